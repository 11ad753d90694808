"""Set 4 of benchmarks/untapped_localisation.py: a second held-out set, written without reading how
the tool localises (equivcheck/models/trace.py, untapped.py, localise.py). Four torch model
families not in sets 1-3, each with a tap-free JAX port written the way users write one, planted
migration slips, and correct ports written in unusual but valid ways (false-alarm probes).

  wavenet  a WaveNet-style stack on (B, 2, T) series: inp (a causal Conv1d: an nn.Conv1d subclass
           that left-pads by (k-1)*dilation in its own forward) -> 3 residual blocks (dilations 1, 2,
           4; each: a causal dilated Conv1d to 2C channels -> a gated activation module of its own
           (chunk in two halves, tanh(a) * sigmoid(b)) -> 1x1 res conv added to the input and scaled
           by sqrt(0.5), 1x1 skip conv) -> the skips summed -> post [ReLU, 1x1 Conv1d, ReLU, 1x1
           Conv1d] -> (B, 3, T), MSE; the port is NWC with a causal-conv helper over lax.conv
  xattn    a decoder layer with cross-attention: target tokens (tgt_embed) attend causally to
           themselves (nn.MultiheadAttention, a bool attn_mask) and then to source tokens (src_embed,
           an nn.MultiheadAttention with a key padding mask: token 0 pads, the first position never),
           pre-norm with nn.RMSNorm (eps 1e-6), a SwiGLU MLP module of its own (w2(silu(w1 x) * w3 x)),
           final RMSNorm -> mean over target positions -> Linear head; the port is einsums over the
           converted (E, heads, head_dim) attention kernels
  mixer    an MLP-Mixer on 1x8x16 images: stem Conv2d (kernel = stride = 4: 8 patches of 8 channels)
           -> 2 mixer blocks (LayerNorm -> token-mixing MLP across the 8 patches, transposed in and
           out -> residual; LayerNorm -> channel MLP -> residual; GELU MLPs as modules of their own)
           -> LayerNorm -> mean over patches -> Linear; tokens == channels == 8, so a mixing axis
           slip keeps every shape; the port patchifies with reshape/transpose and a matmul
  tagger   a sequence tagger: Embedding -> bidirectional nn.GRU (batch_first) -> LayerNorm over the
           two directions' concatenated states -> Linear -> SiLU -> Linear head per token, MSE
           against (B, T, 4); the port runs each direction as a `jax.lax.scan` (`reverse=True` for
           the backward one) over a GRU cell helper

(A bidirectional nn.LSTM tagger was the first choice: equivcheck's converter refuses
bidirectional LSTMs, "bidirectional is not supported (no Flax counterpart here)", so the tagger
is a bidirectional GRU, which converts to linen.Bidirectional's forward_rnn/backward_rnn trees.)

A port is `apply(params, *inputs, train=False, slip="")` as in sets 1-3: `slip=""` is the correct
port, any key of the model's SLIPS switches on exactly one slip. Each slip records the module it
originates in: the innermost torch module (a name from `model.named_modules()`) whose own
parameters, settings or forward code the slip changes; a slip in how a parent module's own forward
code wires its children (a residual, a scale, a transpose between two children) is the parent's;
a slip in the root model's own forward code is recorded at the module that consumes the wrong
value (the root has no name). A slip in a helper the port calls for every block is recorded at the
first module it changes. Each model's `ODD` ports are other correct ports written differently: a
failure there is a false alarm.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from _untapped_models import Case, _check_slip, _pick
from torch import nn

from equivcheck import Custom, Floats, Inputs, Ints
from equivcheck.models import ModelPair, cross_entropy, mse

HIGHEST = jax.lax.Precision.HIGHEST  # the CPU ignores it; a GPU would otherwise take TF32 in matmuls


def _uniform_(t: torch.Tensor, lo: float, hi: float) -> None:
    with torch.no_grad():
        t.uniform_(lo, hi)


def _dense(p: Any, x: Any, bias: bool = True) -> Any:
    y = jnp.matmul(x, p["kernel"], precision=HIGHEST)
    return y + p["bias"] if bias and "bias" in p else y


# --------------------------------------------------------------------------- (a) WaveNet-style stack


class CausalConv1d(nn.Conv1d):
    """A Conv1d that pads (kernel_size - 1) * dilation zeros on the left only: output t sees inputs <= t."""

    def __init__(self, cin: int, cout: int, k: int, dilation: int = 1) -> None:
        super().__init__(cin, cout, k, dilation=dilation)
        self.left = (k - 1) * dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (self.left, 0)))


class GatedActivation(nn.Module):
    """WaveNet's gate: the channels split in two halves a, b; tanh(a) * sigmoid(b)."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        a, b = h.chunk(2, dim=1)
        return torch.tanh(a) * torch.sigmoid(b)


