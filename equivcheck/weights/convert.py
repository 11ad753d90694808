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
                    bidirectional: *_l{k}_reverse keys  [per layer] linen.Bidirectional's params:
                                                        {forward_rnn: {cell: ...}, backward_rnn: {cell: ...}}
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

from collections.abc import Callable, Mapping
from typing import Any

from equivcheck.weights.layouts import (  # noqa: F401 - re-exported: the conversion API lives here
    _AFFINE,
    ConversionError,
    _affine_to_jax,
    _array,
    _batch_norm_to_jax,
    _batch_norm_to_torch,
    _conv_to_jax,
    _conv_to_torch,
    _embedding_to_jax,
    _embedding_to_torch,
    _layer_norm_to_jax,
    _layer_norm_to_torch,
    _linear_to_jax,
    _linear_to_torch,
    _norm_to_torch,
    channels_first,
    channels_last,
)
from equivcheck.weights.layouts_seq import (  # noqa: F401
    GRU_GATES,
    LSTM_GATES,
    _gru_to_jax,
    _gru_to_torch,
    _lstm_to_jax,
    _lstm_to_torch,
    _mha_to_jax,
    _mha_to_torch,
)

KINDS = ("linear", "conv", "conv_transpose", "layer_norm", "rms_norm", "group_norm", "instance_norm",
         "batch_norm", "embedding", "lstm", "gru", "mha")

# kind -> (torch state_dict -> Flax tree, Flax tree -> torch state_dict)
_LAYOUTS: dict[str, tuple[Callable[..., Any], Callable[..., Any]]] = {
    "linear": (_linear_to_jax, _linear_to_torch),
    "conv": (_conv_to_jax, _conv_to_torch),
    "conv_transpose": (lambda sd, **cfg: _conv_to_jax(sd, kind="conv_transpose"),
                       lambda tree, **cfg: _conv_to_torch(tree, kind="conv_transpose")),
    "layer_norm": (_layer_norm_to_jax, _layer_norm_to_torch),
    "rms_norm": (lambda sd, **cfg: _layer_norm_to_jax(sd, kind="rms_norm"),
                 lambda tree, **cfg: _layer_norm_to_torch(tree, kind="rms_norm", **cfg)),
    "group_norm": (lambda sd, **cfg: _affine_to_jax("group_norm", sd, _AFFINE),
                   lambda tree, **cfg: _norm_to_torch("group_norm", tree, _AFFINE)),
    # InstanceNorm's default affine=False has no parameters at all
    "instance_norm": (lambda sd, **cfg: _affine_to_jax("instance_norm", sd, _AFFINE) if sd else {},
                      lambda tree, **cfg: _norm_to_torch("instance_norm", tree, _AFFINE) if tree else {}),
    "batch_norm": (_batch_norm_to_jax, _batch_norm_to_torch),
    "embedding": (_embedding_to_jax, _embedding_to_torch),
    "lstm": (_lstm_to_jax, _lstm_to_torch),
    "gru": (_gru_to_jax, _gru_to_torch),
    "mha": (_mha_to_jax, _mha_to_torch),
}


_MODULES: list[tuple[type, str, Callable[[Any], dict[str, Any]]]] = []  # register_module's, newest first


def register_module(module_type: type, kind: str, to_jax: Callable[..., Any], to_torch: Callable[..., Any], *,
                    config: Callable[[Any], Mapping[str, Any]] | None = None) -> None:
    """Teach the automatic model conversion (ModelPair without rules) a module type of your own.

    module_type  a torch.nn.Module subclass; its instances (subclasses too) convert by `kind`.
                 A type registered later wins over an earlier one and over the built-in table.
    kind         a new name (not one of the built-in KINDS): it names the module in messages.
    to_jax       (state_dict, **cfg) -> the port's parameter tree for one module: the module's own
                 parameters and persistent buffers by their local names ("weight", "scale", ...);
                 its child modules convert on their own, nested under it by their names.
                 It must keep jax arrays jax (use `.T`, `.reshape`, `.transpose`, slicing, jnp):
                 gradients go back to torch names by `jax.vjp` of this function.
    to_torch     (tree, **cfg) -> the module's state_dict: the inverse.
    config       module -> cfg keyword arguments both functions take (settings read off the module).

    Raises ConversionError for a kind already registered or built in, TypeError for a
    module_type that is not a class or functions that are not callable.
    """
    if not isinstance(module_type, type):
        raise TypeError(f"register_module: module_type must be a class, got {type(module_type).__name__}")
    if not (callable(to_jax) and callable(to_torch)) or (config is not None and not callable(config)):
        raise TypeError(f"register_module({module_type.__name__}): to_jax, to_torch and config must be callable")
    if not isinstance(kind, str) or not kind or kind in _LAYOUTS:
        raise ConversionError(f"register_module({module_type.__name__}): kind {kind!r} is empty or taken "
                              f"(taken: {', '.join(_LAYOUTS)})")
    _LAYOUTS[kind] = (to_jax, to_torch)
    _MODULES.insert(0, (module_type, kind, config or (lambda module: {})))


def _kind(kind: str) -> None:
    if kind not in _LAYOUTS:
        raise ConversionError(f"unknown layer kind {kind!r}; known: {', '.join(_LAYOUTS)}")


def to_jax(kind: str, state_dict: Mapping[str, Any], **cfg: Any) -> Any:
    """A torch layer's state_dict (tensors or arrays) as the Flax layer's parameter tree.

    cfg: `num_heads` for mha. The tree is what `nnx.to_pure_dict(nnx.state(layer))` gives
    for the matching nnx layer (per-layer cell lists for lstm/gru).
    """
    _kind(kind)
    if not isinstance(state_dict, Mapping):
        raise ConversionError(f"{kind}: expected a state_dict mapping, got {type(state_dict).__name__}")
    return _LAYOUTS[kind][0]({k: _array(v) for k, v in state_dict.items()}, **cfg)


def to_torch(kind: str, tree: Any, **cfg: Any) -> dict[str, Any]:
    """A Flax parameter tree as the torch layer's state_dict (NumPy or jax arrays; wrap with
    torch.from_numpy / torch.as_tensor to load). cfg: `normalized_shape` for layer_norm and
    rms_norm (else 1-D), `packed` for mha (default: packed when kdim == embed_dim)."""
    _kind(kind)
    return _LAYOUTS[kind][1](tree, **cfg)


# --------------------------------------------------------------------------- from a module


def describe(module: Any) -> tuple[str, dict[str, Any]]:
    """The layer kind and conversion settings of a torch.nn module (`register_module`'s first)."""
    from torch import nn

    for cls, kind, config in _MODULES:
        if isinstance(module, cls):
            return kind, dict(config(module))

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
            if kind in ("lstm", "gru"):
                cfg["bias"] = module.bias
            return kind, cfg
    raise ConversionError(f"no conversion for {type(module).__name__}; known kinds: {', '.join(_LAYOUTS)} "
                          "(equivcheck.weights.register_module adds one)")


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
