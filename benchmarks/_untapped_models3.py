"""Set 3 of benchmarks/untapped_localisation.py: a held-out set, written without reading how the
tool localises (equivcheck/models/trace.py, untapped.py, localise.py). Four torch model families
not in sets 1-2, each with a tap-free JAX port written the way users write one, planted migration
slips, and correct ports written in unusual but valid ways (false-alarm probes).

  mobilenet  stem conv (stride 2) -> BatchNorm -> ReLU6 -> an inverted residual block [1x1 expand ->
             BN -> ReLU6 -> 3x3 depthwise conv (groups=C) -> BN -> ReLU6 -> squeeze-excitation (a module
             of its own: avg pool, 1x1 reduce, ReLU, 1x1 expand, sigmoid gate, x * gate) -> 1x1 project
             -> BN] + identity -> avg pool -> Dropout -> Linear. BatchNorm eps 1e-3 (torchvision's
             MobileNet setting); the port is NHWC with a `@jax.jit` conv+BN helper
  vit        patch embedding (Conv2d, kernel = stride = 4, on 8x12 images: a 2x3 grid) -> class token
             prepended + learned position embedding (nn.Parameters of a module of their own, converted
             through a `weights.Rule` with a registered Layout) -> one pre-norm transformer block (timm
             style: a custom attention module with a fused qkv Linear and its own forward math, a GELU
             MLP module) -> LayerNorm (eps 1e-6, timm's) -> head on the class token; the port patchifies
             with reshape/transpose and a matmul, attention in `jnp.einsum`
  unet       [Conv2d -> GroupNorm -> ReLU] (nn.Sequential) -> MaxPool2d -> [Conv2d -> GroupNorm -> ReLU]
             -> an up block (a module of its own: ConvTranspose2d (k3, stride 2, padding 1,
             output_padding 1), concatenation with the skip along channels, [Conv2d -> InstanceNorm2d
             (affine) -> ReLU]) -> 1x1 Conv2d head, on 2x8x6 images, MSE against a map; the port is NHWC,
             its transposed conv a dilated-input conv with a flipped kernel, its InstanceNorm under
             `jax.vmap`
  seq2seq    a forecaster: GRU encoder over the series -> bridge Linear -> Tanh -> a decoder module of
             its own that runs a one-layer nn.GRU one step at a time for 3 steps, each step attending
             over the encoder outputs (a Luong "general" attention module with its own forward) and
             feeding its prediction back; the port runs the encoder as a `jax.lax.scan` and the decoder
             as a `jax.lax.fori_loop` over a `@jax.jit` GRU cell

A port is `apply(params, *inputs, train=False, slip="")` as in sets 1 and 2: `slip=""` is the
correct port, any key of the model's SLIPS switches on exactly one slip. Each slip records the
module it originates in: the innermost torch module (a name from `model.named_modules()`) whose
own parameters, settings or forward code the slip changes; a slip in how a parent module's own
forward code wires its children (a residual, a concatenation, which hidden state is passed) is the
parent's; a slip in the root model's own forward code is recorded at the module that consumes the
wrong value (the root has no name). Each model's `ODD` ports are other correct ports written
differently: a failure there is a false alarm.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
from _untapped_models import Case, _check_slip, _pick
from flax import linen
from torch import nn

from equivcheck import Custom, Floats, Inputs, Ints
from equivcheck.models import ModelPair, cross_entropy, mse
from equivcheck.weights import LAYOUTS, Layout, Rule

HIGHEST = jax.lax.Precision.HIGHEST  # the CPU ignores it; a GPU would otherwise take TF32 in matmuls


def _uniform_(t: torch.Tensor, lo: float, hi: float) -> None:
    with torch.no_grad():
        t.uniform_(lo, hi)


def _trained_bn(bn: nn.BatchNorm2d, var: tuple[float, float] = (0.5, 2.0), scale: tuple[float, float] = (0.5, 1.5),
                shift: tuple[float, float] = (-0.5, 0.5)) -> None:
    _uniform_(bn.running_mean, -0.5, 0.5)
    _uniform_(bn.running_var, *var)
    _uniform_(bn.weight, *scale)
    _uniform_(bn.bias, *shift)


def _trained_affine(norm: nn.Module) -> None:
    _uniform_(norm.weight, 0.5, 1.5)
    _uniform_(norm.bias, -0.5, 0.5)


def _nhwc_conv(x: Any, kernel: Any, stride: int = 1, padding: Any = ((1, 1), (1, 1)), groups: int = 1) -> Any:
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), padding, feature_group_count=groups,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=HIGHEST)


# --------------------------------------------------------------------------- (a) MobileNet-style block


class SqueezeExcite(nn.Module):
    """torchvision's SqueezeExcitation: avg pool -> 1x1 reduce -> ReLU -> 1x1 expand -> sigmoid, x * gate."""

    def __init__(self, c: int, r: int) -> None:
        super().__init__()
        self.pool, self.reduce, self.act = nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, r, 1), nn.ReLU()
        self.expand, self.gate = nn.Conv2d(r, c, 1), nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.expand(self.act(self.reduce(self.pool(x)))))