class ResidualBlock(nn.Module):
    def __init__(self, ch: int, skip: int, dilation: int) -> None:
        super().__init__()
        self.dil = CausalConv1d(ch, 2 * ch, 2, dilation)
        self.gated = GatedActivation()
        self.res, self.skip = nn.Conv1d(ch, ch, 1), nn.Conv1d(ch, skip, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.gated(self.dil(x))
        return (x + self.res(z)) * math.sqrt(0.5), self.skip(z)


class WaveNet(nn.Module):
    """inp CausalConv1d(2, 8, 2) -> blocks (ResidualBlock(8, skip 6, dilation d) for d in 1, 2, 4) ->
    sum of the skips -> post [ReLU, Conv1d(6, 6, 1), ReLU, Conv1d(6, 3, 1)], on (B, 2, T)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = CausalConv1d(2, 8, 2)
        self.blocks = nn.ModuleList([ResidualBlock(8, 6, d) for d in (1, 2, 4)])
        self.post = nn.Sequential(nn.ReLU(), nn.Conv1d(6, 6, 1), nn.ReLU(), nn.Conv1d(6, 3, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, skips = self.inp(x), 0.0
        for block in self.blocks:
            h, s = block(h)
            skips = skips + s
        return self.post(skips)


WAVENET_SLIPS = {  # slip -> (the torch module it is in, what the slip is)
    "inp_pad_right": ("inp", "the input conv's causal padding put on the right: output t sees t and t+1"),
    "dil_taps_reversed": ("blocks.0.dil", ("the dilated conv's kernel flipped in time in the causal-conv helper "
                                           "(a true convolution, np.convolve's habit, where torch cross-correlates)")),
    "gated_halves_swapped": ("blocks.0.gated", "tanh of the second half and sigmoid of the first"),
    "res_kernel_out_in": ("blocks.0.res", ("the square 1x1 residual conv's kernel used as torch's (out, in): "
                                           "kernel[0].T of the converted (1, in, out) kernel")),
    "res_scale_missing": ("blocks.0", "the residual sum's sqrt(0.5) scale left out"),
    "dilations_typo": ("blocks.2.dil", "dilations written out by hand as (1, 2, 2) where the model has (1, 2, 4)"),
    "post_first_relu_missing": ("post.0", "the ReLU on the summed skips (post's first layer) left out"),
}


def _causal_conv(p: Any, x: Any, dilation: int = 1, pad_right: bool = False, flip: bool = False) -> Any:
    """torch's CausalConv1d in NWC: left-pad (k-1)*dilation, dilated VALID conv, bias."""
    k = p["kernel"]  # (k, in, out)
    if flip:
        k = k[::-1]
    left = (k.shape[0] - 1) * dilation
    pads = ((0, left),) if pad_right else ((left, 0),)
    y = jax.lax.conv_general_dilated(x, k, (1,), pads, rhs_dilation=(dilation,),
                                     dimension_numbers=("NWC", "WIO", "NWC"), precision=HIGHEST)
    return y + p["bias"]


def _pointwise(p: Any, x: Any) -> Any:
    return jnp.matmul(x, p["kernel"][0], precision=HIGHEST) + p["bias"]


def wavenet_apply(params: Any, x: Any, train: bool = False, slip: str = "") -> Any:
    _check_slip(WAVENET_SLIPS, slip)
    h = jnp.transpose(x, (0, 2, 1))  # (B, C, T) -> (B, T, C)
    h = _causal_conv(params["inp"], h, pad_right=slip == "inp_pad_right")
    dilations = (1, 2, 2) if slip == "dilations_typo" else (1, 2, 4)
    skips = 0.0
    for i, d in enumerate(dilations):
        b = params["blocks"][str(i)]
        g = _causal_conv(b["dil"], h, d, flip=slip == "dil_taps_reversed")
        a, s = jnp.split(g, 2, axis=-1)
        z = jnp.tanh(s) * jax.nn.sigmoid(a) if slip == "gated_halves_swapped" else jnp.tanh(a) * jax.nn.sigmoid(s)
        if slip == "res_kernel_out_in":
            r = jnp.matmul(z, b["res"]["kernel"][0].T, precision=HIGHEST) + b["res"]["bias"]
        else:
            r = _pointwise(b["res"], z)
        h = h + r if slip == "res_scale_missing" else (h + r) * np.sqrt(0.5)
        skips = skips + _pointwise(b["skip"], z)
    p = params["post"]
    y = skips if slip == "post_first_relu_missing" else jax.nn.relu(skips)
    y = _pointwise(p["3"], jax.nn.relu(_pointwise(p["1"], y)))
    return jnp.transpose(y, (0, 2, 1))


def wavenet_taps_apply(params: Any, x: Any, train: bool = False) -> Any:
    """Correct, written otherwise: channels-first (B, C, T) throughout and no lax.conv: each causal
    conv a sum over its taps of time-shifted inputs (jnp.pad + slice) contracted by einsum with that
    tap's (in, out) matrix, the gate halves by slicing channels, the 1x1 convs einsums over channels,
    the skips collected in a list and summed with jnp.stack at the end, the residual scale a divide
    by sqrt(2)."""

    def causal(p: Any, v: Any, d: int) -> Any:
        k = p["kernel"]  # (taps, in, out)
        taps, t = k.shape[0], v.shape[-1]
        vp = jnp.pad(v, ((0, 0), (0, 0), ((taps - 1) * d, 0)))
        out = sum(jnp.einsum("bct,co->bot", vp[:, :, j * d:j * d + t], k[j], precision=HIGHEST) for j in range(taps))
        return out + p["bias"][:, None]

    def one(p: Any, v: Any) -> Any:
        return jnp.einsum("bct,co->bot", v, p["kernel"][0], precision=HIGHEST) + p["bias"][:, None]

    h = causal(params["inp"], x, 1)
    skips = []
    for i, d in enumerate((1, 2, 4)):
        b = params["blocks"][str(i)]
        g = causal(b["dil"], h, d)
        c = g.shape[1] // 2
        z = jnp.tanh(g[:, :c]) / (1.0 + jnp.exp(-g[:, c:]))
        h = (h + one(b["res"], z)) / np.sqrt(2.0)
        skips.append(one(b["skip"], z))
    y = jnp.maximum(jnp.stack(skips).sum(0), 0.0)
    return one(params["post"]["3"], jnp.maximum(one(params["post"]["1"], y), 0.0))


WAVENET_INPUTS = Inputs(Custom(lambda rng: ((b := _pick((2, 3))(rng), 2, t := _pick((8, 12, 16))(rng)), (b, 3, t)),
                               ((2, 2, 8), (2, 3, 8))),
                        (Floats(-2, 2, tiny=False, min_magnitude=1e-3), Floats(-1, 1, tiny=False, min_magnitude=1e-3)))


# --------------------------------------------------------------------------- (b) cross-attention decoder layer


class SwiGLU(nn.Module):
    """LLaMA's MLP: w2(silu(w1 x) * w3 x), no biases."""

    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.w1, self.w3 = nn.Linear(d, hidden, bias=False), nn.Linear(d, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class CrossDecoderLayer(nn.Module):
    """Pre-norm: x + self_attn(norm1 x) (causal), x + cross_attn(norm2 x, memory) (key padding mask),
    x + mlp(norm3 x); RMSNorm eps 1e-6."""

    def __init__(self, d: int, heads: int, hidden: int) -> None:
        super().__init__()
        # no in-projection biases: a key bias has a zero exact gradient, rounded differently by each side
        self.norm1, self.self_attn = nn.RMSNorm(d, eps=1e-6), nn.MultiheadAttention(d, heads, bias=False,
                                                                                     batch_first=True)
        self.norm2, self.cross_attn = nn.RMSNorm(d, eps=1e-6), nn.MultiheadAttention(d, heads, bias=False,
                                                                                      batch_first=True)
        self.norm3, self.mlp = nn.RMSNorm(d, eps=1e-6), SwiGLU(d, hidden)
        for norm in (self.norm1, self.norm2, self.norm3):
            _uniform_(norm.weight, 0.5, 1.5)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, memory_pad: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)  # True: may not attend
        h = self.norm1(x)
        x = x + self.self_attn(h, h, h, attn_mask=causal, need_weights=False)[0]
        h = self.norm2(x)
        x = x + self.cross_attn(h, memory, memory, key_padding_mask=memory_pad, need_weights=False)[0]
        return x + self.mlp(self.norm3(x))


class CrossDecoder(nn.Module):
    """src_embed Embedding(12, 8) (the memory), tgt_embed Embedding(12, 8) -> layer (2 heads, SwiGLU 8 -> 16)
    -> norm RMSNorm(8, eps 1e-6) -> mean over target positions -> head Linear(8, 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.src_embed, self.tgt_embed = nn.Embedding(12, 8), nn.Embedding(12, 8)
        self.layer = CrossDecoderLayer(8, 2, 16)
        self.norm, self.head = nn.RMSNorm(8, eps=1e-6), nn.Linear(8, 3)
        _uniform_(self.norm.weight, 0.5, 1.5)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        pad = src == 0
        pad[:, 0] = False
        x = self.layer(self.tgt_embed(tgt), self.src_embed(src), pad)
        return self.head(self.norm(x).mean(1))


XATTN_SLIPS = {
    "causal_mask_inverted": ("layer.self_attn", ("torch's bool attn_mask (True = may not attend) used as a keep "
                                                 "mask: each position attends to its future")),
    "attn_no_scale": ("layer.self_attn", ("attention scores not divided by sqrt(head_dim) (in the helper both "
                                          "attentions call)")),
    "cross_pad_polarity": ("layer.cross_attn", "key padding mask polarity inverted (True = attend)"),
    "cross_heads_merged_wrong": ("layer.cross_attn", ("cross-attention heads merged as (head_dim, heads) before "
                                                      "the out projection, whose kernel is laid out (heads, "
                                                      "head_dim)")),
    "norm2_centered": ("layer.norm2", "RMSNorm written as a LayerNorm without bias: the mean subtracted first"),
    "swiglu_w1_w3_swapped": ("layer.mlp", "silu applied to w3's output and w1's output the linear branch"),
    "final_norm_gemma_offset": ("norm", "final RMSNorm scaled by (1 + weight) (Gemma's convention)"),
    "tgt_in_src_table": ("tgt_embed", "target tokens looked up in the source embedding table"),
}


def _rms_norm(p: Any, x: Any, eps: float = 1e-6, centered: bool = False, offset: bool = False) -> Any:
    if centered:
        x = x - x.mean(-1, keepdims=True)
    y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), -1, keepdims=True) + eps)
    return y * (1.0 + p["scale"]) if offset else y * p["scale"]


def _mha(p: Any, xq: Any, xkv: Any, keep: Any, scale: bool = True, merge_wrong: bool = False) -> Any:
    """nn.MultiheadAttention without biases on the converted query/key/value (E, heads, hd) and out
    (heads, hd, E) kernels; keep broadcasts to (B, heads, Tq, Tk), True = may attend."""
    q = jnp.einsum("bte,ehd->bthd", xq, p["query"]["kernel"], precision=HIGHEST)
    k = jnp.einsum("bse,ehd->bshd", xkv, p["key"]["kernel"], precision=HIGHEST)
    v = jnp.einsum("bse,ehd->bshd", xkv, p["value"]["kernel"], precision=HIGHEST)
    s = jnp.einsum("bthd,bshd->bhts", q, k, precision=HIGHEST)
    if scale:
        s = s / np.sqrt(q.shape[-1])
    s = jnp.where(keep, s, -1e30)
    o = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s, axis=-1), v, precision=HIGHEST)
    out = p["out"]["kernel"]  # (heads, hd, E)
    b, t, heads, hd = o.shape
    if merge_wrong:
        o = jnp.swapaxes(o, 2, 3)
    return jnp.matmul(o.reshape(b, t, heads * hd), out.reshape(heads * hd, -1), precision=HIGHEST)


def xattn_apply(params: Any, src: Any, tgt: Any, train: bool = False, slip: str = "") -> Any:
    _check_slip(XATTN_SLIPS, slip)
    pad = (src == 0).at[:, 0].set(False)
    mem = params["src_embed"]["embedding"][src]
    table = params["src_embed"] if slip == "tgt_in_src_table" else params["tgt_embed"]
    x = table["embedding"][tgt]
    lp = params["layer"]
    t = tgt.shape[1]
    future = jnp.triu(jnp.ones((t, t), bool), 1)
    keep_self = future if slip == "causal_mask_inverted" else ~future
    keep_mem = pad if slip == "cross_pad_polarity" else ~pad
    scale = slip != "attn_no_scale"
    h = _rms_norm(lp["norm1"], x)
    x = x + _mha(lp["self_attn"], h, h, keep_self[None, None], scale)
    h = _rms_norm(lp["norm2"], x, centered=slip == "norm2_centered")
    x = x + _mha(lp["cross_attn"], h, mem, keep_mem[:, None, None, :], scale,
                 merge_wrong=slip == "cross_heads_merged_wrong")
    m = lp["mlp"]
    h = _rms_norm(lp["norm3"], x)
    a, g = _dense(m["w1"], h), _dense(m["w3"], h)
    if slip == "swiglu_w1_w3_swapped":
        a, g = g, a
    x = x + _dense(m["w2"], jax.nn.silu(a) * g)
    x = _rms_norm(params["norm"], x, offset=slip == "final_norm_gemma_offset")
    return _dense(params["head"], x.mean(1))


def xattn_fused_apply(params: Any, src: Any, tgt: Any, train: bool = False) -> Any:
    """Correct, written otherwise: one fused (E, 3, heads, hd) projection for the self-attention's
    q/k/v, attention per head under jax.vmap over the heads axis with an additive mask bias
    (jnp.finfo min, not a where), the RMSNorm a divide by sqrt(mean + eps), the SwiGLU's w1|w3
    concatenated into one matmul and split, the embeddings through jnp.take, the mean over target
    positions an einsum with a 1/T weight vector."""
    lp = params["layer"]
    x = jnp.take(params["tgt_embed"]["embedding"], tgt, axis=0)
    mem = jnp.take(params["src_embed"]["embedding"], src, axis=0)
    neg = jnp.finfo(x.dtype).min
    t = tgt.shape[1]

    def rms(p: Any, v: Any) -> Any:
        return p["scale"] * v / jnp.sqrt(jnp.mean(v * v, axis=-1, keepdims=True) + 1e-6)

    def heads(q: Any, k: Any, v: Any, bias: Any) -> Any:  # (T, hd), (S, hd), (S, hd), (T, S) for one head
        w = jax.nn.softmax(q @ k.T / jnp.sqrt(q.shape[-1]) + bias, axis=-1)
        return w @ v

    def attend(p: Any, q: Any, k: Any, v: Any, bias: Any) -> Any:  # q (B, T, H, hd) ...; bias (B, T, S)
        per_head = jax.vmap(jax.vmap(heads, in_axes=(1, 1, 1, None), out_axes=1), in_axes=(0, 0, 0, 0))
        o = per_head(q, k, v, bias)  # (B, T, H, hd)
        return jnp.einsum("bthd,hde->bte", o, p["out"]["kernel"], precision=HIGHEST)

    sa = lp["self_attn"]
    w = jnp.stack([sa["query"]["kernel"], sa["key"]["kernel"], sa["value"]["kernel"]], 1)  # (E, 3, H, hd)
    qkv = jnp.einsum("bte,eghd->gbthd", rms(lp["norm1"], x), w, precision=HIGHEST)
    causal_bias = jnp.where(jnp.arange(t)[:, None] >= jnp.arange(t)[None, :], 0.0, neg).astype(x.dtype)
    x = x + attend(sa, qkv[0], qkv[1], qkv[2], jnp.broadcast_to(causal_bias, (x.shape[0], t, t)))
    ca = lp["cross_attn"]
    h = rms(lp["norm2"], x)
    q = jnp.einsum("bte,ehd->bthd", h, ca["query"]["kernel"], precision=HIGHEST)
    k = jnp.einsum("bse,ehd->bshd", mem, ca["key"]["kernel"], precision=HIGHEST)
    v = jnp.einsum("bse,ehd->bshd", mem, ca["value"]["kernel"], precision=HIGHEST)
    valid = (src != 0).at[:, 0].set(True)
    mem_bias = jnp.where(valid, 0.0, neg).astype(x.dtype)[:, None, :]
    x = x + attend(ca, q, k, v, jnp.broadcast_to(mem_bias, (x.shape[0], t, src.shape[1])))
    m = lp["mlp"]
    ag = rms(lp["norm3"], x) @ jnp.concatenate([m["w1"]["kernel"], m["w3"]["kernel"]], -1)
    a, g = jnp.split(ag, 2, axis=-1)
    x = x + (a * jax.nn.sigmoid(a) * g) @ m["w2"]["kernel"]
    pooled = jnp.einsum("btd,t->bd", rms(params["norm"], x), jnp.full((t,), 1.0 / t, x.dtype), precision=HIGHEST)
    return pooled @ params["head"]["kernel"] + params["head"]["bias"]


XATTN_INPUTS = Inputs(Custom(lambda rng: ((b := _pick((2, 3, 4))(rng), _pick((3, 4, 5))(rng)),
                                          (b, _pick((3, 4, 5))(rng)), (b,)),
                             ((2, 3), (2, 3), (2,))),
                      (Ints(0, 11), Ints(0, 11), Ints(0, 2)))


# --------------------------------------------------------------------------- (c) MLP-Mixer


class MlpBlock(nn.Module):
    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class MixerBlock(nn.Module):
    """x + token_mlp(norm1(x)^T)^T (mixing across patches), then x + channel_mlp(norm2(x))."""

    def __init__(self, tokens: int, d: int, token_hidden: int, channel_hidden: int) -> None:
        super().__init__()
        self.norm1, self.token_mlp = nn.LayerNorm(d), MlpBlock(tokens, token_hidden)
        self.norm2, self.channel_mlp = nn.LayerNorm(d), MlpBlock(d, channel_hidden)
        for norm in (self.norm1, self.norm2):
            _uniform_(norm.weight, 0.5, 1.5)
            _uniform_(norm.bias, -0.5, 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.token_mlp(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mlp(self.norm2(x))


class Mixer(nn.Module):
    """stem Conv2d(1, 8, 4, stride 4) on 1x8x16 images (a 2x4 grid: 8 patches) -> flatten(2).transpose ->
    blocks (2 MixerBlocks: token MLP 8 -> 8 -> 8, channel MLP 8 -> 16 -> 8) -> norm LayerNorm(8) ->
    mean over patches -> head Linear(8, 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 4, stride=4)
        self.blocks = nn.Sequential(MixerBlock(8, 8, 8, 16), MixerBlock(8, 8, 8, 16))
        self.norm, self.head = nn.LayerNorm(8), nn.Linear(8, 3)
        _uniform_(self.norm.weight, 0.5, 1.5)
        _uniform_(self.norm.bias, -0.5, 0.5)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(img).flatten(2).transpose(1, 2))
        return self.head(self.norm(x).mean(1))


