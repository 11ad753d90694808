"""`python -m equivcheck onnx MODEL.onnx --torch module:factory [--jax module:apply]`: an ONNX file
exported elsewhere, checked against the torch model it was exported from (and the JAX port) outside pytest.

The inputs come from the graph itself (a file exported elsewhere has no Inputs spec): each graph input's
element type and shape, fixed dimensions as given, a dynamic first dimension set to --batch and other
dynamic ones to small sizes, drawn from a seeded NumPy generator. Everything is compared by the engine's
`compare` under the tolerance table's forward bound (equivcheck.onnx.threeway), as the pytest `onnx`
check does. `run` raises BadInput (exit 2, one line naming the file, torch or jax) for what keeps the
question from being asked; otherwise it returns 0 (all agree) or 1 (a side is off).
"""
from __future__ import annotations

import copy
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from equivcheck.engine.compare import is_float, leaves
from equivcheck.engine.tolerance import BASE, lookup

__all__ = ["FLOAT_RANGE", "INT_RANGE", "BadInput", "draw_inputs", "load_callable", "parse_dims", "run"]

FLOAT_RANGE = (-3.0, 3.0)  # float inputs: uniform here (activations of a normalised input)
INT_RANGE = (0, 10)  # integer inputs: [0, 10), valid token ids / indices for any vocabulary of 10 or more
SMALL = (2, 6)  # other dynamic dimensions: [2, 6); 1 is avoided, the exporters specialise a dimension of size 1
# compare()'s verdict kinds that say the outputs do not even line up: bad input, not a side that is off
LAYOUT = ("structure", "shape")
_FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16}
_INT_TYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16,
              "tensor(int8)": np.int8, "tensor(uint8)": np.uint8}


class BadInput(Exception):
    """The check cannot run; the message is the one line to print (it names the file, torch or jax)."""


def load_callable(spec: str, option: str) -> Callable[..., Any]:
    """The callable named by `spec`, "pkg.mod:name" (imported) or "path/to/file.py:name" (run from the
    file). Raises BadInput naming `option` when spec is malformed, the module does not import, or the
    name is missing or not callable."""
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise BadInput(f"{option} {spec}: expected module:callable or path/to/file.py:callable")
    try:
        if where.endswith(".py") or os.sep in where or "/" in where:
            if not os.path.isfile(where):
                raise BadInput(f"{option} {spec}: {where} does not exist")
            mod_name = f"_equivcheck_cli_{os.path.splitext(os.path.basename(where))[0]}"
            loader = importlib.util.spec_from_file_location(mod_name, where)
            if loader is None or loader.loader is None:
                raise BadInput(f"{option} {spec}: {where} is not a Python file")
            module = importlib.util.module_from_spec(loader)
            sys.modules[mod_name] = module  # before running it: dataclasses and pickling look it up there
            loader.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except BadInput:
        raise
    except (Exception, SystemExit) as exc:  # any failure of the user's module, sys.exit() too; not Ctrl-C
        raise BadInput(f"{option} {spec}: cannot import {where}: {_one_line(exc)}") from exc
    fn = getattr(module, name, None)
    if fn is None:
        raise BadInput(f"{option} {spec}: {where} has no {name!r}")
    if not callable(fn):
        raise BadInput(f"{option} {spec}: {name} is a {type(fn).__name__}, not callable")
    return fn


def _one_line(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}"[:400]


def parse_dims(values: list[str], specs: list[tuple[str, list[Any], str]]) -> dict[Any, int]:
    """--dim values, "SYMBOL=SIZE" (a dynamic dimension's name in the graph, e.g. s27 or batch) or
    "INPUT:AXIS=SIZE", as {symbol or (input, axis): size}. Raises BadInput for a malformed value, a size
    below 1, or a name the graph does not have."""
    symbols = {d for _, shape, _ in specs for d in shape if isinstance(d, str)}
    ranks = {name: len(shape) for name, shape, _ in specs}
    shapes = {name: shape for name, shape, _ in specs}
    out: dict[Any, int] = {}
    for value in values:
        key, _, size = value.rpartition("=")
        if not key or not size.isdigit() or int(size) < 1:
            raise BadInput(f"--dim {value}: expected SYMBOL=SIZE or INPUT:AXIS=SIZE, SIZE a positive integer")
        name, colon, axis = key.rpartition(":")
        if colon and axis.isdigit():
            if name not in ranks or int(axis) >= ranks[name]:
                raise BadInput(f"--dim {value}: the ONNX file has no input {name!r} with an axis {axis} "
                               f"(inputs: {', '.join(f'{n} rank {r}' for n, r in ranks.items())})")
            pinned = shapes[name][int(axis)]
            # a size the graph pins otherwise would run at the graph's size or fail in ONNX Runtime, and
            # be blamed on a side; the same size is harmless
            if isinstance(pinned, int) and pinned >= 0 and pinned != int(size):
                raise BadInput(f"--dim {value}: {name} axis {axis} is fixed at {pinned} in the graph")
            out[(name, int(axis))] = int(size)
        elif key in symbols:
            out[key] = int(size)
        elif colon and name in ranks:
            # "x:a=4": an input's name and a non-numeric axis, not a symbol the graph lacks
            raise BadInput(f"--dim {value}: the axis {axis!r} of input {name!r} must be an integer "
                           f"(INPUT:AXIS=SIZE, AXIS from 0 to {ranks[name] - 1})")
        else:
            raise BadInput(f"--dim {value}: the ONNX file has no dynamic dimension {key!r} "
                           f"(its dynamic dimensions: {', '.join(sorted(symbols)) or 'none'})")
    return out