class InvertedResidual(nn.Module):
    """1x1 expand -> BN -> ReLU6 -> 3x3 depthwise -> BN -> ReLU6 -> SE -> 1x1 project -> BN, + x."""

    def __init__(self, c: int = 8, e: int = 16, se: int = 4) -> None:
        super().__init__()
        self.expand, self.bn1, self.act1 = nn.Conv2d(c, e, 1, bias=False), nn.BatchNorm2d(e, eps=1e-3), nn.ReLU6()
        self.dw = nn.Conv2d(e, e, 3, padding=1, groups=e, bias=False)
        self.bn2, self.act2 = nn.BatchNorm2d(e, eps=1e-3), nn.ReLU6()
        self.se = SqueezeExcite(e, se)
        self.project, self.bn3 = nn.Conv2d(e, c, 1, bias=False), nn.BatchNorm2d(c, eps=1e-3)
        # trained-looking statistics; bn1's push a good share of the expansion past ReLU6's 6
        _trained_bn(self.bn1, var=(0.05, 0.3), scale=(1.0, 2.5), shift=(1.0, 3.0))
        _trained_bn(self.bn2, var=(0.1, 1.0), scale=(0.5, 1.5), shift=(0.0, 2.0))
        _trained_bn(self.bn3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act1(self.bn1(self.expand(x)))
        h = self.se(self.act2(self.bn2(self.dw(h))))
        return x + self.bn3(self.project(h))


class MobileNet(nn.Module):
    """stem Conv2d(3, 8, 3, stride 2, pad 1) -> stem_bn -> stem_act ReLU6 -> block (InvertedResidual
    8 -> 16 -> 8, SE 16 -> 4) -> pool AdaptiveAvgPool2d(1) -> drop Dropout(0.2) -> fc Linear(8, 3), on
    3x12x12 images."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.stem_bn, self.stem_act = nn.BatchNorm2d(8, eps=1e-3), nn.ReLU6()
        self.block = InvertedResidual(8, 16, 4)
        self.pool, self.drop, self.fc = nn.AdaptiveAvgPool2d(1), nn.Dropout(0.2), nn.Linear(8, 3)
        _trained_bn(self.stem_bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.block(self.stem_act(self.stem_bn(self.stem(x))))
        return self.fc(self.drop(torch.flatten(self.pool(h), 1)))


MOBILENET_SLIPS = {  # slip -> (the torch module it is in, what the slip is)
    "dw_kernel_hw_swapped": ("block.dw", ("depthwise kernel taken with its two spatial axes swapped (a `.T`-style "
                                         "OIHW -> WHIO conversion done by hand): a 3x3 kernel transposed")),
    "act1_relu": ("block.act1", "ReLU6 after the expansion written as jax.nn.relu: no clipping at 6"),
    "bn2_eps_torch_default": ("block.bn2", ("BatchNorm eps 1e-5 (torch's default) where the model sets 1e-3 "
                                           "(torchvision's MobileNet)")),
    "se_reduce_kernel_out_in": ("block.se.reduce", ("SE reduce 1x1 kernel read as torch's (out, in): "
                                                    "kernel.reshape(4, 16).T of the converted (1, 1, 16, 4) HWIO "
                                                    "kernel")),
    "se_hard_sigmoid": ("block.se.gate", "SE gate jax.nn.hard_sigmoid (MobileNetV3's) where the model has Sigmoid"),
    "residual_dropped": ("block", "the inverted residual's identity skip left out"),
    "drop_on_in_eval": ("drop", "dropout (rate 0.2, the port's own key) applied in eval mode too"),
}


@functools.partial(jax.jit, static_argnames=("stride", "groups", "padding", "act"))
def conv_bn(kernel: Any, bn: Any, x: Any, eps: Any = 1e-3, stride: int = 1, groups: int = 1,
            padding: Any = ((1, 1), (1, 1)), act: str = "relu6") -> Any:
    """NHWC conv (no bias) -> eval BatchNorm -> activation ("relu6", "relu" or "none")."""
    y = _nhwc_conv(x, kernel, stride, padding, groups)
    y = (y - bn["mean"]) / jnp.sqrt(bn["var"] + eps) * bn["scale"] + bn["bias"]
    return {"relu6": jax.nn.relu6, "relu": jax.nn.relu, "none": lambda v: v}[act](y)


def mobilenet_apply(params: Any, x: Any, train: bool = False, slip: str = "") -> Any:
    _check_slip(MOBILENET_SLIPS, slip)
    h = jnp.transpose(x, (0, 2, 3, 1))  # NCHW -> NHWC
    h = conv_bn(params["stem"]["kernel"], params["stem_bn"], h, stride=2)
    b = params["block"]
    no_pad = ((0, 0), (0, 0))
    e = conv_bn(b["expand"]["kernel"], b["bn1"], h, padding=no_pad, act="relu" if slip == "act1_relu" else "relu6")
    k = b["dw"]["kernel"]  # (3, 3, 1, 16)
    if slip == "dw_kernel_hw_swapped":
        k = jnp.transpose(k, (1, 0, 2, 3))
    e = conv_bn(k, b["bn2"], e, eps=1e-5 if slip == "bn2_eps_torch_default" else 1e-3, groups=e.shape[-1])
    # squeeze-excitation: the 1x1 convs of a pooled vector are matmuls
    se = b["se"]
    s = e.mean((1, 2))
    w_r = se["reduce"]["kernel"]
    w_r = w_r.reshape(w_r.shape[3], w_r.shape[2]).T if slip == "se_reduce_kernel_out_in" else w_r[0, 0]
    s = jax.nn.relu(jnp.dot(s, w_r, precision=HIGHEST) + se["reduce"]["bias"])
    s = jnp.dot(s, se["expand"]["kernel"][0, 0], precision=HIGHEST) + se["expand"]["bias"]
    gate = jax.nn.hard_sigmoid(s) if slip == "se_hard_sigmoid" else jax.nn.sigmoid(s)
    e = e * gate[:, None, None, :]
    r = conv_bn(b["project"]["kernel"], b["bn3"], e, padding=no_pad, act="none")
    h = r if slip == "residual_dropped" else h + r
    pooled = h.mean((1, 2))
    if train or slip == "drop_on_in_eval":
        keep = jax.random.bernoulli(jax.random.key(0), 0.8, pooled.shape)
        pooled = jnp.where(keep, pooled / 0.8, 0.0)
    return jnp.dot(pooled, params["fc"]["kernel"], precision=HIGHEST) + params["fc"]["bias"]


def mobilenet_folded_apply(params: Any, x: Any, train: bool = False) -> Any:
    """Correct, written otherwise (a deployment port, NCHW throughout, no lax.conv): every BatchNorm
    folded into its conv's kernel and a bias, the stem an im2col of strided slices, the 1x1 convs
    einsums over channels, the depthwise conv a sum of nine shifted slices times per-channel taps,
    ReLU6 a clip, SE's gate in the NCHW layout."""

    def fold(kernel: Any, bn: Any) -> tuple[Any, Any]:
        s = bn["scale"] / jnp.sqrt(bn["var"] + 1e-3)
        return kernel * s, bn["bias"] - bn["mean"] * s

    def relu6(v: Any) -> Any:
        return jnp.clip(v, 0.0, 6.0)

    k, c = fold(params["stem"]["kernel"], params["stem_bn"])  # (3, 3, 3, 8)
    xp = jnp.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    ho, wo = x.shape[2] // 2, x.shape[3] // 2
    cols = jnp.stack([jnp.stack([xp[:, :, i:i + 2 * ho:2, j:j + 2 * wo:2] for j in range(3)], -1) for i in range(3)],
                     -2)  # (n, c, ho, wo, 3, 3)
    h = relu6(jnp.einsum("nchwij,ijco->nohw", cols, k, precision=HIGHEST) + c[:, None, None])
    b = params["block"]
    k, c = fold(b["expand"]["kernel"][0, 0], b["bn1"])
    e = relu6(jnp.einsum("nchw,co->nohw", h, k, precision=HIGHEST) + c[:, None, None])
    k, c = fold(b["dw"]["kernel"][:, :, 0, :], b["bn2"])  # (3, 3, C)
    ep = jnp.pad(e, ((0, 0), (0, 0), (1, 1), (1, 1)))
    hh, ww = e.shape[2], e.shape[3]
    acc = sum(ep[:, :, i:i + hh, j:j + ww] * k[i, j][None, :, None, None] for i in range(3) for j in range(3))
    e = relu6(acc + c[:, None, None])
    se = b["se"]
    s = jnp.einsum("nchw->nc", e) / (hh * ww)
    s = jnp.maximum(jnp.einsum("nc,cr->nr", s, se["reduce"]["kernel"][0, 0], precision=HIGHEST)
                    + se["reduce"]["bias"], 0.0)
    s = jnp.einsum("nr,rc->nc", s, se["expand"]["kernel"][0, 0], precision=HIGHEST) + se["expand"]["bias"]
    e = e / (1.0 + jnp.exp(-s))[:, :, None, None]
    k, c = fold(b["project"]["kernel"][0, 0], b["bn3"])
    h = h + jnp.einsum("nchw,co->nohw", e, k, precision=HIGHEST) + c[:, None, None]
    pooled = h.mean((2, 3))
    return jnp.einsum("nc,co->no", pooled, params["fc"]["kernel"], precision=HIGHEST) + params["fc"]["bias"]


MOBILENET_INPUTS = Inputs(Custom(lambda rng: ((n := _pick((2, 3))(rng), 3, 12, 12), (n,)), ((2, 3, 12, 12), (2,))),
                          (Floats(-2, 2, tiny=False, min_magnitude=1e-3), Ints(0, 2)))


# --------------------------------------------------------------------------- (b) ViT-style model


class ClassTokenPos(nn.Module):
    """The class token prepended to the patch tokens, then the learned position embedding added."""

    def __init__(self, n: int, d: int) -> None:
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.5)
        self.pos = nn.Parameter(torch.randn(1, n + 1, d) * 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos


class Attention(nn.Module):
    """timm's Attention: one fused qkv Linear, heads split by reshape/permute, a proj Linear."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads, self.scale = heads, (d // heads) ** -0.5
        # no qkv bias (timm's default): a key bias has a zero exact gradient, rounded differently by each side
        self.qkv, self.proj = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm: x + attn(norm1(x)), then x + mlp(norm2(x)); LayerNorm eps 1e-6 (timm's)."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(d, eps=1e-6), Attention(d, heads)
        self.norm2, self.mlp = nn.LayerNorm(d, eps=1e-6), Mlp(d, 2 * d)
        _trained_affine(self.norm1)
        _trained_affine(self.norm2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """patch Conv2d(3, 8, 4, stride 4) on 3x8x12 images (a 2x3 grid, 6 patches) -> flatten(2).transpose ->
    tokens (class token + position embedding) -> block -> norm LayerNorm(8, eps 1e-6) -> head Linear(8, 3)
    on the class token."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 4, stride=4)
        self.tokens, self.block = ClassTokenPos(6, 8), Block(8, 2)
        self.norm, self.head = nn.LayerNorm(8, eps=1e-6), nn.Linear(8, 3)
        _trained_affine(self.norm)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        x = self.patch(img).flatten(2).transpose(1, 2)
        x = self.norm(self.block(self.tokens(x)))
        return self.head(x[:, 0])


def _same(a: Any, meta: Any) -> Any:
    return a


# the class token and position embedding are bare nn.Parameters: no converter knows them, so the
# benchmark registers a Layout (torch name -> Flax name, both unchanged) and gives a Rule for them
LAYOUTS.setdefault("class_token_pos", Layout({"cls": "cls", "pos": "pos"}, {"cls": _same, "pos": _same},
                                             {"cls": _same, "pos": _same}))
VIT_RULES = (Rule("tokens", "tokens", "class_token_pos"),)

VIT_SLIPS = {
    "patch_flatten_chw": ("patch", ("patches flattened in (C, p, p) order (NCHW habit) against the HWIO kernel "
                                    "flattened in (p, p, C) order")),
    "cls_appended": ("tokens", ("class token appended after the patches instead of prepended (the head still "
                                "reads token 0)")),
    "pos_skips_cls": ("tokens", ("position embedding added to the patches before the class token is concatenated: "
                                 "pos[:, 1:] to the patches, nothing to the class token")),
    "qkv_split_order": ("block.attn", ("fused qkv output reshaped as (B, N, heads, 3, hd) where torch splits "
                                       "(B, N, 3, heads, hd)")),
    "residual_from_normed": ("block", "the attention residual added to norm1(x) instead of x"),
    "norm_eps_torch_default": ("norm", ("final LayerNorm eps 1e-5 (torch's default) where the model sets 1e-6 "
                                        "(timm's)")),
    "head_on_mean": ("head", "head on the mean of all tokens (global_pool='avg') where torch reads the class token"),
}


def _ln(p: Any, x: Any, eps: float) -> Any:
    mu = x.mean(-1, keepdims=True)
    var = jnp.square(x - mu).mean(-1, keepdims=True)
    return (x - mu) / jnp.sqrt(var + eps) * p["scale"] + p["bias"]


def _lin(p: Any, x: Any) -> Any:
    y = jnp.matmul(x, p["kernel"], precision=HIGHEST)
    return y + p["bias"] if "bias" in p else y


def vit_apply(params: Any, img: Any, train: bool = False, slip: str = "", patch: int = 4, heads: int = 2) -> Any:
    _check_slip(VIT_SLIPS, slip)
    b, c, hh, ww = img.shape
    gh, gw = hh // patch, ww // patch
    x = img.reshape(b, c, gh, patch, gw, patch)
    # (b, gh, gw, p, p, c): the order the HWIO kernel flattens in
    x = x.transpose(0, 2, 4, 1, 3, 5) if slip == "patch_flatten_chw" else x.transpose(0, 2, 4, 3, 5, 1)
    k = params["patch"]["kernel"]  # (p, p, c, d)
    d = k.shape[-1]
    x = jnp.matmul(x.reshape(b, gh * gw, -1), k.reshape(-1, d), precision=HIGHEST) + params["patch"]["bias"]
    cls = jnp.broadcast_to(params["tokens"]["cls"], (b, 1, d))
    pos = params["tokens"]["pos"]
    if slip == "cls_appended":
        x = jnp.concatenate([x, cls], 1) + pos
    elif slip == "pos_skips_cls":
        x = jnp.concatenate([cls, x + pos[:, 1:]], 1)
    else:
        x = jnp.concatenate([cls, x], 1) + pos
    n, hd = x.shape[1], d // heads
    blk = params["block"]
    y = _ln(blk["norm1"], x, 1e-6)
    qkv = _lin(blk["attn"]["qkv"], y)
    if slip == "qkv_split_order":
        qkv = qkv.reshape(b, n, heads, 3, hd).transpose(3, 0, 1, 2, 4)  # (3, b, n, heads, hd)
    else:
        qkv = qkv.reshape(b, n, 3, heads, hd).transpose(2, 0, 1, 3, 4)
    q, kk, v = qkv[0], qkv[1], qkv[2]
    s = jnp.einsum("bqhd,bkhd->bhqk", q, kk, precision=HIGHEST) * hd ** -0.5
    o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v, precision=HIGHEST).reshape(b, n, d)
    o = _lin(blk["attn"]["proj"], o)
    x = (y if slip == "residual_from_normed" else x) + o
    m = blk["mlp"]
    x = x + _lin(m["fc2"], jax.nn.gelu(_lin(m["fc1"], _ln(blk["norm2"], x, 1e-6)), approximate=False))
    x = _ln(params["norm"], x, 1e-5 if slip == "norm_eps_torch_default" else 1e-6)
    return _lin(params["head"], x.mean(1) if slip == "head_on_mean" else x[:, 0])