MIXER_SLIPS = {
    "stem_patch_pixels_transposed": ("stem", ("patch pixels flattened column-major (pw, ph) against the HWIO "
                                              "kernel flattened row-major (ph, pw)")),
    "token_mix_no_transpose": ("blocks.0", ("the token MLP applied without transposing: it mixes channels "
                                            "(patches == channels == 8, so every shape fits)")),
    "channel_gelu_tanh": ("blocks.0.channel_mlp.act", ("gelu's tanh approximation (jax.nn.gelu's default) "
                                                       "where torch's nn.GELU is exact")),
    "token_fc2_untransposed": ("blocks.1.token_mlp.fc2", "square token-MLP fc2 kernel used as torch's (out, in)"),
    "channel_residual_missing": ("blocks.1", "the channel MLP's residual left out in the second block"),
    "final_norm_skipped": ("norm", "the final LayerNorm left out"),
    "pool_axis_channels": ("head", ("mean over the channel axis instead of the patch axis (8 patches == 8 "
                                    "channels: the head's input shape still fits)")),
}


def _layer_norm(p: Any, x: Any, eps: float = 1e-5) -> Any:
    mu = x.mean(-1, keepdims=True)
    var = jnp.square(x - mu).mean(-1, keepdims=True)
    return (x - mu) / jnp.sqrt(var + eps) * p["scale"] + p["bias"]


