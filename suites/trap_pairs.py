"""Default-configuration traps: each layer ported with both frameworks' *defaults*, beside its
reconciled twin.

A trap pair is what a user writes when porting naively (nnx.LayerNorm(C) for
nn.LayerNorm(C)). It is listed in known_divergences.txt (so it xfails with the cause) and in
equivcheck.layers.traps (cause, measured size, the setting that reconciles the two); its twin,
with that setting, is a passing pair. Traps check the forward at float32 only: the trap is
in the function itself, and a failing check costs its shrinking time.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import scipy.special as sp
import torch
import torch.nn as nn
from flax import nnx

from equivcheck import Fixed, Floats, Inputs, Mask, Pair, Static, Tolerance
from equivcheck.layers import flax_bridge as fb
from equivcheck.references import layers as R
from equivcheck.weights import convert
from suites._kit import ATTENTION_F64, POSITIVE, W, X, call, ints, layer, module

TRAP = dict(checks=("forward",), dtypes=("float32",))
SMALL = Floats(-0.01, 0.01)  # unit-scale eps differences show on low-variance inputs


def _features(rng, c=(2, 5)):
    return ((ints(rng, 1, 3), ints(rng, *c)),)


def _nchw(rng):
    c = 2 * ints(rng, 1, 2)
    return ((ints(rng, 1, 2), c, ints(rng, 2, 4), ints(rng, 2, 4)),)


def _cl(layer_, x):
    return convert.channels_first(layer_(convert.channels_last(x)))


NORM_TRAPS = [
    layer("nn.trap.layer_norm_eps", lambda x: module(nn.LayerNorm, x.shape[-1], dtype=x.dtype)(x),
          lambda x: nnx.LayerNorm(x.shape[-1], use_fast_variance=False, rngs=nnx.Rngs(0))(x),
          _features, ((1, 2),), (SMALL,), ("input",), reference=lambda x: R.layer_norm(x, x.shape[-1:]), **TRAP),
    layer("nn.trap.layer_norm_fast_variance", lambda x: module(nn.LayerNorm, x.shape[-1], dtype=x.dtype)(x),
          lambda x: nnx.LayerNorm(x.shape[-1], epsilon=1e-5, rngs=nnx.Rngs(0))(x),
          _features, ((1, 2),), (Floats(1000.3, 1001.7),), ("input",),
          reference=lambda x: R.layer_norm(x, x.shape[-1:]),
          **TRAP),
    layer("nn.trap.group_norm_eps", lambda x: module(nn.GroupNorm, 2, x.shape[1], dtype=x.dtype)(x),
          lambda x: _cl(nnx.GroupNorm(x.shape[1], num_groups=2, use_fast_variance=False, rngs=nnx.Rngs(0)), x),
          _nchw, ((1, 2, 2, 2),), (SMALL,), ("input",), reference=lambda x: R.group_norm(x, 2), **TRAP),
    layer("nn.trap.rms_norm_eps", lambda x: module(nn.RMSNorm, x.shape[-1], dtype=x.dtype)(x),
          lambda x: nnx.RMSNorm(x.shape[-1], use_fast_variance=False, rngs=nnx.Rngs(0))(x),
          _features, ((1, 2),), (Floats(-1e-3, 1e-3),), ("input",), reference=lambda x: R.rms_norm(x, x.shape[-1:]),
          **TRAP),
    # The reconciled twin of layer_norm_fast_variance, on inputs offset by 10: from ~100 on, float32
    # rounding of x - mean alone puts both sides ~1e-4 off the float64 value (measured at offset
    # 100: forward 7.8e-5 torch, 5.2e-5 jax; torch's backward 1.3e-4 on a 5e-3 gradient), whatever
    # the variance formula. Fast variance at offset 10 is already off by ~5e-5.
    layer("nn.layer_norm_offset", lambda x: module(nn.LayerNorm, x.shape[-1], dtype=x.dtype)(x),
          lambda x: fb.layer_norm(x, x.shape[-1:]), _features, ((1, 2),), (Floats(10.3, 11.7),), ("input",),
          reference=lambda x: R.layer_norm(x, x.shape[-1:]), doc="twin of nn.trap.layer_norm_fast_variance"),
]


def _bn_torch(x, w, b, rm, rv):
    m = module(nn.BatchNorm1d, x.shape[1])
    rm, rv = rm.clone(), rv.clone()
    params = {"weight": w, "bias": b, "running_mean": rm, "running_var": rv,
              "num_batches_tracked": torch.zeros((), dtype=torch.int64)}
    return call(m.train(), params, x), rm, rv


def _bn_flax(x, w, b, rm, rv, **kw):
    tree = convert.to_jax("batch_norm", {"weight": w, "bias": b, "running_mean": rm, "running_var": rv})
    bn = fb.nnx_layer(nnx.BatchNorm, tree, num_features=x.shape[1], use_running_average=False,
                      use_fast_variance=False, **kw)
    return bn(x), jax.lax.stop_gradient(bn.mean[...]), jax.lax.stop_gradient(bn.var[...])


def _bn_shapes(rng):
    c = ints(rng, 1, 3)
    return ((ints(rng, 2, 5), c), (c,), (c,), (c,), (c,))


BN_ARGS = dict(smallest=((2, 1), (1,), (1,), (1,), (1,)), specs=(X, W, W, W, POSITIVE),
               names=("input", "weight", "bias", "running_mean", "running_var"), diff=(0, 1, 2))
BN_TRAPS = [
    # the running mean after one step: Flax's default momentum 0.99 weighs the old statistic
    layer("nn.trap.batch_norm_momentum", lambda *a: _bn_torch(*a)[:2], lambda *a: _bn_flax(*a)[:2], _bn_shapes,
          reference=lambda x, w, b, rm, rv: R.batch_norm(x, rm, rv, w, b, True)[:2], **BN_ARGS, **TRAP),
    # momentum inverted (0.9), running var left as Flax updates it: biased
    layer("nn.trap.batch_norm_running_var", _bn_torch, lambda *a: _bn_flax(*a, momentum=0.9), _bn_shapes,
          reference=lambda x, w, b, rm, rv: R.batch_norm(x, rm, rv, w, b, True), **BN_ARGS, **TRAP),
]


# --------------------------------------------------------------------------- initialisers


def _stats(w, b, fan_in, xp):
    s = math.sqrt(fan_in)
    stats = [xp.std(w) * s, xp.max(xp.abs(w)) * s]
    return stats + ([xp.std(b) * s] if b is not None else [])


def t_init_linear(fan_in):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        m = nn.Linear(fan_in, 4096)
    return torch.stack(_stats(m.weight.detach(), m.bias.detach(), fan_in, torch))


def j_init_linear(fan_in, matched=False):
    bound = 1 / math.sqrt(fan_in)
    kw = dict(kernel_init=nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
              bias_init=lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound),
              ) if matched else {}
    m = nnx.Linear(fan_in, 4096, rngs=nnx.Rngs(0), **kw)
    return jnp.stack(_stats(m.kernel[...], m.bias[...], fan_in, jnp))


def t_init_embedding(dim):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        m = nn.Embedding(4096, dim)
    return torch.stack(_stats(m.weight.detach(), None, 1, torch)[:1])


def j_init_embedding(dim, matched=False):
    kw = dict(embedding_init=nnx.initializers.normal(stddev=1.0)) if matched else {}
    m = nnx.Embed(4096, dim, rngs=nnx.Rngs(0), **kw)
    return jnp.stack(_stats(m.embedding[...], None, 1, jnp)[:1])


# Statistics of independent draws agree only to sampling error: the std of 4096 uniform bias
# values has a relative standard error of ~1.1%; 4096*fan_in weights ~0.2%; the largest |w| of
# a uniform sample sits within 1/n of its bound on both sides. Measured between torch and the
# matched Flax initialisers (fan_in 16, 64; features 8, 32): at most 1.7% relative.
SAMPLING = Tolerance(0.05, 0.0, "sampling error of statistics over >= 4096 independent draws "
                                "(measured <= 1.7% between matched initialisers)")


def _init_pair(name, t_fn, j_fn, configs, **kw):
    return Pair(name, t_fn, j_fn, Inputs(Fixed(((),)), (Static(tuple(configs)),)), diff_args=(), checks=("forward",),
                dtypes=("float32",), arg_names=("config",), family="layers", **kw)


INIT_PAIRS = [
    _init_pair("nn.trap.init_linear", t_init_linear, j_init_linear, [16, 64], tolerance=SAMPLING,
               doc="[std(W), max|W|, std(b)] * sqrt(fan_in) of a default-initialised Linear"),
    _init_pair("nn.init_linear_matched", t_init_linear, lambda f: j_init_linear(f, matched=True), [16, 64],
               tolerance=SAMPLING, doc="twin of nn.trap.init_linear"),
    _init_pair("nn.trap.init_embedding", t_init_embedding, j_init_embedding, [8, 32], tolerance=SAMPLING,
               doc="std of a default-initialised Embedding"),
    _init_pair("nn.init_embedding_matched", t_init_embedding, lambda d: j_init_embedding(d, matched=True), [8, 32],
               tolerance=SAMPLING, doc="twin of nn.trap.init_embedding"),
]


# --------------------------------------------------------------------------- conv, pooling, resampling


def t_conv3(x, w, b, stride=1, padding=0):
    conv = module(nn.Conv2d, x.shape[1], w.shape[0], 3, stride=stride, padding=padding)
    return call(conv, {"weight": w, "bias": b}, x)


def j_conv_default(x, w, b, **kw):
    conv = fb.nnx_layer(nnx.Conv, convert.to_jax("conv", {"weight": w, "bias": b}), in_features=x.shape[1],
                        out_features=w.shape[0], kernel_size=(3, 3), **kw)
    return _cl(conv, x)


def _conv_shapes(even=False):
    def sample(rng):
        cin, cout = ints(rng, 1, 2), ints(rng, 1, 2)
        side = (lambda: 2 * ints(rng, 2, 3)) if even else (lambda: ints(rng, 3, 6))
        return ((ints(rng, 1, 2), cin, side(), side()), (cout, cin, 3, 3), (cout,))

    return sample


def _conv_t_shapes(rng):
    cin, cout = ints(rng, 1, 2), ints(rng, 1, 2)
    return ((1, cin, ints(rng, 2, 4), ints(rng, 2, 4)), (cin, cout, 3, 3), (cout,))


def t_conv_t(x, w, b):
    return call(module(nn.ConvTranspose2d, w.shape[0], w.shape[1], 3, stride=2, padding=1), {"weight": w, "bias": b}, x)


def j_conv_t_noflip(x, w, b):
    tree = {"kernel": jnp.transpose(w, (2, 3, 0, 1)), "bias": b}  # (in, out, k, k) -> (k, k, in, out), unflipped
    conv = fb.nnx_layer(nnx.ConvTranspose, tree, in_features=w.shape[0], out_features=w.shape[1], kernel_size=(3, 3),
                        strides=(2, 2), padding=((1, 1), (1, 1)))
    return _cl(conv, x)


CONV_TRAPS = [
    layer("nn.trap.conv_padding_default", t_conv3, j_conv_default, _conv_shapes(), ((1, 1, 3, 3), (1, 1, 3, 3), (1,)),
          (X, W, W), ("input", "weight", "bias"), reference=lambda x, w, b: R.conv(x, w, b), **TRAP),
    layer("nn.trap.conv_same_stride2", lambda x, w, b: t_conv3(x, w, b, stride=2, padding=1),
          lambda x, w, b: j_conv_default(x, w, b, strides=(2, 2), padding="SAME"), _conv_shapes(even=True),
          ((1, 1, 4, 4), (1, 1, 3, 3), (1,)), (X, W, W), ("input", "weight", "bias"),
          reference=lambda x, w, b: R.conv(x, w, b, stride=2, padding=1), **TRAP),
    layer("nn.trap.conv_transpose_no_flip", t_conv_t, j_conv_t_noflip, _conv_t_shapes,
          ((1, 1, 2, 2), (1, 1, 3, 3), (1,)), (X, W, W), ("input", "weight", "bias"),
          reference=lambda x, w, b: R.conv_transpose(x, w, b, stride=2, padding=1), **TRAP),
    layer("nn.trap.max_pool_stride_default", lambda x: module(nn.MaxPool2d, 2)(x),
          lambda x: convert.channels_first(nnx.max_pool(convert.channels_last(x), (2, 2))), _nchw, ((1, 2, 2, 2),),
          (X,), ("input",), reference=lambda x: R.max_pool(x, 2), **TRAP),
    layer("nn.trap.interp_bilinear_antialias", lambda x: nn.functional.interpolate(x, size=(2, 2), mode="bilinear"),
          lambda x: jax.image.resize(x, x.shape[:2] + (2, 2), "linear"),
          lambda rng: ((1, ints(rng, 1, 2), ints(rng, 4, 6), ints(rng, 4, 6)),), ((1, 1, 4, 4),), (X,), ("input",),
          reference=lambda x: R.interpolate(x, (2, 2), "bilinear", False), **TRAP),
    layer("nn.trap.interp_nearest", lambda x: nn.functional.interpolate(x, size=(2, 3), mode="nearest"),
          lambda x: jax.image.resize(x, x.shape[:2] + (2, 3), "nearest"),
          lambda rng: ((1, 1, ints(rng, 3, 5), ints(rng, 4, 5)),), ((1, 1, 3, 4),), (X,), ("input",),
          reference=lambda x: R.interpolate(x, (2, 3), "nearest"), **TRAP),
]


# --------------------------------------------------------------------------- attention, recurrent, activation


def _mha_weights(dtype):
    """Fixed projections: the MHA traps are about layout and mask polarity, not weights, and a
    failing check shrinks faster with fewer drawn arrays."""
    rng = np.random.default_rng(0)
    w = [rng.uniform(-1, 1, s).astype(dtype) for s in ((12, 4), (12,), (4, 4), (4,))]
    return dict(zip(("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"), w))


def t_mha_default(q, kpm=None):
    """torch's defaults: (L, N, E) input (batch_first=False); key_padding_mask True = ignore."""
    m = module(nn.MultiheadAttention, 4, 2, dtype=q.dtype)
    if kpm is not None:
        kpm = kpm.clone()
        kpm[:, 0] = False
    sd = {k: torch.as_tensor(v) for k, v in _mha_weights(str(q.dtype).removeprefix("torch.")).items()}
    return call(m, sd, q, q, q, key_padding_mask=kpm, need_weights=False)[0]


