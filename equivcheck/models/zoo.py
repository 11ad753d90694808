"""Built-in models and their JAX ports: the suite's table (suites/test_models.py) and the
material of the planted-migration-bug tests.

Each port is a pure `apply(params, *inputs, train)` over the Flax tree equivcheck converts
from the torch model, written as a migration would write it (Flax nnx layers where they
exist, NHWC convolutions), with `tap` marking each torch module's output. The keyword
options of a port are the slips a migration makes (gelu approximation, LayerNorm eps,
BatchNorm momentum, ...); their defaults are the correct port.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn as nn
from flax import nnx

from equivcheck.layers import flax_bridge
from equivcheck.models import mapping as mm
from equivcheck.models.pair import ModelPair, cross_entropy, mse
from equivcheck.models.tap import dropout, tap
from equivcheck.ops.shapes import Custom
from equivcheck.ops.strategies import Floats, Inputs, Ints
from equivcheck.optim import Schedule, optimizer_pair
from equivcheck.weights import Rule, convert

# GPU under --equiv-precision=default: the table's TF32 row for models that multiply matrices
MATMUL = frozenset({"matmul"})


def _dense(p: Any, x: Any) -> Any:
    return x @ p["kernel"] + p["bias"]


def _sizes(*options: int) -> Any:
    return lambda rng: int(rng.choice(options))


# --------------------------------------------------------------------------- 1. the MLP


class MLP(nn.Module):
    """Linear(10, 10) -> ReLU -> Linear(10, 1): where every torch/JAX comparison starts."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def mlp_apply(params: Any, x: Any, train: bool = False, transpose_bug: bool = False) -> Any:
    w1 = params["fc1"]["kernel"].T if transpose_bug else params["fc1"]["kernel"]
    h = tap("fc1", x @ w1 + params["fc1"]["bias"])
    h = tap("act", jax.nn.relu(h))
    return tap("fc2", _dense(params["fc2"], h))


def mlp_naive_apply(params: Any, x: Any, train: bool = False) -> Any:
    """The naive port: `W @ x` per example with the (10, 10) and (10, 1) kernels as they are."""
    w1, w2 = params["fc1"]["kernel"], params["fc2"]["kernel"]
    h = tap("fc1", jax.vmap(lambda v: w1 @ v)(x) + params["fc1"]["bias"])
    h = tap("act", jax.nn.relu(h))
    return tap("fc2", jax.vmap(lambda v: w2 @ v)(h) + params["fc2"]["bias"])


MLP_INPUTS = Inputs(Custom(lambda rng: ((n := _sizes(1, 3, 8, 16)(rng), 10), (n, 1)), ((1, 10), (1, 1))),
                    (Floats(-3, 3, tiny=False, min_magnitude=1e-3), Floats(-3, 3, tiny=False, min_magnitude=1e-3)))


def mlp_pair(name: str = "mlp", apply: Any = mlp_apply, optimizer: Any = None, **kw: Any) -> ModelPair:
    opt = optimizer or optimizer_pair(f"{name}.sgd_steplr", "SGD", lr=0.01, momentum=0.9,
                                      schedule=Schedule("StepLR", step_size=5, gamma=0.5))
    kw.setdefault("tags", MATMUL)
    return ModelPair(name, MLP, apply, MLP_INPUTS, loss=mse(), optimizer=opt,
                     doc="Linear(10,10) -> ReLU -> Linear(10,1), MSE, SGD(momentum) + StepLR", **kw)


# --------------------------------------------------------------------------- 2. the CNN