def _mlp(p: Any, x: Any, approximate: bool = False) -> Any:
    return _dense(p["fc2"], jax.nn.gelu(_dense(p["fc1"], x), approximate=approximate))


def mixer_apply(params: Any, img: Any, train: bool = False, slip: str = "", patch: int = 4) -> Any:
    _check_slip(MIXER_SLIPS, slip)
    b, c, hh, ww = img.shape
    gh, gw = hh // patch, ww // patch
    x = img.reshape(b, c, gh, patch, gw, patch)
    if slip == "stem_patch_pixels_transposed":
        x = x.transpose(0, 2, 4, 5, 3, 1)  # (b, gh, gw, pw, ph, c)
    else:
        x = x.transpose(0, 2, 4, 3, 5, 1)  # (b, gh, gw, ph, pw, c): the HWIO kernel's order
    k = params["stem"]["kernel"]
    x = jnp.matmul(x.reshape(b, gh * gw, -1), k.reshape(-1, k.shape[-1]), precision=HIGHEST) + params["stem"]["bias"]
    for i in range(2):
        blk = params["blocks"][str(i)]
        y = _layer_norm(blk["norm1"], x)
        tm = blk["token_mlp"]
        if slip == "token_fc2_untransposed" and i == 1:
            tm = {**tm, "fc2": {"kernel": tm["fc2"]["kernel"].T, "bias": tm["fc2"]["bias"]}}
        if slip == "token_mix_no_transpose" and i == 0:
            x = x + _mlp(tm, y)
        else:
            x = x + jnp.swapaxes(_mlp(tm, jnp.swapaxes(y, 1, 2)), 1, 2)
        y = _mlp(blk["channel_mlp"], _layer_norm(blk["norm2"], x), approximate=slip == "channel_gelu_tanh" and i == 0)
        x = y if slip == "channel_residual_missing" and i == 1 else x + y
    if slip != "final_norm_skipped":
        x = _layer_norm(params["norm"], x)
    return _dense(params["head"], x.mean(2 if slip == "pool_axis_channels" else 1))


