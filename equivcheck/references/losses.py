"""float64 NumPy references for torch.nn.functional losses, from torch's documented formulas.

They decide which side is off when torch and the optax/jnp port disagree in float64 too.
Class axis 1 (torch's layout); reductions as torch defines them.
"""
from __future__ import annotations

import numpy as np


def _f(*arrays):
    return [None if a is None else np.asarray(a, np.float64) for a in arrays]


def reduce(loss, reduction, weight_sum=None):
    loss = np.asarray(loss, np.float64)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        return loss.sum() / (weight_sum if weight_sum is not None else loss.size)


def log_softmax(z, axis=1):
    m = z.max(axis=axis, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=axis, keepdims=True))


def cross_entropy(z, y, w=None, reduction="mean", ignore_index=-100, label_smoothing=0.0):
    """Integer targets: loss_i = (1-e) w_y (-log p_y) + e/C sum_c w_c (-log p_c); 'mean' divides
    by the summed weights of the kept targets."""
    (z,) = _f(z)
    y = np.asarray(y)
    c = z.shape[1]
    w = np.ones(c) if w is None else np.asarray(w, np.float64)
    logp = np.moveaxis(log_softmax(z), 1, -1)
    keep = y != ignore_index
    yy = np.where(keep, y, 0)
    nll = -np.take_along_axis(logp, yy[..., None], -1)[..., 0] * w[yy]
    smooth = -(logp * w).sum(-1) / c
    loss = np.where(keep, (1 - label_smoothing) * nll + label_smoothing * smooth, 0.0)
    return reduce(loss, reduction, np.where(keep, w[yy], 0.0).sum())


def cross_entropy_probs(z, q, reduction="mean", label_smoothing=0.0):
    z, q = _f(z, q)
    q = q * (1 - label_smoothing) + label_smoothing / z.shape[1]
    loss = -(log_softmax(z) * q).sum(axis=1)
    return reduce(loss, reduction)


def nll(logp, y, w, reduction="mean", ignore_index=-100):
    logp, w = _f(logp, w)
    y = np.asarray(y)
    keep = y != ignore_index
    yy = np.where(keep, y, 0)
    picked = np.take_along_axis(np.moveaxis(logp, 1, -1), yy[..., None], -1)[..., 0]
    return reduce(np.where(keep, -picked * w[yy], 0.0), reduction, np.where(keep, w[yy], 0.0).sum())


def bce(p, y, reduction="mean"):
    """torch clamps each log at -100."""
    p, y = _f(p, y)
    with np.errstate(divide="ignore"):
        loss = -(y * np.maximum(np.log(p), -100) + (1 - y) * np.maximum(np.log1p(-p), -100))
    return reduce(loss, reduction)


def _log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def bce_logits(x, y, pos_weight=None, reduction="mean"):
    x, y, pw = _f(x, y, pos_weight)
    pw = 1.0 if pw is None else pw
    return reduce(-(pw * y * _log_sigmoid(x) + (1 - y) * _log_sigmoid(-x)), reduction)


def smooth_l1(x, y, beta=1.0, reduction="mean"):
    d = np.abs(np.subtract(*_f(x, y)))
    return reduce(np.where(d < beta, 0.5 * d**2 / beta, d - 0.5 * beta), reduction)


def huber(x, y, delta=1.0, reduction="mean"):
    d = np.abs(np.subtract(*_f(x, y)))
    return reduce(np.where(d <= delta, 0.5 * d**2, delta * (d - 0.5 * delta)), reduction)


def kl_div(logq, p, reduction="mean", log_target=False):
    """target * (log target - input), 0 where target is 0; 'batchmean' divides the sum by N,
    'mean' by every element."""
    logq, p = _f(logq, p)
    if log_target:
        loss = np.exp(p) * (p - logq)
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            loss = np.where(p > 0, p * (np.log(np.where(p > 0, p, 1)) - logq), 0.0)
    if reduction == "batchmean":
        return loss.sum() / loss.shape[0]
    return reduce(loss, reduction)


def ctc(logits, targets, target_lengths, reduction="mean", blank=0):
    """Connectionist temporal classification by the forward (alpha) recursion in log space.
    logits (N, T, C), every input full length; 'mean' divides by target lengths, then averages."""
    (logits,) = _f(logits)
    logp = log_softmax(logits, axis=-1)
    losses = []
    for n in range(logits.shape[0]):
        lab = list(np.asarray(targets[n])[: int(target_lengths[n])])
        ext = [blank]
        for c in lab:
            ext += [c, blank]
        s = len(ext)
        alpha = np.full(s, -np.inf)
        alpha[0] = logp[n, 0, blank]
        if s > 1:
            alpha[1] = logp[n, 0, ext[1]]
        for t in range(1, logits.shape[1]):
            prev = alpha.copy()
            for i in range(s):
                terms = [prev[i]] + ([prev[i - 1]] if i >= 1 else [])
                if i >= 2 and ext[i] != blank and ext[i] != ext[i - 2]:
                    terms.append(prev[i - 2])
                alpha[i] = np.logaddexp.reduce(terms) + logp[n, t, ext[i]]
        losses.append(-np.logaddexp(alpha[-1], alpha[-2] if s > 1 else -np.inf))
    losses = np.asarray(losses)
    if reduction == "mean":
        return (losses / np.asarray(target_lengths, np.float64)).mean()
    return reduce(losses, reduction)


def cosine_embedding(a, b, y, margin=0.0, reduction="mean"):
    """torch: cos = a.b / sqrt((|a|^2 + 1e-12)(|b|^2 + 1e-12))."""
    a, b = _f(a, b)
    eps = 1e-12
    cos = (a * b).sum(-1) / np.sqrt(((a * a).sum(-1) + eps) * ((b * b).sum(-1) + eps))
    return reduce(np.where(np.asarray(y) == 1, 1 - cos, np.maximum(0.0, cos - margin)), reduction)


def margin_ranking(a, b, y, margin=0.0, reduction="mean"):
    a, b = _f(a, b)
    return reduce(np.maximum(0.0, -np.asarray(y) * (a - b) + margin), reduction)
