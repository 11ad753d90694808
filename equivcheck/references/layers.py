"""float64 NumPy references for torch.nn layers, written from torch's documented definitions.

When the two frameworks disagree even in float64, a pair's `reference` decides which side
computes the documented function. These are deliberately plain (loops over kernel offsets,
windows and time steps) and share no code with either side or with flax_bridge. Layouts are
torch's: NC... activations, torch-shaped weights.
"""
from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def _t(v: Any, n: int) -> tuple[int, ...]:
    return (int(v),) * n if np.ndim(v) == 0 else tuple(int(i) for i in v)


def _f(*arrays: Any) -> list[Any]:
    return [None if a is None else np.asarray(a, np.float64) for a in arrays]


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + np.tanh(0.5 * x))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    finite_max = np.max(np.where(np.isfinite(x), x, -np.inf), axis=axis, keepdims=True)
    e = np.exp(x - np.where(np.isfinite(finite_max), finite_max, 0))
    return e / e.sum(axis=axis, keepdims=True)


def linear(x, w, b=None):
    x, w, b = _f(x, w, b)
    return x @ w.T + (0 if b is None else b)


def conv(x, w, b=None, stride=1, padding=0, dilation=1, groups=1, padding_mode="zeros"):
    x, w, b = _f(x, w, b)
    n = w.ndim - 2
    k, s, d = w.shape[2:], _t(stride, n), _t(dilation, n)
    if padding == "valid":
        pads = [(0, 0)] * n
    elif padding == "same":
        pads = [(dd * (kk - 1) // 2, dd * (kk - 1) - dd * (kk - 1) // 2) for kk, dd in zip(k, d)]
    else:
        pads = [(p, p) for p in _t(padding, n)]
    mode = {"zeros": "constant", "circular": "wrap", "reflect": "reflect", "replicate": "edge"}[padding_mode]
    xp = np.pad(x, [(0, 0), (0, 0)] + pads, mode=mode)
    outs = [(xp.shape[2 + i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(n)]
    cg, og = x.shape[1] // groups, w.shape[0] // groups
    y = np.zeros((x.shape[0], w.shape[0], *outs))
    for offs in itertools.product(*map(range, k)):
        sl = tuple(slice(o * dd, o * dd + (m - 1) * ss + 1, ss) for o, dd, ss, m in zip(offs, d, s, outs))
        patch = xp[(slice(None), slice(None)) + sl]
        for g in range(groups):
            wg = w[(slice(g * og, (g + 1) * og), slice(None)) + offs]
            y[:, g * og:(g + 1) * og] += np.einsum("nc...,oc->no...", patch[:, g * cg:(g + 1) * cg], wg)
    return y + (0 if b is None else b.reshape((1, -1) + (1,) * n))


def conv_transpose(x, w, b=None, stride=1, padding=0, output_padding=0, dilation=1):
    """Each input element scatters weight * value to out[i*stride + k*dilation - padding]."""
    x, w, b = _f(x, w, b)
    n = w.ndim - 2
    k, s, d = w.shape[2:], _t(stride, n), _t(dilation, n)
    p, op = _t(padding, n), _t(output_padding, n)
    size = x.shape[2:]
    full = [(L - 1) * ss + dd * (kk - 1) + 1 + o for L, ss, dd, kk, o in zip(size, s, d, k, op)]
    y = np.zeros((x.shape[0], w.shape[1], *full))
    for offs in itertools.product(*map(range, k)):
        sl = tuple(slice(o * dd, o * dd + (L - 1) * ss + 1, ss) for o, dd, ss, L in zip(offs, d, s, size))
        y[(slice(None), slice(None)) + sl] += np.einsum("nc...,co->no...", x, w[(slice(None), slice(None)) + offs])
    crop = tuple(slice(pp, f - pp) for pp, f in zip(p, full))
    y = y[(slice(None), slice(None)) + crop]
    return y + (0 if b is None else b.reshape((1, -1) + (1,) * n))


def _normalize(x, axes, eps):
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    return (x - mean) / np.sqrt(var + eps)


def layer_norm(x, normalized_shape, w=None, b=None, eps=1e-5):
    x, w, b = _f(x, w, b)
    k = len(_t(normalized_shape, 1))
    y = _normalize(x, tuple(range(-k, 0)), eps)
    return y * (1 if w is None else w) + (0 if b is None else b)


def rms_norm(x, normalized_shape, w=None, eps=None):
    eps = np.finfo(np.asarray(x).dtype).eps if eps is None else eps
    (x, w) = _f(x, w)
    k = len(_t(normalized_shape, 1))
    y = x / np.sqrt(np.mean(x**2, axis=tuple(range(-k, 0)), keepdims=True) + eps)
    return y * (1 if w is None else w)


def _channel(v, ndim):
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def group_norm(x, num_groups, w=None, b=None, eps=1e-5):
    x, w, b = _f(x, w, b)
    g = x.reshape(x.shape[0], num_groups, -1)
    y = _normalize(g, (2,), eps).reshape(x.shape)
    return y * (1 if w is None else _channel(w, x.ndim)) + (0 if b is None else _channel(b, x.ndim))


def instance_norm(x, w=None, b=None, eps=1e-5):
    x, w, b = _f(x, w, b)
    y = _normalize(x, tuple(range(2, x.ndim)), eps)
    return y * (1 if w is None else _channel(w, x.ndim)) + (0 if b is None else _channel(b, x.ndim))


def batch_norm(x, running_mean, running_var, w, b, training, momentum=0.1, eps=1e-5):
    """(output, new running_mean, new running_var); torch's running_var takes the unbiased variance."""
    x, rm, rv, w, b = _f(x, running_mean, running_var, w, b)
    axes = (0,) + tuple(range(2, x.ndim))
    if training:
        n = x.size // x.shape[1]
        mean, var = x.mean(axis=axes), x.var(axis=axes)
        rm = (1 - momentum) * rm + momentum * mean
        rv = (1 - momentum) * rv + momentum * var * n / (n - 1)
    else:
        mean, var = rm, rv
    y = (x - _channel(mean, x.ndim)) / np.sqrt(_channel(var, x.ndim) + eps)
    return y * _channel(w, x.ndim) + _channel(b, x.ndim), rm, rv


def embedding(idx, w):
    return np.asarray(w, np.float64)[np.asarray(idx)]


# --------------------------------------------------------------------------- pooling


def _pool_out(L, k, s, p, ceil_mode):
    out = math.floor((L + 2 * p - k) / s) + 1 if not ceil_mode else math.ceil((L + 2 * p - k) / s) + 1
    if ceil_mode and (out - 1) * s >= L + p:
        out -= 1
    return out


def _pool(x, kernel_size, stride, padding, ceil_mode, fill):
    x = np.asarray(x, np.float64)
    n = x.ndim - 2
    k = _t(kernel_size, n)
    s = _t(stride if stride is not None else k, n)
    p = _t(padding, n)
    outs = [_pool_out(L, kk, ss, pp, ceil_mode) for L, kk, ss, pp in zip(x.shape[2:], k, s, p)]
    right = [max(0, (o - 1) * ss + kk - L - pp) for o, ss, kk, L, pp in zip(outs, s, k, x.shape[2:], p)]
    xp = np.pad(x, [(0, 0), (0, 0)] + [(pp, r) for pp, r in zip(p, right)], constant_values=fill)
    win = sliding_window_view(xp, k, axis=tuple(range(2, x.ndim)))
    win = win[(slice(None), slice(None)) + tuple(slice(0, (o - 1) * ss + 1, ss) for o, ss in zip(outs, s))]
    return win, k, s, p, outs


def _window_axes(win):
    """sliding_window_view appends the n window axes after the (N, C, *outs) ones."""
    return tuple(range(win.ndim // 2 + 1, win.ndim))


def max_pool(x, kernel_size, stride=None, padding=0, ceil_mode=False):
    win, *_ = _pool(x, kernel_size, stride, padding, ceil_mode, -np.inf)
    return win.max(axis=_window_axes(win))


def avg_pool(x, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True):
    win, k, s, p, outs = _pool(x, kernel_size, stride, padding, ceil_mode, 0.0)
    total = win.sum(axis=_window_axes(win))
    sizes = np.asarray(x).shape[2:]
    counts = []
    for L, kk, ss, pp, o in zip(sizes, k, s, p, outs):
        start = np.arange(o) * ss - pp
        lo, hi = (start, np.minimum(start + kk, L + pp)) if count_include_pad else \
            (np.maximum(start, 0), np.minimum(start + kk, L))
        counts.append(hi - lo)
    return total / functools.reduce(np.multiply.outer, counts).astype(np.float64)


def adaptive_avg_pool(x, output_size):
    x = np.asarray(x, np.float64)
    n = x.ndim - 2
    outs = _t(output_size, n)
    y = np.zeros(x.shape[:2] + outs)
    for idx in itertools.product(*map(range, outs)):
        sl = tuple(slice((i * L) // o, -(-((i + 1) * L) // o)) for i, L, o in zip(idx, x.shape[2:], outs))
        y[(slice(None), slice(None)) + idx] = x[(slice(None), slice(None)) + sl].mean(axis=tuple(range(2, x.ndim)))
    return y


# --------------------------------------------------------------------------- attention


def attention(q, k, v, keep=None, is_causal=False, scale=None):
    """softmax(q k^T * scale, masked where keep is False) v over the last two axes."""
    q, k, v = _f(q, k, v)
    s = q @ np.swapaxes(k, -1, -2) * (1 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if is_causal:
        keep = np.tril(np.ones(s.shape[-2:], bool)) & (True if keep is None else keep)
    if keep is not None:
        s = np.where(keep, s, -np.inf)
    return softmax(s) @ v


def multihead_attention(query, key, value, sd: Mapping[str, Any], num_heads, key_padding_mask=None, attn_mask=None,
                        batch_first=False):
    q, k, v = _f(query, key, value)
    if not batch_first:
        q, k, v = (np.swapaxes(a, 0, 1) for a in (q, k, v))
    sd = {a: np.asarray(b, np.float64) for a, b in sd.items()}
    e = q.shape[-1]
    ws = np.split(sd["in_proj_weight"], 3) if "in_proj_weight" in sd else [sd[f"{c}_proj_weight"] for c in "qkv"]
    bs = np.split(sd["in_proj_bias"], 3) if "in_proj_bias" in sd else [0, 0, 0]
    heads = lambda a: a.reshape(a.shape[0], a.shape[1], num_heads, -1).transpose(0, 2, 1, 3)  # noqa: E731
    qh, kh, vh = (heads(a @ w.T + bb) for a, w, bb in zip((q, k, v), ws, bs))
    keep = np.ones((q.shape[0], 1, q.shape[1], k.shape[1]), bool)
    if attn_mask is not None:
        keep = keep & ~np.asarray(attn_mask, bool)
    if key_padding_mask is not None:
        keep = keep & ~np.asarray(key_padding_mask, bool)[:, None, None, :]
    o = attention(qh, kh, vh, keep).transpose(0, 2, 1, 3).reshape(q.shape[0], q.shape[1], e)
    out = o @ sd["out_proj.weight"].T + sd.get("out_proj.bias", 0)
    return out if batch_first else np.swapaxes(out, 0, 1)


# --------------------------------------------------------------------------- recurrent


def _stack(x, sd, n_gates, h0, batch_first, cell):
    x = np.asarray(x, np.float64)
    sd = {a: np.asarray(b, np.float64) for a, b in sd.items()}
    x = x if batch_first else np.swapaxes(x, 0, 1)
    layers = len([k for k in sd if k.startswith("weight_ih_l")])
    hidden = sd["weight_hh_l0"].shape[1]
    finals = []
    for layer in range(layers):
        w_ih, w_hh = sd[f"weight_ih_l{layer}"], sd[f"weight_hh_l{layer}"]
        b_ih = sd.get(f"bias_ih_l{layer}", np.zeros(n_gates * hidden))
        b_hh = sd.get(f"bias_hh_l{layer}", np.zeros(n_gates * hidden))
        state = tuple(np.asarray(s[layer], np.float64) for s in h0)
        outs = []
        for t in range(x.shape[1]):
            state = cell(x[:, t] @ w_ih.T + b_ih, state, w_hh, b_hh)
            outs.append(state[0])
        x = np.stack(outs, axis=1)
        finals.append(state)
    return (x if batch_first else np.swapaxes(x, 0, 1)), finals


def lstm(x, sd, h0, c0, batch_first=False):
    def cell(gx, state, w_hh, b_hh):
        h, c = state
        i, f, g, o = np.split(gx + h @ w_hh.T + b_hh, 4, axis=-1)
        c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
        return sigmoid(o) * np.tanh(c), c

    out, finals = _stack(x, sd, 4, (h0, c0), batch_first, cell)
    return out, (np.stack([h for h, _ in finals]), np.stack([c for _, c in finals]))


def gru(x, sd, h0, batch_first=False):
    def cell(gx, state, w_hh, b_hh):
        (h,) = state
        xr, xz, xn = np.split(gx, 3, axis=-1)
        hr, hz, hn = np.split(h @ w_hh.T + b_hh, 3, axis=-1)
        r, z = sigmoid(xr + hr), sigmoid(xz + hz)
        n = np.tanh(xn + r * hn)
        return ((1 - z) * n + z * h,)

    out, finals = _stack(x, sd, 3, (h0,), batch_first, cell)
    return out, np.stack([h for (h,) in finals])


# --------------------------------------------------------------------------- resampling, reshaping


def _antialias_matrix(n_in: int, n_out: int) -> np.ndarray:
    """torch's (and PIL's) antialiased linear filter: a triangle widened by the downscale
    factor around each output centre, weights normalised over the input taps it covers."""
    scale = n_in / n_out
    support, inv = (scale, 1 / scale) if scale >= 1 else (1.0, 1.0)
    a = np.zeros((n_out, n_in))
    for i in range(n_out):
        centre = scale * (i + 0.5)
        lo, hi = max(int(centre - support + 0.5), 0), min(int(centre + support + 0.5), n_in)
        w = np.maximum(0.0, 1 - np.abs((np.arange(lo, hi) - centre + 0.5) * inv))
        a[i, lo:hi] = w / w.sum()
    return a


def _resample_matrix(n_in: int, n_out: int, mode: str, align_corners: bool | None,
                     antialias: bool = False) -> np.ndarray:
    if antialias and mode not in ("nearest", "nearest-exact"):
        return _antialias_matrix(n_in, n_out)
    a = np.zeros((n_out, n_in))
    for i in range(n_out):
        if mode == "nearest":
            a[i, min((i * n_in) // n_out, n_in - 1)] = 1
        elif mode == "nearest-exact":
            a[i, min(((2 * i + 1) * n_in) // (2 * n_out), n_in - 1)] = 1
        else:
            if align_corners:
                src = i * (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
            else:
                src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
            i0 = min(int(math.floor(src)), n_in - 1)
            i1, w = min(i0 + 1, n_in - 1), src - i0
            a[i, i0] += 1 - w
            a[i, i1] += w
    return a


def interpolate(x, size: Sequence[int], mode="nearest", align_corners=None, antialias=False):
    """F.interpolate(x, size) for nearest, nearest-exact and (bi)linear, antialiased or not."""
    y = np.asarray(x, np.float64)
    for axis, (n_in, n_out) in enumerate(zip(y.shape[2:], size)):
        m = _resample_matrix(n_in, int(n_out), mode, align_corners, antialias)
        y = np.moveaxis(np.tensordot(y, m.T, axes=[[2 + axis], [0]]), -1, 2 + axis)
    return y


def pixel_shuffle(x, r):
    x = np.asarray(x, np.float64)
    n, c, h, w = x.shape
    y = np.zeros((n, c // (r * r), h * r, w * r))
    for ch in range(c):
        oc, rem = divmod(ch, r * r)
        i, j = divmod(rem, r)
        y[:, oc, i::r, j::r] = x[:, ch]
    return y
