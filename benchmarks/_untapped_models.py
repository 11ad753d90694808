"""The models of benchmarks/untapped_localisation.py: four tiny torch models, each with a JAX port
written the way users write one (a plain function over the converted Flax parameter tree, no
`tap` calls), and the migration slips planted in copies of those ports.

A port is `apply(params, *inputs, train=False, slip="")`: `slip=""` is the correct port, any other
value (a key of the model's SLIPS) switches on exactly one slip, so each planted port is the
correct one with one line changed. The parameter tree is what equivcheck converts torch's
state_dict to: nested by torch module name, Linear `kernel` (in, out), Conv `kernel` HWIO,
LayerNorm/BatchNorm `scale`/`bias` (+ BatchNorm `mean`/`var`), Embedding `embedding`,
MultiheadAttention `query`/`key`/`value` (E, heads, head_dim) and `out` (heads, head_dim, E), GRU
per layer `ir`/`iz`/`in` and `hr`/`hz`/`hn` with torch's two biases kept apart.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
from torch import nn

from equivcheck import Custom, Floats, Inputs, Ints
from equivcheck.models import ModelPair, cross_entropy, mse
from equivcheck.models.zoo import TinyEncoder


def _dense(p: Any, x: Any, bias: bool = True) -> Any:
    return x @ p["kernel"] + p["bias"] if bias else x @ p["kernel"]


def _layer_norm(p: Any, x: Any, eps: float = 1e-5) -> Any:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / jnp.sqrt(var + eps) * p["scale"] + p["bias"]


def _pick(options: tuple[int, ...]) -> Any:
    return lambda rng: int(rng.choice(options))


def _check_slip(slips: dict[str, Any], slip: str) -> None:
    if slip and slip not in slips:
        raise ValueError(f"unknown slip {slip!r}: one of {sorted(slips)}")


# --------------------------------------------------------------------------- MLP


class MLP(nn.Module):
    """Linear(6, 8) -> ReLU -> Linear(8, 8) -> GELU -> LayerNorm(8) -> Linear(8, 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act1, self.fc2, self.act2 = nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.GELU()
        self.norm, self.out = nn.LayerNorm(8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(self.act2(self.fc2(self.act1(self.fc1(x))))))


MLP_SLIPS = {  # slip -> (the torch module it is in, what the slip is)
    "fc1_no_bias": ("fc1", "bias dropped from the first Linear"),
    "act1_silu": ("act1", "silu where torch has ReLU"),
    "fc2_untransposed": ("fc2", "square Linear kernel used untransposed (torch's (out, in) weight)"),
    "act2_gelu_tanh": ("act2", "gelu tanh approximation (jax.nn.gelu's default) where torch is exact"),
    "norm_eps_keras": ("norm", "LayerNorm eps 1e-3 (the Keras default) where torch has 1e-5"),
}


def mlp_apply(params: Any, x: Any, train: bool = False, slip: str = "") -> Any:
    _check_slip(MLP_SLIPS, slip)
    h = _dense(params["fc1"], x, bias=slip != "fc1_no_bias")
    h = jax.nn.silu(h) if slip == "act1_silu" else jax.nn.relu(h)
    w2 = params["fc2"]["kernel"]
    h = h @ (w2.T if slip == "fc2_untransposed" else w2) + params["fc2"]["bias"]
    h = jax.nn.gelu(h, approximate=slip == "act2_gelu_tanh")
    h = _layer_norm(params["norm"], h, eps=1e-3 if slip == "norm_eps_keras" else 1e-5)
    return _dense(params["out"], h)


MLP_INPUTS = Inputs(Custom(lambda rng: ((n := _pick((2, 3, 4))(rng), 6), (n, 2)), ((2, 6), (2, 2))),
                    (Floats(-3, 3, tiny=False, min_magnitude=1e-3), Floats(-3, 3, tiny=False, min_magnitude=1e-3)))


# --------------------------------------------------------------------------- CNN


class CNN(nn.Module):
    """conv(1->4, 3x3, pad 1) -> BatchNorm -> ReLU -> max pool 2 -> conv(4->6, 3x3, stride 2, pad 1)
    -> ReLU -> flatten -> Linear(24, 3), on 1x8x8 images. The BatchNorm has trained-looking
    statistics and affine parameters (a migrated model is a trained one)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.act1 = nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU()
        self.pool, self.conv2, self.act2 = nn.MaxPool2d(2), nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU()
        self.flatten, self.fc = nn.Flatten(), nn.Linear(24, 3)
        with torch.no_grad():
            self.bn1.running_mean.uniform_(-0.5, 0.5)
            self.bn1.running_var.uniform_(0.5, 2.0)
            self.bn1.weight.uniform_(0.5, 1.5)
            self.bn1.bias.uniform_(-0.5, 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(self.act1(self.bn1(self.conv1(x))))
        return self.fc(self.flatten(self.act2(self.conv2(h))))


CNN_SLIPS = {
    "conv2_same_padding": ("conv2", "padding='SAME' on a stride-2 conv: pads (0, 1) where torch pads (1, 1)"),
    "bn1_batch_stats": ("bn1", "BatchNorm normalises with the batch's statistics in eval mode"),
    "bn1_eps_keras": ("bn1", "BatchNorm eps 1e-3 (the Keras default) where torch has 1e-5"),
    "pool_avg": ("pool", "average pooling where torch max-pools"),
    "flatten_nhwc": ("flatten", "flattens NHWC activations where torch flattens NCHW"),
}


def _conv(p: Any, x: Any, stride: int, padding: Any) -> Any:
    y = jax.lax.conv_general_dilated(x, p["kernel"], (stride, stride), padding,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + p["bias"] if "bias" in p else y


def cnn_apply(params: Any, x: Any, train: bool = False, slip: str = "") -> Any:
    _check_slip(CNN_SLIPS, slip)
    h = jnp.transpose(x, (0, 2, 3, 1))  # NCHW -> NHWC
    h = _conv(params["conv1"], h, 1, ((1, 1), (1, 1)))
    bn = params["bn1"]
    mean, var = bn["mean"], bn["var"]
    if slip == "bn1_batch_stats":
        mean, var = h.mean((0, 1, 2)), h.var((0, 1, 2))
    eps = 1e-3 if slip == "bn1_eps_keras" else 1e-5
    h = jax.nn.relu((h - mean) / jnp.sqrt(var + eps) * bn["scale"] + bn["bias"])
    n, hh, ww, c = h.shape
    windows = h.reshape(n, hh // 2, 2, ww // 2, 2, c)
    h = windows.mean((2, 4)) if slip == "pool_avg" else windows.max((2, 4))
    h = jax.nn.relu(_conv(params["conv2"], h, 2, "SAME" if slip == "conv2_same_padding" else ((1, 1), (1, 1))))
    if slip != "flatten_nhwc":
        h = jnp.transpose(h, (0, 3, 1, 2))  # back to NCHW: the fc weight reads torch's C, H, W order
    return _dense(params["fc"], h.reshape(n, -1))


CNN_INPUTS = Inputs(Custom(lambda rng: ((n := _pick((2, 3, 4))(rng), 1, 8, 8), (n,)), ((2, 1, 8, 8), (2,))),
                    (Floats(-1, 1, tiny=False, min_magnitude=1e-3), Ints(0, 2)))


# --------------------------------------------------------------------------- transformer encoder block


class Encoder(TinyEncoder):
    """The zoo's TinyEncoder at width 8: Embedding(20, 8) -> MultiheadAttention(8, 2 heads, key
    padding mask; token 0 pads, the first position never) -> residual + LayerNorm -> Linear(8, 16)
    -> GELU -> Linear(16, 8) -> residual + LayerNorm -> masked mean -> Linear(8, 3)."""

    def __init__(self) -> None:
        super().__init__(vocab=20, d=8, heads=2, ff=16, classes=3)


ENCODER_SLIPS = {
    "attn_no_scale": ("attn", "attention scores not divided by sqrt(head_dim)"),
    "attn_softmax_axis": ("attn", "softmax over the query axis instead of the key axis"),
    "attn_mask_inverted": ("attn", "key padding mask polarity inverted (True = attend)"),
    "norm1_eps_flax": ("norm1", "LayerNorm eps 1e-6 (Flax's default) where torch has 1e-5"),
    "act_gelu_tanh": ("act", "gelu tanh approximation where torch is exact"),
    "norm2_residual_after": ("norm2", "residual added after the LayerNorm instead of before it"),
}


def _attention(p: Any, h: Any, pad: Any, slip: str) -> Any:
    q, k, v = (jnp.einsum("ble,ehd->blhd", h, p[n]["kernel"]) for n in ("query", "key", "value"))
    if slip != "attn_no_scale":
        q = q / np.sqrt(q.shape[-1])
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k)
    keep = pad if slip == "attn_mask_inverted" else ~pad
    scores = jnp.where(keep[:, None, None, :], scores, -jnp.inf)
    weights = jax.nn.softmax(scores, axis=-2 if slip == "attn_softmax_axis" else -1)
    weights = jnp.nan_to_num(weights)  # a fully masked row (the inverted mask's) attends nowhere
    return jnp.einsum("bqhd,hde->bqe", jnp.einsum("bhqk,bkhd->bqhd", weights, v), p["out"]["kernel"])


def encoder_apply(params: Any, tokens: Any, train: bool = False, slip: str = "") -> Any:
    _check_slip(ENCODER_SLIPS, slip)
    pad = (tokens == 0).at[:, 0].set(False)
    h = params["embed"]["embedding"][tokens]
    h = _layer_norm(params["norm1"], h + _attention(params["attn"], h, pad, slip),
                    eps=1e-6 if slip == "norm1_eps_flax" else 1e-5)
    f = _dense(params["ff2"], jax.nn.gelu(_dense(params["ff1"], h), approximate=slip == "act_gelu_tanh"))
    h = h + _layer_norm(params["norm2"], f) if slip == "norm2_residual_after" else _layer_norm(params["norm2"], h + f)
    keep = (~pad).astype(h.dtype)[..., None]
    return _dense(params["head"], (h * keep).sum(1) / keep.sum(1))


SEQ_INPUTS = Inputs(Custom(lambda rng: ((b := _pick((2, 3, 4))(rng), _pick((3, 4, 5))(rng)), (b,)), ((2, 3), (2,))),
                    (Ints(0, 19), Ints(0, 2)))


# --------------------------------------------------------------------------- GRU classifier


class GRUNet(nn.Module):
    """Embedding(20, 6) -> GRU(6, 8) -> Linear(8, 3) on the final hidden state."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.gru, self.head = nn.Embedding(20, 6), nn.GRU(6, 8, batch_first=True), nn.Linear(8, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        _, h = self.gru(self.embed(tokens))
        return self.head(h[-1])