class DigitsCNN(nn.Module):
    """conv -> BatchNorm -> ReLU -> max pool -> flatten -> dropout -> linear, for 8x8 digits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.act1 = nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        self.pool, self.drop, self.fc = nn.MaxPool2d(2), nn.Dropout(0.25), nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.act1(self.bn1(self.conv1(x))))
        return self.fc(self.drop(x.flatten(1)))


def _chw_to_hwc(m: Any) -> Any:
    n = m.shape[0]
    return m.reshape(n, 8, 4, 4).transpose(0, 2, 3, 1).reshape(n, -1)


def cnn_apply(params: Any, x: Any, train: bool = False, bn_momentum: float = 0.9,
              padding: Any = ((1, 1), (1, 1)), eval_dropout: bool = False, own_dropout: bool = False) -> Any:
    """NHWC inside, as a Flax model is written; bn_momentum is Flax's (weight of the old statistic).
    own_dropout: the port draws its own dropout mask (jax.random) instead of torch's."""
    cf = convert.channels_first
    h = convert.channels_last(x)
    conv = flax_bridge.nnx_layer(nnx.Conv, params["conv1"], in_features=1, out_features=8, kernel_size=(3, 3),
                                 padding=padding, use_bias=False)
    h = tap("conv1", conv(h), cf)
    bn = flax_bridge.nnx_layer(nnx.BatchNorm, params["bn1"], num_features=8, momentum=bn_momentum, epsilon=1e-5,
                               use_fast_variance=False, use_running_average=not train)
    h = tap("bn1", bn(h), cf)
    stats = {"bn1": {"mean": params["bn1"]["mean"], "var": params["bn1"]["var"]}}
    if train:
        n = h.size // h.shape[-1]
        new_var = convert.unbiased_running_var(params["bn1"]["var"], bn.var[...], bn_momentum, n)
        stats = {"bn1": {"mean": jax.lax.stop_gradient(bn.mean[...]), "var": jax.lax.stop_gradient(new_var)}}
    h = tap("act1", jax.nn.relu(h), cf)
    h = tap("pool", nnx.max_pool(h, (2, 2), strides=(2, 2)), cf)
    flat = h.reshape(h.shape[0], -1)  # H, W, C order: the fc kernel is converted for it (linear_after_flatten)
    if own_dropout and train:
        keep = jax.random.bernoulli(jax.random.key(0), 0.75, flat.shape)
        flat = jnp.where(keep, flat / 0.75, jnp.zeros_like(flat))
    else:
        flat = dropout("drop", flat, 0.25, train or eval_dropout, from_torch=_chw_to_hwc)
    tap("drop", flat, lambda v: v.reshape(v.shape[0], 4, 4, 8).transpose(0, 3, 1, 2).reshape(v.shape[0], -1))
    return tap("fc", _dense(params["fc"], flat)), stats


def load_digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.data / 16.0).reshape(-1, 1, 8, 8)
    y = d.target.astype(np.int64)
    return x[:1437], y[:1437], x[1437:], y[1437:]


# Nonzero inputs of magnitude >= 1e-3: XLA on CPU flushes subnormal results to zero where torch
# keeps them, and a subnormal conv output decides a ReLU's gradient (found at 1.2e-38 inputs).
CNN_INPUTS = Inputs(Custom(lambda rng: ((n := _sizes(2, 4, 8)(rng), 1, 8, 8), (n,)), ((2, 1, 8, 8), (2,))),
                    (Floats(-1, 1, tiny=False, min_magnitude=1e-3), Ints(0, 9)))
CNN_RULES = (Rule("fc", "fc", "linear_after_flatten", (8, 4, 4)),)


def cnn_pair(name: str = "cnn", apply: Any = cnn_apply, optimizer: Any = None, **kw: Any) -> ModelPair:
    from equivcheck.models.pair import Fit

    kw.setdefault("checks", ("forward", "grad", "modes", "train"))
    kw.setdefault("tags", MATMUL | {"conv"})
    kw.setdefault("fit", Fit(load_digits_split, epochs=3, batch_size=64))
    return ModelPair(name, DigitsCNN, apply, CNN_INPUTS, loss=cross_entropy(),
                     optimizer=optimizer or optimizer_pair(f"{name}.adam", "Adam", lr=1e-2), rules=CNN_RULES,
                     stateful=True,
                     doc="conv, BatchNorm, max pool, dropout, linear (NHWC port); Adam, cross-entropy", **kw)


# --------------------------------------------------------------------------- 3. transformer encoder block


