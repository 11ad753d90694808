"""Per-layer weight layouts, torch state_dict <-> Flax tree, and their validation (the
dense layers; recurrent and attention layers are in layouts_seq.py). Use them through
equivcheck.weights.convert, which documents every layout in one table."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


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
# kind -> (torch state_dict -> Flax tree, Flax tree -> torch state_dict)