GRU_SLIPS = {
    "gru_gate_order": ("gru", "reset and update gates read from each other's rows (r, z swapped)"),
    "gru_reset_before": ("gru", "reset gate applied to h before the hidden matmul (Keras reset_after=False)"),
    "gru_update_flipped": ("gru", "h' = z*n + (1-z)*h where torch computes (1-z)*n + z*h"),
    "gru_time_axis": ("gru", "scans over the batch axis: batch_first inputs not swapped to time-major"),
    "head_no_bias": ("head", "bias dropped from the head Linear"),
}


def gru_apply(params: Any, tokens: Any, train: bool = False, slip: str = "") -> Any:
    _check_slip(GRU_SLIPS, slip)
    c = params["gru"][0]
    r_in, z_in = ("iz", "ir") if slip == "gru_gate_order" else ("ir", "iz")
    r_h, z_h = ("hz", "hr") if slip == "gru_gate_order" else ("hr", "hz")

    def step(h: Any, x: Any) -> tuple[Any, Any]:
        r = jax.nn.sigmoid(_dense(c[r_in], x) + _dense(c[r_h], h))
        z = jax.nn.sigmoid(_dense(c[z_in], x) + _dense(c[z_h], h))
        if slip == "gru_reset_before":
            n = jnp.tanh(_dense(c["in"], x) + _dense(c["hn"], r * h))
        else:
            n = jnp.tanh(_dense(c["in"], x) + r * _dense(c["hn"], h))
        h = z * n + (1 - z) * h if slip == "gru_update_flipped" else (1 - z) * n + z * h
        return h, h

    x = params["embed"]["embedding"][tokens]
    seq = x if slip == "gru_time_axis" else jnp.swapaxes(x, 0, 1)  # lax.scan runs over axis 0
    h0 = jnp.zeros((seq.shape[1], c["hr"]["kernel"].shape[0]), x.dtype)
    last, _ = jax.lax.scan(step, h0, seq)
    return _dense(params["head"], last, bias=slip != "head_no_bias")