def mixer_channels_first_apply(params: Any, img: Any, train: bool = False) -> Any:
    """Correct, written otherwise: tokens kept channels-first (B, D, N) throughout, so the token MLP
    is a right matmul on the last axis and the channel MLP an einsum over axis 1; the stem a strided
    NCHW lax.conv with the kernel moved back to OIHW; LayerNorm over axis 1 as jax.nn.standardize
    with the affine after; GELU written out with jax.scipy.special.erf."""
    k = jnp.transpose(params["stem"]["kernel"], (3, 2, 0, 1))  # HWIO -> OIHW
    x = jax.lax.conv_general_dilated(img, k, (4, 4), "VALID", precision=HIGHEST)
    x = (x + params["stem"]["bias"][:, None, None]).reshape(img.shape[0], k.shape[0], -1)  # (B, D, N)

    def norm(p: Any, v: Any) -> Any:
        return jax.nn.standardize(v, axis=1, epsilon=1e-5) * p["scale"][:, None] + p["bias"][:, None]

    def gelu(v: Any) -> Any:
        return 0.5 * v * (1.0 + jax.scipy.special.erf(v / np.sqrt(2.0)))

    for i in range(2):
        blk = params["blocks"][str(i)]
        tm, cm = blk["token_mlp"], blk["channel_mlp"]
        y = gelu(norm(blk["norm1"], x) @ tm["fc1"]["kernel"] + tm["fc1"]["bias"])
        x = x + y @ tm["fc2"]["kernel"] + tm["fc2"]["bias"]
        y = gelu(jnp.einsum("bdn,dh->bhn", norm(blk["norm2"], x), cm["fc1"]["kernel"], precision=HIGHEST)
                 + cm["fc1"]["bias"][:, None])
        x = x + jnp.einsum("bhn,hd->bdn", y, cm["fc2"]["kernel"], precision=HIGHEST) + cm["fc2"]["bias"][:, None]
    pooled = norm(params["norm"], x).mean(-1)
    return pooled @ params["head"]["kernel"] + params["head"]["bias"]


