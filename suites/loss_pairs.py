"""Loss pairs: torch.nn.functional losses against optax where optax has them, else jax.numpy,
with each torch reduction written out on the JAX side (optax returns per-example losses).
float64 NumPy references (equivcheck.references.losses) decide which side is off.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import torch.nn.functional as F

from equivcheck import Convention, Floats, Index, Ints
from equivcheck.references import losses as R
from suites._kit import POSITIVE, ints, layer

SMOOTH = ("forward", "vjp", "jvp", "hvp")  # smooth losses: their Hessians matter (second-order methods)
PIECEWISE = ("forward", "vjp", "jvp")  # second derivatives are piecewise constant: nothing to compare
LOGITS = Floats(-10, 10)
PROB = Floats(0.01, 0.99, tiny=False)


def reduce(loss, reduction, weight_sum=None):
    """torch's reductions of per-element losses; 'mean' with class weights divides by their sum."""
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / weight_sum if weight_sum is not None else loss.mean()


def _classes(rng, extra=True):
    """logits (N, C) or (N, C, d): torch's class axis is 1."""
    n, c = ints(rng, 1, 4), ints(rng, 2, 5)
    return (n, c) + ((ints(rng, 1, 3),) if extra and rng.integers(2) else ())


def _targets(logits_shape):
    return logits_shape[:1] + logits_shape[2:]


def _last(x):
    return jnp.moveaxis(x, 1, -1)


# --------------------------------------------------------------------------- cross-entropy, NLL


def j_cross_entropy(logits, target, weight=None, reduction="mean", ignore_index=-100, label_smoothing=0.0):
    """F.cross_entropy with integer targets, via optax."""
    z = _last(logits)
    c = z.shape[-1]
    keep = target != ignore_index
    y = jnp.where(keep, target, 0)
    w = jnp.ones((c,), z.dtype) if weight is None else weight
    if label_smoothing:
        q = optax.losses.smooth_labels(jax.nn.one_hot(y, c, dtype=z.dtype), label_smoothing)
        loss = optax.losses.softmax_cross_entropy(z, q * w)
    else:
        loss = optax.losses.softmax_cross_entropy_with_integer_labels(z, y) * w[y]
    loss = jnp.where(keep, loss, 0.0)
    return reduce(loss, reduction, jnp.where(keep, w[y], 0.0).sum() if weight is not None else keep.sum())


def t_cross_entropy(logits, target, weight=None, reduction="mean", ignore_index=-100, label_smoothing=0.0):
    return F.cross_entropy(logits, target, weight, reduction=reduction, ignore_index=ignore_index,
                           label_smoothing=label_smoothing)


def _ce(name, configs, weighted=False, logits=LOGITS, checks=SMOOTH, **kw):
    """configs: (reduction, ignore_index, label_smoothing)."""
    if weighted:
        def sample(rng):
            s = _classes(rng)
            return (s, _targets(s), (s[1],))

        def t_fn(z, y, w, c):
            return t_cross_entropy(z, y, w, *c)

        def j_fn(z, y, w, c):
            return j_cross_entropy(z, y, w, *c)

        def r_fn(z, y, w, c):
            return R.cross_entropy(z, y, w, *c)

        specs, names, smallest = (logits, Index(of=0, axis=1), POSITIVE), ("input", "target", "weight"), \
            ((1, 2), (1,), (2,))
    else:
        def sample(rng):
            s = _classes(rng)
            return (s, _targets(s))

        t_fn = lambda z, y, c: t_cross_entropy(z, y, None, *c)  # noqa: E731
        j_fn = lambda z, y, c: j_cross_entropy(z, y, None, *c)  # noqa: E731
        r_fn = lambda z, y, c: R.cross_entropy(z, y, None, *c)  # noqa: E731
        specs, names, smallest = (logits, Index(of=0, axis=1)), ("input", "target"), ((1, 2), (1,))
    return layer(name, t_fn, j_fn, sample, smallest, specs, names, configs=configs, diff=(0,), checks=checks,
                 reference=r_fn, **kw)