# --------------------------------------------------------------------------- the table


@dataclasses.dataclass(frozen=True)
class Case:
    model: str
    name: str  # "correct", or the slip
    expected: str  # the torch module the slip is in ("" for a correct port)
    what: str
    pair: ModelPair
    checks: tuple[str, ...]
    dtype: str = "float32"

    @property
    def id(self) -> str:
        return f"{self.model}/{self.name}"


MODELS = {  # model -> (torch model, port, inputs, loss, slips)
    "mlp": (MLP, mlp_apply, MLP_INPUTS, mse, MLP_SLIPS),
    "cnn": (CNN, cnn_apply, CNN_INPUTS, cross_entropy, CNN_SLIPS),
    "encoder": (Encoder, encoder_apply, SEQ_INPUTS, cross_entropy, ENCODER_SLIPS),
    "gru": (GRUNet, gru_apply, SEQ_INPUTS, cross_entropy, GRU_SLIPS),
}
# slips also run under `grad` by default (the rest: forward only)
GRAD_TOO = {"fc2_untransposed", "bn1_batch_stats", "attn_no_scale", "gru_reset_before"}
# 1e-6 vs 1e-5 moves a LayerNorm of unit-variance inputs by ~5e-6 relative: under float32's bound
FLOAT64 = {"norm1_eps_flax"}


def _pair(model: str, torch_model: Any, inputs: Inputs, loss: Any, name: str, apply: Any) -> ModelPair:
    return ModelPair(f"untapped_{model}_{name}", torch_model, apply, inputs, loss=loss(), checks=("forward",),
                     dtypes=("float32", "float64"))


def cases() -> list[Case]:
    out = []
    for model, (torch_model, port, inputs, loss, slips) in MODELS.items():
        pair = functools.partial(_pair, model, torch_model, inputs, loss)
        out.append(Case(model, "correct", "", "the correct port", pair("correct", port), ("forward", "grad")))
        for slip, (module, what) in slips.items():
            out.append(Case(model, slip, module, what, pair(slip, functools.partial(port, slip=slip)),
                            ("forward", "grad") if slip in GRAD_TOO else ("forward",),
                            "float64" if slip in FLOAT64 else "float32"))
    return out
