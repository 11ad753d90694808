"""The `onnx` check of a layer pair: the torch function exported to ONNX, run in ONNX Runtime, three ways.

A layer pair's torch side is a function of arrays (the input, the weights in torch layout, indices,
masks) and static hyperparameters, so the exported graph takes all its arrays as graph inputs: the
weights are fed like the input, the same drawn values every side gets. One export per layer and
dtype and combination of `Static` arguments drawn (cached for the process with its InferenceSession),
at one shape of the forward check's palette (the largest: the first is the all-ones minimum), every
dimension pinned; the examples draw the static values as the forward check does (a stride, a padding
mode: each a graph of its own) and array values at that shape, through the engine's
`evaluate` (torch and JAX forward as the forward check runs them), and three_way compares the three
under the table's forward tolerance. The float64 arbiter is the pair's NumPy `reference` where it
has one, else torch on float64 inputs. This check judges the ONNX side: an example where the
arbiter names torch or jax alone (ONNX Runtime with the other) is counted and noted, not failed, as
the forward check judges torch against jax with its acceptance rules and known divergences (the
trap pairs' deliberately naive ports fail there, not twice).

Only the dynamo exporter is tried (torch's recommended one; the TorchScript fallback would add a
second export to every layer that fails, in a check whose cost is its exports): a layer it cannot export is a skip of kind "not-exportable" with the
exporter's message. float32 only, as the model check.
"""
from __future__ import annotations

import collections
import time
from typing import Any

import numpy as np

from equivcheck.engine.compare import format_args
from equivcheck.engine.records import CheckRecord, RunSettings
from equivcheck.engine.search import Search
from equivcheck.engine.tolerance import Tolerance
from equivcheck.onnx.check import FLOAT64_SKIP, Failed, directory
from equivcheck.onnx.export import Exported, ExportError, available, export_model
from equivcheck.onnx.session import DeviceUnavailable, Graph, LoadError
from equivcheck.onnx.threeway import ThreeWay, summary, three_way

__all__ = ["run_layer_onnx", "vote"]

# (pair name, dtype, device, shape) -> (Exported, Graph, torch's output structure, statics) or the error
_CACHE: dict[tuple[Any, ...], tuple[Exported, Graph, Any, dict[int, Any]] | Exception] = {}


def _statics_text(named: dict[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in named.items()) or "no static arguments"


def _module(pair: Any, statics: dict[int, Any], n: int) -> Any:
    """An nn.Module whose forward(*arrays) is pair.torch_fn with the static values put back in place."""
    import torch

    class Layer(torch.nn.Module):
        def forward(self, *arrays: Any) -> Any:
            it = iter(arrays)
            return pair.torch_fn(*(statics[k] if k in statics else next(it) for k in range(n)))

    return Layer().eval()


def _prepare(pair: Any, args: tuple[Any, ...], dtype: str, device: str) -> tuple[Exported, Graph, Any, dict[int, Any]]:
    """Export (dynamo only, every dimension pinned) and load the layer at `args`' shapes, once per key.
    Raises ExportError (the exporter's message), LoadError or DeviceUnavailable, cached as the outcome."""
    import torch
    from torch.utils import _pytree

    from equivcheck.ops.strategies import Static

    statics = {k: a for k, (s, a) in enumerate(zip(pair.inputs.args, args)) if isinstance(s, Static)}
    arrays = [a for k, a in enumerate(args) if k not in statics]
    key = (pair.name, dtype, device, tuple(np.shape(a) for a in arrays), tuple(sorted(statics.items())))
    if key not in _CACHE:
        try:
            tensors = tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)
            model = _module(pair, statics, len(args))
            with torch.no_grad():
                spec = _pytree.tree_structure(model(*tensors))
            exported = export_model(model, tensors, directory(), f"layer-{pair.name}-{dtype}-{len(_CACHE)}".replace("/", "_"),
                                    dynamic_batch=False, exporters=("dynamo",))
            _CACHE[key] = (exported, Graph(exported.path, device), spec, statics)
        except (ExportError, LoadError, DeviceUnavailable) as exc:
            _CACHE[key] = exc
        except Exception as exc:  # noqa: BLE001 - torch_fn itself failing on the export arguments
            _CACHE[key] = ExportError(f"layer {pair.name!r} is not exportable to ONNX: {type(exc).__name__}: {exc}")
    got = _CACHE[key]
    if isinstance(got, Exception):
        raise got
    return got