def t_ce_probs(z, q, config):
    reduction, smoothing = config
    return F.cross_entropy(z, q, reduction=reduction, label_smoothing=smoothing)


def j_ce_probs(z, q, config):
    reduction, smoothing = config
    z, q = _last(z), _last(q)
    q = optax.losses.smooth_labels(q, smoothing) if smoothing else q  # (1-e) q + e/C, as torch does
    return reduce(optax.losses.softmax_cross_entropy(z, q), reduction)


def t_nll(logp, y, w, config):
    reduction, ignore = config
    return F.nll_loss(logp, y, w, reduction=reduction, ignore_index=ignore)


def j_nll(logp, y, w, config):
    reduction, ignore = config
    keep = y != ignore
    yy = jnp.where(keep, y, 0)
    picked = jnp.take_along_axis(_last(logp), yy[..., None], axis=-1)[..., 0]
    loss = jnp.where(keep, -picked * w[yy], 0.0)
    return reduce(loss, reduction, jnp.where(keep, w[yy], 0.0).sum())


def _ce_prob_shapes(rng):
    s = _classes(rng)
    return (s, s)


CE_PAIRS = [
    _ce("loss.cross_entropy", [("mean", -100, 0.0), ("none", -100, 0.0), ("sum", -100, 0.0)],
        doc="integer targets, optax.losses.softmax_cross_entropy_with_integer_labels"),
    _ce("loss.cross_entropy_weighted", [("mean", 0, 0.0), ("sum", 1, 0.0)], weighted=True,
        doc="class weights and ignore_index: 'mean' divides by the kept targets' summed weights"),
    _ce("loss.cross_entropy_label_smoothing", [("mean", -100, 0.1), ("sum", 0, 0.2)], weighted=True,
        doc="label smoothing (optax.losses.smooth_labels) with class weights, applied per class"),
    _ce("loss.cross_entropy_extreme", [("mean", -100, 0.0)], logits=Floats(-1e4, 1e4, fill=True),
        checks=("forward", "vjp"), doc="logits of large magnitude and ties"),
    layer("loss.cross_entropy_probs", t_ce_probs, j_ce_probs, _ce_prob_shapes, ((1, 2), (1, 2)),
          (LOGITS, Floats(0, 1)), ("input", "target"), configs=[("mean", 0.0), ("none", 0.1)], checks=SMOOTH,
          reference=lambda z, q, c: R.cross_entropy_probs(z, q, *c), doc="probability targets; both differentiable"),
    layer("loss.nll", t_nll, j_nll, lambda rng: (lambda s: (s, _targets(s), (s[1],)))(_classes(rng)),
          ((1, 2), (1,), (2,)), (Floats(-10, 0), Index(of=0, axis=1), POSITIVE), ("input", "target", "weight"),
          configs=[("mean", -100), ("none", 1)], diff=(0,), checks=SMOOTH,
          reference=lambda z, y, w, c: R.nll(z, y, w, *c)),
]


# --------------------------------------------------------------------------- binary cross-entropy


def j_bce(p, y, reduction):
    # torch clamps each log at -100 so that p = 0 or 1 gives a finite loss
    loss = -(y * jnp.maximum(jnp.log(p), -100.0) + (1 - y) * jnp.maximum(jnp.log1p(-p), -100.0))
    return reduce(loss, reduction)


def t_bce_logits_pw(x, y, pw, reduction):
    return F.binary_cross_entropy_with_logits(x, y, pos_weight=pw, reduction=reduction)


def j_bce_logits_pw(x, y, pw, reduction):
    # optax.losses.sigmoid_binary_cross_entropy has no pos_weight: torch's formula on log-sigmoids
    loss = -(pw * y * jax.nn.log_sigmoid(x) + (1 - y) * jax.nn.log_sigmoid(-x))
    return reduce(loss, reduction)


def _pairwise(rng):
    s = (ints(rng, 1, 4), ints(rng, 1, 4))
    return (s, s)


