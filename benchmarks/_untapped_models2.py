"""Set 2 of benchmarks/untapped_localisation.py: four more torch models, each with a tap-free JAX
port written the way users write one, planted migration slips, and correct ports written in
unusual but valid ways (false-alarm probes), three of which carry a slip of their own.
Independent of set 1 (benchmarks/_untapped_models.py) and harder: nested torch modules whose own
forward code holds the slip, ports in NHWC/NWC or time-major layouts, `jax.lax.scan`, `jax.vmap`
and `jax.lax.map` over the batch, a `@jax.jit` helper, folded BatchNorm, im2col convolutions,
fused projections.

  resnet   conv0 (3->8, non-square 3x5 kernel) -> bn0 -> relu0 -> [conv1 -> bn1 -> relu1 -> conv2
           (dilation 2) -> bn2] + skip -> relu2 -> AdaptiveAvgPool2d(1) -> fc; the port is NHWC
           (`jax.lax.conv_general_dilated`), its stem in NCHW/OIHW
  decoder  token + learned position embeddings -> pre-norm causal self-attention (a module of its
           own with q/k/v/o Linears, heads split with view/transpose) -> pre-norm GELU MLP ->
           final LayerNorm -> mean over positions -> head; the port's attention is `jnp.einsum`
  lstm     Linear -> Tanh -> 2-layer nn.LSTM -> LayerNorm of the top layer's final hidden state ->
           head; the port runs each layer as a `jax.lax.scan` over time-major steps
  textcnn  Embedding(padding_idx=0) -> Conv1d over the sequence -> ReLU -> AdaptiveMaxPool1d(1) ->
           Linear -> SiLU -> Linear; the port is one example's function under `jax.vmap`, its conv a
           `@jax.jit` helper

A port is `apply(params, *inputs, train=False, slip="")` as in set 1: `slip=""` is the correct
port, any key of the model's SLIPS switches on exactly one slip. Each model's `ODD` ports are
other correct ports, written differently (im2col, folded BatchNorm, fused qkv, one-hot embedding
lookups, precomputed input projections): a failure there is a false alarm. Two of them also carry
planted slips of their own (RESNET_FOLDED_SLIPS, LSTM_PROJECTED_SLIPS, TEXTCNN_MAP_SLIPS): a slip
next to a torch module whose output the port never materialises (a conv folded into its BatchNorm,
an LSTM whose top-layer scan yields no per-step outputs, a per-example function run under
jax.lax.map, whose every value but the output lives inside a scan body).
"""
from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
from _untapped_models import Case, _check_slip, _pick
from torch import nn

from equivcheck import Custom, Floats, Inputs, Ints
from equivcheck.models import ModelPair, cross_entropy

HIGHEST = jax.lax.Precision.HIGHEST  # the CPU ignores it; a GPU would otherwise take TF32 in matmuls


def _trained_bn(bn: nn.BatchNorm2d) -> None:
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)


def _trained_ln(ln: nn.LayerNorm) -> None:
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.uniform_(-0.5, 0.5)


# --------------------------------------------------------------------------- (a) ResNet-style block