class TinyEncoder(nn.Module):
    """Embedding -> multi-head self-attention with a key padding mask -> residual + LayerNorm ->
    GELU MLP -> residual + LayerNorm -> masked mean -> linear. Token 0 is padding (the first
    position always attends, so no row is fully masked)."""

    def __init__(self, vocab: int = 20, d: int = 16, heads: int = 2, ff: int = 32, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.attn = nn.MultiheadAttention(d, heads, bias=False, batch_first=True)
        self.norm1, self.ff1, self.act = nn.LayerNorm(d), nn.Linear(d, ff), nn.GELU()
        self.ff2, self.norm2, self.head = nn.Linear(ff, d), nn.LayerNorm(d), nn.Linear(d, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pad = tokens == 0
        pad[:, 0] = False
        h = self.embed(tokens)
        h = self.norm1(h + self.attn(h, h, h, key_padding_mask=pad, need_weights=False)[0])
        h = self.norm2(h + self.ff2(self.act(self.ff1(h))))
        keep = (~pad).to(h.dtype)[..., None]
        return self.head((h * keep).sum(1) / keep.sum(1))


def _attention(p: Any, h: Any, keep: Any) -> Any:
    """Multi-head self-attention on the converted Flax tree (query/key/value kernels (E, heads,
    head_dim), out (heads, head_dim, E)), written out: nnx.MultiHeadAttention loses ~4e-8 in
    float64 (measured against a NumPy float64 reference; torch is at 2e-16)."""
    q, k, v = (jnp.einsum("ble,ehd->blhd", h, p[n]["kernel"]) for n in ("query", "key", "value"))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q / np.sqrt(q.shape[-1]).astype(q.dtype), k)
    weights = jax.nn.softmax(jnp.where(keep, scores, -jnp.inf), axis=-1)
    return jnp.einsum("bqhd,hde->bqe", jnp.einsum("bhqk,bkhd->bqhd", weights, v), p["out"]["kernel"])


def encoder_apply(params: Any, tokens: Any, train: bool = False, gelu_approximate: bool = False,
                  ln_eps: float = 1e-5, invert_mask: bool = False, heads: int = 2) -> Any:
    pad = (tokens == 0).at[:, 0].set(False)
    h = tap("embed", params["embed"]["embedding"][tokens])
    b, length, d = h.shape
    keep = flax_bridge.attention_mask(heads, length, length, b, key_padding_mask=~pad if invert_mask else pad)
    a = tap("attn", _attention(params["attn"], h, keep))

    def norm(name: str, v: Any) -> Any:
        layer = flax_bridge.nnx_layer(nnx.LayerNorm, params[name], num_features=d, epsilon=ln_eps,
                                      use_fast_variance=False)
        return tap(name, layer(v))

    h = norm("norm1", h + a)
    f = tap("ff1", _dense(params["ff1"], h))
    f = tap("act", jax.nn.gelu(f, approximate=gelu_approximate))
    h = norm("norm2", h + tap("ff2", _dense(params["ff2"], f)))
    keep = (~pad).astype(h.dtype)[..., None]
    return tap("head", _dense(params["head"], (h * keep).sum(1) / keep.sum(1)))


SEQ_INPUTS = Inputs(Custom(lambda rng: ((b := _sizes(2, 4, 6)(rng), _sizes(3, 5, 8)(rng)), (b,)), ((2, 3), (2,))),
                    (Ints(0, 19), Ints(0, 2)))


def encoder_pair(name: str = "encoder", apply: Any = encoder_apply, optimizer: Any = None, **kw: Any) -> ModelPair:
    kw.setdefault("tags", MATMUL)
    return ModelPair(name, TinyEncoder, apply, SEQ_INPUTS, loss=cross_entropy(),
                     optimizer=optimizer or optimizer_pair(f"{name}.adamw", "AdamW", lr=1e-2),
                     doc="embedding, MHA with key padding mask, LayerNorm, GELU MLP, residuals; AdamW", **kw)


# --------------------------------------------------------------------------- 4. LSTM classifier


class LSTMClassifier(nn.Module):
    def __init__(self, vocab: int = 20, d: int = 8, hidden: int = 16, classes: int = 3) -> None:
        super().__init__()
        self.embed, self.lstm = nn.Embedding(vocab, d), nn.LSTM(d, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, (h, _) = self.lstm(self.embed(tokens))
        return self.head(h[-1])


def lstm_apply(params: Any, tokens: Any, train: bool = False, swap_gates: bool = False) -> Any:
    x = tap("embed", params["embed"]["embedding"][tokens])
    cells = mm.fold_rnn_biases(params["lstm"])
    if swap_gates:  # forget and cell-candidate gates read from each other's rows
        cells = [dict(c, if_=c["ig"], ig=c["if_"], hf=c["hg"], hg=c["hf"]) for c in cells]
    out, (h, _) = flax_bridge.lstm(x, convert.to_torch("lstm", cells), batch_first=True)
    tap("lstm", out)
    return tap("head", _dense(params["head"], h[-1]))


def lstm_pair(name: str = "lstm", apply: Any = lstm_apply, optimizer: Any = None, **kw: Any) -> ModelPair:
    kw.setdefault("tags", MATMUL)
    return ModelPair(name, LSTMClassifier, apply, SEQ_INPUTS, loss=cross_entropy(),
                     optimizer=optimizer or optimizer_pair(f"{name}.adam", "Adam", lr=1e-2),
                     doc="embedding -> one-layer LSTM -> linear on the last hidden state; Adam", **kw)


# --------------------------------------------------------------------------- 5. GRU classifiers


class GRUClassifier(nn.Module):
    """Embedding -> GRU (stacked, optionally bidirectional) -> linear on the last layer's final
    hidden state (both directions' concatenated)."""

    def __init__(self, layers: int = 1, bidirectional: bool = False, vocab: int = 20, d: int = 6,
                 hidden: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.gru = nn.GRU(d, hidden, num_layers=layers, bidirectional=bidirectional, batch_first=True)
        self.head = nn.Linear(hidden * (2 if bidirectional else 1), classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        _, h = self.gru(self.embed(tokens))
        return self.head(torch.cat([h[-2], h[-1]], -1) if self.gru.bidirectional else h[-1])


def gru_apply(params: Any, tokens: Any, train: bool = False) -> Any:
    """linen.RNN(linen.GRUCell) per layer (nnx.GRUCell has no bias for torch's b_hn), a
    bidirectional layer through linen.Bidirectional: each layer's tree is what it takes."""
    from flax import linen

    x = tap("embed", params["embed"]["embedding"][tokens])
    finals: list[Any] = []
    for layer in mm.fold_rnn_biases(params["gru"]):
        both = "forward_rnn" in layer
        hidden = (layer["forward_rnn"]["cell"] if both else layer)["hr"]["kernel"].shape[0]
        rnn = [linen.RNN(linen.GRUCell(features=hidden), return_carry=True) for _ in range(1 + both)]
        h0 = jnp.zeros((x.shape[0], hidden), x.dtype)  # linen's own initial carry is float32
        if both:
            carry, x = linen.Bidirectional(*rnn, return_carry=True).apply({"params": layer}, x,
                                                                           initial_carry=(h0, h0))
            finals += list(carry)
        else:
            carry, x = rnn[0].apply({"params": {"cell": layer}}, x, initial_carry=h0)
            finals.append(carry)
    tap("gru", x)
    last = jnp.concatenate(finals[-2:], -1) if "forward_rnn" in params["gru"][-1] else finals[-1]
    return tap("head", _dense(params["head"], last))


def gru_pair(name: str = "gru", layers: int = 1, bidirectional: bool = False, apply: Any = gru_apply,
             optimizer: Any = None, **kw: Any) -> ModelPair:
    kw.setdefault("tags", MATMUL)
    kw.setdefault("steps", 5)
    # SGD, not Adam: Adam turns a gradient element near its eps into a full step. Through two
    # bidirectional GRU layers, a token first seen at a late step gets embedding gradients of
    # ~1e-8, rounding noise in float32, and XLA's float32 sigmoid/tanh are a few ulps off where
    # torch's are within one. Found at step 2: the port 4.7x torch's distance from float64, past
    # evaluate.ROUNDING_FACTOR, with no port bug.
    opt = optimizer or optimizer_pair(f"{name}.sgd", "SGD", lr=0.05, momentum=0.9)
    return ModelPair(name, functools.partial(GRUClassifier, layers, bidirectional), apply, SEQ_INPUTS,
                     loss=cross_entropy(), optimizer=opt,
                     doc=f"embedding -> {layers}-layer {'bidirectional ' if bidirectional else ''}GRU -> linear "
                         "on the final hidden state; SGD with momentum", **kw)


def planted(port: Any, **slip: Any) -> Any:
    """A port with one migration slip switched on (a keyword option of the port)."""
    return functools.partial(port, **slip)


MODELS = [mlp_pair(), cnn_pair(), encoder_pair(), lstm_pair(), gru_pair(),
          gru_pair("gru_bi", 2, True)]
