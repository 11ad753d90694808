"""Layer pairs, part 2: attention and recurrent layers. Inputs are drawn batch-first; a config
with batch_first=False transposes them on both sides before the layer sees them, so torch's
(L, N, E) default is what gets checked there.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from equivcheck import Mask
from equivcheck.layers import flax_bridge as fb
from equivcheck.references import layers as R
from suites._kit import ATTENTION_F64, W, X, call, ints, layer, module, pick


def _kpm(mask):
    """Key padding masks keep key 0: a fully masked row is its own pair (sdpa_fully_masked)."""
    mask = mask.clone() if isinstance(mask, torch.Tensor) else mask
    if isinstance(mask, torch.Tensor):
        mask[:, 0] = False
        return mask
    return mask.at[:, 0].set(False)


def _causal(q_len, k_len, xp):
    return xp.triu(xp.ones((q_len, k_len), dtype=bool), 1)  # torch MHA: True = may not attend


def _seq_first(a, batch_first, swap):
    return a if batch_first else swap(a)


def t_mha(q, k, v, w_in, b_in, w_out, b_out, kpm, config):
    heads, batch_first, causal = config
    sd = {"in_proj_weight": w_in, "in_proj_bias": b_in, "out_proj.weight": w_out, "out_proj.bias": b_out}
    return _t_mha(q, k, v, sd, kpm, heads, batch_first, causal)


def _t_mha(q, k, v, sd, kpm, heads, batch_first, causal):
    m = module(nn.MultiheadAttention, q.shape[-1], heads, batch_first=batch_first, kdim=k.shape[-1], vdim=v.shape[-1])
    swap = lambda a: a.transpose(0, 1)  # noqa: E731
    q, k, v = (_seq_first(a, batch_first, swap) for a in (q, k, v))
    mask = _causal(q.shape[1 if batch_first else 0], k.shape[1 if batch_first else 0], torch) if causal else None
    out = call(m, sd, q, k, v, key_padding_mask=_kpm(kpm), attn_mask=mask, need_weights=False)[0]
    return _seq_first(out, batch_first, swap)


def j_mha(q, k, v, w_in, b_in, w_out, b_out, kpm, config):
    heads, batch_first, causal = config
    sd = {"in_proj_weight": w_in, "in_proj_bias": b_in, "out_proj.weight": w_out, "out_proj.bias": b_out}
    return _j_mha(q, k, v, sd, kpm, heads, batch_first, causal)


def _j_mha(q, k, v, sd, kpm, heads, batch_first, causal):
    import jax.numpy as jnp

    swap = lambda a: jnp.swapaxes(a, 0, 1)  # noqa: E731
    mask = _causal(q.shape[1], k.shape[1], jnp) if causal else None
    q, k, v = (_seq_first(a, batch_first, swap) for a in (q, k, v))
    out = fb.multihead_attention(q, k, v, sd, heads, key_padding_mask=_kpm(kpm), attn_mask=mask,
                                 batch_first=batch_first)
    return _seq_first(out, batch_first, swap)


def r_mha(q, k, v, w_in, b_in, w_out, b_out, kpm, config):
    heads, _, causal = config
    sd = {"in_proj_weight": w_in, "in_proj_bias": b_in, "out_proj.weight": w_out, "out_proj.bias": b_out}
    kpm = kpm.copy()
    kpm[:, 0] = False
    mask = _causal(q.shape[1], k.shape[1], np) if causal else None
    return R.multihead_attention(q, k, v, sd, heads, kpm, mask, batch_first=True)


def s_mha(rng):
    n, e, l_q = ints(rng, 1, 2), pick(rng, (2, 4)), ints(rng, 1, 3)
    s = l_q + ints(rng, 0, 2)  # causal masks need S >= L so that no row is fully masked
    return ((n, l_q, e), (n, s, e), (n, s, e), (3 * e, e), (3 * e,), (e, e), (e,), (n, s))


MHA_NAMES = ("query", "key", "value", "in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias",
             "key_padding_mask")


def t_mha_kdim(q, k, v, wq, wk, wv, b_in, w_out, b_out, kpm):
    sd = {"q_proj_weight": wq, "k_proj_weight": wk, "v_proj_weight": wv, "in_proj_bias": b_in,
          "out_proj.weight": w_out, "out_proj.bias": b_out}
    return _t_mha(q, k, v, sd, kpm, 2, True, False)


def j_mha_kdim(q, k, v, wq, wk, wv, b_in, w_out, b_out, kpm):
    sd = {"q_proj_weight": wq, "k_proj_weight": wk, "v_proj_weight": wv, "in_proj_bias": b_in,
          "out_proj.weight": w_out, "out_proj.bias": b_out}
    return _j_mha(q, k, v, sd, kpm, 2, True, False)


def r_mha_kdim(q, k, v, wq, wk, wv, b_in, w_out, b_out, kpm):
    sd = {"q_proj_weight": wq, "k_proj_weight": wk, "v_proj_weight": wv, "in_proj_bias": b_in,
          "out_proj.weight": w_out, "out_proj.bias": b_out}
    kpm = kpm.copy()
    kpm[:, 0] = False
    return R.multihead_attention(q, k, v, sd, 2, kpm, None, batch_first=True)


def s_mha_kdim(rng):
    n, l_q, s, kd = ints(rng, 1, 2), ints(rng, 1, 3), ints(rng, 1, 3), ints(rng, 1, 3)
    return ((n, l_q, 4), (n, s, kd), (n, s, kd), (4, 4), (4, kd), (4, kd), (12,), (4, 4), (4,), (n, s))


def t_sdpa(q, k, v, mask, causal):
    return nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=None if causal else _keep_first(mask),
                                                      is_causal=causal)


def _keep_first(mask):
    """SDPA masks (True = attend) keep key 0, for the same reason as _kpm."""
    if isinstance(mask, torch.Tensor):
        mask = mask.clone()
        mask[..., 0] = True
        return mask
    if isinstance(mask, np.ndarray):
        mask = mask.copy()
        mask[..., 0] = True
        return mask
    return mask.at[..., 0].set(True)


def j_sdpa(q, k, v, mask, causal):
    return fb.scaled_dot_product_attention(q, k, v, attn_mask=None if causal else _keep_first(mask), is_causal=causal)


def r_sdpa(q, k, v, mask, causal):
    return R.attention(q, k, v, None if causal else _keep_first(mask), is_causal=causal)


def s_sdpa(rng):
    b, h, l_q, d = ints(rng, 1, 2), ints(rng, 1, 2), ints(rng, 1, 3), ints(rng, 1, 3)
    s = l_q + ints(rng, 0, 2)
    # jax.nn.dot_product_attention needs value's head dim equal to the query's (torch does not)
    return ((b, h, l_q, d), (b, h, s, d), (b, h, s, d), (b, 1, 1, s))


ATTENTION_PAIRS = [
    layer("nn.multihead_attention", t_mha, j_mha, s_mha,
          ((1, 1, 2), (1, 1, 2), (1, 1, 2), (6, 2), (6,), (2, 2), (2,), (1, 1)), (X, X, X, W, W, W, W, Mask()),
          MHA_NAMES, configs=[(2, False, True)], reference=r_mha, tolerance=ATTENTION_F64,
          tags={"matmul"}, doc="packed in_proj -> separate q/k/v kernels (in, heads, head_dim); key_padding_mask "
                               "and causal attn_mask (True = ignore) -> one Flax mask (True = attend)"),
    layer("nn.multihead_attention_kdim", t_mha_kdim, j_mha_kdim, s_mha_kdim,
          ((1, 1, 4), (1, 1, 1), (1, 1, 1), (4, 4), (4, 1), (4, 1), (12,), (4, 4), (4,), (1, 1)),
          (X, X, X, W, W, W, W, W, W, Mask()),
          ("query", "key", "value", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias",
           "out_proj.weight", "out_proj.bias", "key_padding_mask"),
          reference=r_mha_kdim, tolerance=ATTENTION_F64, tags={"matmul"},
          doc="kdim = vdim != embed_dim: separate q/k/v_proj_weight -> in_kv_features"),
    layer("nn.scaled_dot_product_attention", t_sdpa, j_sdpa, s_sdpa, ((1, 1, 1, 1),) * 3 + ((1, 1, 1, 1),),
          (X, X, X, Mask()), ("query", "key", "value", "attn_mask"), configs=[False, True], reference=r_sdpa,
          tolerance=ATTENTION_F64, tags={"matmul"},
          doc="padding mask (B, 1, 1, S) or is_causal; (B, H, L, D) vs jax.nn.dot_product_attention's (B, L, H, D)"),
]


# --------------------------------------------------------------------------- recurrent


def _rnn_names(layers, kind):
    keys = [f"{w}_l{k}" for k in range(layers) for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    return ("input", *keys, "h0") + (("c0",) if kind == "lstm" else ())


def s_rnn(layers, gates, kind):
    def sample(rng):
        n, t, f, h = ints(rng, 1, 2), ints(rng, 1, 4), ints(rng, 1, 3), ints(rng, 1, 3)
        shapes = [(n, t, f)]
        for k in range(layers):
            shapes += [(gates * h, f if k == 0 else h), (gates * h, h), (gates * h,), (gates * h,)]
        return tuple(shapes + [(layers, n, h)] * (2 if kind == "lstm" else 1))

    return sample


def rnn_pair(kind, layers):
    """One layer with torch's default batch_first=False, two stacked with batch_first=True: one
    recurrent program per shape (each compiles in ~1.5 s)."""
    gates = 4 if kind == "lstm" else 3
    names = _rnn_names(layers, kind)
    n_w = 4 * layers

    def split(args):
        *arrays, batch_first = args
        return arrays[0], dict(zip(names[1:1 + n_w], arrays[1:1 + n_w])), arrays[1 + n_w:], batch_first

    def t_fn(*args):
        x, sd, states, batch_first = split(args)
        m = module(getattr(nn, kind.upper()), x.shape[-1], sd["weight_hh_l0"].shape[1], num_layers=layers,
                   batch_first=batch_first)
        x = x if batch_first else x.transpose(0, 1)
        out, final = call(m, sd, x, tuple(states) if kind == "lstm" else states[0])
        out = out if batch_first else out.transpose(0, 1)
        return (out, *final) if kind == "lstm" else (out, final)

    def j_fn(*args):
        x, sd, states, batch_first = split(args)
        x = x if batch_first else x.swapaxes(0, 1)
        if kind == "lstm":
            out, (h, c) = fb.lstm(x, sd, *states, batch_first=batch_first)
            final = (h, c)
        else:
            out, h = fb.gru(x, sd, *states, batch_first=batch_first)
            final = (h,)
        return (out if batch_first else out.swapaxes(0, 1), *final)

    def r_fn(*args):
        x, sd, states, _ = split(args)
        if kind == "lstm":
            out, (h, c) = R.lstm(x, sd, *states, batch_first=True)
            return out, h, c
        out, h = R.gru(x, sd, *states, batch_first=True)
        return out, h

    smallest = s_rnn(layers, gates, kind)(_Ones())
    doc = {"lstm": "nnx.RNN(nnx.LSTMCell): gate rows (i,f,g,o) -> ii/if_/ig/io + hi/hf/hg/ho, b_ih + b_hh",
           "gru": "linen.RNN(linen.GRUCell): b_hn inside r * (W_hn h + b_hn) -> hn bias"}[kind]
    return layer(f"nn.{kind}" + ("_stacked" if layers > 1 else ""), t_fn, j_fn, s_rnn(layers, gates, kind), smallest,
                 [X] + [W] * n_w + [X] * (len(names) - 1 - n_w), names, configs=[layers > 1],
                 reference=r_fn, tags={"matmul"}, doc=doc)


class _Ones:
    """A stand-in generator that makes a sampler return its smallest shapes."""

    def integers(self, lo, hi=None, size=None):
        return 0 if hi is None else lo


RNN_PAIRS = [rnn_pair("lstm", 1), rnn_pair("lstm", 2), rnn_pair("gru", 1), rnn_pair("gru", 2)]

PAIRS = [*ATTENTION_PAIRS, *RNN_PAIRS]
