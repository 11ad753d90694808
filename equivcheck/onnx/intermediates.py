"""Per-layer columns of the `onnx` model check: each torch module's output found in the ONNX graph.

torch 2.14's dynamo exporter writes, on every node, `metadata_props` with `pkg.torch.onnx.name_scopes`:
the module path of the call that made it, as a Python list literal (`['', 'fc1', 'linear']`: the root
module, the submodule `fc1`, the aten op), beside `namespace` and `pkg.torch.onnx.stack_trace`
(checked by exporting the zoo's models and printing them). Nodes come in topological order, so the
last node inside a module's scope made its output. `module_values` maps module names to those node
outputs; `with_outputs` writes a copy of the graph that also returns them (used only for the check,
beside the file under test); `layer_rows` runs torch with forward hooks, that copy, and the port's
taps on one example and compares every module found three ways. A module the optimiser folded away
(a Conv fused into the BatchNorm after it) has no node of its own and no row; so has a graph from
another exporter (no metadata).
"""
from __future__ import annotations

import ast
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from equivcheck.engine.compare import compare
from equivcheck.engine.tolerance import Tolerance

__all__ = ["SCOPES", "first_departure", "layer_rows", "module_values", "with_outputs"]

SCOPES = "pkg.torch.onnx.name_scopes"


def module_values(model_proto: Any, modules: Sequence[str]) -> dict[str, list[str]]:
    """module name (torch's, dotted) -> the outputs of the last graph node in its scope, for the
    names in `modules` that own a node. Scopes are read as module paths ('', 'block', '0', ...)
    joined by dots, and as dotted names themselves (the exporter's form for nested containers)."""
    wanted, found = set(modules), {}
    for node in model_proto.graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        try:
            scopes = ast.literal_eval(meta.get(SCOPES, "[]"))
        except (ValueError, SyntaxError):
            continue
        path = [s for s in scopes[1:-1] if isinstance(s, str)]  # the last scope is the op itself
        for k in range(1, len(path) + 1):
            for name in (".".join(path[:k]), path[k - 1]):
                if name in wanted:
                    found[name] = list(node.output)
    return found


def with_outputs(path: str, values: Mapping[str, list[str]]) -> tuple[str, list[str]]:
    """A copy of the ONNX file at `path` (`<path>.layers.onnx`, written beside it under a temporary
    name and renamed) whose graph also outputs every value in `values`; returns its path and the
    added output names. The file under test is not touched. Raises what onnx raises on a bad file."""
    import onnx

    proto = onnx.load(path)
    have = {o.name for o in proto.graph.output}
    typed = {v.name: v for v in list(proto.graph.value_info) + list(proto.graph.input)}
    added = []
    for names in values.values():
        for name in names:
            if name and name not in have:
                have.add(name)
                added.append(name)
                # the exporter's value_info carries the type; without one ONNX Runtime infers it
                if name in typed:
                    proto.graph.output.append(typed[name])
                else:
                    proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    out = path[:-len(".onnx")] + ".layers.onnx" if path.endswith(".onnx") else path + ".layers.onnx"
    onnx.save(proto, out + ".part")
    os.replace(out + ".part", out)
    return out, added


def _cell(a: Any, b: Any, tol: Tolerance) -> dict[str, Any]:
    """One column of a row: two arrays compared under `tol` (None where either side has no value)."""
    if a is None or b is None:
        return {"max_abs": None, "ratio": None, "ok": None}
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return {"max_abs": "inf", "ratio": "inf", "ok": False, "note": f"shape {list(a.shape)} against {list(b.shape)}"}
    v = compare(a, b, tol)
    # non-finite numbers as strings, as the model rows write them (equivcheck.models.slips.Row.to_json): JSON has none
    finite = lambda x: x if np.isfinite(x) else str(x)
    return {"max_abs": finite(v.worst.max_abs if v.worst else 0.0),
            "ratio": finite(v.ratio if v.kind in ("match", "values") else float("inf")), "ok": v.ok}


def layer_rows(model: Any, graph_session: Any, feed: Mapping[str, np.ndarray], values: Mapping[str, list[str]],
               torch_args: Sequence[Any], taps: Mapping[str, Any], layer_names: Mapping[str, str],
               tol: Tolerance) -> list[dict[str, Any]]:
    """One row per torch module whose output the graph exposes, in the order torch finished them:
    {layer, module, torch-onnx, torch-jax, onnx-jax (each {max_abs, ratio, ok}), max_abs, ratio, ok
    (torch vs onnx, the report's main columns), first (set by first_departure)}.

    model: the torch nn.Module (eval mode), run on `torch_args` (tensors) with forward hooks;
    graph_session: an onnxruntime InferenceSession of with_outputs' copy, fed `feed` (name -> array);
    taps: the port's tap name -> value on the same inputs ({} without a port or taps), looked up by
    `layer_names.get(module, module)`. Of a module's node outputs, the first of the shape of the torch
    output's first tensor is taken; failing that, of another tensor of the output (an RNN module's final
    state h_n, which ONNX's LSTM/GRU node returns as Y_h in torch's (layers x directions, batch, hidden)
    layout where the sequence Y is (seq, directions, batch, hidden)): that row compares torch with
    ONNX on that tensor, says which in its note, and leaves onnx-jax empty unless the port's tap holds
    the same output. A module with no graph value of any of its output shapes gets torch vs jax only."""
    import jax
    import torch

    from equivcheck.backends.torch import to_numpy
    from equivcheck.models.slips import _first_tensor
    from equivcheck.models.tap import first_array

    seen: list[tuple[str, Any, Any]] = []
    handles = [m.register_forward_hook(lambda m, a, o, name=name: seen.append((name, m, o)))
               for name, m in model.named_modules() if name in values]
    try:
        with torch.no_grad():
            model(*torch_args)
    finally:
        for h in handles:
            h.remove()
    names = [n for ns in values.values() for n in ns if n]
    got = dict(zip(names, graph_session.run(names, dict(feed))))
    rows = []
    for name, module, out in seen:
        t = _first_tensor(out)
        if t is None or any(r["layer"] == name for r in rows):
            continue  # a module called twice: its first call is the one its scope's last node need not be
        t = to_numpy(t)
        tensors = [to_numpy(x) for x in jax.tree_util.tree_leaves(out) if isinstance(x, torch.Tensor)]
        k, o = next(((k, got[n]) for k, x in enumerate(tensors) for n in values[name]
                     if n in got and np.shape(got[n]) == x.shape), (0, None))
        key = layer_names.get(name, name)
        j = np.asarray(first_array(taps[key])) if key in taps else None
        note = "" if o is not None else "no graph value of the module's output shapes"
        if k:
            note = (f"the graph holds the module's output {k + 1} of {len(tensors)} (shape {list(tensors[k].shape)}), "
                    "not its first: torch-onnx compares that one")
        row = {"layer": name, "module": type(module).__name__, "torch-onnx": _cell(tensors[k], o, tol),
               "torch-jax": _cell(t, j, tol), "onnx-jax": _cell(o if k == 0 else None, j, tol), "first": False,
               "note": note}
        row.update(max_abs=row["torch-onnx"]["max_abs"], ratio=row["torch-onnx"]["ratio"], ok=row["torch-onnx"]["ok"])
        rows.append(row)
    return rows


def first_departure(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The first row where ONNX Runtime leaves torch (marked `first`), or None."""
    row = next((r for r in rows if r["torch-onnx"]["ok"] is False), None)
    if row is not None:
        row["first"] = True
    return row