BCE_PAIRS = [
    layer("loss.bce", lambda p, y, r: F.binary_cross_entropy(p, y, reduction=r), j_bce, _pairwise, ((1, 1), (1, 1)),
          (PROB, Floats(0, 1)), ("input", "target"), configs=["mean", "sum"], checks=SMOOTH,
          reference=lambda p, y, r: R.bce(p, y, r), doc="probabilities away from 0 and 1"),
    layer("loss.bce_saturated", lambda p, y: F.binary_cross_entropy(p, y), lambda p, y: j_bce(p, y, "mean"), _pairwise,
          ((1, 1), (1, 1)), (Floats(0, 1, special=(0.0, 1.0)), Floats(0, 1, special=(0.0, 1.0))), ("input", "target"),
          diff=(0,), checks=("forward", "vjp"), reference=lambda p, y: R.bce(p, y, "mean"),
          doc="p = 0 or 1: both clamp log at -100 in the forward"),
    layer("loss.bce_with_logits", lambda x, y, r: F.binary_cross_entropy_with_logits(x, y, reduction=r),
          lambda x, y, r: reduce(optax.losses.sigmoid_binary_cross_entropy(x, y), r), _pairwise, ((1, 1), (1, 1)),
          (Floats(-20, 20), Floats(0, 1)), ("input", "target"), configs=["mean", "none"], checks=SMOOTH,
          reference=lambda x, y, r: R.bce_logits(x, y, None, r)),
    layer("loss.bce_with_logits_pos_weight", t_bce_logits_pw, j_bce_logits_pw,
          lambda rng: (lambda s: (s, s, s[-1:]))((ints(rng, 1, 4), ints(rng, 1, 4))), ((1, 1), (1, 1), (1,)),
          (Floats(-20, 20), Floats(0, 1), POSITIVE), ("input", "target", "pos_weight"), configs=["mean"],
          diff=(0, 1), checks=SMOOTH, reference=lambda x, y, pw, r: R.bce_logits(x, y, pw, r)),
    layer("loss.bce_with_logits_extreme", lambda x, y: F.binary_cross_entropy_with_logits(x, y),
          lambda x, y: optax.losses.sigmoid_binary_cross_entropy(x, y).mean(), _pairwise, ((1, 1), (1, 1)),
          (Floats(-1e3, 1e3, fill=True), Floats(0, 1, special=(0.0, 1.0))), ("input", "target"),
          checks=("forward", "vjp"), reference=lambda x, y: R.bce_logits(x, y, None, "mean"),
          doc="saturating logits and ties"),
]


# --------------------------------------------------------------------------- regression losses


def _kink(arg, sign):
    """L1's derivative where input - target rounds to 0. At x == y torch takes sign(0) = 0 and
    jnp.abs's derivative at 0 is 1 (jax-ml/jax#37820). XLA on CPU also flushes a subnormal
    x - y to zero, so below the smallest normal JAX is at the kink while torch keeps the sign.
    Scaled by the reduction (a full reduction broadcasts the scalar cotangent)."""
    def scale(x, reduction):
        return 1.0 / x.size if reduction == "mean" else 1.0

    def where(x, y, reduction):
        return np.abs(x.astype(np.float64) - y) < np.finfo(x.dtype).tiny

    return Convention(
        f"l1_kink_{'input' if arg == 0 else 'target'}", where,
        lambda x, y, r: sign * np.sign(x.astype(np.float64) - y) * scale(x, r),
        lambda x, y, r: sign * scale(x, r),
        "|x - y|' where x - y rounds to 0: torch sign(x - y) (0 at x == y); JAX 1 (jnp.abs'(0) = 1, and XLA on CPU "
        "flushes subnormal differences to 0)", arg=arg)