def _widen(args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(a.astype(np.float64) if isinstance(a, np.ndarray) and a.dtype.kind == "f" else a for a in args)


def _reference(pair: Any, args: tuple[Any, ...], device: str) -> Any:
    """The float64 forward: the pair's NumPy reference, else torch on the inputs widened to float64."""
    from equivcheck.ops.autodiff import evaluate

    wide = _widen(args)
    if pair.reference is not None:
        return pair.reference(*wide)
    ev = evaluate(pair, wide, 0, dtype="float64", device=device, checks=["forward"])
    if ev.torch.errors.get("forward"):
        raise RuntimeError(ev.torch.errors["forward"].describe())
    return ev.torch.values["forward"]


def vote(rec: CheckRecord) -> str:
    """What ONNX Runtime's output said where torch and jax disagreed (rec.extra["torch_jax_only"]),
    e.g. "ONNX Runtime agrees with torch in 4 of 5 examples ...", or "" when they never disagreed.
    The forward check alone cannot always name a side; this third implementation is evidence for it."""
    counts = rec.extra.get("torch_jax_only") or {}
    parts = []
    for side, n in sorted(counts.items(), key=lambda kv: -kv[1]):
        off = side.split("+")
        with_ = [s for s in ("torch", "jax") if s not in off]
        who = f"agrees with {with_[0]}" if with_ else "is nearer the float64 reference than torch and jax"
        parts.append(f"ONNX Runtime {who} in {n} of {rec.examples} example{'s' if rec.examples != 1 else ''}; in "
                     f"those torch and jax disagree and {' and '.join(off)} {'is' if len(off) == 1 else 'are'} off "
                     "against the float64 reference")
    return "; ".join(parts)


def run_layer_onnx(pair: Any, dtype: str, run: RunSettings, tol: Tolerance, palette: list[Any] | None) -> CheckRecord:
    """The `onnx` record of layer `pair` at `dtype` on `run.device`: torch vs ONNX Runtime vs JAX.

    `palette`: the forward check's shape tuples (one shape per array argument); the last one is
    exported (None: the pair's minimal shapes). Outcomes as the model check's (equivcheck.onnx.check):
    skipped (extra missing, float64, no provider, kind "not-exportable" with the exporter's message),
    failed (kind "error" naming the side that raised or the file that does not load, "values" when
    the three disagree: `side` is the one off, or several "+"-joined), passed. rec.extra: exporter,
    opset, the exported shapes, the static values of every graph made (and those refused), and per pair of sides the worst ratio and
    largest absolute difference.
    """
    from hypothesis import strategies as st

    from equivcheck.ops.autodiff import CHECKS, evaluate
    from equivcheck.ops.strategies import Static

    start = time.perf_counter()
    rec = CheckRecord(pair.name, "onnx", dtype, run.device, run.precision, "passed", tags=sorted(pair.tags),
                      tolerance={"rtol": tol.rtol, "atol": tol.atol, "per": tol.per, "reason": tol.reason})

    def done(outcome: str = "", message: str = "", kind: str = "", side: str | None = None) -> CheckRecord:
        if outcome:
            rec.outcome, rec.message, rec.kind, rec.side = outcome, message, kind, side
            rec.worst_ratio = float("inf") if outcome == "failed" else rec.worst_ratio
        rec.seconds = time.perf_counter() - start
        return rec

    reason = available() or (FLOAT64_SKIP if dtype != "float32" else "")
    if reason:
        return done("skipped", reason)
    inputs = pair.inputs
    shapes = (palette or [inputs.shapes.minimal()])[-1]
    strategy = st.tuples(inputs.strategy(dtype, [shapes]), st.integers(0, 2**31 - 1))
    # the forward check's own checks: its compiled JAX program (keyed by the checks) is reused
    checks = [c for c in CHECKS if c in pair.checks] or ["forward"]
    seen: list[ThreeWay] = []
    elsewhere: collections.Counter[str] = collections.Counter()  # side named off without onnx -> examples
    # those examples' outcomes: not this check's verdict, but its torch-jax figures (pairs) cover them
    judged: list[ThreeWay] = []
    refused: dict[str, Exception] = {}  # static values (as recorded) -> why their graph could not be made
    exports: list[dict[str, str]] = []  # the static values of every graph made, in the order first drawn

    def test(example: tuple[tuple[Any, ...], int]) -> None:
        args, vec_seed = example
        named = {pair.arg_names[k] if pair.arg_names else str(k): repr(a)
                 for k, (spec_k, a) in enumerate(zip(pair.inputs.args, args)) if isinstance(spec_k, Static)}
        try:
            exported, graph, spec, statics = _prepare(pair, args, dtype, run.device)
        except LoadError as exc:
            raise Failed(str(exc), "error", "onnx", "", args, None) from exc
        except (ExportError, DeviceUnavailable) as exc:
            # no failure to shrink: the export is per shape and static values, which examples share (cached)
            refused[_statics_text(named)] = exc
            return
        if named not in exports:
            exports.append(named)
        rec.extra.update(exporter=exported.exporter, opset=exported.opset, onnx=exported.describe(),
                         statics=exports)
        ev = evaluate(pair, args, vec_seed, dtype=dtype, device=run.device, checks=checks)
        for side in (ev.torch, ev.jax):
            if side.errors.get("forward"):
                raise Failed(side.errors["forward"].describe(), "error", side.errors["forward"].side, "", args, None)
        try:
            o = graph.run([a for k, a in enumerate(args) if k not in statics])
        except Exception as exc:
            raise Failed(f"ONNX Runtime raised {type(exc).__name__}: {exc}", "error", "onnx", "", args, None) from exc
        from torch.utils import _pytree

        outs = {"torch": ev.torch.values["forward"], "onnx": _pytree.tree_unflatten(o, spec),
                "jax": ev.jax.values["forward"]}
        tw = three_way(outs, tol, lambda: _reference(pair, args, run.device))
        if not tw.ok and tw.side and "onnx" not in tw.side.split("+"):
            # torch against jax alone: the forward check's finding, judged there with its acceptance
            # rules (ill-conditioned, low precision) and known divergences (the trap pairs' ports)
            elsewhere[tw.side] += 1
            judged.append(tw)
            return
        if not tw.ok:
            raise Failed(tw.message, "values", tw.side, tw.how, args, tw)
        seen.append(tw)

    failed = Search(run, Failed)(test, strategy, digest=f"{pair.name}:onnx:{dtype}",
                                  seed=run.item_seed(pair.name, "onnx", dtype, run.device))
    if refused and not (seen or judged or failed):
        first = next(iter(refused.values()))
        kind = "not-exportable" if isinstance(first, ExportError) else ""
        return done("skipped", f"not exportable: {first}" if kind else str(first), kind)
    rec.notes += [f"not exportable with {values}: {exc}" for values, exc in refused.items()]
    if refused:
        rec.extra["statics_refused"] = {values: str(exc) for values, exc in refused.items()}
    rec.examples = len(seen) + sum(elsewhere.values()) + bool(failed)
    rec.extra["torch_jax_only"] = dict(elsewhere)
    rec.notes += [f"{n} examples where torch and jax disagree, {side} off against the float64 reference and ONNX "
                  f"Runtime with the other: the forward check's finding, not this check's" for side, n in elsewhere.items()]
    # a passed record's notes reach neither the terminal nor the .md: the vote is its message too
    rec.message = vote(rec)
    rec.worst_ratio, _, rec.max_abs_err = summary(seen)
    # every example counted: a torch-jax max_abs of 0.0 over the agreeing ones alone read as no difference
    rec.extra["pairs"] = summary(seen + judged)[1]
    if failed is not None:
        rec.diagnosis = failed.how
        rec.inputs = format_args(failed.args)
        return done("failed", failed.message, failed.kind, failed.side)
    return done()
