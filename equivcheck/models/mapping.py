"""A whole torch model's weights as the port's parameter tree, and gradients back by torch name.

Each module that holds parameters or buffers of its own is one entry: a `weights.Rule` the
user gave for its prefix, else the kind equivcheck.weights.convert reads off the module (Linear,
Conv, norms, BatchNorm, Embedding, LSTM/GRU, MultiheadAttention). The Flax tree nests the
converted layers by the torch module names (`blocks.0.attn` -> tree["blocks"]["0"]["attn"]).
BatchNorm's running statistics (Flax `mean`/`var`) are the tree's non-trainable part.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from equivcheck import weights
from equivcheck.weights import convert
from equivcheck.weights.layouts import ConversionError

STATS = {"batch_norm": ("mean", "var")}
# nnx.LSTMCell's (input, hidden) Linear names, in torch's row order
_GATE_CELLS = tuple(("i" + ("f_" if g == "f" else g), "h" + g) for g in "ifgo")


def _lstm_biases(cells: list[Any], sub: Mapping[str, Any]) -> list[Any]:
    """Both torch biases as leaves of their own (input side on the i* cells): Flax sums them
    into one, which computes the same but trains otherwise: each torch bias gets the
    gradient and its own optimizer step, so under SGD the sum moves twice as far."""
    out = []
    for k, cell in enumerate(cells):
        cell = {name: dict(v) for name, v in cell.items()}
        hidden = cell["hi"]["kernel"].shape[-1]
        for j, (i_name, h_name) in enumerate(_GATE_CELLS):
            cell[i_name]["bias"] = sub[f"bias_ih_l{k}"][j * hidden:(j + 1) * hidden]
            cell[h_name]["bias"] = sub[f"bias_hh_l{k}"][j * hidden:(j + 1) * hidden]
        out.append(cell)
    return out


def fold_rnn_biases(cells: list[Any]) -> list[Any]:
    """The nnx.LSTMCell trees of cells that keep torch's two biases apart (the model tree's
    layout): the input-side bias added to the hidden-side one. Call it inside the port."""
    out = []
    for cell in cells:
        cell = {name: dict(v) for name, v in cell.items()}
        for i_name, h_name in _GATE_CELLS:
            if "bias" in cell[i_name]:
                cell[h_name]["bias"] = cell[h_name]["bias"] + cell[i_name].pop("bias")
        out.append(cell)
    return out


@dataclasses.dataclass(frozen=True)
class Entry:
    module: str  # torch prefix ("" for the root)
    path: tuple[str, ...]  # where the layer sits in the Flax tree
    kind: str  # a convert kind, or "rule:<layout>"
    cfg: Mapping[str, Any]
    rule: Any = None


def _split(name: str) -> tuple[str, ...]:
    return tuple(name.split(".")) if name else ()


def _own(module: Any) -> list[str]:
    names = [n for n, _ in module.named_parameters(recurse=False)]
    return names + [n for n, _ in module.named_buffers(recurse=False) if n != "num_batches_tracked"]


def entries(model: Any, rules: Sequence[Any] = ()) -> list[Entry]:
    """The model's layers, in module order. A module holding parameters that neither a rule
    nor equivcheck.weights.convert covers is refused, naming it."""
    out: list[Entry] = []
    covered: list[str] = []
    by_prefix = {r.torch: r for r in rules}
    inside = lambda name: any(name == c or name.startswith(c + ".") for c in covered)  # noqa: E731
    for name, module in model.named_modules():
        if inside(name):
            continue
        if name in by_prefix:
            rule = by_prefix[name]
            out.append(Entry(name, tuple(rule.jax.split("/")), f"rule:{rule.layout}", {}, rule))
            covered.append(name)
            continue
        own = _own(module)
        if not own:
            continue
        try:
            kind, cfg = convert.describe(module)
        except ConversionError:
            raise ConversionError(
                f"module {name or '<root>'!r} ({type(module).__name__}) holds {', '.join(own)}, which no converter "
                f"knows: give a weights.Rule for {name!r} (or tap a supported layer instead)") from None
        out.append(Entry(name, _split(name), kind, cfg))
        covered.append(name)
    unknown = sorted(set(by_prefix) - {e.module for e in out})
    if unknown:
        raise ConversionError(f"rule for {unknown[0]!r}: the torch model has no module of that name")
    return out


def _sub(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    if not prefix:
        return dict(state)
    return {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}


def _put(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    if path:
        tree[path[-1]] = value
    else:
        tree.update(value)


def get(tree: Any, path: tuple[str, ...], what: str = "params tree") -> Any:
    node = tree
    for i, key in enumerate(path):
        if not isinstance(node, Mapping) or key not in node:
            raise ConversionError(f"the {what} has no {'/'.join(path[:i + 1])!r} (keys there: "
                                  f"{sorted(node) if isinstance(node, Mapping) else type(node).__name__})")
        node = node[key]
    return node


def to_jax(ents: Sequence[Entry], state: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(trainable tree, statistics tree) from a torch state_dict (NumPy values)."""
    params: dict[str, Any] = {}
    stats: dict[str, Any] = {}
    for e in ents:
        sub = _sub(state, e.module)
        if e.rule is not None:
            layer = weights.torch_to_jax({f"{e.module}.{k}": v for k, v in sub.items()},
                                         [weights.Rule(e.module, "/".join(e.path), e.rule.layout, e.rule.meta)])
            layer = get(layer, e.path)
        else:
            try:
                layer = convert.to_jax(e.kind, sub, **e.cfg)
            except ConversionError as exc:
                raise ConversionError(f"module {e.module!r}: {exc}") from None
            if e.kind == "lstm" and e.cfg.get("bias", True):
                layer = _lstm_biases(layer, sub)
        keep = STATS.get(e.kind, ())
        if keep:
            _put(stats, e.path, {k: v for k, v in layer.items() if k in keep})
            layer = {k: v for k, v in layer.items() if k not in keep}
        _put(params, e.path, layer)
    return params, stats