REGRESSION_PAIRS = [
    layer("loss.mse", lambda x, y, r: F.mse_loss(x, y, reduction=r),
          lambda x, y, r: reduce(optax.losses.squared_error(x, y), r), _pairwise, ((1, 1), (1, 1)),
          (Floats(), Floats()), ("input", "target"), configs=["mean", "none"], checks=SMOOTH,
          reference=lambda x, y, r: R.reduce((x - y) ** 2, r),
          doc="optax.losses.squared_error (not l2_loss, which halves it)"),
    layer("loss.l1", lambda x, y, r: F.l1_loss(x, y, reduction=r), lambda x, y, r: reduce(jnp.abs(x - y), r),
          _pairwise, ((1, 1), (1, 1)), (Floats(), Floats()), ("input", "target"), configs=["mean", "none"],
          static=True, diff=(0,), checks=PIECEWISE, conventions=(_kink(0, 1.0),),
          reference=lambda x, y, r: R.reduce(np.abs(x - y), r)),
    layer("loss.smooth_l1", lambda x, y, b: F.smooth_l1_loss(x, y, beta=b),
          lambda x, y, b: (optax.losses.huber_loss(x, y, delta=b) / b).mean(), _pairwise, ((1, 1), (1, 1)),
          (Floats(-3, 3), Floats(-3, 3)), ("input", "target"), configs=[1.0, 0.5], checks=PIECEWISE,
          reference=lambda x, y, b: R.smooth_l1(x, y, b), doc="smooth_l1(beta) = huber_loss(delta=beta) / beta"),
    layer("loss.huber", lambda x, y, d: F.huber_loss(x, y, delta=d),
          lambda x, y, d: optax.losses.huber_loss(x, y, delta=d).mean(),
          _pairwise, ((1, 1), (1, 1)), (Floats(-3, 3), Floats(-3, 3)), ("input", "target"), configs=[1.0, 2.0],
          checks=PIECEWISE, reference=lambda x, y, d: R.huber(x, y, d)),
]


# --------------------------------------------------------------------------- KL, CTC, embedding losses


def j_kl(logq, p, config):
    reduction, log_target = config
    if reduction == "none":
        pointwise = jnp.exp(p) * (p - logq) if log_target else p * (jnp.where(p == 0, 0.0, jnp.log(p)) - logq)
        return pointwise
    kl = optax.losses.kl_divergence_with_log_targets if log_target else optax.losses.kl_divergence
    per_example = kl(logq, p)
    return per_example.mean() if reduction == "batchmean" else per_example.sum()


def t_kl(logq, p, config):
    reduction, log_target = config
    return F.kl_div(logq, p, reduction=reduction, log_target=log_target)


KL_ARGS = dict(sampler=_pairwise, smallest=((1, 1), (1, 1)), names=("input", "target"), checks=SMOOTH,
               reference=lambda q, p, c: R.kl_div(q, p, *c))


def t_ctc(logits, targets, lengths, reduction):
    logp = F.log_softmax(logits, dim=-1).transpose(0, 1)  # (T, N, C)
    t_len = lengths + 1
    in_len = torch.full((logits.shape[0],), logits.shape[1], dtype=torch.int64)
    return F.ctc_loss(logp, targets, in_len, t_len, blank=0, reduction=reduction)


def j_ctc(logits, targets, lengths, reduction):
    t_len = lengths + 1
    label_pad = (jnp.arange(targets.shape[1])[None, :] >= t_len[:, None]).astype(logits.dtype)
    loss = optax.losses.ctc_loss(logits, jnp.zeros(logits.shape[:2], logits.dtype), targets, label_pad)
    # torch 'mean' divides each sequence's loss by its target length, then averages
    if reduction == "mean":
        return (loss / t_len.astype(logits.dtype)).mean()
    return reduce(loss, reduction)


def s_ctc(rng):
    n, s = ints(rng, 1, 3), ints(rng, 1, 3)
    return ((n, 2 * s + 1 + ints(rng, 0, 2), 4), (n, s), (n,))  # T >= 2S + 1: every alignment is feasible


def t_cosine(x1, x2, y, margin):
    return F.cosine_embedding_loss(x1, x2, 2 * y - 1, margin=margin)


def j_cosine(x1, x2, y, margin):
    cos = optax.losses.cosine_similarity(x1, x2)
    return jnp.where(y == 1, 1 - cos, jnp.maximum(0.0, cos - margin)).mean()


