"""The `onnx` model check: torch, its ONNX export run in ONNX Runtime, and the JAX port, three ways.

Inputs are drawn as the `forward` check draws them (the same shape palette, so the port's compiled
forward programs are reused). The weights are one checkpoint per run: the torch model built under
torch.manual_seed(s), s from the run's seed, because the ONNX file carries its weights as the
deployed artefact does (a graph fed other weights would hide an export of the wrong checkpoint), and
exporting once per model and dtype keeps the check cheap (an export takes seconds, a session run
milliseconds). Exports and sessions are cached for the process.

float32 only: ONNX Runtime's float64 kernel coverage is partial (a deployment runs float32 anyway),
so a float64 record is skipped with that reason (not measured per model here); the float32 record holds the three-way comparison, and
torch's float64 forward is the reference when the three disagree.
"""
from __future__ import annotations

import atexit
import copy
import functools
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np

from equivcheck.engine.compare import format_args, leaves
from equivcheck.engine.records import CheckRecord, RunSettings
from equivcheck.engine.search import Search
from equivcheck.engine.tolerance import Tolerance
from equivcheck.models import mapping as mm
from equivcheck.models import sides as ms
from equivcheck.onnx.export import Exported, ExportError, available, export_model, input_names
from equivcheck.onnx.intermediates import first_departure, layer_rows, module_values, with_outputs
from equivcheck.onnx.session import DeviceUnavailable, Graph, GraphMismatch, LoadError
from equivcheck.onnx.threeway import ThreeWay, summary, three_way

__all__ = ["FLOAT64_SKIP", "Failed", "directory", "run_onnx_check", "varying_axes"]

FLOAT64_SKIP = ("the onnx check runs at float32 only (ONNX Runtime's float64 kernel coverage is partial, so models "
                "are exported and run at float32); the float32 record holds the three-way comparison")
PALETTE = 2  # as the forward check (equivcheck.models.runner.PALETTE): the same shapes, compiled once

_DIR: str | None = None
# (pair name, dtype, device, weight seed, export function) -> (Exported, Graph) or the error met
_CACHE: dict[tuple[Any, ...], tuple[Exported, Graph] | Exception] = {}
# exported file -> (its copy with every module's output exposed, in a session; module -> value names)
_LAYERS: dict[str, tuple[Graph | None, dict[str, list[str]]]] = {}


class Failed(Exception):
    """Raised inside the Hypothesis search so that it shrinks: the failing example and the evidence."""

    def __init__(self, message: str, kind: str, side: str | None, how: str, args: Any, tw: ThreeWay | None) -> None:
        super().__init__(message)
        self.message, self.kind, self.side, self.how, self.args, self.tw = message, kind, side, how, args, tw


def directory() -> str:
    """One temporary directory per process for the exported files, removed at exit."""
    global _DIR
    if _DIR is None:
        _DIR = tempfile.mkdtemp(prefix="equivcheck-onnx-")
        atexit.register(shutil.rmtree, _DIR, True)
    return _DIR


def _export_args(pair: Any, palette: list[Any], dtype: str, seed: int) -> list[np.ndarray]:
    """Model inputs to export with: drawn like an example, their batch set to a size none of the
    palette's shapes has, so a batch size fixed at export shows on every drawn example (and >= 2:
    the exporter specialises a dimension of size 1)."""
    rng = np.random.default_rng(seed)
    arrays = ms.numpy_batch(pair.inputs, palette[0], dtype, rng)[:-1]
    drawn = {s[0][0] for s in palette if s and s[0]}
    batch = next(b for b in range(2, 64) if b not in drawn)
    return [np.resize(a, (batch, *np.shape(a)[1:])).astype(a.dtype) for a in arrays]


def varying_axes(palette: list[Any], n: int) -> list[tuple[int, ...]]:
    """Per model input (the first n arrays of each palette shape tuple), the axes >= 1 whose size
    differs between the palette's shapes (a sequence length): the export leaves those dynamic and
    pins every other one."""
    out = []
    for i in range(n):
        shapes = [s[i] for s in palette if len(s) > i]
        rank = min((len(s) for s in shapes), default=0)
        out.append(tuple(ax for ax in range(1, rank) if len({s[ax] for s in shapes}) > 1))
    return out