def draw_inputs(specs: list[tuple[str, list[Any], str]], rng: np.random.Generator, batch: int,
                dims: dict[Any, int] | None = None) -> list[np.ndarray]:
    """One example for a graph's inputs (name, shape, ONNX Runtime type): floats uniform in FLOAT_RANGE,
    integers in INT_RANGE, booleans fair coins. A dimension set in `dims` (parse_dims) has that size;
    else dimension 0 when dynamic is `batch`; other dynamic ones are drawn from SMALL, one size per
    symbol (a sequence length shared by two inputs stays shared). Raises BadInput (naming the file's
    input) for an element type with no drawing rule."""
    dims = dims or {}
    sizes: dict[str, int] = {k: v for k, v in dims.items() if isinstance(k, str)}
    out = []
    for name, shape, kind in specs:
        got = []
        for axis, d in enumerate(shape):
            if (name, axis) in dims:
                got.append(dims[(name, axis)])
            elif isinstance(d, int) and d >= 0:
                got.append(d)
            elif axis == 0:
                got.append(sizes.setdefault(d, batch) if isinstance(d, str) else batch)
            elif isinstance(d, str):
                got.append(sizes.setdefault(d, int(rng.integers(*SMALL))))
            else:  # an unnamed dynamic dimension: its own size
                got.append(int(rng.integers(*SMALL)))
        if kind in _FLOAT_TYPES:
            out.append(rng.uniform(*FLOAT_RANGE, size=got).astype(_FLOAT_TYPES[kind]))
        elif kind in _INT_TYPES:
            out.append(rng.integers(*INT_RANGE, size=got).astype(_INT_TYPES[kind]))
        elif kind == "tensor(bool)":
            out.append(rng.random(got) < 0.5)
        else:
            raise BadInput(f"input {name!r} of the ONNX file has element type {kind}: no rule to draw it "
                           "(float, integer and bool inputs are drawn)")
    return out


def _drawn_hint(specs: list[tuple[str, list[Any], str]], dims: dict[Any, int]) -> str:
    """What to try when a side refuses the drawn inputs: the exporters leave dimensions a model fixes
    (a Linear's width) symbolic too (torch 2.14's dynamo exporter with Dim.AUTO did, on a 2-layer MLP)."""
    drawn = sorted({f"{name}:{axis}" for name, shape, _ in specs for axis, d in enumerate(shape)
                    if axis and not isinstance(d, int) and (name, axis) not in dims and d not in dims})
    return f"; dynamic dimensions {', '.join(drawn)} got drawn sizes: fix them with --dim INPUT:AXIS=SIZE" if drawn else ""


def check_batch(specs: list[tuple[str, list[Any], str]], batch: int | None, dims: dict[Any, int]) -> int:
    """The batch size to draw: `batch` (None: 2, the default). Raises BadInput when --batch was given
    and an input's first axis is fixed at another size in the graph (drawn at the graph's size, the run
    would silently check another batch) and not set by --dim."""
    if batch is None:
        return 2
    for name, shape, _ in specs:
        first = shape[0] if shape else None
        if (name, 0) not in dims and isinstance(first, int) and first >= 0 and first != batch:
            raise BadInput(f"--batch {batch} refused: {name}'s batch axis is fixed at {first} in the graph")
    return batch


