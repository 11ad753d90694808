"""Loss traps: each loss ported with optax's default behaviour where torch's differs, beside
the twin in loss_pairs.py that reconciles them (see trap_pairs.py for the convention)."""
from __future__ import annotations

import jax.numpy as jnp
import optax
import torch.nn.functional as F

from equivcheck import Floats, Index, Ints
from equivcheck.references import losses as R
from suites._kit import POSITIVE, ints, layer
from suites.loss_pairs import LOGITS, _classes, _pairwise, _targets, s_ctc, t_ctc

TRAP = dict(checks=("forward",), dtypes=("float32",))


def _ce_shapes(rng):
    s = _classes(rng, extra=False)
    return (s, _targets(s), (s[1],))


def j_ce_naive_weighted(z, y, w):
    """optax per-example losses times the class weight, then .mean(): not torch's sum(w l) / sum(w)."""
    return (optax.losses.softmax_cross_entropy_with_integer_labels(z, y) * w[y]).mean()


def j_ctc_naive(logits, targets, lengths):
    t_len = lengths + 1
    pad = (jnp.arange(targets.shape[1])[None, :] >= t_len[:, None]).astype(logits.dtype)
    return optax.losses.ctc_loss(logits, jnp.zeros(logits.shape[:2], logits.dtype), targets, pad).mean()


PAIRS = [
    layer("loss.trap.cross_entropy_reduction", lambda z, y: F.cross_entropy(z, y),
          lambda z, y: optax.losses.softmax_cross_entropy_with_integer_labels(z, y),
          lambda rng: _ce_shapes(rng)[:2], ((1, 2), (1,)), (LOGITS, Index(of=0, axis=1)), ("input", "target"),
          diff=(0,), reference=lambda z, y: R.cross_entropy(z, y), **TRAP),
    layer("loss.trap.cross_entropy_weighted_mean", lambda z, y, w: F.cross_entropy(z, y, w), j_ce_naive_weighted,
          _ce_shapes, ((2, 2), (2,), (2,)), (LOGITS, Index(of=0, axis=1), POSITIVE), ("input", "target", "weight"),
          diff=(0,), reference=lambda z, y, w: R.cross_entropy(z, y, w), **TRAP),
    layer("loss.trap.kl_div_mean", lambda q, p: F.kl_div(q, p, reduction="mean"),
          lambda q, p: optax.losses.kl_divergence(q, p).mean(),
          lambda rng: (lambda s: (s, s))((ints(rng, 1, 3), ints(rng, 2, 4))), ((1, 2), (1, 2)),
          (Floats(-5, 1), Floats(0.01, 1, tiny=False)), ("input", "target"),
          reference=lambda q, p: R.kl_div(q, p, "mean"), **TRAP),
    layer("loss.trap.smooth_l1_as_huber", lambda x, y: F.smooth_l1_loss(x, y, beta=2.0),
          lambda x, y: optax.losses.huber_loss(x, y, delta=2.0).mean(), _pairwise, ((1, 1), (1, 1)),
          (Floats(-3, 3), Floats(-3, 3)), ("input", "target"), reference=lambda x, y: R.smooth_l1(x, y, 2.0), **TRAP),
    layer("loss.trap.mse_as_l2_loss", lambda x, y: F.mse_loss(x, y), lambda x, y: optax.losses.l2_loss(x, y).mean(),
          _pairwise, ((1, 1), (1, 1)), (Floats(), Floats()), ("input", "target"),
          reference=lambda x, y: R.reduce((x - y) ** 2, "mean"), **TRAP),
    layer("loss.trap.bce_unclamped", lambda p, y: F.binary_cross_entropy(p, y),
          lambda p, y: (-(y * jnp.log(p) + (1 - y) * jnp.log1p(-p))).mean(), _pairwise, ((1, 1), (1, 1)),
          (Floats(0, 1, special=(0.0, 1.0)), Floats(0, 1, special=(0.0, 1.0))), ("input", "target"),
          reference=lambda p, y: R.bce(p, y), **TRAP),
    layer("loss.trap.ctc_mean", lambda z, t, n: t_ctc(z, t, n, "mean"), j_ctc_naive, s_ctc, ((1, 3, 4), (1, 1), (1,)),
          (LOGITS, Ints(1, 3), Index(of=1, axis=1)), ("input", "targets", "target_lengths"),
          diff=(0,), reference=lambda z, t, n: R.ctc(z, t, n + 1, "mean"), **TRAP),
]
