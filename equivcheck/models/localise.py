"""The first diverging layer of a model pair, and a hint at why.

torch: forward hooks on every module record its inputs, keyword arguments and output in
the order the modules finish. JAX: the port's `tap(name, value)`s, recorded on an eager run
(so the layers before an exception still count). Each torch module with a tap of its name
(or `layer_names[name]`) is compared under the forward tolerance; BatchNorm statistics after
a train-mode forward are rows of their own. The first row out of tolerance is the first
diverging layer: every layer that finished before it was within tolerance, so its inputs
were. The hint re-runs that torch module with each known migration slip (the divergences
table's traps: gelu approximation, LayerNorm eps, BatchNorm momentum and running variance,
one-border conv padding, mask polarity; and an untransposed Linear weight, dropout in eval,
LSTM gate order) and names the one that reproduces the port's output.

A tap bounds a divergence on both sides only where the port has one: untapped code before the
first tap (an input scaling) shows at the first tapped layer, and untapped code after the last
(a final scale, activation or head) shows at no layer at all. So "every tapped layer is within
tolerance" is said only with the model's output compared too: when the output differs, the
divergence lies after the last tapped layer, and the text names it.

A port with no taps at all is traced instead (equivcheck.models.trace, .untapped): every torch
module's output is looked up among all the values the port computes.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from equivcheck.engine.compare import compare
from equivcheck.engine.tolerance import Tolerance
from equivcheck.models import mapping as mm
from equivcheck.models.slips import Row, _first_tensor, _stats_hint, hint
from equivcheck.models.tap import first_array


@dataclasses.dataclass
class Localisation:
    rows: list[Row]
    first: Row | None
    hint: str
    text: str
    where: str = ""  # "at layer ln", "at or before layer fc1", "after layer fc2": where the port leaves torch
    output_off: bool = False  # every tapped layer agrees, the model's output does not
    outputs: tuple[Any, Any] = (None, None)  # the model's output on each side (the port's None if it raised)


def localise(pair: Any, model: Any, ents: Sequence[mm.Entry], inputs: Sequence[Any], masks: Mapping[str, Any],
             *, train: bool, seed: int, dtype: str, device: str, tol: Tolerance) -> Localisation:
    """Run both sides once more with every layer recorded; the first divergence and its hint."""
    import torch

    from equivcheck.backends import SideError, deadline
    from equivcheck.backends.torch import to_numpy
    from equivcheck.models.sides import _dropout_hooks, jax_capture, to_torch_args, torch_state

    params, stats = mm.to_jax(ents, torch_state(model))
    seen: list[tuple[str, Any, tuple[Any, ...], dict[str, Any], Any]] = []
    model.train(train)
    masks = dict(masks)
    handles = _dropout_hooks(model, masks, seed, 0)
    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_hook(
                lambda m, a, k, o, name=name: seen.append((name, m, a, dict(k), o)), with_kwargs=True))
    try:
        with torch.no_grad(), deadline.side("torch"):
            t_model = to_numpy(model(*to_torch_args(inputs, device)))
    finally:
        for h in handles:
            h.remove()
    t_stats = mm.to_jax(ents, torch_state(model))[1]
    j_model, taps, exc, j_stats = jax_capture(pair, params, stats, inputs, masks, train, dtype, device)
    bn_of = {e.module: e for e in ents if e.kind == "batch_norm"}
    per_channel = {n: a[0].numel() // a[0].shape[1] for n, _, a, _, _ in reversed(seen)  # the first call's
                   if n in bn_of and a and getattr(a[0], "ndim", 0) > 1}  # values per channel of each BatchNorm

    def stats_row(name: str, module: Any) -> tuple[Row | None, str]:
        if not (train and name in bn_of and j_stats is not None):
            return None, ""
        path = bn_of[name].path
        roles = getattr(bn_of[name], "names", None) or {"mean": "mean", "var": "var"}
        tsub, jsub, old = ({roles.get(k, k): v for k, v in dict(mm.get(tree, path, what)).items()}
                           for tree, what in ((t_stats, "statistics tree"), (j_stats, "port's statistics"),
                                              (stats, "statistics tree")))
        v = compare(tsub, jsub, tol)
        w = v.worst
        row = Row(f"{name} (running stats)", type(module).__name__, w.max_abs if w else 0.0, w.max_rel if w else 0.0,
                  v.ratio, v.ok)
        return row, "" if v.ok else _stats_hint(old, tsub, jsub, module.momentum or 0.1, tol, per_channel.get(name))

    if not taps and exc is None:
        traced = _untapped(pair, params, stats, inputs, masks, train, dtype, device, seen, tol, stats_row, t_model,
                           j_model)
        if traced is not None:
            return dataclasses.replace(_untapped_result(traced), outputs=(t_model, j_model))
    rows: list[Row] = []
    first_hint, untapped = "", []
    for name, module, args, kwargs, out in seen:
        key = pair.layer_names.get(name, name)
        t = _first_tensor(out)
        if key not in taps or t is None:
            untapped.append(name)
            continue
        tn, jn = to_numpy(t), np.asarray(first_array(taps[key]))
        if tn.shape != jn.shape:
            row = Row(name, type(module).__name__, float("inf"), float("inf"), float("inf"), False,
                      note=f"shape: torch {list(tn.shape)}, port {list(jn.shape)}")
        else:
            v = compare(tn, jn, tol)
            w = v.worst
            row = Row(name, type(module).__name__, w.max_abs if w else 0.0, w.max_rel if w else 0.0, v.ratio, v.ok,
                      note="" if v.ok or v.kind == "values" else v.kind)
        rows.append(row)
        if not row.ok and not first_hint:
            first_hint = hint(module, args, kwargs, t, jn, tol) or "-"
        srow, shint = stats_row(name, module)
        if srow is not None:
            rows.append(srow)
            if not srow.ok and not first_hint:
                first_hint = shint or "-"
    first = next((r for r in rows if not r.ok), None)
    if first is not None:
        first.first = True
    parts, where, output_off = [], "", False
    if first is not None:
        before = [r.layer for r in rows[:rows.index(first)]]
        where = f"at layer {first.layer}" if before else f"at or before layer {first.layer}"
        parts.append(f"first diverging layer: {first.layer} ({first.module}): max abs err {first.max_abs:.3g}, "
                     f"max rel err {first.max_rel:.3g}, {first.ratio:.3g} x the tolerance"
                     + (f" [{first.note}]" if first.note else "")
                     + (f"; every tapped layer before it ({', '.join(before[-4:])}) was within tolerance: the "
                        f"divergence is in it or in untapped code between {before[-1]} and it" if before else
                        "; it is the first tapped layer: the divergence is in it or before it, in untapped code "
                        "between the model's input and its tap (an input scaling or preprocessing)"))
        if first_hint and first_hint != "-":
            parts.append(f"hint: {first_hint}")
    if exc is not None:
        err = SideError.from_exc("jax", "forward", exc)
        after = rows[-1].layer if rows else "the start"
        parts.append(f"the port raised after {after}: {err.type}: {err.message} ({err.where})")
    if first is None and exc is None:
        out = compare(t_model, j_model, tol)
        output_off = not out.ok
        if output_off:
            where, text = _after_last(rows, out)
            parts.append(text)
        else:
            parts.append("every tapped layer is within tolerance" + (f" ({len(rows)} rows)" if rows else
                                                                       ": the port taps no layer (models.tap)")
                         + ", and so is the model's output")
    missing = [n for n in untapped if not any(r.layer == n for r in rows)]
    hint_text = first_hint if first_hint not in ("", "-") else ""
    if missing and first is None:
        parts.append(f"layers without a tap: {', '.join(missing[:8])}")
    return Localisation(rows, first, hint_text, "; ".join(parts), where, output_off, (t_model, j_model))


def _untapped(pair: Any, params: Any, stats: Any, inputs: Sequence[Any], masks: Mapping[str, Any], train: bool,
              dtype: str, device: str, seen: Any, tol: Tolerance, stats_row: Any, t_model: Any, j_model: Any) -> Any:
    """equivcheck.models.untapped's rows for a port without taps; None when the port cannot be
    traced (a Python side effect, a value-dependent branch): the taps' text then says so."""
    from equivcheck.models import untapped
    from equivcheck.models.trace import port_values

    try:
        values = port_values(pair, params, stats, inputs, masks, train, dtype, device)
    except Exception:  # noqa: BLE001 (an untraceable port keeps the taps' localisation)
        return None
    out = compare(t_model, j_model, tol)
    return untapped.locate(seen, values, tol, stats_row, out.ok), out