def _prepare(pair: Any, model: Any, args: list[np.ndarray], dtype: str, device: str, seed: int,
             varying: list[tuple[int, ...]]) -> tuple[Exported, Graph]:
    own: Callable[..., Exported] | None = pair.onnx_export
    export = own or functools.partial(export_model, varying=varying)
    key = (pair.name, dtype, device, seed, own or export_model)
    if key not in _CACHE:
        try:
            # a copy: tracing runs forward, which in train mode would move BatchNorm's running statistics
            # of the model torch's side then runs (found by the train-mode planted bug)
            exported = export(copy.deepcopy(model), ms.to_torch_args(args, "cpu"), directory(),
                              f"{pair.name}-{dtype}-{seed}")
            _CACHE[key] = (exported, Graph(exported.path, device))
        except (ExportError, LoadError, DeviceUnavailable) as exc:
            _CACHE[key] = exc
        except Exception as exc:  # noqa: BLE001 - a user's export function's own failure: not exportable
            _CACHE[key] = ExportError(f"model {pair.name!r} is not exportable to ONNX: {type(exc).__name__}: {exc}")
    got = _CACHE[key]
    if isinstance(got, Exception):
        raise got
    return got


def _skip(rec: CheckRecord, message: str, kind: str = "") -> None:
    rec.outcome, rec.message, rec.kind, rec.examples = "skipped", message, kind, 0


def run_onnx_check(pair: Any, rec: CheckRecord, ents: list[mm.Entry], dtype: str, run: RunSettings,
                   tol: Tolerance) -> None:
    """Fill `rec` (check "onnx") for `pair` at `dtype` on `run.device`.

    Outcomes: skipped (the extra not installed: "pip install equivcheck[onnx]"; float64; no ONNX
    Runtime provider for the device; the model not exportable, kind "not-exportable", with the
    exporters' messages), failed (kind "error" for a file that does not load, "structure" for a graph
    that does not fit the model, "values" when the three disagree; `side` names the one off:
    torch, onnx or jax), passed. rec.extra holds exporter, opset, the graph's input shapes, each pair's
    worst ratio and largest absolute difference over the passing examples, and `layers`: per torch
    module the graph exposes, torch vs onnx vs jax on one example (_layer_columns); a values failure's
    diagnosis names the first layer where onnx departs from torch (extra.onnx_first_layer).
    """
    reason = available()
    if reason:
        return _skip(rec, reason)
    if dtype != "float32":
        return _skip(rec, FLOAT64_SKIP)
    seed = run.item_seed(pair.name, "onnx", dtype, run.device) % 2**16
    palette = pair.inputs.palette(run.shape_seed(pair.name, "forward", dtype, run.device), PALETTE)
    try:
        model = ms.build_torch(pair, seed, dtype, "cpu")  # exported from the CPU copy: the file is device-free
        params, stats = mm.to_jax(ents, ms.torch_state(model))
        args = _export_args(pair, palette, dtype, seed)
    except Exception as exc:  # noqa: BLE001 - the forward check reports this too; here it stops the check
        rec.outcome, rec.kind, rec.side, rec.worst_ratio = "failed", "error", "torch", float("inf")
        rec.message = f"building the torch model for export failed: {type(exc).__name__}: {exc}"
        return None
    try:
        exported, graph = _prepare(pair, model, args, dtype, run.device, seed, varying_axes(palette, len(args)))
    except ExportError as exc:
        return _skip(rec, f"not exportable: {exc}", "not-exportable")
    except DeviceUnavailable as exc:
        return _skip(rec, str(exc))
    except LoadError as exc:
        rec.outcome, rec.kind, rec.side, rec.message, rec.worst_ratio = "failed", "error", "onnx", str(exc), float("inf")
        return None
    rec.extra.update(exporter=exported.exporter, opset=exported.opset, onnx=exported.describe(),
                     weights=f"torch.manual_seed({seed})")
    rec.notes += list(exported.notes)
    names = input_names(model, len(args))
    # names are checked only where forward names its arguments (a *args forward has no names to hold)
    names_or_none = None if pair.keywords or any(n.startswith("input_") for n in names) else names
    device_model = ms.build_torch(pair, seed, dtype, run.device) if run.device != "cpu" else model
    wide: dict[str, Any] = {}
    seen: list[ThreeWay] = []
    last: list[list[Any]] = []  # the last passing example's inputs: the per-layer columns' example

    def reference(x: list[Any]) -> Any:
        if "model" not in wide:
            wide["model"] = ms.build_torch(pair, seed, "float64", "cpu")
        x64 = [np.asarray(a, np.float64) if np.asarray(a).dtype.kind == "f" else a for a in x]
        return leaves(ms.torch_forward(wide["model"], x64, train=False, seed=seed, device="cpu")[0])

    def test(example: tuple[Any, ...]) -> None:
        x = list(example[:-1])
        try:
            t_out, masks = ms.torch_forward(device_model, x, train=False, seed=seed, device=run.device)
        except Exception as exc:
            raise Failed(f"torch raised {type(exc).__name__}: {exc}", "error", "torch", "", example, None) from exc
        t = leaves(t_out)
        try:
            graph.validate(x, names_or_none, [np.ndim(a) for a in t])
            o = graph.run(x)
        except GraphMismatch as exc:
            raise Failed(str(exc), "structure", "onnx", "the graph does not fit the model", example, None) from exc
        except Exception as exc:
            raise Failed(f"ONNX Runtime raised {type(exc).__name__}: {exc}", "error", "onnx", "", example,
                         None) from exc
        try:
            j_out, _ = ms.run_jax(pair, "forward_eval", dtype, run.device, params, stats, x, masks)
        except Exception as exc:
            raise Failed(f"the port raised {type(exc).__name__}: {exc}", "error", "jax", "", example, None) from exc
        tw = three_way({"torch": t, "onnx": o, "jax": leaves(j_out)}, tol, lambda: reference(x))
        if not tw.ok:
            raise Failed(tw.message, "values", tw.side, tw.how, example, tw)
        seen.append(tw)
        last[:] = [x]

    strategy = pair.inputs.strategy(dtype, palette)
    search = Search(run, Failed)
    failed = search(test, strategy, digest=f"model:{pair.name}:onnx:{dtype}",
                    seed=run.item_seed(pair.name, "forward", dtype, run.device))
    rec.examples = len(seen) + bool(failed)
    rec.worst_ratio, rec.extra["pairs"], rec.max_abs_err = summary(seen)
    if failed is not None:
        rec.outcome, rec.kind, rec.side, rec.message = "failed", failed.kind, failed.side, failed.message
        rec.diagnosis = failed.how
        rec.inputs = f"{format_args(failed.args)}; weights from torch.manual_seed({seed})"
        worst = max((v.worst for v in failed.tw.verdicts.values() if v.worst), key=lambda w: w.ratio,
                    default=None) if failed.tw else None
        rec.worst_ratio = worst.ratio if worst else float("inf")
        if worst is not None:
            rec.max_abs_err, rec.max_rel_err, rec.max_ulp = worst.max_abs, worst.max_rel, worst.max_ulp
    x = list(failed.args[:-1]) if failed is not None and failed.kind == "values" else (last[0] if last else None)
    if x is not None and not pair.keywords:  # a keyword input is no positional graph input to feed by order
        _layer_columns(rec, pair, model, exported, x, (params, stats), dtype, run.device, tol)
    return None