def t_ranking(x1, x2, y, margin):
    return F.margin_ranking_loss(x1, x2, (2 * y - 1).to(x1.dtype), margin=margin)


def j_ranking(x1, x2, y, margin):
    return jax.nn.relu(-(2 * y - 1) * (x1 - x2) + margin).mean()


# torch's clamp_min passes the gradient at its bound up to 2.13 and not from 2.14 on
# (pytorch/pytorch#184574; measured 2.13.0 and 2.14.1).
CLAMP_BOUNDARY = 1.0 if tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) < (2, 14) else 0.0


def _ranking_kink(arg):
    """max(0, z) at z = 0: torch's clamp_min gives gradient CLAMP_BOUNDARY there, jax.nn.relu 0."""
    def torch_value(x1, x2, y, margin):
        return CLAMP_BOUNDARY * (-(2 * y - 1) if arg == 0 else (2 * y - 1)) / x1.size

    where = lambda x1, x2, y, m: -(2 * y - 1) * (x1 - x2) + m == 0  # noqa: E731
    return Convention(f"ranking_hinge_{arg}", where, torch_value, 0.0,
                      "at -y*(x1-x2) + margin == 0 torch's clamp_min(0) gives gradient 1 (torch < 2.14) or 0, "
                      "jax.nn.relu 0", arg=arg)


NONUNIT = Floats(-2, 2, tiny=False, min_magnitude=0.1, exclude=(0.0,))  # no zero vectors: eps conventions differ

OTHER_PAIRS = [
    layer("loss.kl_div", t_kl, j_kl, specs=(Floats(-5, 1), Floats(0.01, 1, tiny=False)),
          configs=[("batchmean", False), ("none", False)], doc="optax.kl_divergence; 'none' pointwise in jnp",
          **KL_ARGS),
    layer("loss.kl_div_log_target", t_kl, j_kl, specs=(Floats(-5, 1), Floats(-5, 0)),
          configs=[("batchmean", True), ("sum", True)], doc="optax.kl_divergence_with_log_targets", **KL_ARGS),
    layer("loss.ctc", t_ctc, j_ctc, s_ctc, ((1, 3, 4), (1, 1), (1,)), (LOGITS, Ints(1, 3), Index(of=1, axis=1)),
          ("input", "targets", "target_lengths"), configs=["mean", "sum"], diff=(0,), checks=("forward", "vjp"),
          reference=lambda z, t, n, r: R.ctc(z, t, n + 1, r),
          doc="optax.losses.ctc_loss on logits vs F.ctc_loss on log_softmax; torch has no forward-mode AD for CTC"),
    layer("loss.cosine_embedding", t_cosine, j_cosine,
          lambda rng: (lambda n, d: ((n, d), (n, d), (n,)))(ints(rng, 1, 3), ints(rng, 1, 4)), ((1, 1), (1, 1), (1,)),
          (NONUNIT, NONUNIT, Ints(0, 1)), ("input1", "input2", "target"), configs=[0.0, 0.5], diff=(0, 1),
          checks=PIECEWISE, reference=lambda a, b, y, m: R.cosine_embedding(a, b, 2 * y - 1, m),
          doc="optax.losses.cosine_similarity inside torch's hinge; targets drawn as {0,1} -> {-1,1}"),
    layer("loss.margin_ranking", t_ranking, j_ranking, lambda rng: (lambda n: ((n,), (n,), (n,)))(ints(rng, 1, 5)),
          ((1,), (1,), (1,)), (Floats(-3, 3), Floats(-3, 3), Ints(0, 1)), ("input1", "input2", "target"),
          configs=[0.0, 0.5], static=True, diff=(0,), checks=PIECEWISE, conventions=(_ranking_kink(0),),
          reference=lambda a, b, y, m: R.margin_ranking(a, b, 2 * y - 1, m)),
]

PAIRS = [*CE_PAIRS, *BCE_PAIRS, *REGRESSION_PAIRS, *OTHER_PAIRS]