def _fits(path: str, graph: Any, model: Any, x: list[np.ndarray], spec: str) -> None:
    """BadInput when torch raises on inputs of the graph's own shapes at every dimension the graph fixes:
    nothing the user chose, so the file does not fit the model (another architecture's file), not a
    factory at fault. Where a size past the batch was drawn or set by --dim, the usual --torch message
    (naming the drawn shapes and --dim) says so instead."""
    if any(not isinstance(d, int) or d < 0 for _, shape, _ in graph.inputs for d in shape[1:]):
        return
    try:
        _torch_out(model, x)
    except Exception as exc:
        ins = ", ".join(f"{n}[{', '.join(str(d) if d is not None else '?' for d in s)}]" for n, s, _ in graph.inputs)
        raise BadInput(f"{path}: the ONNX file's input {ins} does not fit the torch model (--torch {spec} raised "
                       f"{_one_line(exc)} on that shape): a file for another model?") from exc


def _torch_model(spec: str) -> Any:
    import torch

    factory = load_callable(spec, "--torch")
    try:
        model = factory()
    except Exception as exc:
        raise BadInput(f"--torch {spec}: the factory raised {_one_line(exc)}") from exc
    if not isinstance(model, torch.nn.Module):
        raise BadInput(f"--torch {spec}: the factory returned a {type(model).__name__}, not a torch nn.Module")
    return model.eval()


def _names_to_check(graph: Any, model: Any, path: str, spec: str) -> list[str] | None:
    """The model's argument names when the graph uses them (then their order must match: inputs are fed
    by position); None when the exporter was given other names (input_names=...), which is no mismatch.
    Raises BadInput when the graph's input count is not one forward accepts (Graph.validate compares
    the graph with inputs drawn from itself, so it cannot see this)."""
    import inspect

    from equivcheck.onnx.export import input_names

    n = len(graph.inputs)
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):  # no signature to hold the graph to
        params = []
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    if params and (n < len(required) or (n > len(positional) and not any(p.kind == p.VAR_POSITIONAL for p in params))):
        raise BadInput(f"{path}: the ONNX file takes {n} inputs {[g for g, _, _ in graph.inputs]}, the torch model's "
                       f"forward {len(required)}" + (f" to {len(positional)}" if len(positional) > len(required) else "")
                       + f" ({', '.join(p.name for p in positional)}) (--torch {spec})")
    names = input_names(model, n)
    return names if {g for g, _, _ in graph.inputs} <= set(names) else None


def _header(path: str, graph: Any, opset: int, tol: Any) -> str:
    ins = ", ".join(f"{n}[{', '.join(str(d) if d is not None else '?' for d in s)}] {k[7:-1]}"
                    for n, s, k in graph.inputs)
    return f"{path}: opset {opset}; inputs {ins}; tolerance {tol.describe()} ({tol.reason})"