def _layer_columns(rec: CheckRecord, pair: Any, model: Any, exported: Exported, x: list[Any], port: tuple[Any, Any],
                   dtype: str, device: str, tol: Tolerance) -> None:
    """rec.extra["layers"]: per torch module the graph exposes, torch vs ONNX Runtime vs the port's tap
    (equivcheck.onnx.intermediates.layer_rows) on the example `x` (the failing one, else the last);
    on a failure the first layer where ONNX leaves torch is named in rec.diagnosis. A graph without
    module names, or any error making the columns, is a note: the three-way verdict stands without them."""
    import onnx

    try:
        if exported.path not in _LAYERS:
            modules = [n for n, _ in model.named_modules() if n]
            values = module_values(onnx.load(exported.path, load_external_data=False), modules)
            copy_path = with_outputs(exported.path, values)[0] if values else ""
            _LAYERS[exported.path] = (Graph(copy_path, device) if values else None, values)
        layer_graph, values = _LAYERS[exported.path]
        if layer_graph is None:
            rec.notes.append("no per-layer columns: the graph's nodes carry no torch module names "
                             "(pkg.torch.onnx.name_scopes)")
            return
        _, taps, _, _ = ms.jax_capture(pair, *port, x, {}, False, dtype, device)
        rows = layer_rows(model.eval(), layer_graph.session, layer_graph.feed(x), values, ms.to_torch_args(x, "cpu"),
                          taps, pair.layer_names, tol)
    except Exception as exc:  # noqa: BLE001 - advice only: the three-way verdict stands without the columns
        rec.notes.append(f"per-layer columns not made: {type(exc).__name__}: {exc}")
        return
    rec.extra["layers"] = rows
    first = first_departure(rows)
    if first is not None and rec.outcome == "failed":
        cell = first["torch-onnx"]
        num = lambda x: x if isinstance(x, str) else f"{x:.3g}"  # "inf" is written as a string
        rec.diagnosis += (f"; first layer where onnx departs from torch: {first['layer']} ({first['module']}), max abs "
                          f"err {num(cell['max_abs'])}, {num(cell['ratio'])} x the tolerance")
        rec.extra["onnx_first_layer"] = first["layer"]