class ResNet(nn.Module):
    """conv0 (3->8, 3x5 kernel, pad (1, 2)) -> bn0 -> relu0 -> a residual block [conv1 (3x3, pad 1) ->
    bn1 -> relu1 -> conv2 (3x3, dilation 2, pad 2) -> bn2] + identity skip -> relu2 ->
    AdaptiveAvgPool2d(1) -> flatten -> fc Linear(8, 4), on 3x8x6 images (H=8, W=6). The
    BatchNorms have trained-looking statistics; no conv bias before a BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, (3, 5), padding=(1, 2), bias=False)
        self.bn0, self.relu0 = nn.BatchNorm2d(8), nn.ReLU()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=2, dilation=2, bias=False), nn.BatchNorm2d(8)
        self.relu2, self.pool, self.fc = nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Linear(8, 4)
        for bn in (self.bn0, self.bn1, self.bn2):
            _trained_bn(bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu0(self.bn0(self.conv0(x)))
        r = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(h)))))
        h = self.relu2(h + r)
        return self.fc(torch.flatten(self.pool(h), 1))


RESNET_SLIPS = {  # slip -> (the torch module it is in, what the slip is)
    "conv0_kernel_T": ("conv0", ("stem kernel to OIHW with `.T` (O, I, W, H) on a non-square 3x5 kernel: "
                                "H and W swapped, shapes still fit")),
    "input_nwhc": ("conv0", ("image to channels-last with transpose(0, 3, 2, 1) (N, W, H, C) instead of "
                            "(0, 2, 3, 1)")),
    "relu1_missing": ("relu1", "the ReLU between bn1 and conv2 left out"),
    "conv2_no_dilation": ("conv2", "conv2 written like conv1 (dilation 1, pad 1) where torch has dilation 2, pad 2"),
    "bn2_bn1_stats": ("bn2", "copy-paste: bn2 normalises with bn1's running mean and variance"),
    "skip_pre_relu": ("relu2", "skip connection taken before relu0 (bn0's output) instead of after it"),
    "pool_nchw_axes": ("pool", "global average pool over axes (2, 3) (NCHW habit) of an NHWC tensor: W and C"),
}


def _conv(p: Any, x: Any, padding: Any, dilation: int = 1) -> Any:
    """NHWC x HWIO."""
    return jax.lax.conv_general_dilated(x, p["kernel"], (1, 1), padding, rhs_dilation=(dilation, dilation),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=HIGHEST)


def _bn(p: Any, x: Any, mean: Any = None, var: Any = None, eps: float = 1e-5) -> Any:
    mean = p["mean"] if mean is None else mean
    var = p["var"] if var is None else var
    return (x - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def resnet_apply(params: Any, x: Any, train: bool = False, slip: str = "") -> Any:
    _check_slip(RESNET_SLIPS, slip)
    if slip == "input_nwhc":
        h = jax.lax.conv_general_dilated(jnp.transpose(x, (0, 3, 2, 1)), params["conv0"]["kernel"], (1, 1),
                                         ((1, 1), (2, 2)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                         precision=HIGHEST)
    else:
        # the stem in the input's own layout: NCHW with the kernel back in torch's OIHW
        k = params["conv0"]["kernel"]
        k = k.T if slip == "conv0_kernel_T" else jnp.transpose(k, (3, 2, 0, 1))
        h = jax.lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (2, 2)), dimension_numbers=("NCHW", "OIHW", "NCHW"),
                                         precision=HIGHEST)
        h = jnp.transpose(h, (0, 2, 3, 1))  # NHWC from here on
    pre = _bn(params["bn0"], h)
    h = jax.nn.relu(pre)
    r = _bn(params["bn1"], _conv(params["conv1"], h, ((1, 1), (1, 1))))
    if slip != "relu1_missing":
        r = jax.nn.relu(r)
    r = (_conv(params["conv2"], r, ((1, 1), (1, 1))) if slip == "conv2_no_dilation"
         else _conv(params["conv2"], r, ((2, 2), (2, 2)), dilation=2))
    if slip == "bn2_bn1_stats":
        r = _bn(params["bn2"], r, params["bn1"]["mean"], params["bn1"]["var"])
    else:
        r = _bn(params["bn2"], r)
    h = jax.nn.relu((pre if slip == "skip_pre_relu" else h) + r)
    h = h.mean((2, 3)) if slip == "pool_nchw_axes" else h.mean((1, 2))
    return h @ params["fc"]["kernel"] + params["fc"]["bias"]


def _im2col(x: Any, kh: int, kw: int, pad: tuple[int, int], dilation: int = 1) -> Any:
    """(N, H, W, C) -> (N, H', W', kh, kw, C): every stride-1 window, by slicing."""
    _n, hh, ww, _c = x.shape
    x = jnp.pad(x, ((0, 0), (pad[0], pad[0]), (pad[1], pad[1]), (0, 0)))
    ho, wo = hh + 2 * pad[0] - dilation * (kh - 1), ww + 2 * pad[1] - dilation * (kw - 1)
    rows = [jnp.stack([x[:, i * dilation:i * dilation + ho, j * dilation:j * dilation + wo, :] for j in range(kw)], 3)
            for i in range(kh)]
    return jnp.stack(rows, 3)


# slips planted in the folded port (its conv outputs never exist apart from their BatchNorms')
RESNET_FOLDED_SLIPS = {
    "folded_bn1_mean_unscaled": ("bn1", ("BatchNorm folded into conv1 with bias beta - mean where it is "
                                        "beta - mean * gamma / sqrt(var + eps)")),
}


def resnet_im2col_apply(params: Any, x: Any, train: bool = False, slip: str = "") -> Any:
    """Correct, written as a deployment port: every conv an im2col matmul with its BatchNorm
    folded into the kernel and a bias (conv and BatchNorm outputs are never apart), the pool a
    sum divided by the count."""
    _check_slip(RESNET_FOLDED_SLIPS, slip)

    def conv_bn(name: str, bn: str, h: Any, pad: tuple[int, int], dilation: int = 1) -> Any:
        k, p = params[name]["kernel"], params[bn]
        s = p["scale"] / jnp.sqrt(p["var"] + 1e-5)
        cols = _im2col(h, k.shape[0], k.shape[1], pad, dilation)
        unscaled = slip == "folded_bn1_mean_unscaled" and bn == "bn1"
        shift = p["bias"] - p["mean"] if unscaled else p["bias"] - p["mean"] * s
        return jnp.einsum("nhwijc,ijco->nhwo", cols, k * s, precision=HIGHEST) + shift

    h = jax.nn.relu(conv_bn("conv0", "bn0", jnp.moveaxis(x, 1, -1), (1, 2)))
    r = conv_bn("conv2", "bn2", jax.nn.relu(conv_bn("conv1", "bn1", h, (1, 1))), (2, 2), dilation=2)
    h = jnp.maximum(h + r, 0.0)
    pooled = h.sum((1, 2)) / (h.shape[1] * h.shape[2])
    return jnp.einsum("bi,io->bo", pooled, params["fc"]["kernel"], precision=HIGHEST) + params["fc"]["bias"]


RESNET_INPUTS = Inputs(Custom(lambda rng: ((n := _pick((2, 3))(rng), 3, 8, 6), (n,)), ((2, 3, 8, 6), (2,))),
                       (Floats(-1, 1, tiny=False, min_magnitude=1e-3), Ints(0, 3)))


# --------------------------------------------------------------------------- (b) decoder block


class CausalSelfAttention(nn.Module):
    """nanoGPT-style: q/k/v/o Linears, heads split with view/transpose, a causal mask."""

    def __init__(self, d: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        # no key bias: its exact gradient is zero (softmax is shift-invariant), torch and JAX round it differently
        self.q, self.k, self.v, self.o = nn.Linear(d, d), nn.Linear(d, d, bias=False), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        hd = d // self.heads

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.heads, hd).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        s = q @ k.transpose(-2, -1) / math.sqrt(hd)
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        w = s.masked_fill(~causal, float("-inf")).softmax(-1)
        return self.o((w @ v).transpose(1, 2).reshape(b, t, d))


class Decoder(nn.Module):
    """embed (Embedding(20, 8)) + pos (Embedding(8, 8) of positions) -> h + attn(ln1(h)) ->
    h + fc2(act(fc1(ln2(h)))) (GELU, 8 -> 32 -> 8) -> ln_f -> mean over positions -> head Linear(8, 3)."""

    def __init__(self, vocab: int = 20, d: int = 8, max_len: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.embed, self.pos = nn.Embedding(vocab, d), nn.Embedding(max_len, d)
        self.ln1, self.attn = nn.LayerNorm(d), CausalSelfAttention(d, 2)
        self.ln2, self.fc1, self.act, self.fc2 = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)
        self.ln_f, self.head = nn.LayerNorm(d), nn.Linear(d, classes)
        for ln in (self.ln1, self.ln2, self.ln_f):
            _trained_ln(ln)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        h = self.embed(tokens) + self.pos(torch.arange(t, device=tokens.device))
        h = h + self.attn(self.ln1(h))
        h = h + self.fc2(self.act(self.fc1(self.ln2(h))))
        return self.head(self.ln_f(h).mean(1))


DECODER_SLIPS = {
    "mask_diag_excluded": ("attn", ("causal mask built as triu(ones, k=0) of the masked places: the diagonal "
                                   "is masked too (position 0 attends nowhere: NaN)")),
    "mask_after_softmax": ("attn", "future positions zeroed after the softmax (rows no longer sum to 1)"),
    "heads_merge_order": ("attn", "heads merged by reshaping (b, heads, t, hd) to (b, t, d) without the transpose"),
    "scale_by_d": ("attn", "scores divided by sqrt(d_model) instead of sqrt(head_dim)"),
    "post_norm": ("ln1", "post-norm: ln1(h + attn(h)), ln2(h + mlp(h)) where torch is pre-norm"),
    "pos_from_one": ("pos", "positions counted from 1 (arange(1, t + 1)) where torch counts from 0"),
}


def _ln(p: Any, x: Any, eps: float = 1e-5) -> Any:
    mu = x.mean(-1, keepdims=True)
    var = jnp.square(x - mu).mean(-1, keepdims=True)
    return (x - mu) / jnp.sqrt(var + eps) * p["scale"] + p["bias"]


def _lin(p: Any, x: Any) -> Any:
    y = jnp.matmul(x, p["kernel"], precision=HIGHEST)
    return y + p["bias"] if "bias" in p else y


def decoder_apply(params: Any, tokens: Any, train: bool = False, slip: str = "", heads: int = 2) -> Any:
    _check_slip(DECODER_SLIPS, slip)
    b, t = tokens.shape
    positions = jnp.arange(1, t + 1) if slip == "pos_from_one" else jnp.arange(t)
    h = params["embed"]["embedding"][tokens] + params["pos"]["embedding"][positions]
    d = h.shape[-1]
    hd = d // heads
    p = params["attn"]

    def attention(x: Any) -> Any:
        q, k, v = (_lin(p[n], x).reshape(b, t, heads, hd).transpose(0, 2, 1, 3) for n in "qkv")
        s = jnp.einsum("bhqd,bhkd->bhqk", q, k, precision=HIGHEST) / np.sqrt(d if slip == "scale_by_d" else hd)
        future = jnp.triu(jnp.ones((t, t), bool), k=0 if slip == "mask_diag_excluded" else 1)
        if slip == "mask_after_softmax":
            w = jnp.where(future, 0.0, jax.nn.softmax(s, axis=-1))
        else:
            w = jax.nn.softmax(jnp.where(future, -jnp.inf, s), axis=-1)
        y = jnp.einsum("bhqk,bhkd->bhqd", w, v, precision=HIGHEST)
        y = y.reshape(b, t, d) if slip == "heads_merge_order" else y.transpose(0, 2, 1, 3).reshape(b, t, d)
        return _lin(p["o"], y)

    def mlp(x: Any) -> Any:
        return _lin(params["fc2"], jax.nn.gelu(_lin(params["fc1"], x), approximate=False))

    if slip == "post_norm":
        h = _ln(params["ln1"], h + attention(h))
        h = _ln(params["ln2"], h + mlp(h))
    else:
        h = h + attention(_ln(params["ln1"], h))
        h = h + mlp(_ln(params["ln2"], h))
    return _lin(params["head"], _ln(params["ln_f"], h).mean(1))


def decoder_fused_apply(params: Any, tokens: Any, train: bool = False, heads: int = 2) -> Any:
    """Correct, written otherwise: one fused qkv matmul (the three kernels concatenated) then
    split, heads as an einsum axis (no transpose), the causal mask an additive bias, softmax
    written out, every Linear an einsum."""
    b, t = tokens.shape
    x = jnp.take(params["embed"]["embedding"], tokens, axis=0) + params["pos"]["embedding"][:t][None]
    d = x.shape[-1]
    hd = d // heads
    p = params["attn"]
    w_qkv = jnp.concatenate([p["q"]["kernel"], p["k"]["kernel"], p["v"]["kernel"]], axis=1)
    b_qkv = jnp.concatenate([p["q"]["bias"], jnp.zeros_like(p["q"]["bias"]), p["v"]["bias"]])
    bias = jnp.where(jnp.tril(jnp.ones((t, t), bool)), 0.0, -jnp.inf)

    def ln(name: str, v: Any) -> Any:
        mu = jnp.mean(v, -1, keepdims=True)
        c = v - mu
        inv = jax.lax.rsqrt(jnp.mean(c * c, -1, keepdims=True) + 1e-5)
        return c * inv * params[name]["scale"] + params[name]["bias"]

    def dense(name: Any, v: Any) -> Any:
        pp = params[name] if isinstance(name, str) else name
        return jnp.einsum("bti,io->bto", v, pp["kernel"], precision=HIGHEST) + pp["bias"]

    qkv = jnp.einsum("bti,io->bto", ln("ln1", x), w_qkv, precision=HIGHEST) + b_qkv
    q, k, v = (a.reshape(b, t, heads, hd) for a in jnp.split(qkv, 3, axis=-1))
    s = jnp.einsum("bqhd,bkhd->bhqk", q * (1.0 / np.sqrt(hd)), k, precision=HIGHEST) + bias
    e = jnp.exp(s - s.max(-1, keepdims=True))
    w = e / e.sum(-1, keepdims=True)
    y = jnp.einsum("bhqk,bkhd->bqhd", w, v, precision=HIGHEST).reshape(b, t, d)
    x = x + dense(p["o"], y)
    x = x + dense("fc2", jax.nn.gelu(dense("fc1", ln("ln2", x)), approximate=False))
    pooled = ln("ln_f", x).sum(1) / t
    return jnp.einsum("bi,io->bo", pooled, params["head"]["kernel"], precision=HIGHEST) + params["head"]["bias"]


DECODER_INPUTS = Inputs(Custom(lambda rng: ((b := _pick((2, 3, 4))(rng), _pick((3, 4, 5, 6))(rng)), (b,)),
                               ((2, 3), (2,))),
                        (Ints(0, 19), Ints(0, 2)))


# --------------------------------------------------------------------------- (c) LSTM


class LSTMNet(nn.Module):
    """inp Linear(5, 6) -> act Tanh -> lstm LSTM(6, 8, 2 layers, batch_first) -> norm LayerNorm(8)
    of the top layer's final hidden state -> head Linear(8, 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.act = nn.Linear(5, 6), nn.Tanh()
        self.lstm = nn.LSTM(6, 8, num_layers=2, batch_first=True)
        self.norm, self.head = nn.LayerNorm(8), nn.Linear(8, 3)
        _trained_ln(self.norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, (h, _) = self.lstm(self.act(self.inp(x)))
        return self.head(self.norm(h[-1]))


LSTM_SLIPS = {
    "forget_bias_plus_one": ("lstm", ("forget gate bias + 1.0 (TF/Keras unit_forget_bias habit) on top of the "
                                      "converted biases")),
    "gates_onnx_order": ("lstm", ("fused gate pre-activations split as (i, o, f, g) (ONNX's iofc order) where the "
                                 "kernels were concatenated in torch's (i, f, g, o)")),
    "scan_reversed": ("lstm", "lax.scan(reverse=True): the sequence runs from its last step to its first"),
    "layer2_gets_cell": ("lstm", "the second layer is fed the first layer's cell states c instead of h"),
    "no_cell_tanh": ("lstm", "h = o * c where torch computes o * tanh(c)"),
    "head_from_layer1": ("norm", "the final hidden state of the first layer (h_n[0]) where torch takes h_n[-1]"),
    "act_missing": ("act", "the Tanh after the input Linear left out"),
}


def _lstm_scan(cell: Any, xs: Any, slip: str) -> tuple[Any, Any, Any]:
    """One layer over time-major xs (T, B, in): (hs, cs, (h_T, c_T)). Kernels fused as cuDNN
    does: (in, 4H) and (H, 4H) in torch's gate order i, f, g, o."""
    gates = ("i", "f", "g", "o")
    w_i = jnp.concatenate([cell["i" + ("f_" if g == "f" else g)]["kernel"] for g in gates], axis=1)
    w_h = jnp.concatenate([cell["h" + g]["kernel"] for g in gates], axis=1)
    bias = jnp.concatenate([cell["i" + ("f_" if g == "f" else g)]["bias"] + cell["h" + g]["bias"] for g in gates])
    hidden = w_h.shape[0]
    if slip == "forget_bias_plus_one":
        bias = bias.at[hidden:2 * hidden].add(1.0)

    def step(carry: Any, x: Any) -> tuple[Any, Any]:
        h, c = carry
        z = jnp.dot(x, w_i, precision=HIGHEST) + jnp.dot(h, w_h, precision=HIGHEST) + bias
        if slip == "gates_onnx_order":
            i, o, f, g = jnp.split(z, 4, axis=-1)
        else:
            i, f, g, o = jnp.split(z, 4, axis=-1)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * (c if slip == "no_cell_tanh" else jnp.tanh(c))
        return (h, c), (h, c)

    zeros = jnp.zeros((xs.shape[1], hidden), xs.dtype)
    last, (hs, cs) = jax.lax.scan(step, (zeros, zeros), xs, reverse=slip == "scan_reversed")
    return hs, cs, last


def lstm_apply(params: Any, x: Any, train: bool = False, slip: str = "") -> Any:
    _check_slip(LSTM_SLIPS, slip)
    h = _lin(params["inp"], x)
    if slip != "act_missing":
        h = jnp.tanh(h)
    seq = jnp.swapaxes(h, 0, 1)  # time-major for lax.scan
    finals = []
    for k, cell in enumerate(params["lstm"]):
        hs, cs, (h_t, _) = _lstm_scan(cell, seq, slip)
        seq = cs if slip == "layer2_gets_cell" and k == 0 else hs
        finals.append(h_t)
    last = finals[0] if slip == "head_from_layer1" else finals[-1]
    return _lin(params["head"], _ln(params["norm"], last))


# slips planted in the projected port (its top layer's scan yields no per-step outputs)
LSTM_PROJECTED_SLIPS = {
    "carry_only_norm_no_affine": ("norm", "LayerNorm as jax.nn.standardize: its scale and bias left out"),
}


def lstm_projected_apply(params: Any, x: Any, train: bool = False, slip: str = "") -> Any:
    """Correct, written otherwise: gate kernels stacked on a gate axis (4, in, H), each layer's
    input projections for every step computed before the scan in one einsum, the scan carrying
    the hidden state through its recurrent einsum; the top layer's scan yields nothing per step
    (only its final carry is used), so the LSTM's output sequence is never materialised."""
    _check_slip(LSTM_PROJECTED_SLIPS, slip)
    h = jnp.tanh(jnp.einsum("bti,io->bto", x, params["inp"]["kernel"], precision=HIGHEST) + params["inp"]["bias"])
    seq = jnp.moveaxis(h, 1, 0)
    last = None
    for layer, cell in enumerate(params["lstm"]):
        top = layer == len(params["lstm"]) - 1
        names = (("ii", "hi"), ("if_", "hf"), ("ig", "hg"), ("io", "ho"))
        w_i = jnp.stack([cell[a]["kernel"] for a, _ in names])  # (4, in, H)
        w_h = jnp.stack([cell[b]["kernel"] for _, b in names])  # (4, H, H)
        bias = jnp.stack([cell[a]["bias"] + cell[b]["bias"] for a, b in names])  # (4, H)
        pre = jnp.einsum("tbi,gih->tbgh", seq, w_i, precision=HIGHEST) + bias

        def step(carry: Any, p: Any, w_h: Any = w_h, top: bool = top) -> tuple[Any, Any]:
            hh, c = carry
            z = p + jnp.einsum("bk,gkh->bgh", hh, w_h, precision=HIGHEST)
            i, f, g, o = z[:, 0], z[:, 1], z[:, 2], z[:, 3]
            c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
            hh = jax.nn.sigmoid(o) * jnp.tanh(c)
            return (hh, c), None if top else hh

        zeros = jnp.zeros(pre.shape[1:2] + pre.shape[3:], pre.dtype)
        (last, _), seq = jax.lax.scan(step, (zeros, zeros), pre)
    if slip == "carry_only_norm_no_affine":
        return _lin(params["head"], jax.nn.standardize(last, axis=-1, epsilon=1e-5))
    return _lin(params["head"], _ln(params["norm"], last))


LSTM_INPUTS = Inputs(Custom(lambda rng: ((b := _pick((2, 3, 4))(rng), _pick((3, 4, 5))(rng), 5), (b,)),
                            ((2, 3, 5), (2,))),
                     (Floats(-2, 2, tiny=False, min_magnitude=1e-3), Ints(0, 2)))


# --------------------------------------------------------------------------- (d) text CNN


PAD = 0


class TextCNN(nn.Module):
    """embed Embedding(12, 6, padding_idx=0) -> conv Conv1d(6, 8, 3, pad 1) over the sequence ->
    act ReLU -> pool AdaptiveMaxPool1d(1) -> fc1 Linear(8, 8) -> act2 SiLU -> fc2 Linear(8, 3), on
    sequences of 8 tokens (token 0 pads: its embedding row is zero and gets no gradient)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(12, 6, padding_idx=PAD)
        self.conv, self.act, self.pool = nn.Conv1d(6, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool1d(1)
        self.fc1, self.act2, self.fc2 = nn.Linear(8, 8), nn.SiLU(), nn.Linear(8, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens).transpose(1, 2)  # (B, C, T)
        h = self.pool(self.act(self.conv(h))).squeeze(-1)
        return self.fc2(self.act2(self.fc1(h)))


TEXTCNN_SLIPS = {
    "pad_row_gets_grad": ("embed", ("plain table lookup: the padding row stays zero in the forward pass but takes a "
                                   "gradient, where torch's padding_idx gives it none")),
    "pad_id_one": ("embed", ("padding positions found as token == 1 (fairseq/RoBERTa's pad id) where the model pads "
                            "with 0: token 1's embeddings zeroed")),
    "embed_scaled": ("embed", "embeddings multiplied by sqrt(d) (a transformer habit) where torch does not scale"),
    "conv_kernel_flipped": ("conv", ("true convolution (kernel reversed in time, as np.convolve / "
                                    "jax.scipy.signal.convolve compute) where Conv1d is a cross-correlation")),
    "conv_causal_padding": ("conv", "causal padding (2, 0) where torch pads 1 on both sides"),
    "pool_channel_axis": ("pool", ("max over the last axis (the NCW code's time axis) of an NWC activation: "
                                  "over channels")),
    "act2_missing": ("act2", "the SiLU between fc1 and fc2 left out"),
}


@functools.partial(jax.jit, static_argnames=("flip", "padding"))
def conv1d_relu(kernel: Any, bias: Any, x: Any, flip: bool = False, padding: tuple[int, int] = (1, 1)) -> Any:
    """One example's Conv1d + ReLU: x (T, C_in), kernel (K, C_in, C_out) -> (T', C_out)."""
    k = kernel[::-1] if flip else kernel
    y = jax.lax.conv_general_dilated(x[None], k, (1,), [padding], dimension_numbers=("NWC", "WIO", "NWC"),
                                     precision=HIGHEST)[0]
    return jax.nn.relu(y + bias)


def textcnn_apply(params: Any, tokens: Any, train: bool = False, slip: str = "", batch: Any = jax.vmap) -> Any:
    _check_slip(TEXTCNN_SLIPS, slip)
    table = params["embed"]["embedding"]

    def one(tok: Any) -> Any:  # one example: tok (T,)
        e = table[tok]
        if slip == "pad_id_one":
            e = jnp.where((tok == 1)[:, None], 0.0, e)
        elif slip != "pad_row_gets_grad":
            e = jnp.where((tok == PAD)[:, None], 0.0, e)  # padding_idx: zero, and no gradient to the row
        if slip == "embed_scaled":
            e = e * np.sqrt(e.shape[-1])
        h = conv1d_relu(params["conv"]["kernel"], params["conv"]["bias"], e, flip=slip == "conv_kernel_flipped",
                        padding=(2, 0) if slip == "conv_causal_padding" else (1, 1))
        h = h.max(-1) if slip == "pool_channel_axis" else h.max(0)
        h = _lin(params["fc1"], h)
        if slip != "act2_missing":
            h = jax.nn.silu(h)
        return _lin(params["fc2"], h)

    return batch(one)(tokens)


# slips planted in the lax.map port (every value but the model's output lives in the scan's body)
TEXTCNN_MAP_SLIPS = {
    "lax_map_act2_missing": ("act2", "act2_missing in the lax.map port: the SiLU between fc1 and fc2 left out"),
}


def textcnn_map_apply(params: Any, tokens: Any, train: bool = False, slip: str = "") -> Any:
    """Correct, written otherwise: the same one-example function mapped over the batch with
    jax.lax.map (sequential, a scan: memory-frugal) instead of jax.vmap."""
    _check_slip(TEXTCNN_MAP_SLIPS, slip)
    return textcnn_apply(params, tokens, slip={"lax_map_act2_missing": "act2_missing"}.get(slip, ""),
                         batch=lambda f: functools.partial(jax.lax.map, f))


def textcnn_onehot_apply(params: Any, tokens: Any, train: bool = False) -> Any:
    """Correct, written otherwise (batched, no vmap): the lookup a one-hot matmul against the table
    with its padding row masked out, the conv an im2col of shifted copies contracted in one
    einsum, the max pool a reduction over the time axis, the Linears einsums."""
    table = params["embed"]["embedding"]
    keep = (jnp.arange(table.shape[0]) != PAD).astype(table.dtype)[:, None]
    e = jnp.einsum("btv,vc->btc", jax.nn.one_hot(tokens, table.shape[0], dtype=table.dtype), table * keep,
                   precision=HIGHEST)
    k = params["conv"]["kernel"]  # (K, C_in, C_out)
    t = e.shape[1]
    padded = jnp.pad(e, ((0, 0), (1, 1), (0, 0)))
    cols = jnp.stack([padded[:, j:j + t] for j in range(k.shape[0])], axis=2)  # (B, T, K, C_in)
    h = jnp.maximum(jnp.einsum("btkc,kco->bto", cols, k, precision=HIGHEST) + params["conv"]["bias"], 0.0)
    h = jnp.max(h, axis=1)
    h = jnp.einsum("bi,io->bo", h, params["fc1"]["kernel"], precision=HIGHEST) + params["fc1"]["bias"]
    h = h * jax.nn.sigmoid(h)
    return jnp.einsum("bi,io->bo", h, params["fc2"]["kernel"], precision=HIGHEST) + params["fc2"]["bias"]


# tokens 0..11 with 0 (padding) and 1 drawn often enough: a batch of 2-4 sequences of 8 holds both
TEXTCNN_INPUTS = Inputs(Custom(lambda rng: ((b := _pick((2, 3, 4))(rng), 8), (b,)), ((2, 8), (2,))),
                        (Ints(0, 11), Ints(0, 2)))


# --------------------------------------------------------------------------- the table


MODELS = {  # model -> (torch model, port, inputs, loss, slips,
    #                    {name: (correct port written otherwise, the slips planted in it)})
    "resnet": (ResNet, resnet_apply, RESNET_INPUTS, cross_entropy, RESNET_SLIPS,
               {"correct_im2col_folded_bn": (resnet_im2col_apply, RESNET_FOLDED_SLIPS)}),
    "decoder": (Decoder, decoder_apply, DECODER_INPUTS, cross_entropy, DECODER_SLIPS,
                {"correct_fused_qkv": (decoder_fused_apply, {})}),
    "lstm": (LSTMNet, lstm_apply, LSTM_INPUTS, cross_entropy, LSTM_SLIPS,
             {"correct_precomputed_gates": (lstm_projected_apply, LSTM_PROJECTED_SLIPS)}),
    "textcnn": (TextCNN, textcnn_apply, TEXTCNN_INPUTS, cross_entropy, TEXTCNN_SLIPS,
                {"correct_onehot_im2col": (textcnn_onehot_apply, {}),
                 "correct_lax_map": (textcnn_map_apply, TEXTCNN_MAP_SLIPS)}),
}
# slips also run under `grad` (the rest: forward only); GRAD_ONLY: invisible in the forward pass
GRAD_TOO = {"bn2_bn1_stats", "heads_merge_order", "forget_bias_plus_one", "conv_kernel_flipped"}
GRAD_ONLY = {"pad_row_gets_grad"}


def _pair(model: str, torch_model: Any, inputs: Inputs, loss: Any, name: str, apply: Any) -> ModelPair:
    return ModelPair(f"untapped2_{model}_{name}", torch_model, apply, inputs, loss=loss(), checks=("forward",),
                     dtypes=("float32", "float64"))


def cases() -> list[Case]:
    out = []
    for model, (torch_model, port, inputs, loss, slips, odd) in MODELS.items():
        pair = functools.partial(_pair, model, torch_model, inputs, loss)
        out.append(Case(model, "correct", "", "the correct port", pair("correct", port), ("forward", "grad")))
        for name, (other, _) in odd.items():
            out.append(Case(model, name, "", " ".join((other.__doc__ or "").split()), pair(name, other),
                            ("forward", "grad")))
        planted = [(port, slip, v) for slip, v in slips.items()]
        planted += [(other, slip, v) for other, more in odd.values() for slip, v in more.items()]
        for fn, slip, (module, what) in planted:
            checks = ("grad",) if slip in GRAD_ONLY else ("forward", "grad") if slip in GRAD_TOO else ("forward",)
            out.append(Case(model, slip, module, what, pair(slip, functools.partial(fn, slip=slip)), checks))
    return out