def vit_flax_apply(params: Any, img: Any, train: bool = False, heads: int = 2) -> Any:
    """Correct, written otherwise: the patch embedding a strided NHWC lax.conv, the class token
    written into a zero row padded in front of the patches, attention through
    jax.nn.dot_product_attention on (B, T, heads, hd) with the qkv kernel split per projection,
    the LayerNorms flax.linen.LayerNorm applied functionally, the MLP under jax.vmap per token."""
    b = img.shape[0]
    k = params["patch"]["kernel"]
    d = k.shape[-1]
    x = jax.lax.conv_general_dilated(jnp.moveaxis(img, 1, -1), k, (4, 4), "VALID",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=HIGHEST)
    x = (x + params["patch"]["bias"]).reshape(b, -1, d)  # row-major over (gh, gw): torch's flatten(2) order
    x = jnp.pad(x, ((0, 0), (1, 0), (0, 0)))
    x = x.at[:, 0].set(params["tokens"]["cls"][0, 0]) + params["tokens"]["pos"][0]
    ln = linen.LayerNorm(epsilon=1e-6, use_fast_variance=False)
    blk = params["block"]
    y = ln.apply({"params": blk["norm1"]}, x)
    hd = d // heads
    wq, wk, wv = jnp.split(blk["attn"]["qkv"]["kernel"], 3, axis=-1)
    q, kk, v = (jnp.einsum("btd,de->bte", y, w, precision=HIGHEST).reshape(b, -1, heads, hd) for w in (wq, wk, wv))
    o = jax.nn.dot_product_attention(q, kk, v, scale=1.0 / np.sqrt(hd), implementation="xla")
    x = x + jnp.einsum("bte,ed->btd", o.reshape(b, -1, d), blk["attn"]["proj"]["kernel"], precision=HIGHEST) \
        + blk["attn"]["proj"]["bias"]
    m = blk["mlp"]

    def mlp(t: Any) -> Any:  # one token (d,)
        return _lin(m["fc2"], jax.nn.gelu(_lin(m["fc1"], t), approximate=False))

    x = x + jax.vmap(jax.vmap(mlp))(ln.apply({"params": blk["norm2"]}, x))
    cls = ln.apply({"params": params["norm"]}, x[:, 0])
    return cls @ params["head"]["kernel"] + params["head"]["bias"]


