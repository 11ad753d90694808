"""The first diverging torch module of a port that has no taps.

Every torch module's output (forward hooks, in the order the modules finish) is looked up
among the values the port computes (equivcheck.models.trace). The first module whose output
the port never computes, while its inputs are among the port's values, is where the port
leaves torch: everything it was given agrees, what it gives does not.

Two refinements keep a correct computation from being named:
- a port need not materialise every module's output in torch's form (a fused bias, a
  folded scale): when a module that consumes an unmatched output is itself matched, the
  unmatched output did not carry a divergence, and is passed over;
- an unmatched module whose inputs are unmatched too, with no module before it to blame,
  means the divergence sits in code outside any torch module (the forward method's own
  arithmetic: a residual sum, a reshape): it is named "at or before" that module.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from equivcheck.engine.tolerance import Tolerance
from equivcheck.models.trace import Found, Matcher

HOW = "located without taps: each torch module's output looked up among the {n} values the port computes"


def _tensors(args: Any, kwargs: Any) -> Iterator[Any]:
    import torch

    stack = [*args, *kwargs.values()]
    while stack:
        a = stack.pop(0)
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (tuple, list)):
            stack[:0] = list(a)


def locate(seen: Sequence[tuple[str, Any, tuple[Any, ...], dict[str, Any], Any]], values: Sequence[Any],
           tol: Tolerance, stats_row: Callable[[str, Any], tuple[Any, str]],
           output_ok: bool) -> tuple[list[Any], Any, str, str, str]:
    """(rows, first row or None, hint, where, text) for `localise`; `seen` as its hooks record
    it, `stats_row(name, module)` the running-statistics row of a BatchNorm module (or None).
    With the model's output within tolerance (`output_ok`) an output the port never computes
    is one it computes in another form, not a divergence: no module is named then (only
    running statistics can be)."""
    from equivcheck.backends.torch import to_numpy
    from equivcheck.models.localise import Row, _first_tensor, hint

    match = Matcher(values, tol)
    cache: dict[int, Found] = {}

    def look(t: Any) -> Found:
        if id(t) not in cache:
            cache[id(t)] = match.find(to_numpy(t))
        return cache[id(t)]

    producer: dict[int, str] = {}
    found: dict[str, Found] = {}
    inputs_ok: dict[str, bool] = {}
    healed: set[str] = set()
    rows: list[Any] = []
    extra: dict[str, tuple[Any, str]] = {}
    for name, module, args, kwargs, out in seen:
        t = _first_tensor(out)
        if t is None or not t.is_floating_point():
            continue
        ins = [a for a in _tensors(args, kwargs) if a.is_floating_point()]
        f = found[name] = look(t)
        inputs_ok[name] = all(look(a).ok for a in ins)
        if f.ok:
            healed.update(producer[id(a)] for a in ins if id(a) in producer and not found[producer[id(a)]].ok)
        producer.setdefault(id(t), name)
        note = ("" if f.ok and not f.layout else f.layout) if f.value is not None else "no port value of this size"
        rows.append(Row(name, type(module).__name__, f.max_abs, f.max_rel, f.ratio, f.ok, note=note))
        srow, shint = stats_row(name, module)
        if srow is not None:
            rows.append(srow)
            extra[srow.layer] = (srow, shint)
    modules = {name: (module, args, kwargs, out) for name, module, args, kwargs, out in seen}
    off = [r for r in rows if not r.ok and r.layer not in healed and r.layer not in extra]
    if output_ok:
        for r in off:
            r.note = f"{r.note}; not among the port's values in torch's form, but the model's output agrees".lstrip("; ")
        off = []
    first = off[0] if off else None
    at_or_before = first is not None and not inputs_ok[first.layer]
    stats_first = next((r for r in rows if r.layer in extra and not r.ok), None)
    if first is None and stats_first is not None:
        first = stats_first
    how = HOW.format(n=len(match))
    if first is None:
        return rows, None, "", "", ""
    first.first = True
    if first.layer in extra:
        h = extra[first.layer][1]
        text = (f"first diverging layer: {first.layer} ({first.module}): every module's output agrees, its "
                f"running statistics do not (max abs err {first.max_abs:.3g}); {how}")
        return rows, first, h, f"at layer {first.layer.split(' ')[0]}", text + (f"; hint: {h}" if h else "")
    module, args, kwargs, out = modules[first.layer]
    f = found[first.layer]
    closest = (f"closest: {f.layout}, max abs err {f.max_abs:.3g}, {f.ratio:.3g} x the tolerance"
               if f.value is not None else "the port computes no value of its size")
    before = [r.layer for r in rows[:rows.index(first)] if r.ok]
    if at_or_before:
        where = f"at or before layer {first.layer}"
        text = (f"first diverging layer: at or before {first.layer} ({first.module}): neither its output nor its "
                f"input is among the port's values ({closest}); the divergence is in code outside the torch modules "
                f"that feeds it (the forward method's own arithmetic: a residual sum, a reshape, a scaling)"
                + (f", after {before[-1]}" if before else ""))
    else:
        where = f"at layer {first.layer}"
        text = (f"first diverging layer: {first.layer} ({first.module}): its inputs are among the port's values, "
                f"its output is not ({closest})")
    t = _first_tensor(out)
    h = hint(module, args, kwargs, t, f.value if f.value is not None else to_numpy(t), tol,
             same=lambda y: match.find(to_numpy(y)).ok)
    text += f"; {how}" + (f"; hint: {h}" if h else "")
    return rows, first, h, where, text