def _flax_mha(q):
    tree = convert.to_jax("mha", _mha_weights(str(q.dtype)), num_heads=2)
    return fb.nnx_layer(nnx.MultiHeadAttention, tree, num_heads=2, in_features=4, decode=False, deterministic=True)


def j_mha_batch_major(q):
    """(L, N, E) handed to Flax, which reads axis 0 as the batch."""
    return _flax_mha(q)(q, q, q)


def j_mha_mask_as_is(q, kpm):
    """Layout right, but torch's key_padding_mask (True = ignore) passed as Flax's mask (True = attend)."""
    x = jnp.swapaxes(q, 0, 1)
    kpm = kpm.at[:, 0].set(False)
    return jnp.swapaxes(_flax_mha(q)(x, x, x, mask=kpm[:, None, None, :]), 0, 1)


def _mha_shapes(rng):
    length, n = ints(rng, 2, 3), ints(rng, 2, 3)
    return ((length, n, 4), (n, length))


def r_mha_default(q, kpm=None):
    if kpm is not None:
        kpm = kpm.copy()
        kpm[:, 0] = False
    return R.multihead_attention(q, q, q, _mha_weights("float64"), 2, kpm)


def t_sdpa_free(q, k, v, mask):
    return nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def j_sdpa_free(q, k, v, mask, guard=False):
    out = fb.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    # JAX gives a fully masked row mean(V), torch zeros: guard the row explicitly
    return jnp.where(jnp.any(mask, axis=-1, keepdims=True), out, 0.0) if guard else out