def run(path: str, torch_spec: str, jax_spec: str | None = None, *, examples: int = 10, seed: int = 0,
        batch: int | None = None, dims: Sequence[str] = (), echo: Callable[[str], None] = print) -> int:
    """Check the ONNX file at `path` against `torch_spec`'s model (and `jax_spec`'s apply) on `examples`
    drawn inputs; `echo` gets one line per example, a table of the worst ratio per pair and the verdict.
    `batch`: --batch (None: 2, and a batch the graph fixes is used as fixed). `dims`: --dim values (parse_dims). Returns 0 when all agree, 1 when a side is off (or the sides disagree and none can be named). Raises
    BadInput (one line) for: the onnx extra missing, a file that does not exist or load, a factory or
    apply that does not import or does not return what it should, a side that raises on the drawn
    inputs, a graph whose inputs or outputs do not fit the model, and a port whose outputs do not."""
    from equivcheck.onnx.export import available, opset_of
    from equivcheck.onnx.session import Graph, GraphMismatch, LoadError
    from equivcheck.onnx.threeway import PAIRS, three_way, two_way

    reason = available()
    if reason:
        raise BadInput(reason)
    if not os.path.isfile(path):
        raise BadInput(f"{path}: the ONNX file does not exist" if not os.path.exists(path)
                       else f"{path}: the ONNX file is not a regular file")
    try:
        graph = Graph(path, "cpu")
        opset = opset_of(path)
    except LoadError as exc:
        raise BadInput(str(exc)) from exc
    model = _torch_model(torch_spec)
    apply = load_callable(jax_spec, "--jax") if jax_spec else None
    names = _names_to_check(graph, model, path, torch_spec)
    fixed = parse_dims(list(dims), graph.inputs)
    batch = check_batch(graph.inputs, batch, fixed)
    hint = _drawn_hint(graph.inputs, fixed)
    rng = np.random.default_rng(seed)
    pairs = [f"{a}-{b}" for a, b in PAIRS] if apply else ["torch-onnx"]
    worst = dict.fromkeys(pairs, 0.0)
    tol = None
    wide: dict[str, Any] = {}
    for i in range(examples):
        x = draw_inputs(graph.inputs, rng, batch, fixed)
        if i == 0:
            _fits(path, graph, model, x, torch_spec)
        t = _side("torch", torch_spec, lambda xs: _torch_out(model, xs), x, hint)
        if tol is None:
            tol = _tolerance(t)
            echo(_header(path, graph, opset, tol))
        try:
            graph.validate(x, names, [np.ndim(a) for a in t])
            o = graph.run(x)
        except GraphMismatch as exc:
            raise BadInput(f"{exc} (--torch {torch_spec})") from exc
        except Exception as exc:
            raise BadInput(f"{path}: ONNX Runtime raised {_one_line(exc)} on inputs {_shapes(x)}{hint}") from exc
        outs = {"torch": t, "onnx": o}
        if apply is not None:
            outs["jax"] = _side("jax", jax_spec, lambda xs: [np.asarray(a) for a in leaves(apply(*xs))], x, hint)

        def reference(x: list[np.ndarray] = x) -> Any:
            if "model" not in wide:  # a float64 copy, made once and only when two sides disagree
                wide["model"] = copy.deepcopy(model).double()
            return _torch_out(wide["model"], [a.astype(np.float64) if is_float(a) else a for a in x])

        tw = three_way(outs, tol, reference) if apply else two_way(outs, tol, reference)
        _layout(tw, path, torch_spec, jax_spec)
        for p in pairs:
            worst[p] = max(worst[p], tw.verdicts[p].ratio)
        ratios = ", ".join(f"{p} {tw.verdicts[p].ratio:.3g}" for p in pairs)
        echo(f"example {i + 1}/{examples} {_shapes(x)}: {ratios}: {'agree' if tw.ok else 'DISAGREE'}")
        if not tw.ok:
            who = f"{tw.side} is off" if tw.side and "+" not in tw.side else (
                f"{' and '.join(tw.side.split('+'))} are off" if tw.side else "the sides disagree, none named")
            echo(f"{who}: example {i + 1}: {tw.message} ({tw.how})")
            return 1
    echo("worst error/allowed per pair: " + ", ".join(f"{p} {worst[p]:.3g}" for p in pairs))
    echo(f"all agree: {examples} example{'s' if examples != 1 else ''}, {' and '.join(pairs)} within {tol.describe() if tol else 'the bound'}")
    return 0


def _torch_out(model: Any, x: list[np.ndarray]) -> list[np.ndarray]:
    import torch

    from equivcheck.backends.torch import to_numpy

    with torch.no_grad():
        return [np.asarray(a) for a in leaves(to_numpy(model(*[torch.from_numpy(np.array(a)) for a in x])))]


def _side(side: str, spec: str, fn: Callable[[list[np.ndarray]], list[np.ndarray]],
          x: list[np.ndarray], hint: str) -> list[np.ndarray]:
    """fn's outputs; a raise is bad input naming the side (the drawn inputs do not fit what it expects)."""
    try:
        return fn(x)
    except Exception as exc:
        raise BadInput(f"--{side} {spec}: raised {_one_line(exc)} on inputs {_shapes(x)} drawn from the "
                       f"ONNX file's input specs{hint}") from exc


def _tolerance(t: list[np.ndarray]) -> Any:
    """The table's forward bound at the dtype of torch's first float output (float32 when it has none)."""
    dtype = next((a.dtype.name for a in t if is_float(a)), "float32")
    return lookup(dtype if dtype in BASE else "float32", check="forward")


def _layout(tw: Any, path: str, torch_spec: str, jax_spec: str | None) -> None:
    """BadInput when outputs do not line up (count, nesting, shape): the file's against torch's first,
    then the port's (a shape mismatch is no rounding question, so no side is 'off')."""
    from equivcheck.onnx.threeway import relabel

    v = tw.verdicts["torch-onnx"]
    if v.kind in LAYOUT:
        raise BadInput(f"{path}: the ONNX file's outputs do not fit the torch model's (--torch {torch_spec}): "
                       f"{relabel(v.message, 'torch', 'onnx')}")
    v = tw.verdicts.get("torch-jax")
    if v is not None and v.kind in LAYOUT:
        raise BadInput(f"--jax {jax_spec}: the port's outputs do not fit the torch model's: {v.message}")


def _shapes(x: list[np.ndarray]) -> str:
    return "(" + ", ".join(f"{a.dtype}{list(a.shape)}" for a in x) + ")"