MIXER_INPUTS = Inputs(Custom(lambda rng: ((n := _pick((2, 3, 4))(rng), 1, 8, 16), (n,)), ((2, 1, 8, 16), (2,))),
                      (Floats(-1, 1, tiny=False, min_magnitude=1e-3), Ints(0, 2)))


# --------------------------------------------------------------------------- (d) bidirectional GRU tagger


class Tagger(nn.Module):
    """embed Embedding(11, 6) -> gru GRU(6, 5, bidirectional, batch_first) -> norm LayerNorm(10) ->
    ff Linear(10, 10) -> act SiLU -> head Linear(10, 4), per token: (B, T, 4)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.gru = nn.GRU(6, 5, batch_first=True, bidirectional=True)
        self.norm, self.ff, self.act, self.head = nn.LayerNorm(10), nn.Linear(10, 10), nn.SiLU(), nn.Linear(10, 4)
        _uniform_(self.norm.weight, 0.5, 1.5)
        _uniform_(self.norm.bias, -0.5, 0.5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(self.embed(tokens))
        return self.head(self.act(self.ff(self.norm(out))))


TAGGER_SLIPS = {
    "bwd_not_reversed": ("gru", "the backward direction scanned front to back like the forward one"),
    "bwd_outputs_left_reversed": ("gru", ("the backward direction run over the flipped sequence and its outputs "
                                          "left in flipped order (not flipped back)")),
    "concat_bwd_first": ("gru", ("the two directions concatenated [backward, forward] where torch has "
                                 "[forward, backward]")),
    "bwd_uses_fwd_weights": ("gru", "the backward direction run with forward_rnn's cell parameters"),
    "norm_over_time": ("norm", "LayerNorm statistics taken over the time axis instead of the features"),
    "ff_untransposed": ("ff", "square Linear kernel used as torch's (out, in) weight"),
    "act_hard_silu": ("act", "jax.nn.hard_silu (MobileNetV3's hard swish) where torch has SiLU"),
}


def _gru_cell(c: Any, h: Any, x: Any) -> Any:
    """torch's GRU step on one converted cell (ir/iz/in and hr/hz/hn, kernels (in, H), each with a bias)."""
    r = jax.nn.sigmoid(_dense(c["ir"], x) + _dense(c["hr"], h))
    z = jax.nn.sigmoid(_dense(c["iz"], x) + _dense(c["hz"], h))
    n = jnp.tanh(_dense(c["in"], x) + r * _dense(c["hn"], h))
    return (1.0 - z) * n + z * h


