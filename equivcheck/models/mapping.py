"""A whole torch model's weights as the port's parameter tree, and gradients back by torch name.

Each module that holds parameters or buffers of its own is one entry: a `weights.Rule` the
user gave for its prefix, else the kind equivcheck.weights.convert reads off the module (Linear,
Conv, norms, BatchNorm, Embedding, LSTM/GRU, MultiheadAttention). The Flax tree nests the
converted layers by the torch module names (`blocks.0.attn` -> tree["blocks"]["0"]["attn"]).
BatchNorm's running statistics (Flax `mean`/`var`) are the tree's non-trainable part.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from equivcheck import weights
from equivcheck.weights import convert
from equivcheck.weights.layouts import ConversionError

STATS = {"batch_norm": ("mean", "var")}
# The (input, hidden) Linear names of each gate, in torch's row order: nnx.LSTMCell's, linen.GRUCell's
_GATE_CELLS = {"lstm": tuple(("i" + ("f_" if g == "f" else g), "h" + g) for g in "ifgo"),
               "gru": (("ir", "hr"), ("iz", "hz"), ("in", "hn"))}
_DIRECTIONS = (("", "forward_rnn"), ("_reverse", "backward_rnn"))  # torch key suffix, linen.Bidirectional's


def _map_cells(layers: list[Any], fn: Any) -> list[Any]:
    """Each cell of an RNN tree (per layer: a cell, or linen.Bidirectional's two) replaced by
    fn(torch key suffix "l0" / "l0_reverse", cell)."""
    out = []
    for k, layer in enumerate(layers):
        if "forward_rnn" in layer:
            out.append({name: {"cell": fn(f"l{k}{sfx}", layer[name]["cell"])} for sfx, name in _DIRECTIONS})
        else:
            out.append(fn(f"l{k}", layer))
    return out


def _rnn_biases(kind: str, layers: list[Any], sub: Mapping[str, Any]) -> list[Any]:
    """Both torch biases as leaves of their own (bias_ih on the input-side Linears, bias_hh on
    the hidden-side ones): Flax sums them into one (LSTM: every gate; GRU: r and z), which
    computes the same but trains otherwise: each torch bias gets the gradient and its own
    optimizer step, so under SGD the sum moves twice as far."""
    def split(key: str, cell: Mapping[str, Any]) -> dict[str, Any]:
        cell = {name: dict(v) for name, v in cell.items()}
        hidden = cell[_GATE_CELLS[kind][0][1]]["kernel"].shape[-1]
        for j, (i_name, h_name) in enumerate(_GATE_CELLS[kind]):
            cell[i_name]["bias"] = sub[f"bias_ih_{key}"][j * hidden:(j + 1) * hidden]
            cell[h_name]["bias"] = sub[f"bias_hh_{key}"][j * hidden:(j + 1) * hidden]
        return cell

    return _map_cells(layers, split)


def _torch_biases(kind: str, layers: list[Any]) -> dict[str, Any]:
    """bias_ih_* and bias_hh_* from a tree that keeps them apart (the inverse of `_rnn_biases`)."""
    out: dict[str, Any] = {}

    def collect(key: str, cell: Mapping[str, Any]) -> Mapping[str, Any]:
        out[f"bias_ih_{key}"] = _concat([cell[i]["bias"] for i, _ in _GATE_CELLS[kind]])
        out[f"bias_hh_{key}"] = _concat([cell[h]["bias"] for _, h in _GATE_CELLS[kind]])
        return cell

    _map_cells(layers, collect)
    return out


def fold_rnn_biases(layers: list[Any]) -> list[Any]:
    """The Flax cells' own trees from the model tree's RNN layers, which keep torch's two biases
    apart: nnx.LSTMCell's (each gate's input-side bias added to its hidden-side one) or
    linen.GRUCell's (r and z: the hidden-side bias added to the input-side one; n keeps both,
    b_hn sits inside r * (W_hn h + b_hn)); bidirectional GRU layers stay linen.Bidirectional's
    {"forward_rnn": {"cell": ...}, "backward_rnn": ...}. Call it inside the port."""
    def fold(_: str, cell: Mapping[str, Any]) -> dict[str, Any]:
        cell = {name: dict(v) for name, v in cell.items()}
        if "hi" in cell:
            for i_name, h_name in _GATE_CELLS["lstm"]:
                if "bias" in cell[i_name]:
                    cell[h_name]["bias"] = cell[h_name]["bias"] + cell[i_name].pop("bias")
        else:
            for i_name, h_name in _GATE_CELLS["gru"][:2]:
                if "bias" in cell[h_name]:
                    cell[i_name]["bias"] = cell[i_name]["bias"] + cell[h_name].pop("bias")
        return cell

    return _map_cells(layers, fold)


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
    """What of the module's own the port needs: parameters and persistent buffers. A
    non-persistent buffer (a causal mask, an index table) is rebuilt by the port, not converted;
    BatchNorm's step counter has no Flax counterpart."""
    names = [n for n, _ in module.named_parameters(recurse=False)]
    transient = set(getattr(module, "_non_persistent_buffers_set", ()))
    return names + [n for n, _ in module.named_buffers(recurse=False)
                    if n != "num_batches_tracked" and n not in transient]