VIT_INPUTS = Inputs(Custom(lambda rng: ((n := _pick((2, 3, 4))(rng), 3, 8, 12), (n,)), ((2, 3, 8, 12), (2,))),
                    (Floats(-1, 1, tiny=False, min_magnitude=1e-3), Ints(0, 2)))


# --------------------------------------------------------------------------- (c) U-Net-ish model


class Up(nn.Module):
    """ConvTranspose2d up (stride 2), the skip concatenated after it along channels, then conv."""

    def __init__(self, cin: int, cskip: int, cout: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cout, 3, stride=2, padding=1, output_padding=1)
        # no conv bias before the InstanceNorm: its exact gradient is zero, rounded differently by each side
        self.conv = nn.Sequential(nn.Conv2d(cout + cskip, cout, 3, padding=1, bias=False),
                                  nn.InstanceNorm2d(cout, affine=True), nn.ReLU())
        _trained_affine(self.conv[1])

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([self.up(x), skip], 1))


class UNet(nn.Module):
    """enc [Conv2d(2, 4, 3, pad 1), GroupNorm(2, 4), ReLU] -> pool MaxPool2d(2) -> mid [Conv2d(4, 8, 3,
    pad 1), GroupNorm(4, 8), ReLU] -> up (Up(8, 4, 4), the skip enc's output) -> head Conv2d(4, 2, 1),
    on 2x8x6 images."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU())
        self.pool = nn.MaxPool2d(2)
        self.mid = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.ReLU())
        self.up, self.head = Up(8, 4, 4), nn.Conv2d(4, 2, 1)
        _trained_affine(self.enc[1])
        _trained_affine(self.mid[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.enc(x)
        return self.head(self.up(self.mid(self.pool(s)), s))


UNET_SLIPS = {
    "up_kernel_not_flipped": ("up.up", ("transposed conv as a conv of the 2-dilated input with the kernel's in/out "
                                        "axes swapped but not flipped in space")),
    "up_output_padding_first": ("up.up", ("output_padding added on the low side: the dilated input padded (2, 1) "
                                          "where torch's ConvTranspose2d is (k-1-p, k-1-p+output_padding) = (1, 2)")),
    "skip_concat_order": ("up", "cat([skip, up(x)]) where the model concatenates [up(x), skip]"),
    "mid_norm_group_size": ("mid.1", ("GroupNorm of 2 channels per group read as 2 groups (flax's group_size vs "
                                      "num_groups): 2 groups of 4 where torch has 4 groups of 2")),
    "enc_norm_eps_flax": ("enc.1", "GroupNorm eps 1e-6 (Flax's default) where torch has 1e-5"),
    "inorm_unbiased_var": ("up.conv.1", ("InstanceNorm variance with ddof=1 (torch.var's default) where the norm "
                                         "uses the biased variance")),
}


def _group_norm(p: Any, x: Any, groups: int, eps: float = 1e-5) -> Any:
    """NHWC GroupNorm: statistics over (H, W, channels of the group)."""
    n, h, w, c = x.shape
    g = x.reshape(n, h, w, groups, c // groups)
    mu = g.mean((1, 2, 4), keepdims=True)
    var = jnp.square(g - mu).mean((1, 2, 4), keepdims=True)
    return ((g - mu) / jnp.sqrt(var + eps)).reshape(n, h, w, c) * p["scale"] + p["bias"]


def unet_apply(params: Any, x: Any, train: bool = False, slip: str = "") -> Any:
    _check_slip(UNET_SLIPS, slip)
    pad1 = ((1, 1), (1, 1))
    h = jnp.transpose(x, (0, 2, 3, 1))
    enc, mid, up = params["enc"], params["mid"], params["up"]
    s = _nhwc_conv(h, enc["0"]["kernel"], padding=pad1) + enc["0"]["bias"]
    s = jax.nn.relu(_group_norm(enc["1"], s, 2, eps=1e-6 if slip == "enc_norm_eps_flax" else 1e-5))
    p = jax.lax.reduce_window(s, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    m = _nhwc_conv(p, mid["0"]["kernel"], padding=pad1) + mid["0"]["bias"]
    m = jax.nn.relu(_group_norm(mid["1"], m, 2 if slip == "mid_norm_group_size" else 4))
    # ConvTranspose2d(k=3, stride=2, padding=1, output_padding=1): a stride-1 conv over the input
    # dilated by 2, padded (k-1-p, k-1-p+output_padding), with the kernel flipped in space and its
    # (out, in) axes swapped to HWIO
    k = up["up"]["kernel"]  # (3, 3, out, in)
    k = jnp.swapaxes(k, 2, 3) if slip == "up_kernel_not_flipped" else jnp.flip(jnp.swapaxes(k, 2, 3), (0, 1))
    pads = ((2, 1), (2, 1)) if slip == "up_output_padding_first" else ((1, 2), (1, 2))
    u = jax.lax.conv_general_dilated(m, k, (1, 1), pads, lhs_dilation=(2, 2),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=HIGHEST)
    u = u + up["up"]["bias"]
    cat = jnp.concatenate([s, u] if slip == "skip_concat_order" else [u, s], axis=-1)
    c = _nhwc_conv(cat, up["conv"]["0"]["kernel"], padding=pad1)
    inorm = up["conv"]["1"]

    def instance_norm(v: Any) -> Any:  # one example (H, W, C)
        mu = v.mean((0, 1))
        var = v.var((0, 1), ddof=1 if slip == "inorm_unbiased_var" else 0)
        return (v - mu) / jnp.sqrt(var + 1e-5) * inorm["scale"] + inorm["bias"]

    c = jax.nn.relu(jax.vmap(instance_norm)(c))
    out = jnp.einsum("nhwc,co->nhwo", c, params["head"]["kernel"][0, 0], precision=HIGHEST) + params["head"]["bias"]
    return jnp.transpose(out, (0, 3, 1, 2))


def unet_linen_apply(params: Any, x: Any, train: bool = False) -> Any:
    """Correct, written otherwise: flax.linen layers applied functionally to the converted trees
    (linen.Conv, linen.GroupNorm, linen.ConvTranspose with transpose_kernel=True, the InstanceNorm
    as linen.GroupNorm with group_size=1), linen.max_pool, the skip concatenation in NCHW after
    moving both back to channels-first."""
    h = jnp.moveaxis(x, 1, -1)
    enc, mid, up = params["enc"], params["mid"], params["up"]

    def conv(p: Any, v: Any, features: int, k: int = 3) -> Any:
        layer = linen.Conv(features, (k, k), padding=(k - 1) // 2, use_bias="bias" in p, precision=HIGHEST)
        return layer.apply({"params": p}, v)

    s = conv(enc["0"], h, 4)
    s = jax.nn.relu(linen.GroupNorm(num_groups=2, epsilon=1e-5).apply({"params": enc["1"]}, s))
    m = linen.max_pool(s, (2, 2), strides=(2, 2))
    m = conv(mid["0"], m, 8)
    m = jax.nn.relu(linen.GroupNorm(num_groups=4, epsilon=1e-5).apply({"params": mid["1"]}, m))
    u = linen.ConvTranspose(4, (3, 3), strides=(2, 2), padding=((1, 2), (1, 2)), transpose_kernel=True,
                            precision=HIGHEST).apply({"params": up["up"]}, m)
    cat = jnp.concatenate([jnp.moveaxis(u, -1, 1), jnp.moveaxis(s, -1, 1)], axis=1)
    c = conv(up["conv"]["0"], jnp.moveaxis(cat, 1, -1), 4)
    c = linen.GroupNorm(num_groups=None, group_size=1, epsilon=1e-5).apply({"params": up["conv"]["1"]}, c)
    out = conv(params["head"], jax.nn.relu(c), 2, k=1)
    return jnp.moveaxis(out, -1, 1)


UNET_INPUTS = Inputs(Custom(lambda rng: ((n := _pick((2, 3))(rng), 2, 8, 6), (n, 2, 8, 6)),
                            ((2, 2, 8, 6), (2, 2, 8, 6))),
                     (Floats(-1, 1, tiny=False, min_magnitude=1e-3), Floats(-1, 1, tiny=False, min_magnitude=1e-3)))


# --------------------------------------------------------------------------- (d) seq2seq forecaster


class LuongAttention(nn.Module):
    """Luong's "general" score: score(h, e_s) = e_s . (W h); the context is the softmax-weighted sum."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.w = nn.Linear(hidden, hidden, bias=False)

    def forward(self, h: torch.Tensor, enc: torch.Tensor) -> torch.Tensor:
        weights = torch.einsum("btd,bd->bt", enc, self.w(h)).softmax(-1)
        return torch.einsum("bt,btd->bd", weights, enc)