def r_sdpa_free(q, k, v, mask):
    keep = np.broadcast_to(mask, q.shape[:-1] + (k.shape[-2],))
    out = R.attention(q, k, v, np.where(keep.any(-1, keepdims=True), keep, True))
    return np.where(keep.any(-1, keepdims=True), out, 0.0)


def _sdpa_shapes(rng):
    b, length, d = ints(rng, 1, 2), ints(rng, 1, 3), ints(rng, 1, 3)
    return ((b, 1, length, d),) * 3 + ((b, 1, length, length),)


SDPA_ARGS = dict(smallest=((1, 1, 1, 1),) * 4, specs=(X, X, X, Mask()), names=("query", "key", "value", "attn_mask"),
                 reference=r_sdpa_free, tolerance=ATTENTION_F64)


def t_gru(x, w_ih, w_hh, b_ih, b_hh):
    m = module(nn.GRU, x.shape[-1], w_hh.shape[1], batch_first=True)
    return call(m, {"weight_ih_l0": w_ih, "weight_hh_l0": w_hh, "bias_ih_l0": b_ih, "bias_hh_l0": b_hh}, x)[0]


def j_gru_nnx(x, w_ih, w_hh, b_ih, b_hh):
    """nnx.GRUCell has no hidden-side bias: b_hn folded into the input bias (the usual port)."""
    hidden = w_hh.shape[1]
    b = b_ih + jnp.concatenate([b_hh[:2 * hidden], b_hh[2 * hidden:]])
    tree = {"dense_i": {"kernel": w_ih.T, "bias": b}, "dense_h": {"kernel": w_hh.T}}
    cell = fb._Build((nnx.GRUCell, (("hidden_features", hidden), ("in_features", x.shape[-1]))))
    rnn = fb.nnx_layer(nnx.RNN, {"cell": tree}, cell=cell, rngs=False)
    return rnn(x, initial_carry=jnp.zeros((x.shape[0], hidden), x.dtype))


