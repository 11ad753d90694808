"""Weights between a torch module's state_dict and the Flax side's parameter pytree, both ways.

One place knows every layout difference:

    layer           torch                               Flax (nnx unless noted)
    linear          weight (out, in)                    kernel (in, out)
    conv            weight (O, I/g, *k)                 kernel (*k, I/g, O)           activations NC... vs N...C
    conv_transpose  weight (I, O, *k)                   kernel (*k, O, I), used with transpose_kernel=True
    layer_norm      weight/bias (normalized_shape)      scale/bias, flattened to (prod(normalized_shape),)
    rms_norm        weight                              scale, flattened
    group_norm      weight/bias (C,)                    scale/bias
    instance_norm   weight/bias (C,) when affine        scale/bias
    batch_norm      weight, bias, running_mean/var      scale, bias, mean, var (BatchStat); num_batches_tracked dropped
    embedding       weight (num, dim)                   embedding (num, dim)
    lstm            weight_ih_l{k} (4H, in) rows i,f,g,o; weight_hh_l{k}; bias_ih + bias_hh
                                                        [per layer] ii/if_/ig/io kernel (in, H), no bias;
                                                        hi/hf/hg/ho kernel (H, H) + bias (the two torch biases summed)
    gru             rows r,z,n; b_hn inside r * (W_hn h + b_hn)
                                                        [per layer, linen.GRUCell: nnx.GRUCell has no hidden-side
                                                        bias, so b_hn has nowhere to go] ir/iz/in kernel + bias
                                                        (r, z: the two biases summed), hr/hz kernel, hn kernel + bias
    mha             in_proj_weight (3E, E) packed q,k,v, or q/k/v_proj_weight; out_proj.*
                                                        query/key/value kernel (in, heads, head_dim), bias
                                                        (heads, head_dim); out kernel (heads, head_dim, E)

Every conversion is a transpose, reshape, slice or concatenation, so both directions are
bit-exact, with one exception the layouts force: Flax keeps one bias per LSTM gate (and per
GRU r/z gate) where torch keeps two. torch -> Flax stores fl(b_ih + b_hh); Flax -> torch puts
that sum in bias_hh and zeros in bias_ih: the module computes the same function and
Flax -> torch -> Flax is bit-exact, but the torch-side split is not recoverable.

Arrays stay what they were given as: NumPy in, NumPy out; jax arrays (traced ones included)
in, jax out, so the conversion can run inside a jitted function and is then part of what
the equivalence checks test. torch tensors are read as NumPy. A malformed state_dict or tree
(a missing key, an extra key, a wrong shape) raises ConversionError naming the key.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

KINDS = ("linear", "conv", "conv_transpose", "layer_norm", "rms_norm", "group_norm", "instance_norm",
         "batch_norm", "embedding", "lstm", "gru", "mha")
LSTM_GATES = ("i", "f", "g", "o")  # torch's row order; Flax names the gate Linears ii/if_/ig/io, hi/hf/hg/ho
GRU_GATES = ("r", "z", "n")


class ConversionError(ValueError):
    """A state_dict or parameter tree that does not fit the layer: names the key."""


# --------------------------------------------------------------------------- array helpers


def _xp(x: Any) -> Any:
    if type(x).__module__.startswith(("jax", "jaxlib")):
        import jax.numpy as jnp

        return jnp
    return np


def _array(x: Any) -> Any:
    if type(x).__module__.startswith("torch"):
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            from equivcheck.backends.torch import to_numpy

            return to_numpy(x)
        return x.numpy().copy()
    return x if hasattr(x, "shape") and hasattr(x, "dtype") else np.asarray(x)


def _spatial_first(w: Any) -> Any:
    """(A, B, *k) -> (*k, B, A): torch conv weights to Flax kernels (either conv kind)."""
    n = w.ndim - 2
    return w.transpose(*range(2, n + 2), 1, 0)


def _spatial_last(k: Any) -> Any:
    """The inverse of _spatial_first."""
    n = k.ndim - 2
    return k.transpose(n + 1, n, *range(n))


def channels_last(x: Any) -> Any:
    """NC... activations (torch) to N...C (Flax)."""
    return _xp(x).moveaxis(x, 1, -1)


def channels_first(x: Any) -> Any:
    """N...C activations (Flax) to NC... (torch)."""
    return _xp(x).moveaxis(x, -1, 1)


# --------------------------------------------------------------------------- validation


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        path = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flat(v, path + "/"))
        elif isinstance(v, (list, tuple)) and v and isinstance(v[0], Mapping):
            for i, item in enumerate(v):
                out.update(_flat(item, f"{path}/{i}/"))
        else:
            out[path] = v
    return out


def _check(kind: str, side: str, given: Mapping[str, Any], want: Mapping[str, tuple[int, ...] | None],
           dropped: tuple[str, ...] = ()) -> None:
    """`given` must hold exactly the keys of `want` (shape None: any shape), plus `dropped` ones."""
    missing = [k for k in want if k not in given]
    if missing:
        raise ConversionError(f"{kind}: the {side} is missing {missing[0]!r} (expected keys: {', '.join(want)})")
    extra = [k for k in given if k not in want and k not in dropped]
    if extra:
        raise ConversionError(f"{kind}: the {side} has an unexpected key {extra[0]!r} "
                              f"(expected keys: {', '.join(want)})")
    for k, shape in want.items():
        got = tuple(np.shape(given[k]))
        if shape is not None and got != tuple(shape):
            raise ConversionError(f"{kind}: {side} key {k!r} has shape {list(got)}, expected {list(shape)}")


def _ndim(kind: str, side: str, key: str, x: Any, ndims: tuple[int, ...]) -> None:
    if np.ndim(x) not in ndims:
        raise ConversionError(f"{kind}: {side} key {key!r} has shape {list(np.shape(x))}: "
                              f"expected {' or '.join(map(str, ndims))} dimensions")


SD, TREE = "state_dict", "Flax tree"


# --------------------------------------------------------------------------- per layer


def _affine_to_jax(kind: str, sd: Mapping[str, Any], names: dict[str, str], **_: Any) -> dict[str, Any]:
    """Layers whose torch vectors are Flax vectors under other names (norms, embedding)."""
    first = next((k for k in names if k in sd), None)
    if first is None:
        raise ConversionError(f"{kind}: the {SD} is missing {next(iter(names))!r} (expected keys: {', '.join(names)})")
    shape = np.shape(sd[first])
    _check(kind, SD, sd, {k: shape for k in names if k in sd or k == first})
    return {names[k]: sd[k] for k in names if k in sd}


def _linear_to_jax(sd: Mapping[str, Any], **_: Any) -> dict[str, Any]:
    _ndim("linear", SD, "weight", sd.get("weight", np.zeros((0, 0))), (2,))
    want = {"weight": None} | ({"bias": (np.shape(sd["weight"])[0],)} if "bias" in sd else {})
    _check("linear", SD, sd, want)
    return {"kernel": sd["weight"].T} | ({"bias": sd["bias"]} if "bias" in sd else {})


def _linear_to_torch(tree: Mapping[str, Any], **_: Any) -> dict[str, Any]:
    _ndim("linear", TREE, "kernel", tree.get("kernel", np.zeros((0, 0))), (2,))
    want = {"kernel": None} | ({"bias": (np.shape(tree["kernel"])[1],)} if "bias" in tree else {})
    _check("linear", TREE, tree, want)
    return {"weight": tree["kernel"].T} | ({"bias": tree["bias"]} if "bias" in tree else {})


def _conv_to_jax(sd: Mapping[str, Any], kind: str = "conv", **_: Any) -> dict[str, Any]:
    _ndim(kind, SD, "weight", sd.get("weight", np.zeros((0, 0, 0))), (3, 4, 5))
    out_axis = 1 if kind == "conv_transpose" else 0
    want = {"weight": None} | ({"bias": None} if "bias" in sd else {})
    _check(kind, SD, sd, want)
    w = sd["weight"]
    if "bias" in sd and kind == "conv":
        _check(kind, SD, sd, {"weight": None, "bias": (np.shape(w)[out_axis],)})
    # A transposed conv's bias follows its output channels, which torch keeps per group: (O/g * g,).
    return {"kernel": _spatial_first(w)} | ({"bias": sd["bias"]} if "bias" in sd else {})


def _conv_to_torch(tree: Mapping[str, Any], kind: str = "conv", **_: Any) -> dict[str, Any]:
    _ndim(kind, TREE, "kernel", tree.get("kernel", np.zeros((0, 0, 0))), (3, 4, 5))
    k = tree["kernel"] if "kernel" in tree else None
    want = {"kernel": None} | ({"bias": (np.shape(k)[-1 if kind == "conv" else -2],)} if "bias" in tree else {})
    _check(kind, TREE, tree, want)
    return {"weight": _spatial_last(tree["kernel"])} | ({"bias": tree["bias"]} if "bias" in tree else {})


def _norm_to_torch(kind: str, tree: Mapping[str, Any], names: dict[str, str], shape: tuple[int, ...] | None = None,
                   **_: Any) -> dict[str, Any]:
    back = {v: k for k, v in names.items()}
    present = [k for k in back if k in tree]
    if not present:
        raise ConversionError(f"{kind}: the {TREE} is missing {next(iter(back))!r} (expected keys: {', '.join(back)})")
    size = np.shape(tree[present[0]])
    _check(kind, TREE, tree, {k: size for k in present} | {k: size for k in tree if k not in back})
    return {back[k]: (tree[k].reshape(shape) if shape is not None else tree[k]) for k in present}


def _layer_norm_to_jax(sd: Mapping[str, Any], kind: str = "layer_norm", **_: Any) -> dict[str, Any]:
    names = {"weight": "scale", "bias": "bias"} if kind == "layer_norm" else {"weight": "scale"}
    tree = _affine_to_jax(kind, sd, names)
    return {k: v.reshape(-1) for k, v in tree.items()}


_BN = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}


def _batch_norm_to_jax(sd: Mapping[str, Any], **_: Any) -> dict[str, Any]:
    keys = [k for k in _BN if k in sd]
    if not keys:
        raise ConversionError(f"batch_norm: the {SD} is missing 'weight' (expected keys: {', '.join(_BN)})")
    c = np.shape(sd[keys[0]])
    # affine=False drops weight/bias, track_running_stats=False drops the stats: each as a pair.
    for a, b in (("weight", "bias"), ("running_mean", "running_var")):
        if (a in sd) != (b in sd):
            raise ConversionError(f"batch_norm: the {SD} is missing {(b if a in sd else a)!r} "
                                  f"(expected keys: {', '.join(_BN)})")
    nbt = ("num_batches_tracked",) if "running_mean" in sd else ()
    _check("batch_norm", SD, sd, {k: c for k in keys}, dropped=nbt)
    return {_BN[k]: sd[k] for k in keys}


def _batch_norm_to_torch(tree: Mapping[str, Any], **_: Any) -> dict[str, Any]:
    sd = _norm_to_torch("batch_norm", tree, _BN)
    if "running_mean" in sd:
        sd["num_batches_tracked"] = np.zeros((), np.int64)  # torch's counter; Flax keeps none
    return sd


# ---- recurrent


def _rnn_layers(kind: str, sd: Mapping[str, Any]) -> int:
    for key in sd:
        if key.endswith("_reverse") or key.startswith("weight_hr"):
            what = "bidirectional" if key.endswith("_reverse") else "proj_size"
            raise ConversionError(f"{kind}: {SD} key {key!r}: {what} is not supported (no Flax counterpart here)")
    layers = sorted({int(m.group(1)) for k in sd if (m := re.fullmatch(r"\w+_l(\d+)", k))})
    if not layers:
        raise ConversionError(f"{kind}: the {SD} is missing 'weight_ih_l0' (expected keys: weight_ih_l0, "
                              "weight_hh_l0, bias_ih_l0, bias_hh_l0, ...)")
    return layers[-1] + 1


def _rnn_want(kind: str, sd: Mapping[str, Any], n_gates: int) -> tuple[int, int, dict[str, Any]]:
    n = _rnn_layers(kind, sd)
    _ndim(kind, SD, "weight_hh_l0", sd.get("weight_hh_l0", np.zeros((0, 0))), (2,))
    hidden = np.shape(sd["weight_hh_l0"])[1]
    _ndim(kind, SD, "weight_ih_l0", sd.get("weight_ih_l0", np.zeros((0, 0))), (2,))
    want: dict[str, Any] = {}
    bias = "bias_ih_l0" in sd or "bias_hh_l0" in sd
    for k in range(n):
        in_k = np.shape(sd["weight_ih_l0"])[1] if k == 0 else hidden
        want |= {f"weight_ih_l{k}": (n_gates * hidden, in_k), f"weight_hh_l{k}": (n_gates * hidden, hidden)}
        if bias:
            want |= {f"bias_ih_l{k}": (n_gates * hidden,), f"bias_hh_l{k}": (n_gates * hidden,)}
    _check(kind, SD, sd, want)
    return n, hidden, want


def _rows(w: Any, n: int) -> list[Any]:
    h = w.shape[0] // n
    return [w[i * h:(i + 1) * h] for i in range(n)]


def _lstm_to_jax(sd: Mapping[str, Any], **_: Any) -> list[dict[str, Any]]:
    n, hidden, _ = _rnn_want("lstm", sd, 4)
    layers = []
    for k in range(n):
        wi, wh = _rows(sd[f"weight_ih_l{k}"], 4), _rows(sd[f"weight_hh_l{k}"], 4)
        if f"bias_ih_l{k}" in sd:
            b = _rows(sd[f"bias_ih_l{k}"] + sd[f"bias_hh_l{k}"], 4)
        else:
            b = [_xp(w).zeros(hidden, w.dtype) for w in wh]
        cell = {}
        for g, a, c, bias in zip(LSTM_GATES, wi, wh, b):
            cell["i" + ("f_" if g == "f" else g)] = {"kernel": a.T}
            cell["h" + g] = {"kernel": c.T, "bias": bias}
        layers.append(cell)
    return layers


def _cat(parts: list[Any]) -> Any:
    return _xp(parts[0]).concatenate(parts, axis=0)


def _rnn_tree_want(kind: str, tree: Any, names: dict[str, bool]) -> tuple[int, int]:
    if not isinstance(tree, (list, tuple)) or not tree:
        raise ConversionError(f"{kind}: the {TREE} must be a non-empty list of per-layer cell parameters, "
                              f"got {type(tree).__name__}")
    first = tree[0].get("hi" if kind == "lstm" else "hr", {}).get("kernel")
    if first is None:
        raise ConversionError(f"{kind}: the {TREE} is missing '0/{'hi' if kind == 'lstm' else 'hr'}/kernel'")
    hidden = np.shape(first)[0]
    in0 = np.shape(tree[0].get("ii" if kind == "lstm" else "ir", {}).get("kernel", np.zeros((0, 0))))[0]
    want = {}
    for k in range(len(tree)):
        in_k = in0 if k == 0 else hidden
        for name, has_bias in names.items():
            side_in = name[0] == "i"
            want[f"{k}/{name}/kernel"] = (in_k if side_in else hidden, hidden)
            if has_bias:
                want[f"{k}/{name}/bias"] = (hidden,)
    flat = {f"{k}/{p}": v for k, cell in enumerate(tree) for p, v in _flat(cell).items()}
    _check(kind, TREE, flat, want)
    return len(tree), hidden


def _lstm_to_torch(tree: Any, bias: bool = True, **_: Any) -> dict[str, Any]:
    names = {"ii": False, "if_": False, "ig": False, "io": False, "hi": True, "hf": True, "hg": True, "ho": True}
    n, hidden = _rnn_tree_want("lstm", tree, names)
    sd: dict[str, Any] = {}
    for k, cell in enumerate(tree):
        sd[f"weight_ih_l{k}"] = _cat([cell["i" + ("f_" if g == "f" else g)]["kernel"].T for g in LSTM_GATES])
        sd[f"weight_hh_l{k}"] = _cat([cell["h" + g]["kernel"].T for g in LSTM_GATES])
        b = _cat([cell["h" + g]["bias"] for g in LSTM_GATES])
        if bias:
            sd[f"bias_ih_l{k}"] = _xp(b).zeros_like(b)
            sd[f"bias_hh_l{k}"] = b
        elif _xp(b) is np and np.any(b != 0):
            raise ConversionError(f"lstm: {TREE} key '{k}/hi/bias' (or another gate's) is nonzero but bias=False")
    return sd


def _gru_to_jax(sd: Mapping[str, Any], **_: Any) -> list[dict[str, Any]]:
    n, hidden, _ = _rnn_want("gru", sd, 3)
    layers = []
    for k in range(n):
        (wr, wz, wn), (ur, uz, un) = _rows(sd[f"weight_ih_l{k}"], 3), _rows(sd[f"weight_hh_l{k}"], 3)
        if f"bias_ih_l{k}" in sd:
            (br, bz, bn), (cr, cz, cn) = _rows(sd[f"bias_ih_l{k}"], 3), _rows(sd[f"bias_hh_l{k}"], 3)
            br, bz = br + cr, bz + cz
        else:
            br = bz = bn = cn = _xp(wr).zeros(hidden, wr.dtype)
        layers.append({"ir": {"kernel": wr.T, "bias": br}, "iz": {"kernel": wz.T, "bias": bz},
                       "in": {"kernel": wn.T, "bias": bn}, "hr": {"kernel": ur.T}, "hz": {"kernel": uz.T},
                       "hn": {"kernel": un.T, "bias": cn}})
    return layers


def _gru_to_torch(tree: Any, **_: Any) -> dict[str, Any]:
    names = {"ir": True, "iz": True, "in": True, "hr": False, "hz": False, "hn": True}
    _rnn_tree_want("gru", tree, names)
    sd: dict[str, Any] = {}
    for k, cell in enumerate(tree):
        sd[f"weight_ih_l{k}"] = _cat([cell["i" + g]["kernel"].T for g in GRU_GATES])
        sd[f"weight_hh_l{k}"] = _cat([cell["h" + g]["kernel"].T for g in GRU_GATES])
        zero = _xp(cell["hn"]["bias"]).zeros_like(cell["hn"]["bias"])
        sd[f"bias_ih_l{k}"] = _cat([cell["i" + g]["bias"] for g in GRU_GATES])
        sd[f"bias_hh_l{k}"] = _cat([zero, zero, cell["hn"]["bias"]])
    return sd


# ---- attention


def _mha_to_jax(sd: Mapping[str, Any], num_heads: int | None = None, **_: Any) -> dict[str, Any]:
    if num_heads is None:
        raise ConversionError("mha: num_heads is needed to split the projections into heads")
    for key in ("bias_k", "bias_v"):
        if key in sd:
            raise ConversionError(f"mha: {SD} key {key!r}: add_bias_kv is not supported (Flax has no counterpart)")
    _ndim("mha", SD, "out_proj.weight", sd.get("out_proj.weight", np.zeros((0, 0))), (2,))
    e = np.shape(sd["out_proj.weight"])[0]
    if e % num_heads:
        raise ConversionError(f"mha: embed_dim {e} (from 'out_proj.weight') is not divisible by num_heads {num_heads}")
    d = e // num_heads
    packed = "in_proj_weight" in sd
    if packed:
        want: dict[str, Any] = {"in_proj_weight": (3 * e, e)}
    else:
        kdim = np.shape(sd.get("k_proj_weight", np.zeros((e, e))))[-1]
        want = {"q_proj_weight": (e, e), "k_proj_weight": (e, kdim), "v_proj_weight": (e, kdim)}
    bias = "in_proj_bias" in sd
    want |= {"out_proj.weight": (e, e)} | ({"in_proj_bias": (3 * e,), "out_proj.bias": (e,)} if bias else {})
    _check("mha", SD, sd, want)
    ws = _rows(sd["in_proj_weight"], 3) if packed else [sd[f"{p}_proj_weight"] for p in "qkv"]
    bs = _rows(sd["in_proj_bias"], 3) if bias else [None] * 3
    tree: dict[str, Any] = {}
    for name, w, b in zip(("query", "key", "value"), ws, bs):
        tree[name] = {"kernel": w.T.reshape(w.shape[1], num_heads, d)}
        if bias:
            tree[name]["bias"] = b.reshape(num_heads, d)
    wo = sd["out_proj.weight"]
    tree["out"] = {"kernel": wo.T.reshape(num_heads, d, e)} | ({"bias": sd["out_proj.bias"]} if bias else {})
    return tree


def _mha_to_torch(tree: Mapping[str, Any], packed: bool | None = None, **_: Any) -> dict[str, Any]:
    out_k = tree.get("out", {}).get("kernel")
    if out_k is None or np.ndim(out_k) != 3:
        raise ConversionError(f"mha: the {TREE} is missing 'out/kernel' of shape (heads, head_dim, embed_dim)")
    h, d, e = np.shape(out_k)
    kdim = np.shape(tree.get("key", {}).get("kernel", np.zeros((e, h, d))))[0]
    bias = "bias" in tree.get("out", {})
    want: dict[str, Any] = {"query/kernel": (e, h, d), "key/kernel": (kdim, h, d), "value/kernel": (kdim, h, d),
                            "out/kernel": (h, d, e)}
    if bias:
        want |= {"query/bias": (h, d), "key/bias": (h, d), "value/bias": (h, d), "out/bias": (e,)}
    _check("mha", TREE, _flat(tree), want)
    packed = kdim == e if packed is None else packed
    ws = [tree[n]["kernel"].reshape(-1, e).T for n in ("query", "key", "value")]
    sd: dict[str, Any] = {"in_proj_weight": _cat(ws)} if packed else {f"{p}_proj_weight": w for p, w in zip("qkv", ws)}
    if bias:
        sd["in_proj_bias"] = _cat([tree[n]["bias"].reshape(e) for n in ("query", "key", "value")])
    sd["out_proj.weight"] = out_k.reshape(e, e).T
    if bias:
        sd["out_proj.bias"] = tree["out"]["bias"]
    return sd


# --------------------------------------------------------------------------- the table


def _embedding_to_torch(tree: Mapping[str, Any], **_: Any) -> dict[str, Any]:
    _check("embedding", TREE, tree, {"embedding": None})
    _ndim("embedding", TREE, "embedding", tree["embedding"], (2,))
    return {"weight": tree["embedding"]}


def _embedding_to_jax(sd: Mapping[str, Any], **_: Any) -> dict[str, Any]:
    _check("embedding", SD, sd, {"weight": None})
    _ndim("embedding", SD, "weight", sd["weight"], (2,))
    return {"embedding": sd["weight"]}


def _layer_norm_to_torch(tree: Mapping[str, Any], kind: str = "layer_norm", normalized_shape: Any = None,
                         **_: Any) -> dict[str, Any]:
    names = {"weight": "scale", "bias": "bias"} if kind == "layer_norm" else {"weight": "scale"}
    shape = None if normalized_shape is None else tuple(np.atleast_1d(normalized_shape))
    return _norm_to_torch(kind, tree, names, shape)


_AFFINE = {"weight": "scale", "bias": "bias"}
_TO_JAX: dict[str, Callable[..., Any]] = {
    "linear": _linear_to_jax,
    "conv": _conv_to_jax,
    "conv_transpose": lambda sd, **cfg: _conv_to_jax(sd, kind="conv_transpose"),
    "layer_norm": _layer_norm_to_jax,
    "rms_norm": lambda sd, **cfg: _layer_norm_to_jax(sd, kind="rms_norm"),
    "group_norm": lambda sd, **cfg: _affine_to_jax("group_norm", sd, _AFFINE),
    "instance_norm": lambda sd, **cfg: _affine_to_jax("instance_norm", sd, _AFFINE) if sd else {},
    "batch_norm": _batch_norm_to_jax,
    "embedding": _embedding_to_jax,
    "lstm": _lstm_to_jax,
    "gru": _gru_to_jax,
    "mha": _mha_to_jax,
}
_TO_TORCH: dict[str, Callable[..., Any]] = {
    "linear": _linear_to_torch,
    "conv": _conv_to_torch,
    "conv_transpose": lambda tree, **cfg: _conv_to_torch(tree, kind="conv_transpose"),
    "layer_norm": _layer_norm_to_torch,
    "rms_norm": lambda tree, **cfg: _layer_norm_to_torch(tree, kind="rms_norm", **cfg),
    "group_norm": lambda tree, **cfg: _norm_to_torch("group_norm", tree, _AFFINE),
    "instance_norm": lambda tree, **cfg: _norm_to_torch("instance_norm", tree, _AFFINE) if tree else {},
    "batch_norm": _batch_norm_to_torch,
    "embedding": _embedding_to_torch,
    "lstm": _lstm_to_torch,
    "gru": _gru_to_torch,
    "mha": _mha_to_torch,
}


def _kind(kind: str) -> None:
    if kind not in _TO_JAX:
        raise ConversionError(f"unknown layer kind {kind!r}; known: {', '.join(KINDS)}")


def to_jax(kind: str, state_dict: Mapping[str, Any], **cfg: Any) -> Any:
    """A torch layer's state_dict (tensors or arrays) as the Flax layer's parameter tree.

    cfg: `num_heads` for mha. The tree is what `nnx.to_pure_dict(nnx.state(layer))` gives
    for the matching nnx layer (per-layer cell lists for lstm/gru).
    """
    _kind(kind)
    if not isinstance(state_dict, Mapping):
        raise ConversionError(f"{kind}: expected a state_dict mapping, got {type(state_dict).__name__}")
    return _TO_JAX[kind]({k: _array(v) for k, v in state_dict.items()}, **cfg)


def to_torch(kind: str, tree: Any, **cfg: Any) -> dict[str, Any]:
    """A Flax parameter tree as the torch layer's state_dict (NumPy or jax arrays; wrap with
    torch.from_numpy / torch.as_tensor to load). cfg: `normalized_shape` for layer_norm and
    rms_norm (else 1-D), `packed` for mha (default: packed when kdim == embed_dim)."""
    _kind(kind)
    return _TO_TORCH[kind](tree, **cfg)


# --------------------------------------------------------------------------- from a module


def describe(module: Any) -> tuple[str, dict[str, Any]]:
    """The layer kind and conversion settings of a torch.nn module."""
    import torch.nn as nn

    table: list[tuple[Any, str]] = [
        (nn.Linear, "linear"), ((nn.Conv1d, nn.Conv2d, nn.Conv3d), "conv"),
        ((nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d), "conv_transpose"),
        (nn.LayerNorm, "layer_norm"), (nn.RMSNorm, "rms_norm"), (nn.GroupNorm, "group_norm"),
        ((nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d), "instance_norm"),
        ((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d), "batch_norm"), (nn.Embedding, "embedding"),
        (nn.LSTM, "lstm"), (nn.GRU, "gru"), (nn.MultiheadAttention, "mha"),
    ]
    for cls, kind in table:
        if isinstance(module, cls):
            cfg: dict[str, Any] = {}
            if kind in ("layer_norm", "rms_norm"):
                cfg["normalized_shape"] = tuple(module.normalized_shape)
            if kind == "mha":
                cfg["num_heads"] = module.num_heads
                cfg["packed"] = module._qkv_same_embed_dim
            if kind == "lstm":
                cfg["bias"] = module.bias
            return kind, cfg
    raise ConversionError(f"no conversion for {type(module).__name__}; known kinds: {', '.join(KINDS)}")


def module_to_jax(module: Any) -> Any:
    """`to_jax` of a torch module's own state_dict, its kind and settings read off the module."""
    kind, cfg = describe(module)
    return to_jax(kind, module.state_dict(), **cfg)


def flax_momentum(torch_momentum: float | None) -> float:
    """torch weights the new batch statistic by `momentum`; Flax weights the old one."""
    if torch_momentum is None:
        raise ConversionError("batch_norm: momentum=None (a cumulative average) has no Flax counterpart")
    return 1.0 - torch_momentum


def unbiased_running_var(old: Any, flax_new: Any, flax_momentum_: float, n: int) -> Any:
    """torch's running_var after one step, from Flax's: torch updates with the unbiased batch
    variance (n/(n-1)), Flax with the biased one. n: elements per channel in the batch."""
    if n < 2:
        raise ConversionError("batch_norm: the unbiased variance needs at least 2 values per channel")
    return flax_momentum_ * old + (flax_new - flax_momentum_ * old) * (n / (n - 1))