def entries(model: Any, rules: Sequence[Any] = ()) -> list[Entry]:
    """The model's layers, in module order. A module holding parameters that neither a rule
    nor equivcheck.weights.convert covers is refused, naming it. A module whose every tensor is
    tied to one converted before (an output head sharing the embedding's weight) has no entry:
    the tied tensor is one leaf, where it first appears, and the port reads it there for both
    uses (Flax's `Embed.attend`), so training moves it once, as torch does."""
    out: list[Entry] = []
    covered: list[str] = []
    converted: set[int] = set()  # id() of every tensor converted so far
    by_prefix = {r.torch: r for r in rules}
    inside = lambda name: any(name == c or name.startswith(c + ".") for c in covered)  # noqa: E731
    for name, module in model.named_modules():
        if inside(name):
            continue
        if name in by_prefix:
            rule = by_prefix[name]
            _rearranges(rule, module)
            out.append(Entry(name, tuple(rule.jax.split("/")), f"rule:{rule.layout}", {}, rule))
            covered.append(name)
            converted.update(id(t) for t in module.state_dict(keep_vars=True).values())
            continue
        own = _own(module)
        if not own:
            continue
        ids = {id(getattr(module, n)) for n in own}
        if ids <= converted:
            continue
        converted.update(ids)
        try:
            kind, cfg = convert.describe(module)
        except ConversionError:
            raise ConversionError(
                f"module {name or '<root>'!r} ({type(module).__name__}) holds {', '.join(own)}, which no converter "
                f"knows: register its type (equivcheck.weights.register_module), give a weights.Rule for {name!r}, "
                f"or convert the whole model with ModelPair(to_jax=your_converter)") from None
        out.append(Entry(name, _split(name), kind, cfg))
        if not _registered(kind):  # a registered type converts its own tensors; its children convert as usual
            covered.append(name)
    unknown = sorted(set(by_prefix) - {e.module for e in out})
    if unknown:
        raise ConversionError(f"rule for {unknown[0]!r}: the torch model has no module of that name")
    return out


def _registered(kind: str) -> bool:
    return any(kind == k for _, k, _ in convert._MODULES)


def _rearranges(rule: Any, module: Any) -> None:
    """Refuse a rule whose layout is not a rearrangement of elements on this module's tensors:
    its gradient goes back by the inverse layout, the adjoint only of a rearrangement (a layout
    folding in a constant gave 4x the gradient)."""
    layout = weights.LAYOUTS.get(rule.layout)
    if layout is None:
        return  # torch_to_jax names the unknown layout
    sd = module.state_dict()
    for tname, fn in layout.to_jax.items():
        if tname not in sd:
            continue
        tags = np.arange(1.0, sd[tname].numel() + 1).reshape(tuple(sd[tname].shape))
        out = np.asarray(fn(tags, rule.meta), np.float64)
        if out.size != tags.size or not np.array_equal(np.sort(out.ravel()), tags.ravel()):
            raise ConversionError(
                f"rule {rule.torch!r}: layout {rule.layout!r} does not only rearrange {tname!r} (it scales, sums, "
                f"drops or repeats elements): gradients go back by its inverse, the adjoint of a rearrangement only; "
                f"put the constant in the port, or convert with ModelPair(to_jax=...), whose map is read, scales "
                f"included")


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
    """(trainable tree, statistics tree) from a torch state_dict (NumPy values). `ents` is
    `entries(...)`, or a converter.UserMapping (the pair's own `to_jax`), which converts itself."""
    if hasattr(ents, "to_jax"):
        return ents.to_jax(state)
    params: dict[str, Any] = {}
    stats: dict[str, Any] = {}
    for e in ents:
        sub = _sub(state, e.module)
        if _registered(e.kind):
            sub = {k: v for k, v in sub.items() if "." not in k}
        if e.rule is not None:
            layer = weights.torch_to_jax({f"{e.module}.{k}": v for k, v in sub.items()},
                                         [weights.Rule(e.module, "/".join(e.path), e.rule.layout, e.rule.meta)])
            layer = get(layer, e.path)
        else:
            try:
                layer = convert.to_jax(e.kind, sub, **e.cfg)
            except ConversionError as exc:
                raise ConversionError(f"module {e.module!r}: {exc}") from None
            if e.kind in _GATE_CELLS and e.cfg.get("bias", True):
                layer = _rnn_biases(e.kind, layer, sub)
        keep = STATS.get(e.kind, ())
        if keep:
            _put(stats, e.path, {k: v for k, v in layer.items() if k in keep})
            layer = {k: v for k, v in layer.items() if k not in keep}
        _put(params, e.path, layer)
    return params, stats


