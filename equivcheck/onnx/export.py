"""A torch model exported to ONNX: the exporter torch recommends, a dynamic batch dimension, eval mode.

Every other input dimension is pinned to the model's (the export arguments' size) unless the caller
names it as varying (a sequence length the drawn inputs vary): torch 2.14's `dynamic_shapes` leaves an
axis static when its dict omits it, while `Dim.AUTO` let the exporter keep a Linear's input width
symbolic (`s27`). The written graph's input shapes are checked after export: batch symbolic, the
rest the model's; a graph that is not is that exporter's failure.

torch 2.14 recommends the dynamo-based exporter (`torch.onnx.export(..., dynamo=True)`, which needs
`onnxscript`); a model it cannot export is tried with the TorchScript exporter, and the `Exported`
record names the one that worked and the opset it wrote. The file is written under a temporary name
and renamed into place, so a failed export leaves nothing behind; its error becomes an `ExportError`
naming the model and each exporter's message (the check records "not exportable", the run goes on).
Imports neither pytest nor, until called, torch or onnx.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import io
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["EXTRA_HINT", "ExportError", "Exported", "available", "check_shapes", "export_model", "graph_shapes",
           "input_names", "opset_of"]

# What to install when the optional extra is missing: the skip reason, word for word.
EXTRA_HINT = "pip install equivcheck[onnx]"
# The TorchScript exporter's opset when the dynamo one fails: 17 is the newest it supports fully.
TORCHSCRIPT_OPSET = 17


class ExportError(Exception):
    """The model could not be exported (by either exporter); the message names the model and the errors."""


@dataclasses.dataclass(frozen=True)
class Exported:
    """An ONNX file made from a torch model.

    path           the .onnx file (inside the caller's directory)
    exporter       "dynamo" (torch.onnx.export(dynamo=True)) or "torchscript" (the fallback)
    opset          the default-domain opset of the written graph
    dynamic_batch  whether dimension 0 of every input was exported as a symbol
    shapes         each graph input's shape: ints for pinned dimensions, the symbol's name for dynamic ones
    notes          what else a reader should know (why the fallback ran)
    """

    path: str
    exporter: str
    opset: int
    dynamic_batch: bool = True
    notes: tuple[str, ...] = ()
    shapes: tuple[tuple[int | str, ...], ...] = ()

    def describe(self) -> dict[str, Any]:
        return {"exporter": self.exporter, "opset": self.opset, "dynamic_batch": self.dynamic_batch,
                "shapes": [list(s) for s in self.shapes], "notes": list(self.notes)}


def available() -> str:
    """"" when onnx, onnxscript and onnxruntime import; else the reason to skip (EXTRA_HINT named)."""
    missing = []
    for mod in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(mod)
        except Exception:  # noqa: BLE001 - a broken install is as missing as an absent one
            missing.append(mod)
    return f"{', '.join(missing)} not installed: {EXTRA_HINT}" if missing else ""


def input_names(model: Any, n: int) -> list[str]:
    """The names of the first n parameters of model.forward (what the dynamo exporter calls the graph's
    inputs); `input_<i>` where forward takes *args."""
    try:
        params = [p for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    names = [p.name for p in params[:n]]
    return names + [f"input_{i}" for i in range(len(names), n)]


def _first_line(exc: BaseException) -> str:
    """The error in one line, without terminal colours; the dynamo exporter's ConversionError says only
    which step failed, so its cause (the unsupported operator) is added."""
    def line(e: BaseException) -> str:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().splitlines()
        return f"{type(e).__name__}: {text[0] if text else ''}"

    cause = exc.__cause__ or exc.__context__
    return line(exc) + (f" (caused by {line(cause)})" if cause is not None else "")


def opset_of(path: str) -> int:
    import onnx

    model = onnx.load(path, load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _dynamic_axes(args: tuple[Any, ...], dynamic_batch: bool, varying: Sequence[Sequence[int]]) -> list[set[int]]:
    """Per input, the axes exported as symbols: 0 (when dynamic_batch and the input has one) and
    the input's `varying` axes; every other axis is pinned."""
    out = []
    for i, a in enumerate(args):
        axes = {ax for ax in (varying[i] if i < len(varying) else ()) if 0 < ax < a.ndim}
        out.append(axes | ({0} if dynamic_batch and a.ndim else set()))
    return out


def graph_shapes(path: str) -> list[tuple[int | str, ...]]:
    """Each graph input's shape: an int for a fixed dimension, the symbol's name (or "?") for a dynamic one."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    init = {t.name for t in model.graph.initializer}
    return [tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                  for d in i.type.tensor_type.shape.dim) for i in model.graph.input if i.name not in init]


def check_shapes(shapes: Sequence[tuple[int | str, ...]], args: tuple[Any, ...], dynamic: list[set[int]]) -> None:
    """Raise ValueError unless each graph input shape has the symbols in `dynamic` and the export
    arguments' sizes everywhere else (what a deployment feeds it)."""
    found = []
    if len(shapes) != len(args):
        found.append(f"{len(shapes)} graph inputs for {len(args)} arguments")
    for i, (shape, a, axes) in enumerate(zip(shapes, args, dynamic)):
        if len(shape) != a.ndim:
            found.append(f"input {i} has rank {len(shape)}, the argument {a.ndim}")
            continue
        for ax, (g, m) in enumerate(zip(shape, a.shape)):
            if ax in axes and isinstance(g, int):
                found.append(f"input {i} dimension {ax} is fixed at {g}, exported as dynamic")
            elif ax not in axes and g != m:
                found.append(f"input {i} dimension {ax} is {g!r} in the graph, pinned to {m}")
    if found:
        raise ValueError("the written graph's input shapes are not the model's: " + "; ".join(found))


def _dynamo(model: Any, args: tuple[Any, ...], path: str, dynamic: list[set[int]]) -> None:
    import torch

    dyn = None
    if any(dynamic):
        batch = torch.export.Dim("batch")
        # An axis the dict omits is static (torch.export's dynamic_shapes contract): the model's own
        # size. Varying axes get Dim.AUTO, so the exporter specialises one the model fixes instead of
        # failing; check_shapes then reports it.
        dyn = tuple({ax: batch if ax == 0 else torch.export.Dim.AUTO for ax in sorted(axes)} or None
                    for axes in dynamic)
    torch.onnx.export(model, args, path, dynamo=True, dynamic_shapes=dyn, verbose=False, external_data=False)


def _torchscript(model: Any, args: tuple[Any, ...], path: str, dynamic: list[set[int]]) -> None:
    import torch

    names = input_names(model, len(args))
    axes = {n: {ax: "batch" if ax == 0 else f"{n}_dim{ax}" for ax in sorted(d)} for n, d in zip(names, dynamic) if d}
    # The model's own mode decides the graph's (TRAINING: Dropout with training_mode, BatchNorm on
    # batch statistics); constant folding would fold BatchNorm into the convolution's eval weights.
    mode = torch.onnx.TrainingMode.TRAINING if model.training else torch.onnx.TrainingMode.EVAL
    torch.onnx.export(model, args, path, dynamo=False, input_names=names, opset_version=TORCHSCRIPT_OPSET,
                      dynamic_axes=axes or None, training=mode, do_constant_folding=not model.training)


def export_model(model: Any, args: Sequence[Any], directory: str, name: str, *, dynamic_batch: bool = True,
                 varying: Sequence[Sequence[int]] = (), exporters: Sequence[str] = ("dynamo", "torchscript"),
                 train: bool = False) -> Exported:
    """Export `model` (an nn.Module) called on `args` (torch tensors, batch first) to
    `directory/<name>.onnx`.

    The model runs in eval mode and is put back in the mode it was in. train=True exports the
    training-mode graph (dropout active, BatchNorm on batch statistics: the deployment bug the check
    must catch) with the TorchScript exporter: torch 2.14's dynamo exporter writes the eval-mode
    computation whatever the module's mode (measured on the CNN: its train-mode export matched torch's
    eval output to 2e-7). dynamic_batch=False fixes the batch to that of `args`. `varying[i]`: axes
    (>= 1) of input i left dynamic, the drawn inputs vary them; every other axis is pinned to its
    size in `args`, and the written graph's input shapes must say so (check_shapes). Raises ExportError
    (the model's name and every exporter's error) when no exporter succeeds; nothing is left in
    `directory` then.
    """
    import torch

    runners: dict[str, Callable[..., None]] = {"dynamo": _dynamo, "torchscript": _torchscript}
    if train:
        exporters = ("torchscript",)
    final = os.path.join(directory, f"{name}.onnx")
    was_training = model.training
    errors: list[str] = []
    dynamic = _dynamic_axes(tuple(args), dynamic_batch, varying)
    model.train(train)
    try:
        for exporter in exporters:
            fd, tmp = tempfile.mkstemp(suffix=".onnx.part", dir=directory)
            os.close(fd)
            chatter = io.StringIO()  # the exporters print progress lines: kept for the error message only
            try:
                with contextlib.redirect_stdout(chatter), torch.no_grad():
                    runners[exporter](model, tuple(args), tmp, dynamic)
                opset = opset_of(tmp)
                shapes = graph_shapes(tmp)
                check_shapes(shapes, tuple(args), dynamic)
            except Exception as exc:  # noqa: BLE001 - any exporter failure is a record, not a crash
                with contextlib.suppress(OSError):
                    os.remove(tmp)
                errors.append(f"{exporter}: {_first_line(exc)}"[:600])
                continue
            os.replace(tmp, final)  # atomic: a reader sees the whole file or none
            notes = tuple(f"the dynamo exporter failed ({e})" for e in errors)
            return Exported(final, exporter, opset, dynamic_batch, notes, tuple(shapes))
    finally:
        model.train(was_training)
    raise ExportError(f"model {name!r} is not exportable to ONNX: " + "; ".join(errors))
