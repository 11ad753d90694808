"""Layer pairs, part 1: linear, convolutions, pooling, normalization, embedding, dropout,
resampling and reshaping. torch.nn modules on one side, the Flax layer (via
equivcheck.layers.flax_bridge, which converts the torch-layout weights) on the other; a float64
NumPy reference (equivcheck.references.layers) decides which side is off.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import scipy.special as sp
import torch
import torch.nn as nn
from flax import nnx

from equivcheck import Floats, Index
from equivcheck.layers import flax_bridge as fb
from equivcheck.references import layers as R
from suites._kit import POSITIVE, W, X, call, cfg, ints, layer, module, pick

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d}
XWB = ("input", "weight", "bias")


# --------------------------------------------------------------------------- linear


def t_linear(x, w, b):
    return call(module(nn.Linear, w.shape[1], w.shape[0]), {"weight": w, "bias": b}, x)


def s_linear(rng):
    i, o = ints(rng, 1, 5), ints(rng, 1, 5)
    return (pick(rng, [(), (3,), (2, 3)]) + (i,), (o, i), (o,))


LINEAR = layer("nn.linear", t_linear, fb.linear, s_linear, ((1,), (1, 1), (1,)), (X, W, W), XWB,
               reference=R.linear, tags={"matmul"}, doc="nn.Linear vs nnx.Linear: weight (out,in) -> kernel (in,out)")


# --------------------------------------------------------------------------- convolution


def _conv_cfg(config, w):
    c = dict(config)
    if c.get("padding") == "half":  # circular/reflect: Flax pads dilation*(k-1)/2 per side
        d = c.get("dilation", 1)
        c["padding"] = tuple(d * (k - 1) // 2 for k in w.shape[2:])
    return c


def t_conv(x, w, b, config):
    n = w.ndim - 2
    m = module(CONV[n], x.shape[1], w.shape[0], tuple(w.shape[2:]), groups=x.shape[1] // w.shape[1],
               **_conv_cfg(config, w))
    return call(m, {"weight": w, "bias": b}, x)


def j_conv(x, w, b, config):
    return fb.conv(x, w, b, groups=x.shape[1] // w.shape[1], **_conv_cfg(config, w))


def r_conv(x, w, b, config):
    return R.conv(x, w, b, groups=x.shape[1] // w.shape[1], **_conv_cfg(config, w))


def conv_sampler(n, dilation=2, odd=False, groups=(1, 2)):
    """x (N, C_in, *L), w (C_out, C_in/g, *k), b (C_out,): spatial sides fit every config."""

    def sample(rng):
        g = pick(rng, groups)
        cin, cout = g * ints(rng, 1, 2), g * ints(rng, 1, 2)
        k = tuple(pick(rng, (1, 3) if odd else (1, 2, 3)) for _ in range(n))
        sides = tuple(dilation * (kk - 1) + 1 + ints(rng, 0, 3) for kk in k)
        return ((ints(rng, 1, 2), cin) + sides, (cout, cin // g) + k, (cout,))

    return sample


def _conv_smallest(n, side=3):
    return ((1, 1) + (side,) * n, (1, 1) + (1,) * n, (1,))


CONV_PAIRS = [
    layer("nn.conv1d", t_conv, j_conv, conv_sampler(1), _conv_smallest(1), (X, W, W), XWB,
          configs=[cfg(stride=1, padding="valid"), cfg(stride=2, padding=1, dilation=2), cfg(padding="same")],
          reference=r_conv, tags={"conv"}),
    layer("nn.conv2d", t_conv, j_conv, conv_sampler(2), _conv_smallest(2), (X, W, W), XWB,
          configs=[cfg(stride=2, padding=1), cfg(padding="same", dilation=2)], reference=r_conv, tags={"conv"}),
    layer("nn.conv3d", t_conv, j_conv, conv_sampler(3, dilation=1, groups=(1,)), _conv_smallest(3, 2), (X, W, W), XWB,
          configs=[cfg(stride=(1, 2, 1), padding=(1, 0, 1))], reference=r_conv, tags={"conv"}),
    layer("nn.conv2d_padding_mode", t_conv, j_conv, conv_sampler(2, odd=True), _conv_smallest(2), (X, W, W), XWB,
          configs=[cfg(padding="half", padding_mode="circular"), cfg(padding="half", padding_mode="reflect")],
          reference=r_conv, tags={"conv"}, doc="Flax Conv padding 'CIRCULAR' / 'REFLECT'"),
]


def t_conv_t(x, w, b, config):
    m = module(CONV_T[w.ndim - 2], w.shape[0], w.shape[1], tuple(w.shape[2:]), **dict(config))
    return call(m, {"weight": w, "bias": b}, x)


def j_conv_t(x, w, b, config):
    return fb.conv_transpose(x, w, b, **dict(config))


def r_conv_t(x, w, b, config):
    return R.conv_transpose(x, w, b, **dict(config))


def conv_t_sampler(n):
    def sample(rng):
        cin, cout = ints(rng, 1, 3), ints(rng, 1, 3)
        k = tuple(pick(rng, (2, 3)) for _ in range(n))
        return ((ints(rng, 1, 2), cin) + tuple(ints(rng, 1, 4) for _ in range(n)), (cin, cout) + k, (cout,))

    return sample


CONV_T_PAIRS = [
    # padding <= dilation*(k-1) (k >= 2 here); output_padding < stride or dilation (torch's rule)
    layer("nn.conv_transpose1d", t_conv_t, j_conv_t, conv_t_sampler(1), ((1, 1, 1), (1, 1, 2), (1,)), (X, W, W), XWB,
          configs=[cfg(stride=2, padding=1, output_padding=1), cfg(stride=1, padding=1, dilation=2)],
          reference=r_conv_t, tags={"conv"}),
    layer("nn.conv_transpose2d", t_conv_t, j_conv_t, conv_t_sampler(2), ((1, 1, 1, 1), (1, 1, 2, 2), (1,)), (X, W, W),
          XWB, configs=[cfg(stride=(2, 3), padding=(1, 0), output_padding=(1, 2))], reference=r_conv_t, tags={"conv"}),
]


# --------------------------------------------------------------------------- pooling

POOL_T = {("max", 1): nn.MaxPool1d, ("max", 2): nn.MaxPool2d, ("avg", 1): nn.AvgPool1d, ("avg", 2): nn.AvgPool2d}


def pool_sampler(n, min_side):
    def sample(rng):
        return ((ints(rng, 1, 2), ints(rng, 1, 2)) + tuple(ints(rng, min_side, min_side + 4) for _ in range(n)),)

    return sample


def _pool_pair(kind, n, configs, min_side):
    t_fn = lambda x, config: module(POOL_T[(kind, n)], **dict(config))(x)  # noqa: E731
    j_fn = lambda x, config: (fb.max_pool if kind == "max" else fb.avg_pool)(x, **dict(config))  # noqa: E731
    r_fn = lambda x, config: (R.max_pool if kind == "max" else R.avg_pool)(x, **dict(config))  # noqa: E731
    smallest = ((1, 1) + (min_side,) * n,)
    return layer(f"nn.{kind}_pool{n}d", t_fn, j_fn, pool_sampler(n, min_side), smallest, (X,), ("input",),
                 configs=configs, reference=r_fn)


POOL_PAIRS = [
    _pool_pair("max", 1, [cfg(kernel_size=3, stride=2, padding=1, ceil_mode=True)], 3),
    _pool_pair("max", 2, [cfg(kernel_size=2),
                          cfg(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), ceil_mode=True)], 3),
    _pool_pair("avg", 1, [cfg(kernel_size=4, stride=3, padding=2, ceil_mode=True, count_include_pad=True)], 4),
    _pool_pair("avg", 2, [cfg(kernel_size=3, stride=2, padding=1, ceil_mode=True, count_include_pad=False),
                          cfg(kernel_size=3, stride=2, padding=1, count_include_pad=True)], 3),
    layer("nn.adaptive_avg_pool2d", lambda x, c: module(nn.AdaptiveAvgPool2d, c)(x), fb.adaptive_avg_pool,
          pool_sampler(2, 2), ((1, 1, 2, 2),), (X,), ("input",), configs=[(3, 2)], reference=R.adaptive_avg_pool,
          doc="no Flax layer: averaging matrices in jnp"),
]


# --------------------------------------------------------------------------- normalization


def s_layer_norm(rng):
    feat = pick(rng, [(ints(rng, 2, 5),), (ints(rng, 2, 3), ints(rng, 2, 3))])
    return (pick(rng, [(1,), (2,), (2, 3)]) + feat, feat, feat)


def t_layer_norm(x, w, b):
    return call(module(nn.LayerNorm, tuple(w.shape)), {"weight": w, "bias": b}, x)


def t_rms_norm(x, w):
    return call(module(nn.RMSNorm, tuple(w.shape)), {"weight": w}, x)


def s_channels(min_c=1, step=1, spatial=(1, 2), min_hw=1):
    def sample(rng):
        c = step * ints(rng, min_c, 3)
        hw = tuple(ints(rng, min_hw, 4) for _ in range(pick(rng, spatial)))
        return ((ints(rng, 1, 3), c) + hw, (c,), (c,))

    return sample


def t_group_norm(x, w, b, groups):
    return call(module(nn.GroupNorm, groups, x.shape[1]), {"weight": w, "bias": b}, x)


def t_instance_norm(x, w, b):
    cls = {3: nn.InstanceNorm1d, 4: nn.InstanceNorm2d}[x.ndim]
    return call(module(cls, x.shape[1], affine=True), {"weight": w, "bias": b}, x)


NORM_PAIRS = [
    layer("nn.layer_norm", t_layer_norm, lambda x, w, b: fb.layer_norm(x, w.shape, w, b), s_layer_norm,
          ((1, 2), (2,), (2,)), (X, W, W), XWB, reference=lambda x, w, b: R.layer_norm(x, w.shape, w, b),
          doc="eps 1e-5 and use_fast_variance=False passed to nnx.LayerNorm"),
    layer("nn.rms_norm", t_rms_norm, lambda x, w: fb.rms_norm(x, w.shape, w), lambda rng: s_layer_norm(rng)[:2],
          ((1, 2), (2,)), (X, W), ("input", "weight"), reference=lambda x, w: R.rms_norm(x, w.shape, w),
          doc="torch eps=None is finfo(dtype).eps: passed to nnx.RMSNorm"),
    layer("nn.group_norm", t_group_norm, lambda x, w, b, g: fb.group_norm(x, g, w, b), s_channels(step=2, min_hw=2),
          ((1, 2, 2), (2,), (2,)), (X, W, W), XWB, configs=[2], reference=lambda x, w, b, g: R.group_norm(x, g, w, b)),
    layer("nn.instance_norm", t_instance_norm, fb.instance_norm, s_channels(min_hw=2), ((1, 1, 2), (1,), (1,)),
          (X, W, W), XWB, reference=R.instance_norm, doc="InstanceNorm1d/2d(affine=True) vs nnx.InstanceNorm"),
]


BN = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d}
BN_NAMES = ("input", "weight", "bias", "running_mean", "running_var")


def t_bn_train(x, w, b, rm, rv):
    """x stacks several training steps on axis 0; returns every step's output and the final
    running statistics (torch updates its buffers in place)."""
    m = module(BN[x.ndim - 1], x.shape[2])
    rm, rv = rm.clone(), rv.clone()
    nbt = torch.zeros((), dtype=torch.int64)
    ys = [call(m.train(), {"weight": w, "bias": b, "running_mean": rm, "running_var": rv, "num_batches_tracked": nbt},
               x[t]) for t in range(x.shape[0])]
    return torch.stack(ys), rm, rv


def _bn_steps(batch_norm, stack):
    def run(x, w, b, rm, rv):
        ys = []
        for t in range(x.shape[0]):
            y, rm, rv = batch_norm(x[t], rm, rv, w, b, training=True)
            ys.append(y)
        return stack(ys), rm, rv

    return run


j_bn_train = _bn_steps(fb.batch_norm, jnp.stack)
r_bn_train = _bn_steps(R.batch_norm, np.stack)


def s_bn(steps):
    def sample(rng):
        c = ints(rng, 1, 3)
        rest = pick(rng, [(ints(rng, 2, 4), c), (ints(rng, 1, 2), c, ints(rng, 2, 3)), (2, c, 2, ints(rng, 1, 2))])
        return ((pick(rng, steps),) + rest, (c,), (c,), (c,), (c,))

    return sample


def t_bn_eval(x, w, b, rm, rv):
    m = module(BN[x.ndim], x.shape[1])
    params = {"weight": w, "bias": b, "running_mean": rm, "running_var": rv,
              "num_batches_tracked": torch.zeros((), dtype=torch.int64)}
    return call(m.eval(), params, x)


BN_PAIRS = [
    layer("nn.batch_norm_train", t_bn_train, j_bn_train, s_bn((1, 3)), ((1, 2, 1), (1,), (1,), (1,), (1,)),
          (X, W, W, W, POSITIVE), BN_NAMES, diff=(0, 1, 2), reference=r_bn_train,
          doc="outputs of 1 and 3 training steps and the running stats after them (nnx.BatchNorm, momentum "
              "inverted, running_var corrected to torch's unbiased update)"),
    layer("nn.batch_norm_eval", t_bn_eval, lambda x, w, b, rm, rv: fb.batch_norm(x, rm, rv, w, b, training=False)[0],
          lambda rng: (lambda s: (s[0][1:],) + s[1:])(s_bn((1,))(rng)), ((2, 1), (1,), (1,), (1,), (1,)),
          (X, W, W, W, POSITIVE), BN_NAMES, diff=(0, 1, 2),
          reference=lambda x, w, b, rm, rv: R.batch_norm(x, rm, rv, w, b, training=False)[0]),
]


# --------------------------------------------------------------------------- embedding, dropout


def t_embedding(idx, w, padding_idx):
    return call(module(nn.Embedding, w.shape[0], w.shape[1], padding_idx=padding_idx), {"weight": w}, idx)


def s_embedding(rng):
    return (pick(rng, [(3,), (2, 3)]), (ints(rng, 2, 6), ints(rng, 1, 4)))


MISC_PAIRS = [
    layer("nn.embedding", t_embedding, lambda i, w, p: fb.embedding(i, w, p), s_embedding, ((1,), (2, 1)),
          (Index(of=1, axis=0), W), ("input", "weight"), configs=[None, 0], diff=(1,),
          reference=lambda i, w, p: R.embedding(i, w),
          doc="padding_idx row gets no gradient in torch; nnx.Embed has no such option (stop_gradient in the bridge)"),
    # The same port without the bridge's stop_gradient: the padding row's gradient differs (a known divergence).
    layer("nn.embedding_padding_naive", t_embedding, lambda i, w, p: fb.embedding(i, w, None), s_embedding,
          ((1,), (2, 1)), (Index(of=1, axis=0), W), ("input", "weight"), configs=[0], diff=(1,),
          reference=lambda i, w, p: R.embedding(i, w), doc="nnx.Embed ported without padding_idx"),
    layer("nn.dropout_eval", lambda x, p: module(nn.Dropout, p).eval()(x), fb.dropout_eval,
          lambda rng: ((ints(rng, 1, 3), ints(rng, 1, 4)),), ((1, 1),), (X,), ("input",), configs=[0.5],
          reference=lambda x, p: x),
]


# --------------------------------------------------------------------------- resampling, reshaping


def s_image(rng):
    return ((ints(rng, 1, 2), ints(rng, 1, 2), ints(rng, 2, 5), ints(rng, 2, 5)),)


def t_interp(mode, align_corners=None, antialias=False):
    return lambda x, size: torch.nn.functional.interpolate(x, size=size, mode=mode, align_corners=align_corners,
                                                           antialias=antialias)


def resize_pair(name, mode, configs, align_corners=None, antialias=False, j_fn=None, ref=True, **kw):
    j_fn = j_fn or (lambda x, size: fb.interpolate(x, size, mode, align_corners, antialias))
    r_fn = (lambda x, size: R.interpolate(x, size, mode, align_corners, antialias)) if ref else None
    return layer(name, t_interp(mode, align_corners, antialias), j_fn, s_image, ((1, 1, 2, 2),), (X,), ("input",),
                 configs=configs, reference=r_fn, **kw)


def t_upsample(x, factor):
    return module(nn.Upsample, scale_factor=factor, mode="nearest")(x)


def j_upsample(x, factor):
    return jax.image.resize(x, x.shape[:2] + tuple(s * factor for s in x.shape[2:]), "nearest", antialias=False)


RESIZE_PAIRS = [
    layer("nn.upsample_nearest", t_upsample, j_upsample, s_image, ((1, 1, 2, 2),), (X,), ("input",), configs=[2, 3],
          reference=lambda x, f: R.interpolate(x, [s * f for s in x.shape[2:]], "nearest"),
          doc="integer factors: torch's floor-index nearest equals jax.image.resize's half-pixel one"),
    resize_pair("nn.interp_nearest_exact", "nearest-exact", [(3, 7)],
                j_fn=lambda x, size: jax.image.resize(x, x.shape[:2] + size, "nearest", antialias=False)),
    resize_pair("nn.interp_bilinear", "bilinear", [(3, 7)], align_corners=False,
                j_fn=lambda x, size: jax.image.resize(x, x.shape[:2] + size, "linear", antialias=False)),
    resize_pair("nn.interp_bilinear_align_corners", "bilinear", [(3, 7)], align_corners=True),
    resize_pair("nn.interp_bilinear_antialias", "bilinear", [(2, 3)], align_corners=False, antialias=True,
                j_fn=lambda x, size: jax.image.resize(x, x.shape[:2] + size, "linear", antialias=True),
                doc="antialias=True on both sides (downsampling where the input is larger)"),
    # torch 2.13 (CPU) repeats the first output row when the output is 1 wide: a torch bug the
    # reference exposes (known divergence); forward only.
    layer("nn.interp_bilinear_antialias_width1", t_interp("bilinear", False, True),
          lambda x, size: jax.image.resize(x, x.shape[:2] + size, "linear", antialias=True),
          lambda rng: ((ints(rng, 1, 2), ints(rng, 1, 2), ints(rng, 3, 5), ints(rng, 1, 5)),), ((1, 1, 3, 1),), (X,),
          ("input",), configs=[(2, 1)], reference=lambda x, size: R.interpolate(x, size, "bilinear", False, True),
          checks=("forward",), doc="antialias=True, height downsampled, output width 1"),
    layer("nn.pixel_shuffle", lambda x, r: nn.functional.pixel_shuffle(x, r), fb.pixel_shuffle,
          lambda rng: ((ints(rng, 1, 2), 4 * ints(rng, 1, 2), ints(rng, 1, 3), ints(rng, 1, 3)),), ((1, 4, 1, 1),),
          (X,), ("input",), configs=[2], reference=R.pixel_shuffle),
    layer("nn.flatten", lambda x, c: module(nn.Flatten, *c)(x), lambda x, c: fb.flatten(x, *c),
          lambda rng: (tuple(ints(rng, 1, 3) for _ in range(4)),), ((1, 1, 1, 1),), (X,), ("input",),
          configs=[(1, -1), (0, 2)], reference=lambda x, c: x.reshape(x.shape[:c[0]] + (-1,) + x.shape[c[1] % 4 + 1:])),
    layer("nn.unflatten", lambda x, s: module(nn.Unflatten, 1, s)(x), lambda x, s: fb.unflatten(x, 1, s),
          lambda rng: ((ints(rng, 1, 3), 6, ints(rng, 1, 2)),), ((1, 6, 1),), (X,), ("input",), configs=[(2, 3)],
          reference=lambda x, s: x.reshape(x.shape[:1] + s + x.shape[2:])),
]

GELU = layer("nn.gelu", lambda x: nn.GELU()(x), lambda x: nnx.gelu(x, approximate=False),
             lambda rng: ((ints(rng, 1, 3), ints(rng, 1, 5)),), ((1, 1),), (Floats(-8, 8),), ("input",),
             reference=lambda x: 0.5 * x * (1 + sp.erf(x / np.sqrt(2))),
             doc="nn.GELU (exact erf) vs nnx.gelu(approximate=False)")

PAIRS = [LINEAR, *CONV_PAIRS, *CONV_T_PAIRS, *POOL_PAIRS, *NORM_PAIRS, *BN_PAIRS, *MISC_PAIRS, *RESIZE_PAIRS, GELU]