def tagger_apply(params: Any, tokens: Any, train: bool = False, slip: str = "") -> Any:
    _check_slip(TAGGER_SLIPS, slip)
    x = params["embed"]["embedding"][tokens]
    seq = jnp.swapaxes(x, 0, 1)  # (T, B, E): lax.scan runs over axis 0
    layer = params["gru"][0]
    fwd_cell = layer["forward_rnn"]["cell"]
    bwd_cell = fwd_cell if slip == "bwd_uses_fwd_weights" else layer["backward_rnn"]["cell"]
    hidden = fwd_cell["hr"]["kernel"].shape[0]
    h0 = jnp.zeros((x.shape[0], hidden), x.dtype)

    def run(cell: Any, reverse: bool) -> Any:
        def step(h: Any, xt: Any) -> tuple[Any, Any]:
            h = _gru_cell(cell, h, xt)
            return h, h

        return jax.lax.scan(step, h0, seq, reverse=reverse)[1]

    fwd = run(fwd_cell, False)
    if slip == "bwd_outputs_left_reversed":
        bwd = jax.lax.scan(lambda h, xt: (_gru_cell(bwd_cell, h, xt),) * 2, h0, seq[::-1])[1]
    else:
        bwd = run(bwd_cell, slip != "bwd_not_reversed")
    out = jnp.concatenate([bwd, fwd] if slip == "concat_bwd_first" else [fwd, bwd], -1)
    out = jnp.swapaxes(out, 0, 1)  # (B, T, 2H)
    if slip == "norm_over_time":
        mu = out.mean(1, keepdims=True)
        var = jnp.square(out - mu).mean(1, keepdims=True)
        out = (out - mu) / jnp.sqrt(var + 1e-5) * params["norm"]["scale"] + params["norm"]["bias"]
    else:
        out = _layer_norm(params["norm"], out)
    w = params["ff"]["kernel"]
    h = jnp.matmul(out, w.T if slip == "ff_untransposed" else w, precision=HIGHEST) + params["ff"]["bias"]
    h = jax.nn.hard_silu(h) if slip == "act_hard_silu" else jax.nn.silu(h)
    return _dense(params["head"], h)