def to_torch(ents: Sequence[Entry], params: Any, stats: Any = None) -> dict[str, Any]:
    """torch-named arrays from the port's trees: the inverse layouts (gradients go back by
    `grads_to_torch` instead, where a summed bias is no inverse's business). A converter.UserMapping
    (the pair's own `to_jax`) inverts itself, raising ConversionError where it has no unique inverse."""
    if hasattr(ents, "to_torch"):
        return ents.to_torch(params, stats)
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
        elif e.kind in _GATE_CELLS and e.cfg.get("bias", True):
            sub = convert.to_torch(e.kind, fold_rnn_biases(layer), **e.cfg) | _torch_biases(e.kind, layer)
        else:
            sub = convert.to_torch(e.kind, layer, **e.cfg)
        for k, v in sub.items():
            out[f"{e.module}.{k}" if e.module else k] = v
    return out


def chain_rule(fn: Callable[[Mapping[str, Any]], Any], state: Mapping[str, Any], cotangent: Any) -> dict[str, Any]:
    """The gradient of every floating tensor of `state` (torch name -> NumPy array) given the
    gradient `cotangent` of `fn(state)` (a tree shaped like fn's output): the vjp of `fn`.

    fn must be traceable by JAX (equivcheck.weights.convert's layouts are: they keep jax arrays
    jax). Where two torch tensors feed one leaf (a summed bias) each gets that leaf's gradient;
    where one tensor is split over several leaves (fused gate rows, q/k/v) its gradient is theirs
    put back together; a tensor fn does not read gets zeros. Integer tensors are held constant
    and left out. Jitted per `fn` (pass the same function object to reuse the compilation).
    Returns NumPy arrays, float64 where the cotangent is."""
    import jax

    from equivcheck.backends.jax import to_numpy, x64

    floats = {k: np.asarray(v) for k, v in state.items() if np.asarray(v).dtype.kind == "f"}
    rest = {k: np.asarray(v) for k, v in state.items() if k not in floats}
    wide = any(np.asarray(g).dtype == np.float64 for g in jax.tree.leaves(cotangent))
    with x64(wide):
        back = _pullback()(fn, floats, rest, jax.tree.map(np.asarray, cotangent))
    return {k: to_numpy(v) for k, v in back.items()}


_JIT: list[Any] = []
_CONVERSIONS: dict[Any, Any] = {}  # one function per entries' layout: the jit cache keys on its identity


def _pullback() -> Any:
    if not _JIT:
        import jax

        def back(fn: Any, floats: Any, rest: Any, cotangent: Any) -> Any:
            _, pullback = jax.vjp(lambda fs: fn({**rest, **fs}), floats)
            return pullback(cotangent)[0]

        # eagerly the slices and concatenations cost ~0.2 s a call: once per example of a grad check
        _JIT.append(jax.jit(back, static_argnums=0))
    return _JIT[0]


def grads_to_torch(ents: Sequence[Entry], grads: Any, state: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The gradient of every torch tensor from the port's gradient tree `grads` (shaped like
    the trainable tree of `to_jax`): `chain_rule` through `to_jax`, so no inverse layout is
    written by hand (the inverse of a sum is not its adjoint: it gave GRU's bias_ih the
    gradient of b_hn alone). A `weights.Rule` entry's layout is a permutation of elements
    (transposes, reshapes), whose adjoint is its inverse: it goes back by it.

    state  torch's state_dict as NumPy (names, shapes, dtypes; the conversion is linear).
    Returns torch name -> NumPy array, buffers with zeros. Raises ConversionError where
    `grads` lacks a converted layer's path."""
    if hasattr(ents, "grads_to_torch"):
        return ents.grads_to_torch(grads, state)
    out = to_torch([e for e in ents if e.rule is not None], grads)
    conv = tuple(e for e in ents if e.rule is None)
    if not conv:
        return out
    key = tuple((e.module, e.path, e.kind, tuple(sorted(e.cfg.items()))) for e in conv)
    fn = _CONVERSIONS.setdefault(key, lambda sd: to_jax(conv, sd)[0])
    owned = {k: v for k, v in state.items() if any(not e.module or k.startswith(e.module + ".") for e in conv)}
    cotangent: dict[str, Any] = {}
    for e in conv:
        _put(cotangent, e.path, get(grads, e.path, "gradient tree"))
    import jax

    try:
        out.update(chain_rule(fn, owned, cotangent))
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError) as exc:
        kinds = sorted({e.kind for e in conv} - set(convert.KINDS))
        raise ConversionError(f"the conversion of {kinds or 'a layer'} is not traceable by JAX ({type(exc).__name__}):"
                              f" gradients go back by jax.vjp of register_module's to_jax, so it must keep jax arrays "
                              f"jax (.T, .reshape, slicing, jnp; not np.* functions)") from None
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
