"""torch.nn layers run through their Flax counterparts: torch-layout weights and activations in,
torch-layout results out, with convert.py doing every layout change in between.

Each function takes the arguments of the torch.nn.functional call (or the module's
state_dict) and builds the Flax layer with the settings that make it compute what torch
computes: epsilons passed explicitly, `use_fast_variance=False` (torch's two-pass variance),
momentum inverted, padding translated. It is jit-compatible, so an equivalence pair can use it
as its JAX side and the conversion is checked along with the layer. Where Flax has no layer
(adaptive pooling, pixel shuffle, ceil-mode average pooling's divisor) the function says so
and uses jax.numpy / lax.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen, nnx

from equivcheck.weights import convert
from equivcheck.weights.convert import channels_first, channels_last


@functools.lru_cache(maxsize=512)
def _skeleton(cls: Any, items: tuple[tuple[str, Any], ...]) -> tuple[Any, Any]:
    # Abstract: no initialiser runs (eagerly each would compile); the values are replaced on use.
    def build() -> Any:
        kwargs = {k: v() if isinstance(v, _Build) else v for k, v in items}
        return cls(**({"rngs": nnx.Rngs(0)} | kwargs))

    return nnx.split(nnx.eval_shape(build))


class _Build(tuple):
    """A constructor argument that is itself a module to build (the cell of an nnx.RNN)."""

    def __call__(self) -> Any:
        cls, items = self[0], self[1]
        return cls(**dict(items), rngs=nnx.Rngs(0))


def nnx_layer(cls: Any, tree: Any, **kwargs: Any) -> Any:
    """An nnx layer `cls(**kwargs)` holding the parameters in `tree` (a pure dict)."""
    graphdef, state = _skeleton(cls, tuple(sorted(kwargs.items())))
    state = jax.tree.map(lambda x: x, state)  # a fresh State: replace_by_pure_dict mutates it
    try:
        # jax arrays, never NumPy ones: a layer that updates its statistics writes into them.
        nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, tree))
    except ValueError as exc:
        raise convert.ConversionError(f"{cls.__name__}: {exc}") from None
    unset = [".".join(map(str, path)) for path, leaf in nnx.to_flat_state(state)
             if isinstance(leaf.get_value() if hasattr(leaf, "get_value") else leaf, jax.ShapeDtypeStruct)]
    if unset:
        raise convert.ConversionError(f"{cls.__name__}: the parameter tree has no value for {unset[0]!r}")
    return nnx.merge(graphdef, state)


def _tuple(v: int | Sequence[int], n: int) -> tuple[int, ...]:
    return (int(v),) * n if isinstance(v, (int, np.integer)) else tuple(int(i) for i in v)


def _same(sd: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in sd.items() if v is not None}


# --------------------------------------------------------------------------- linear and conv


def linear(x: Any, weight: Any, bias: Any = None) -> Any:
    tree = convert.to_jax("linear", _same({"weight": weight, "bias": bias}))
    out_f, in_f = weight.shape
    return nnx_layer(nnx.Linear, tree, in_features=in_f, out_features=out_f, use_bias=bias is not None)(x)


def conv_padding(padding: Any, kernel: Sequence[int], dilation: Sequence[int], padding_mode: str = "zeros") -> Any:
    """torch's Conv padding (+ padding_mode) as Flax Conv's `padding`.

    Ints pad both sides (Flax 'SAME' pads asymmetrically when the stride exceeds 1, so ints
    stay explicit); 'same' (stride 1 only in torch) and 'valid' map to their Flax names,
    which pad the same amounts. circular/reflect: Flax pads ((k-1)//2, k//2) of the dilated
    kernel, which is torch's symmetric padding only for padding == dilation*(k-1)/2.
    """
    n = len(kernel)
    if isinstance(padding, str):
        if padding_mode != "zeros":
            raise ValueError(f"padding={padding!r} with padding_mode={padding_mode!r}: give explicit padding")
        return {"same": "SAME", "valid": "VALID"}[padding]
    pads = _tuple(padding, n)
    if padding_mode == "zeros":
        return tuple((p, p) for p in pads)
    if padding_mode not in ("circular", "reflect"):
        raise ValueError(f"padding_mode={padding_mode!r} has no Flax Conv counterpart (circular and reflect do)")
    for p, k, d in zip(pads, kernel, dilation):
        if 2 * p != d * (k - 1):
            raise ValueError(f"padding_mode={padding_mode!r}: Flax pads dilation*(kernel-1)/2 = {d * (k - 1) / 2:g} "
                             f"per side, torch was given {p}")
    return padding_mode.upper()


def conv(x: Any, weight: Any, bias: Any = None, stride: Any = 1, padding: Any = 0, dilation: Any = 1,
         groups: int = 1, padding_mode: str = "zeros") -> Any:
    """torch Conv{1,2,3}d through nnx.Conv (NC... in and out)."""
    n = weight.ndim - 2
    kernel, dil = tuple(weight.shape[2:]), _tuple(dilation, n)
    tree = convert.to_jax("conv", _same({"weight": weight, "bias": bias}))
    layer = nnx_layer(nnx.Conv, tree, in_features=weight.shape[1] * groups, out_features=weight.shape[0],
                      kernel_size=kernel, strides=_tuple(stride, n),
                      padding=conv_padding(padding, kernel, dil, padding_mode),
                      kernel_dilation=dil, feature_group_count=groups, use_bias=bias is not None)
    return channels_first(layer(channels_last(x)))


def conv_transpose(x: Any, weight: Any, bias: Any = None, stride: Any = 1, padding: Any = 0, output_padding: Any = 0,
                   dilation: Any = 1) -> Any:
    """torch ConvTranspose{1,2,3}d (groups=1) through nnx.ConvTranspose with transpose_kernel=True.

    torch's transposed conv is the gradient of a conv: Flax needs the kernel flipped
    (transpose_kernel) and padding dilation*(k-1) - p before and that + output_padding after.
    """
    n = weight.ndim - 2
    kernel, dil, op = tuple(weight.shape[2:]), _tuple(dilation, n), _tuple(output_padding, n)
    pads = tuple((d * (k - 1) - p, d * (k - 1) - p + o) for k, d, p, o in zip(kernel, dil, _tuple(padding, n), op))
    tree = convert.to_jax("conv_transpose", _same({"weight": weight, "bias": bias}))
    layer = nnx_layer(nnx.ConvTranspose, tree, in_features=weight.shape[0], out_features=weight.shape[1],
                      kernel_size=kernel, strides=_tuple(stride, n), padding=pads, kernel_dilation=dil,
                      transpose_kernel=True, use_bias=bias is not None)
    return channels_first(layer(channels_last(x)))


# --------------------------------------------------------------------------- normalization


def _axes(k: int) -> tuple[int, ...]:
    return tuple(range(-k, 0))


def layer_norm(x: Any, normalized_shape: Sequence[int], weight: Any = None, bias: Any = None, eps: float = 1e-5) -> Any:
    shape = _tuple(normalized_shape, 1)
    tree = convert.to_jax("layer_norm", _same({"weight": weight, "bias": bias})) if weight is not None else {}
    layer = nnx_layer(nnx.LayerNorm, tree, num_features=math.prod(shape), epsilon=eps, use_fast_variance=False,
                      reduction_axes=_axes(len(shape)), feature_axes=_axes(len(shape)),
                      use_scale=weight is not None, use_bias=bias is not None)
    return layer(x)


def rms_norm(x: Any, normalized_shape: Sequence[int], weight: Any = None, eps: float | None = None) -> Any:
    """torch's eps=None means finfo(x.dtype).eps; Flax's default is 1e-6."""
    shape = _tuple(normalized_shape, 1)
    eps = float(jnp.finfo(x.dtype).eps) if eps is None else eps
    tree = convert.to_jax("rms_norm", {"weight": weight}) if weight is not None else {}
    layer = nnx_layer(nnx.RMSNorm, tree, num_features=math.prod(shape), epsilon=eps, use_fast_variance=False,
                      reduction_axes=_axes(len(shape)), feature_axes=_axes(len(shape)), use_scale=weight is not None)
    return layer(x)


def group_norm(x: Any, num_groups: int, weight: Any = None, bias: Any = None, eps: float = 1e-5) -> Any:
    tree = convert.to_jax("group_norm", _same({"weight": weight, "bias": bias})) if weight is not None else {}
    layer = nnx_layer(nnx.GroupNorm, tree, num_features=x.shape[1], num_groups=num_groups, epsilon=eps,
                      use_fast_variance=False, use_scale=weight is not None, use_bias=bias is not None)
    return channels_first(layer(channels_last(x)))


def instance_norm(x: Any, weight: Any = None, bias: Any = None, eps: float = 1e-5) -> Any:
    """torch InstanceNorm without running stats (its default)."""
    tree = convert.to_jax("instance_norm", _same({"weight": weight, "bias": bias})) if weight is not None else {}
    layer = nnx_layer(nnx.InstanceNorm, tree, num_features=x.shape[1], epsilon=eps, use_fast_variance=False,
                      use_scale=weight is not None, use_bias=bias is not None)
    return channels_first(layer(channels_last(x)))


def batch_norm(x: Any, running_mean: Any, running_var: Any, weight: Any, bias: Any, training: bool,
               momentum: float = 0.1, eps: float = 1e-5) -> tuple[Any, Any, Any]:
    """torch BatchNorm (F.batch_norm) through nnx.BatchNorm: (output, new running_mean, new running_var).

    Flax weights the old statistic by `momentum` (torch: the new one), and updates the running
    variance with the biased batch variance where torch uses the unbiased one: the update is
    corrected with convert.unbiased_running_var. Running statistics carry no gradient (torch
    updates its buffers outside autograd).
    """
    sd = {"weight": weight, "bias": bias, "running_mean": running_mean, "running_var": running_var}
    m = convert.flax_momentum(momentum)
    layer = nnx_layer(nnx.BatchNorm, convert.to_jax("batch_norm", sd), num_features=x.shape[1], momentum=m,
                      epsilon=eps, use_fast_variance=False, use_running_average=not training)
    y = channels_first(layer(channels_last(x)))
    if not training:
        return y, running_mean, running_var
    n = x.size // x.shape[1]
    new_var = convert.unbiased_running_var(running_var, layer.var[...], m, n)
    return y, jax.lax.stop_gradient(layer.mean[...]), jax.lax.stop_gradient(new_var)


def embedding(indices: Any, weight: Any, padding_idx: int | None = None) -> Any:
    """nnx.Embed; torch keeps the padding_idx row out of the gradient, Flax has no such option."""
    if padding_idx is not None:
        row = (jnp.arange(weight.shape[0]) == padding_idx % weight.shape[0])[:, None]
        weight = jnp.where(row, jax.lax.stop_gradient(weight), weight)
    tree = convert.to_jax("embedding", {"weight": weight})
    # nnx.Embed fixes its compute dtype when built (dtype or the initial table's, float32):
    # float64 weights loaded into a default Embed come out float32.
    return nnx_layer(nnx.Embed, tree, num_embeddings=weight.shape[0], features=weight.shape[1],
                     dtype=weight.dtype, param_dtype=weight.dtype)(indices)


def dropout_eval(x: Any, p: float) -> Any:
    return nnx.Dropout(rate=p, deterministic=True)(x)


# --------------------------------------------------------------------------- pooling


def _pool_geometry(size: int, k: int, s: int, p: int, ceil_mode: bool) -> tuple[int, int]:
    """torch's output length and the extra right padding ceil_mode needs."""
    span = size + 2 * p - k
    out = (-(-span // s) if ceil_mode else span // s) + 1
    if ceil_mode and (out - 1) * s >= size + p:  # torch: the last window must start inside input or left pad
        out -= 1
    return out, max(0, (out - 1) * s + k - (size + 2 * p))


def _pool_args(x: Any, kernel_size: Any, stride: Any, padding: Any, ceil_mode: bool) -> tuple[Any, ...]:
    n = x.ndim - 2
    k = _tuple(kernel_size, n)
    s = _tuple(stride if stride is not None else k, n)
    p = _tuple(padding, n)
    geo = [_pool_geometry(size, *a, ceil_mode) for size, a in zip(x.shape[2:], zip(k, s, p))]
    pads = tuple((pi, pi + e) for pi, (_, e) in zip(p, geo))
    return k, s, p, pads, [o for o, _ in geo]


def max_pool(x: Any, kernel_size: Any, stride: Any = None, padding: Any = 0, ceil_mode: bool = False) -> Any:
    """flax max_pool (pads with -inf, like torch); ceil_mode as extra right padding."""
    k, s, _, pads, _ = _pool_args(x, kernel_size, stride, padding, ceil_mode)
    return channels_first(nnx.max_pool(channels_last(x), k, strides=s, padding=pads))


def avg_pool(x: Any, kernel_size: Any, stride: Any = None, padding: Any = 0, ceil_mode: bool = False,
             count_include_pad: bool = True) -> Any:
    """flax avg_pool. With ceil_mode and count_include_pad torch divides by the window clipped
    to the padded input (the ceil overhang is not counted); Flax has no such divisor, so that
    one case sums with flax and divides by the clipped window count."""
    k, s, p, pads, outs = _pool_args(x, kernel_size, stride, padding, ceil_mode)
    xl = channels_last(x)
    overhang = any(b != a for a, b in pads)
    if not (count_include_pad and overhang):
        return channels_first(nnx.avg_pool(xl, k, strides=s, padding=pads, count_include_pad=count_include_pad))
    total = nnx.avg_pool(xl, k, strides=s, padding=pads, count_include_pad=True) * math.prod(k)
    counts = [np.array([min(i * si - pi + ki, size + pi) - (i * si - pi) for i in range(o)])
              for size, ki, si, pi, o in zip(x.shape[2:], k, s, p, outs)]
    divisor = functools.reduce(np.multiply.outer, counts).astype(x.dtype)
    return channels_first(total / divisor[..., None])


def adaptive_avg_pool(x: Any, output_size: Any) -> Any:
    """No Flax layer: torch's windows [floor(i*L/out), ceil((i+1)*L/out)) as averaging matrices."""
    n = x.ndim - 2
    outs = _tuple(output_size, n)
    for axis, (size, out) in enumerate(zip(x.shape[2:], outs)):
        a = np.zeros((out, size))
        for i in range(out):
            lo, hi = (i * size) // out, -(-((i + 1) * size) // out)
            a[i, lo:hi] = 1.0 / (hi - lo)
        x = jnp.moveaxis(jnp.tensordot(x, a.T.astype(x.dtype), axes=[[2 + axis], [0]]), -1, 2 + axis)
    return x


# --------------------------------------------------------------------------- attention


def attention_mask(num_heads: int, q_len: int, k_len: int, batch: int, attn_mask: Any = None,
                   key_padding_mask: Any = None, is_causal: bool = False) -> Any:
    """torch MultiheadAttention's masks (True = do NOT attend) as one Flax mask (True = attend),
    shaped (batch, heads, q, k). A float attn_mask is additive and cannot be a boolean mask."""
    keep = jnp.ones((batch, num_heads, q_len, k_len), bool)
    if attn_mask is not None:
        if attn_mask.dtype != jnp.bool_:
            raise ValueError("a float attn_mask is additive: pass it as a bias, not a mask")
        m = attn_mask if attn_mask.ndim == 3 else attn_mask[None]
        keep &= ~m.reshape(-1, 1 if m.shape[0] == 1 else num_heads, q_len, k_len)
    if key_padding_mask is not None:
        keep &= ~key_padding_mask.astype(bool)[:, None, None, :]
    if is_causal:
        keep &= jnp.tril(jnp.ones((q_len, k_len), bool))
    return keep


def multihead_attention(query: Any, key: Any, value: Any, state_dict: dict[str, Any], num_heads: int,
                        key_padding_mask: Any = None, attn_mask: Any = None, is_causal: bool = False,
                        batch_first: bool = False) -> Any:
    """torch nn.MultiheadAttention(...)(q, k, v)[0] through nnx.MultiHeadAttention."""
    if not batch_first:  # torch's default layout is (L, N, E)
        query, key, value = (jnp.swapaxes(a, 0, 1) for a in (query, key, value))
    tree = convert.to_jax("mha", state_dict, num_heads=num_heads)
    e, kdim = query.shape[-1], key.shape[-1]
    layer = nnx_layer(nnx.MultiHeadAttention, tree, num_heads=num_heads, in_features=e, in_kv_features=kdim,
                      qkv_features=e, out_features=e, use_bias="bias" in tree["out"], decode=False,
                      deterministic=True)
    mask = attention_mask(num_heads, query.shape[1], key.shape[1], query.shape[0], attn_mask, key_padding_mask,
                          is_causal)
    out = layer(query, key, value, mask=mask)
    return out if batch_first else jnp.swapaxes(out, 0, 1)


def scaled_dot_product_attention(q: Any, k: Any, v: Any, attn_mask: Any = None, is_causal: bool = False,
                                 scale: float | None = None) -> Any:
    """F.scaled_dot_product_attention ((B, H, L, D), boolean mask True = attend) through
    jax.nn.dot_product_attention ((B, L, H, D)); a float mask is its additive bias."""
    t = lambda a: jnp.swapaxes(a, 1, 2)  # noqa: E731
    mask = bias = None
    if attn_mask is not None:
        mask, bias = (attn_mask, None) if attn_mask.dtype == jnp.bool_ else (None, attn_mask)
        mask = None if mask is None else jnp.broadcast_to(mask, q.shape[:2] + mask.shape[-2:])
        bias = None if bias is None else jnp.broadcast_to(bias, q.shape[:2] + bias.shape[-2:]).astype(q.dtype)
    return t(jax.nn.dot_product_attention(t(q), t(k), t(v), bias=bias, mask=mask, scale=scale, is_causal=is_causal))


# --------------------------------------------------------------------------- recurrent


def _layers_over_time(x: Any, layers: list[Any], carries: list[Any]) -> tuple[Any, list[Any]]:
    finals = []
    for layer, carry in zip(layers, carries):
        carry, x = layer(x, carry)
        finals.append(carry)
    return x, finals


def lstm(x: Any, state_dict: dict[str, Any], h0: Any = None, c0: Any = None,
         batch_first: bool = False) -> tuple[Any, tuple[Any, Any]]:
    """torch nn.LSTM (stacked, unidirectional) through nnx.RNN(nnx.LSTMCell): (output, (h_n, c_n))."""
    tree = convert.to_jax("lstm", state_dict)
    x = x if batch_first else jnp.swapaxes(x, 0, 1)
    hidden = tree[0]["hi"]["kernel"].shape[0]
    zeros = jnp.zeros((len(tree), x.shape[0], hidden), x.dtype)
    h0, c0 = (zeros if h0 is None else h0), (zeros if c0 is None else c0)
    def rnn(cell: dict[str, Any]) -> Any:
        build = _Build((nnx.LSTMCell, (("hidden_features", hidden), ("in_features", cell["ii"]["kernel"].shape[0]))))
        layer = nnx_layer(nnx.RNN, {"cell": cell}, cell=build, return_carry=True, rngs=False)
        return lambda seq, carry: layer(seq, initial_carry=carry)

    layers = [rnn(cell) for cell in tree]
    out, finals = _layers_over_time(x, layers, [(c0[k], h0[k]) for k in range(len(tree))])
    out = out if batch_first else jnp.swapaxes(out, 0, 1)
    return out, (jnp.stack([h for _, h in finals]), jnp.stack([c for c, _ in finals]))


def gru(x: Any, state_dict: dict[str, Any], h0: Any = None, batch_first: bool = False) -> tuple[Any, Any]:
    """torch nn.GRU (stacked; bidirectional through linen.Bidirectional) via linen.RNN(linen.GRUCell):
    nnx.GRUCell has no hidden-side bias for torch's b_hn, linen's has. Returns (output, h_n), h_n
    (layers * directions, N, H) in torch's order (layer 0 forward, layer 0 backward, ...)."""
    tree = convert.to_jax("gru", state_dict)
    x = x if batch_first else jnp.swapaxes(x, 0, 1)
    dirs = 2 if "forward_rnn" in tree[0] else 1
    hidden = (tree[0]["forward_rnn"]["cell"] if dirs == 2 else tree[0])["hr"]["kernel"].shape[0]
    h0 = jnp.zeros((len(tree) * dirs, x.shape[0], hidden), x.dtype) if h0 is None else h0
    rnn = [linen.RNN(linen.GRUCell(features=hidden), return_carry=True) for _ in range(dirs)]
    layer = rnn[0] if dirs == 1 else linen.Bidirectional(*rnn, return_carry=True)
    layers = [lambda seq, carry, p=p: layer.apply({"params": {"cell": p} if dirs == 1 else p}, seq,
                                                  initial_carry=carry) for p in tree]
    carries = [h0[k] if dirs == 1 else (h0[2 * k], h0[2 * k + 1]) for k in range(len(tree))]
    out, finals = _layers_over_time(x, layers, carries)
    finals = [h for final in finals for h in (final if dirs == 2 else (final,))]
    return (out if batch_first else jnp.swapaxes(out, 0, 1)), jnp.stack(finals)


# --------------------------------------------------------------------------- resampling and reshaping


def interpolate(x: Any, size: Sequence[int], mode: str = "nearest", align_corners: bool | None = None,
                antialias: bool = False) -> Any:
    """F.interpolate(x, size=...) on NC... arrays.

    nearest-exact is jax.image.resize's 'nearest' (half-pixel centres). torch's 'nearest'
    picks floor(i * in/out), which jax.image.resize does not offer: gathered directly.
    bilinear/linear: jax.image.resize(antialias=...) for half-pixel centres; align_corners=True
    maps output i to input i*(in-1)/(out-1), done with jax.image.scale_and_translate.
    """
    spatial = tuple(range(2, x.ndim))
    size = tuple(int(s) for s in size)
    if mode == "nearest":
        for axis, (n_in, n_out) in zip(spatial, zip(x.shape[2:], size)):
            scale = np.float32(n_in) / np.float32(n_out)  # torch computes the index in float32
            idx = np.minimum(np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(int), n_in - 1)
            x = jnp.take(x, idx, axis=axis)
        return x
    shape = x.shape[:2] + size
    if mode == "nearest-exact":
        return jax.image.resize(x, shape, "nearest", antialias=False)
    if mode not in ("linear", "bilinear", "trilinear"):
        raise ValueError(f"interpolate mode {mode!r} is not bridged")
    if not align_corners:
        return jax.image.resize(x, shape, "linear", antialias=antialias)
    scales, shifts = [], []
    for n_in, n_out in zip(x.shape[2:], size):
        a = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
        scales.append(1.0 / a if a else 1.0)
        shifts.append(0.5 - 0.5 / a if a else 0.0)
    if any(n_out == 1 for n_out in size):
        raise ValueError("align_corners=True with an output side of 1 is not bridged")
    return jax.image.scale_and_translate(x, shape, spatial, jnp.array(scales, x.dtype), jnp.array(shifts, x.dtype),
                                         "linear", antialias=False)


def pixel_shuffle(x: Any, r: int) -> Any:
    n, c, h, w = x.shape
    y = x.reshape(n, c // (r * r), r, r, h, w).transpose(0, 1, 4, 2, 5, 3)
    return y.reshape(n, c // (r * r), h * r, w * r)


def flatten(x: Any, start_dim: int = 1, end_dim: int = -1) -> Any:
    end = end_dim % x.ndim
    return x.reshape(x.shape[:start_dim] + (-1,) + x.shape[end + 1:])


def unflatten(x: Any, dim: int, sizes: Sequence[int]) -> Any:
    dim %= x.ndim
    return x.reshape(x.shape[:dim] + tuple(sizes) + x.shape[dim + 1:])