def _untapped_result(traced: Any) -> Localisation:
    (rows, first, hint_text, where, text), out = traced
    output_off = False
    if first is None:
        output_off = not out.ok
        w = out.worst
        by = (f"max abs err {w.max_abs:.3g}, {out.ratio:.3g} x the tolerance" if out.kind == "values" and w
              else out.message.split("\n")[0])
        last = rows[-1].layer if rows else ""
        found = sum(r.ok for r in rows)
        if output_off:
            where = f"after layer {last}" if last else ""
            among = (f"every torch module's output is among the values the port computes ({len(rows)} rows)"
                     if found == len(rows) else f"{found} of {len(rows)} torch modules' outputs are among the values "
                     "the port computes (each of the rest feeds a module that agrees)")
            text = (f"{among}, but the model's output is not ({by}): the divergence lies after the last module "
                    f"{last!r}, in the forward method's code after it or the port's head")
        else:
            text = (f"{found} of {len(rows)} torch modules' outputs are among the values the port computes"
                    + (" (the rest it computes in another form)" if found < len(rows) else "")
                    + ", and the model's output is within tolerance")
    return Localisation(rows, first, hint_text, text, where, output_off)


def _after_last(rows: Sequence[Row], out: Any) -> tuple[str, str]:
    """(where, text) for a model output that differs while every tapped layer agrees."""
    w = out.worst
    by = (f"max abs err {w.max_abs:.3g}, {out.ratio:.3g} x the tolerance" if out.kind == "values" and w
          else out.message.split("\n")[0])
    layers = [r.layer for r in rows if not r.layer.endswith("(running stats)")]
    if not layers:
        return "", (f"the port taps no layer (models.tap) and the model's output differs ({by}): tap its layers "
                    "to localise the divergence")
    last = layers[-1]
    return f"after layer {last}", (
        f"every tapped layer is within tolerance ({len(rows)} rows), but the model's output is not ({by}): the "
        f"divergence lies after the last tapped layer {last!r}, in untapped code between it and the output (a final "
        "scale, activation or head the port computes without a tap)")