def _gru_shapes(rng):
    n, t, f, h = ints(rng, 1, 2), ints(rng, 1, 4), ints(rng, 1, 3), ints(rng, 1, 3)
    return ((n, t, f), (3 * h, f), (3 * h, h), (3 * h,), (3 * h,))


def r_gru(x, w_ih, w_hh, b_ih, b_hh):
    sd = {"weight_ih_l0": w_ih, "weight_hh_l0": w_hh, "bias_ih_l0": b_ih, "bias_hh_l0": b_hh}
    return R.gru(x, sd, np.zeros((1, x.shape[0], w_hh.shape[1])), batch_first=True)[0]


SEQ_TRAPS = [
    layer("nn.trap.mha_batch_first", t_mha_default, j_mha_batch_major, lambda rng: _mha_shapes(rng)[:1],
          ((2, 2, 4),), (X,), ("query",), reference=r_mha_default, **TRAP),
    layer("nn.trap.mha_key_padding_polarity", t_mha_default, j_mha_mask_as_is, _mha_shapes, ((2, 2, 4), (2, 2)),
          (X, Mask()), ("query", "key_padding_mask"), reference=r_mha_default, **TRAP),
    layer("nn.trap.sdpa_fully_masked_row", t_sdpa_free, j_sdpa_free, _sdpa_shapes, **SDPA_ARGS, **TRAP),
    layer("nn.sdpa_masked_rows_guarded", t_sdpa_free, lambda *a: j_sdpa_free(*a, guard=True), _sdpa_shapes,
          **SDPA_ARGS, doc="twin of nn.trap.sdpa_fully_masked_row: the JAX output guarded per row"),
    layer("nn.trap.gru_nnx_cell", t_gru, j_gru_nnx, _gru_shapes, ((1, 1, 1), (3, 1), (3, 1), (3,), (3,)),
          (X, W, W, W, W), ("input", "weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"), reference=r_gru,
          **TRAP),
    layer("nn.trap.gelu_approximate", lambda x: nn.GELU()(x), nnx.gelu, _features, ((1, 1),), (Floats(-8, 8),),
          ("input",), reference=lambda x: 0.5 * x * (1 + sp.erf(x / np.sqrt(2))),
          **TRAP),
]

PAIRS = [*NORM_TRAPS, *BN_TRAPS, *INIT_PAIRS, *CONV_TRAPS, *SEQ_TRAPS]