def tagger_stacked_apply(params: Any, tokens: Any, train: bool = False) -> Any:
    """Correct, written otherwise: both directions in one lax.scan under jax.vmap over a stacked
    direction axis (the backward one fed the time-flipped sequence, its outputs flipped back after),
    the input projections of all three gates precomputed for every step outside the scan with one
    fused (E, 3H) kernel, the embedding a one-hot matmul, the LayerNorm via jax.nn.standardize."""
    emb = params["embed"]["embedding"]
    x = jnp.matmul(jax.nn.one_hot(tokens, emb.shape[0], dtype=emb.dtype), emb, precision=HIGHEST)  # (B, T, E)
    layer = params["gru"][0]
    cells = [layer["forward_rnn"]["cell"], layer["backward_rnn"]["cell"]]
    stacked = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), *cells)
    xs = jnp.stack([x, x[:, ::-1]])  # (2, B, T, E)

    def direction(c: Any, xd: Any) -> Any:
        wi = jnp.concatenate([c["ir"]["kernel"], c["iz"]["kernel"], c["in"]["kernel"]], -1)
        bi = jnp.concatenate([c["ir"]["bias"], c["iz"]["bias"], c["in"]["bias"]])
        proj = jnp.einsum("bte,eg->tbg", xd, wi, precision=HIGHEST) + bi  # (T, B, 3H)
        hsz = c["hr"]["kernel"].shape[0]

        def step(h: Any, p: Any) -> tuple[Any, Any]:
            pr, pz, pn = p[:, :hsz], p[:, hsz:2 * hsz], p[:, 2 * hsz:]
            r = jax.nn.sigmoid(pr + h @ c["hr"]["kernel"] + c["hr"]["bias"])
            z = jax.nn.sigmoid(pz + h @ c["hz"]["kernel"] + c["hz"]["bias"])
            n = jnp.tanh(pn + r * (h @ c["hn"]["kernel"] + c["hn"]["bias"]))
            h = n + z * (h - n)
            return h, h

        return jax.lax.scan(step, jnp.zeros((xd.shape[0], hsz), xd.dtype), proj)[1]  # (T, B, H)

    outs = jax.vmap(direction)(stacked, xs)  # (2, T, B, H)
    out = jnp.concatenate([outs[0], outs[1][::-1]], -1).transpose(1, 0, 2)
    out = jax.nn.standardize(out, axis=-1, epsilon=1e-5) * params["norm"]["scale"] + params["norm"]["bias"]
    h = out @ params["ff"]["kernel"] + params["ff"]["bias"]
    h = h * jax.nn.sigmoid(h)
    return h @ params["head"]["kernel"] + params["head"]["bias"]


TAGGER_INPUTS = Inputs(Custom(lambda rng: ((b := _pick((2, 3, 4))(rng), t := _pick((3, 4, 5))(rng)), (b, t, 4)),
                              ((2, 3), (2, 3, 4))),
                       (Ints(0, 10), Floats(-1, 1, tiny=False, min_magnitude=1e-3)))


# --------------------------------------------------------------------------- the table


MODELS = {  # model -> (torch model, port, inputs, loss, slips, {name: correct port written otherwise})
    "wavenet": (WaveNet, wavenet_apply, WAVENET_INPUTS, mse, WAVENET_SLIPS, {"correct_tap_sums": wavenet_taps_apply}),
    "xattn": (CrossDecoder, xattn_apply, XATTN_INPUTS, cross_entropy, XATTN_SLIPS,
              {"correct_fused_vmap_heads": xattn_fused_apply}),
    "mixer": (Mixer, mixer_apply, MIXER_INPUTS, cross_entropy, MIXER_SLIPS,
              {"correct_channels_first": mixer_channels_first_apply}),
    "tagger": (Tagger, tagger_apply, TAGGER_INPUTS, mse, TAGGER_SLIPS, {"correct_vmap_directions": tagger_stacked_apply}),
}
# slips also run under `grad` (the rest: forward only)
GRAD_TOO = {"res_kernel_out_in", "swiglu_w1_w3_swapped", "token_fc2_untransposed", "bwd_uses_fwd_weights"}
FLOAT64: set[str] = set()  # slips whose effect is under float32's bound (none so far)


def _pair(model: str, torch_model: Any, inputs: Inputs, loss: Any, name: str, apply: Any) -> ModelPair:
    return ModelPair(f"untapped4_{model}_{name}", torch_model, apply, inputs, loss=loss(), checks=("forward",),
                     dtypes=("float32", "float64"))


def cases() -> list[Case]:
    out = []
    for model, (torch_model, port, inputs, loss, slips, odd) in MODELS.items():
        pair = functools.partial(_pair, model, torch_model, inputs, loss)
        out.append(Case(model, "correct", "", "the correct port", pair("correct", port), ("forward", "grad")))
        for name, other in odd.items():
            out.append(Case(model, name, "", " ".join((other.__doc__ or "").split()), pair(name, other),
                            ("forward", "grad")))
        for slip, (module, what) in slips.items():
            out.append(Case(model, slip, module, what, pair(slip, functools.partial(port, slip=slip)),
                            ("forward", "grad") if slip in GRAD_TOO else ("forward",),
                            "float64" if slip in FLOAT64 else "float32"))
    return out