def to_torch(ents: Sequence[Entry], params: Any, stats: Any = None, *, grads: bool = False) -> dict[str, Any]:
    """torch-named arrays from the port's trees. With `grads`, `params` holds gradients:
    each of torch's two RNN biases gets the gradient of the one summed Flax bias."""
    out: dict[str, Any] = {}
    for e in ents:
        layer = dict(get(params, e.path)) if not isinstance(get(params, e.path), list) else get(params, e.path)
        if e.kind in STATS:
            if stats is not None:
                layer.update(get(stats, e.path, "statistics tree"))
            else:
                some = next(iter(layer.values()))
                layer.update({k: np.zeros_like(some) for k in STATS[e.kind]})
        if e.rule is not None:
            flat = weights.jax_to_torch(_nest(e.path, layer),
                                        [weights.Rule(e.module, "/".join(e.path), e.rule.layout, e.rule.meta)])
            sub = {k[len(e.module) + 1:]: v for k, v in flat.items()}
        elif e.kind == "lstm" and e.cfg.get("bias", True):
            sub = convert.to_torch(e.kind, [{n: {"kernel": v["kernel"]} if n.startswith("i") else v
                                            for n, v in c.items()} for c in layer], **e.cfg)
            for k, cell in enumerate(layer):
                sub[f"bias_ih_l{k}"] = _concat([cell[i]["bias"] for i, _ in _GATE_CELLS])
                sub[f"bias_hh_l{k}"] = _concat([cell[h]["bias"] for _, h in _GATE_CELLS])
        else:
            sub = convert.to_torch(e.kind, layer, **e.cfg)
        if grads and e.kind == "gru":
            for k in list(sub):
                if k.startswith("bias_hh_l"):
                    sub["bias_ih_l" + k[len("bias_hh_l"):]] = sub[k]
        for k, v in sub.items():
            out[f"{e.module}.{k}" if e.module else k] = v
    return out


def _concat(parts: list[Any]) -> Any:
    if all(isinstance(p, np.ndarray) for p in parts):
        return np.concatenate(parts)
    import jax.numpy as jnp

    return jnp.concatenate(parts)


def _nest(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    _put(tree, path, value)
    return tree


def merge(params: Any, stats: Any) -> Any:
    """One tree of both parts (the port reads BatchNorm's statistics beside its scale)."""
    if not isinstance(params, Mapping) or not isinstance(stats, Mapping):
        return params if stats is None or stats == {} else stats
    out = dict(params)
    for k, v in stats.items():
        out[k] = merge(out[k], v) if k in out else v
    return out


def check_against(tree: Any, own: Any, what: str = "the converted tree") -> None:
    """Refuse a converted tree that is not the port's own tree key for key, shape for shape."""
    import jax

    got = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
    want = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_flatten_with_path(own)[0]}
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing:
        raise ConversionError(f"{what} has no {missing[0]} that the port's parameter tree holds "
                              f"(missing: {missing[:4]}; the mapping gives {sorted(got)[:6]})")
    if extra:
        raise ConversionError(f"{what} has {extra[0]}, which the port's parameter tree lacks (extra: {extra[:4]})")
    for k in want:
        if tuple(got[k]) != tuple(want[k]):
            raise ConversionError(f"{what}: {k} has shape {tuple(got[k])}, the port expects {tuple(want[k])}")