class Decoder(nn.Module):
    """A one-layer nn.GRU run one step at a time for `horizon` steps: each step's input is the
    previous prediction, its output out([h, attn(h, enc)])."""

    def __init__(self, hidden: int, horizon: int) -> None:
        super().__init__()
        self.horizon = horizon
        self.gru, self.attn = nn.GRU(1, hidden, batch_first=True), LuongAttention(hidden)
        self.out = nn.Linear(2 * hidden, 1)

    def forward(self, y: torch.Tensor, h: torch.Tensor, enc: torch.Tensor) -> torch.Tensor:
        preds = []
        for _ in range(self.horizon):
            _, hn = self.gru(y[:, None, :], h[None])
            h = hn[0]
            y = self.out(torch.cat([h, self.attn(h, enc)], -1))
            preds.append(y)
        return torch.cat(preds, 1)


class Seq2Seq(nn.Module):
    """encoder GRU(3, 8, batch_first) over (B, T, 3) -> bridge Linear(8, 8) -> bridge_act Tanh of the final
    hidden state -> decoder (horizon 3, first input the last observed value of feature 0) -> (B, 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.GRU(3, 8, batch_first=True)
        self.bridge, self.bridge_act = nn.Linear(8, 8), nn.Tanh()
        self.decoder = Decoder(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        enc, hn = self.encoder(x)
        return self.decoder(x[:, -1, :1], self.bridge_act(self.bridge(hn[-1])), enc)


SEQ2SEQ_SLIPS = {
    "enc_hn_bias_outside_reset": ("encoder", ("encoder GRU cell with the hidden-side n bias outside the reset gate: "
                                              "r * (W_hn h) + b_hn where torch computes r * (W_hn h + b_hn)")),
    "bridge_act_missing": ("bridge_act", "the Tanh after the bridge Linear left out"),
    "dec_stale_hidden": ("decoder", ("the decoder loop's carry keeps the initial hidden state: every step's GRU "
                                     "starts from the bridge's output instead of the previous step's state")),
    "attn_softmax_batch_axis": ("decoder.attn", "attention softmax over the batch axis instead of the time axis"),
    "attn_w_untransposed": ("decoder.attn.w", "square attention Linear kernel used as torch's (out, in) weight"),
    "out_concat_order": ("decoder", "the output Linear fed cat([context, h]) where the model has cat([h, context])"),
}


@functools.partial(jax.jit, static_argnames=("bias_outside",))
def gru_cell(c: Any, x: Any, h: Any, bias_outside: bool = False) -> Any:
    """One torch GRU step on the converted cell (ir/iz/in, hr/hz/hn, each kernel (in, H) + bias)."""

    def lin(name: str, v: Any) -> Any:
        return jnp.dot(v, c[name]["kernel"], precision=HIGHEST) + c[name]["bias"]

    r = jax.nn.sigmoid(lin("ir", x) + lin("hr", h))
    z = jax.nn.sigmoid(lin("iz", x) + lin("hz", h))
    if bias_outside:
        hn = r * jnp.dot(h, c["hn"]["kernel"], precision=HIGHEST) + c["hn"]["bias"]
    else:
        hn = r * lin("hn", h)
    n = jnp.tanh(lin("in", x) + hn)
    return (1.0 - z) * n + z * h


def seq2seq_apply(params: Any, x: Any, train: bool = False, slip: str = "", horizon: int = 3) -> Any:
    _check_slip(SEQ2SEQ_SLIPS, slip)
    enc_cell = params["encoder"][0]
    hidden = enc_cell["hr"]["kernel"].shape[0]

    def enc_step(h: Any, xt: Any) -> tuple[Any, Any]:
        h = gru_cell(enc_cell, xt, h, bias_outside=slip == "enc_hn_bias_outside_reset")
        return h, h

    h_last, enc = jax.lax.scan(enc_step, jnp.zeros((x.shape[0], hidden), x.dtype), jnp.swapaxes(x, 0, 1))
    enc = jnp.swapaxes(enc, 0, 1)  # (B, T, H)
    h0 = jnp.dot(h_last, params["bridge"]["kernel"], precision=HIGHEST) + params["bridge"]["bias"]
    if slip != "bridge_act_missing":
        h0 = jnp.tanh(h0)
    dec = params["decoder"]
    w = dec["attn"]["w"]["kernel"]
    if slip == "attn_w_untransposed":
        w = w.T

    def attend(h: Any) -> Any:
        scores = jnp.einsum("btd,bd->bt", enc, jnp.dot(h, w, precision=HIGHEST), precision=HIGHEST)
        weights = jax.nn.softmax(scores, axis=0 if slip == "attn_softmax_batch_axis" else -1)
        return jnp.einsum("bt,btd->bd", weights, enc, precision=HIGHEST)

    def step(t: Any, carry: tuple[Any, Any, Any]) -> tuple[Any, Any, Any]:
        y, h, preds = carry
        h_new = gru_cell(dec["gru"][0], y, h)
        ctx = attend(h_new)
        feat = jnp.concatenate([ctx, h_new] if slip == "out_concat_order" else [h_new, ctx], -1)
        y = jnp.dot(feat, dec["out"]["kernel"], precision=HIGHEST) + dec["out"]["bias"]
        preds = preds.at[:, t].set(y[:, 0])
        return y, (h if slip == "dec_stale_hidden" else h_new), preds

    preds = jnp.zeros((x.shape[0], horizon), x.dtype)
    _, _, preds = jax.lax.fori_loop(0, horizon, step, (x[:, -1, :1], h0, preds))
    return preds


def seq2seq_linen_apply(params: Any, x: Any, train: bool = False, horizon: int = 3) -> Any:
    """Correct, written otherwise: flax.linen.GRUCell on the trees equivcheck.models.fold_rnn_biases
    gives (torch's two r/z biases summed), the encoder through linen.RNN, the decoder a Python loop
    unrolled at trace time with its predictions stacked at the end, the attention's bilinear score as
    one einsum over the kernel (no separate W h)."""
    from equivcheck.models import fold_rnn_biases

    (enc_cell,) = fold_rnn_biases(params["encoder"])
    (dec_cell,) = fold_rnn_biases(params["decoder"]["gru"])
    hidden = enc_cell["hr"]["kernel"].shape[0]
    b = x.shape[0]
    h, enc = linen.RNN(linen.GRUCell(features=hidden), return_carry=True).apply(
        {"params": {"cell": enc_cell}}, x, initial_carry=jnp.zeros((b, hidden), x.dtype))
    h = jnp.tanh(h @ params["bridge"]["kernel"] + params["bridge"]["bias"])
    cell = linen.GRUCell(features=hidden)
    dec = params["decoder"]
    y, preds = x[:, -1, :1], []
    for _ in range(horizon):
        h, _ = cell.apply({"params": dec_cell}, h, y)
        scores = jnp.einsum("btd,ed,be->bt", enc, dec["attn"]["w"]["kernel"], h, precision=HIGHEST)
        ctx = jnp.einsum("bt,btd->bd", jax.nn.softmax(scores, -1), enc, precision=HIGHEST)
        k = dec["out"]["kernel"]
        y = h @ k[:hidden] + ctx @ k[hidden:] + dec["out"]["bias"]
        preds.append(y)
    return jnp.concatenate(preds, axis=1)


SEQ2SEQ_INPUTS = Inputs(Custom(lambda rng: ((b := _pick((2, 3, 4))(rng), _pick((3, 4, 5))(rng), 3), (b, 3)),
                               ((2, 3, 3), (2, 3))),
                        (Floats(-2, 2, tiny=False, min_magnitude=1e-3), Floats(-2, 2, tiny=False, min_magnitude=1e-3)))


# --------------------------------------------------------------------------- the table


MODELS = {  # model -> (torch model, port, inputs, loss, slips, rules, {name: correct port written otherwise})
    "mobilenet": (MobileNet, mobilenet_apply, MOBILENET_INPUTS, cross_entropy, MOBILENET_SLIPS, (),
                  {"correct_folded_nchw": mobilenet_folded_apply}),
    "vit": (ViT, vit_apply, VIT_INPUTS, cross_entropy, VIT_SLIPS, VIT_RULES,
            {"correct_dot_product_attn": vit_flax_apply}),
    "unet": (UNet, unet_apply, UNET_INPUTS, mse, UNET_SLIPS, (), {"correct_linen_layers": unet_linen_apply}),
    "seq2seq": (Seq2Seq, seq2seq_apply, SEQ2SEQ_INPUTS, mse, SEQ2SEQ_SLIPS, (),
                {"correct_linen_unrolled": seq2seq_linen_apply}),
}
# slips also run under `grad` (the rest: forward only)
GRAD_TOO = {"se_reduce_kernel_out_in", "qkv_split_order", "up_kernel_not_flipped", "dec_stale_hidden"}
# a 1e-6 against 1e-5 eps moves a norm of unit-variance inputs by ~5e-6 relative: under float32's bound
FLOAT64 = {"norm_eps_torch_default", "enc_norm_eps_flax"}


def _pair(model: str, torch_model: Any, inputs: Inputs, loss: Any, rules: tuple[Any, ...], name: str,
          apply: Any) -> ModelPair:
    return ModelPair(f"untapped3_{model}_{name}", torch_model, apply, inputs, loss=loss(), checks=("forward",),
                     dtypes=("float32", "float64"), rules=rules)


def cases() -> list[Case]:
    out = []
    for model, (torch_model, port, inputs, loss, slips, rules, odd) in MODELS.items():
        pair = functools.partial(_pair, model, torch_model, inputs, loss, rules)
        out.append(Case(model, "correct", "", "the correct port", pair("correct", port), ("forward", "grad")))
        for name, other in odd.items():
            out.append(Case(model, name, "", " ".join((other.__doc__ or "").split()), pair(name, other),
                            ("forward", "grad")))
        for slip, (module, what) in slips.items():
            out.append(Case(model, slip, module, what, pair(slip, functools.partial(port, slip=slip)),
                            ("forward", "grad") if slip in GRAD_TOO else ("forward",),
                            "float64" if slip in FLOAT64 else "float32"))
    return out
