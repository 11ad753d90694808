"""Known PyTorch/Flax divergences of layers and losses: the table the report shows.

Each row is a measured difference with its cause and the setting that reconciles the two
sides. A row with a `twin` is a default-configuration trap: the pair named by `id` ports the
layer with each framework's defaults and fails (suites/known_divergences.txt lists it, so it
xfails with the cause); the twin, with the reconciling setting, passes. `effect` is the size
measured by benchmarks/trap_effects.py (seed 0, 5 draws; torch 2.13.0, jax 0.10.2, flax 0.12.8,
optax 0.2.8, CPU).

A row may state its `symptom`: a predicate on the evidence of a failing check (`Evidence`: the
check, the failing leaf on both sides, which elements differ, the example's arguments), so that
a user's own pair that fails the same way is told the cause (`matching`). A symptom names what
the cause does to the numbers (the rows that differ, where a NaN sits), not a pair's name.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Evidence:
    """A failing check's numbers: its leaf on both sides (float64 views of the tested dtype),
    `close` (elementwise within the check's bound), the example's arguments, and `arg`, the
    argument the leaf is the gradient of (None for a forward or JVP leaf)."""

    check: str
    path: str
    torch: np.ndarray
    jax: np.ndarray
    close: np.ndarray
    args: Sequence[Any]
    arg: np.ndarray | None = None


def _padding_row(ev: Evidence) -> bool:
    """A lookup table's gradient differs in exactly one row, which one side leaves at zero
    where the other does not, and which the example's indices look up (else both would be 0)."""
    if ev.check != "vjp" or ev.torch.ndim != 2 or ev.torch.shape != ev.jax.shape:
        return False
    differing = np.flatnonzero(~ev.close.all(axis=1))
    if len(differing) != 1:
        return False
    r = int(differing[0])
    zero_t, zero_j = not ev.torch[r].any(), not ev.jax[r].any()
    looked_up = any(isinstance(a, np.ndarray) and a.dtype.kind in "iu" and np.any(a == r) for a in ev.args)
    return zero_t != zero_j and looked_up


def _nan_at_saturated_probability(ev: Evidence) -> bool:
    """A gradient is NaN on one side where the other is finite, exactly at probabilities of 0 or 1,
    in a loss of probabilities against targets: besides the differentiated argument, another of
    its shape lies in [0, 1]. Without the targets any op failing at a shrunk input of 0 matched
    (a tanh port with a NaN was told of BCE's clamp)."""
    if ev.check != "vjp" or ev.arg is None or ev.arg.shape != ev.torch.shape:
        return False
    in_unit = [a for a in ev.args if isinstance(a, np.ndarray) and a.dtype.kind == "f" and a.shape == ev.arg.shape
               and a.size and np.all((a >= 0) & (a <= 1))]
    if len(in_unit) < 2:
        return False
    one_sided = np.isnan(ev.torch) != np.isnan(ev.jax)
    return bool(one_sided.any() and np.all(np.isin(ev.arg[one_sided], (0.0, 1.0))))


def _differing(ev: Evidence) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """torch's and JAX's values (float64) at the elements that differ, and the mask of them."""
    mask = ~np.asarray(ev.close, bool)
    return np.asarray(ev.torch, np.float64)[mask], np.asarray(ev.jax, np.float64)[mask], mask


def _one_each(t: np.ndarray, j: np.ndarray, a: np.ndarray, b: np.ndarray) -> bool:
    """One side is `a` and the other `b`, each to a tenth of how far apart `a` and `b` are."""
    near = lambda x, y: bool(np.all(np.abs(x - y) <= 0.1 * np.abs(a - b) + 1e-7 * np.abs(y)))
    return bool(np.any(a != b)) and ((near(t, a) and near(j, b)) or (near(t, b) and near(j, a)))


def _gelu_flavours(ev: Evidence) -> bool:
    """A forward that is erf's GELU of its input on one side and the tanh approximation on the other."""
    import math

    x = np.asarray(ev.args[0], np.float64) if ev.args else None
    if ev.check != "forward" or x is None or x.shape != ev.torch.shape:
        return False
    t, j, mask = _differing(ev)
    x = x[mask]
    exact = 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
    approx = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    return t.size > 0 and _one_each(t, j, exact, approx)


def _half_squared_error(ev: Evidence) -> bool:
    """A forward whose two float arguments of one shape (predictions, targets) give the squared
    error on one side and half of it on the other (optax.l2_loss), elementwise, summed or averaged."""
    floats = [np.asarray(a, np.float64) for a in ev.args if isinstance(a, np.ndarray) and a.dtype.kind == "f"]
    if ev.check != "forward" or len(floats) != 2 or floats[0].shape != floats[1].shape:
        return False
    sq = (floats[0] - floats[1]) ** 2
    t, j = np.asarray(ev.torch, np.float64), np.asarray(ev.jax, np.float64)
    for full in (sq, sq.mean(), sq.sum()):
        if np.shape(full) == t.shape and _one_each(t, j, np.asarray(full), np.asarray(full) / 2):
            return True
    return False


def _norm_eps(ev: Evidence) -> bool:
    """A normalisation over the last axis with eps 1e-5 on one side and 1e-6 on the other (torch's
    LayerNorm/GroupNorm against Flax's defaults): each side is (x - mean) / sqrt(var + eps) of the
    input, up to one affine map shared by both (the same weight and bias)."""
    x = np.asarray(ev.args[0], np.float64) if ev.args else None
    if ev.check != "forward" or x is None or x.shape != ev.torch.shape or x.ndim < 1 or x.shape[-1] < 2:
        return False
    centred = x - x.mean(-1, keepdims=True)
    var = x.var(-1, keepdims=True)
    a, b = centred / np.sqrt(var + 1e-5), centred / np.sqrt(var + 1e-6)
    t, j = np.asarray(ev.torch, np.float64), np.asarray(ev.jax, np.float64)
    return _one_each(t, j, a, b)


@dataclasses.dataclass(frozen=True)
class Divergence:
    id: str  # the pair (or pair::check) that shows it
    cause: str  # what differs, named as the setting
    effect: str  # measured size
    reconcile: str  # the setting (or code) that makes the two agree
    twin: str = ""  # the reconciled pair that passes
    source: str = ""
    symptom: Callable[[Evidence], bool] | None = None  # how a failing check shows this cause


TABLE: tuple[Divergence, ...] = (
    # layers: effect = largest |torch - jax| of the trap's forward on inputs drawn from its own ranges
    Divergence("nn.trap.layer_norm_eps", "LayerNorm eps: torch 1e-5, Flax LayerNorm epsilon=1e-6",
               "0.42 max abs (inputs U(-0.01, 0.01))", "nnx.LayerNorm(epsilon=1e-5)", "nn.layer_norm", symptom=_norm_eps),
    Divergence("nn.trap.layer_norm_fast_variance",
               "Flax norms default use_fast_variance=True (E[x^2] - E[x]^2); torch subtracts the mean first",
               "1e2 max abs (inputs U(1000.3, 1001.7), float32)", "use_fast_variance=False", "nn.layer_norm_offset",
               "flax/nnx/nn/normalization.py _compute_stats"),
    Divergence("nn.trap.group_norm_eps", "GroupNorm eps: torch 1e-5, Flax GroupNorm epsilon=1e-6 (and num_groups=32)",
               "0.31 max abs (inputs U(-0.01, 0.01))", "nnx.GroupNorm(num_groups=G, epsilon=1e-5)", "nn.group_norm"),
    Divergence("nn.trap.rms_norm_eps", "RMSNorm eps: torch None = finfo(dtype).eps, Flax RMSNorm epsilon=1e-6",
               "0.74 max abs (inputs U(-1e-3, 1e-3))", "epsilon=float(jnp.finfo(dtype).eps)", "nn.rms_norm"),
    Divergence("nn.trap.batch_norm_momentum",
               "BatchNorm momentum: torch 0.1 weighs the new batch statistic, Flax 0.99 weighs the old one",
               "0.2 max abs in running_mean after one step", "nnx.BatchNorm(momentum=1 - torch_momentum)",
               "nn.batch_norm_train", "equivcheck.weights.convert.flax_momentum"),
    Divergence("nn.trap.batch_norm_running_var",
               "BatchNorm running_var: torch updates with the unbiased batch variance, Flax with the biased one",
               "0.23 max abs in running_var after one step (2-5 values per channel)",
               "no Flax setting: rescale the update by n/(n-1) (equivcheck.weights.convert.unbiased_running_var)",
               "nn.batch_norm_train"),
    Divergence("nn.trap.init_linear",
               "Linear init: torch U(+-1/sqrt(fan_in)) weights and bias, Flax lecun_normal kernel and zero bias",
               "sqrt(fan_in) * [std(W), max|W|, std(b)]: torch [0.58, 1.0, 0.58], Flax [1.0, 2.27, 0]",
               "kernel_init=variance_scaling(1/3, 'fan_in', 'uniform'), bias_init=uniform(+-1/sqrt(fan_in))",
               "nn.init_linear_matched", "pytorch/pytorch#57109"),
    Divergence("nn.trap.init_embedding", "Embedding init: torch N(0, 1), Flax Embed std 1/sqrt(features)",
               "std 1.0 vs 1/sqrt(features) (0.35 at 8)", "embedding_init=nnx.initializers.normal(stddev=1.0)",
               "nn.init_embedding_matched"),
    Divergence("nn.trap.conv_padding_default", "Conv padding: torch 0, Flax Conv 'SAME'",
               "output shape differs (H-2 vs H for a 3x3 kernel)", "padding='VALID' or explicit ((p, p), ...)",
               "nn.conv2d"),
    Divergence("nn.trap.conv_same_stride2",
               "stride 2: torch padding=k//2 pads both sides, Flax 'SAME' pads (0, 1) on even sides",
               "14 max abs, same output shape", "padding=((1, 1), (1, 1))", "nn.conv2d", "pytorch/pytorch#45667"),
    Divergence("nn.trap.conv_transpose_no_flip",
               "ConvTranspose: torch is a conv's gradient (flipped kernel), Flax transpose_kernel=False",
               "12 max abs with matched padding",
               "transpose_kernel=True, padding (d(k-1)-p, d(k-1)-p+output_padding)", "nn.conv_transpose2d",
               "jax-ml/jax#592, google/flax#3137"),
    Divergence("nn.trap.max_pool_stride_default", "max_pool stride: torch kernel_size, Flax max_pool strides=1",
               "output shape differs (H//2 vs H-1)", "strides=window_shape", "nn.max_pool2d"),
    Divergence("nn.trap.interp_bilinear_antialias",
               "downsampling: torch interpolate antialias=False, jax.image.resize antialias=True",
               "2.1 max abs (4-6 px -> 2 px)", "antialias=False (or torch antialias=True)", "nn.interp_bilinear"),
    Divergence("nn.trap.interp_nearest",
               "nearest: torch 'nearest' picks floor(i*in/out), jax.image.resize half-pixel centres",
               "5.2 max abs (3-5 x 4-5 px -> 2x3)", "torch mode='nearest-exact' (or gather floor indices)",
               "nn.interp_nearest_exact"),
    Divergence("nn.trap.mha_batch_first", "MultiheadAttention batch_first: torch False (L, N, E), Flax batch-major",
               "5.9 max abs, same shape", "batch_first=True, or swap axes 0 and 1 around the Flax layer",
               "nn.multihead_attention"),
    Divergence("nn.trap.mha_key_padding_polarity",
               "masks: torch key_padding_mask True = ignore, Flax mask True = attend",
               "5.6 max abs", "mask = ~key_padding_mask[:, None, None, :]", "nn.multihead_attention"),
    Divergence("nn.trap.sdpa_fully_masked_row",
               "fully masked query row: torch SDPA gives 0, jax.nn.dot_product_attention mean(V)",
               "2.7 max abs on the masked rows", "no setting: jnp.where(mask.any(-1, keepdims=True), out, 0)",
               "nn.sdpa_masked_rows_guarded", "pytorch/pytorch#133882"),
    Divergence("nn.trap.gru_nnx_cell",
               "GRU: torch's b_hn sits inside r*(W_hn h + b_hn); nnx.GRUCell has no hidden-side bias",
               "0.22 max abs with b_hn folded into the input bias",
               "flax.linen.GRUCell (hn has a bias), as equivcheck.layers.flax_bridge.gru does", "nn.gru"),
    Divergence("nn.trap.gelu_approximate", "GELU: torch exact erf, Flax/JAX gelu approximate=True",
               "4.6e-4 max abs on [-8, 8]", "approximate=False", "nn.gelu", symptom=_gelu_flavours),
    # losses
    Divergence("loss.trap.cross_entropy_reduction",
               "reduction: torch cross_entropy averages, optax returns per-example losses",
               "output shape differs (scalar vs per example)", ".mean() (or .sum())", "loss.cross_entropy"),
    Divergence("loss.trap.cross_entropy_weighted_mean",
               "weighted mean: torch divides by the kept targets' summed weights", "8.9 max abs",
               "sum(w[y] * l) / sum(w[y])", "loss.cross_entropy_weighted"),
    Divergence("loss.trap.kl_div_mean", "kl_div reduction='mean' divides by every element (N*C), not the batch",
               "4.7 max abs (a factor C)", "torch reduction='batchmean' = optax kl_divergence(...).mean()",
               "loss.kl_div"),
    Divergence("loss.trap.smooth_l1_as_huber", "smooth_l1(beta) = huber_loss(delta=beta) / beta",
               "1.7 max abs (a factor beta = 2)", "optax.losses.huber_loss(x, y, delta=beta) / beta",
               "loss.smooth_l1"),
    Divergence("loss.trap.mse_as_l2_loss", "optax.l2_loss is 0.5 * (x - y)^2; mse_loss is (x - y)^2",
               "48 max abs (a factor 2)", "optax.losses.squared_error", "loss.mse", symptom=_half_squared_error),
    Divergence("loss.trap.bce_unclamped", "binary_cross_entropy clamps each log at -100; a plain log gives inf",
               "inf where p = 0 or 1 (NaN for 0 * log 0)", "jnp.maximum(jnp.log(p), -100)", "loss.bce_saturated"),
    Divergence("loss.trap.ctc_mean", "ctc_loss 'mean' divides each loss by its target length before averaging",
               "12 max abs (a factor of the target length)", "(loss / target_lengths).mean()", "loss.ctc"),
    # found by the suites, no trap: a torch bug, a torch precision loss and a gradient convention
    Divergence("nn.interp_bilinear_antialias_width1::forward",
               "torch CPU bug (2.13.0 and 2.14.1): bilinear antialias=True with output width 1 repeats the first "
               "output row",
               "1.1 max abs against the NumPy reference (JAX matches it to 1e-16)",
               "none in torch; avoid a width-1 antialiased resize (or resize in two steps)"),
    Divergence("nn.layer_norm_offset::vjp::float32",
               "torch's float32 LayerNorm backward loses ~3 digits when a row's spread is small against its mean "
               "(x = [11.4375, 11.5]: 0.2421875 where the exact value is 0.2420329; JAX 0.2420320)",
               "up to 0.24% relative (1e-4 abs) at offset ~11, spread ~0.06; the float64 reference blames torch",
               "none in torch: centre the inputs, or run the backward in float64"),
    Divergence("loss.bce_saturated::vjp",
               "at p = 0 or 1 torch's BCE backward divides by max(p(1-p), 1e-12); the clamped jnp port gives 0*inf",
               "NaN vs finite gradient", "jnp.clip(p, 1e-12, 1 - 1e-12) before the log when gradients must match",
               symptom=_nan_at_saturated_probability),
    Divergence("nn.embedding_padding_naive::vjp",
               "Embedding padding_idx: torch gives the padding row no gradient; nnx.Embed has no such option",
               "the padding row's whole gradient (the sum of its cotangents) on one side, 0 on the other",
               "weight = jnp.where(rows == padding_idx, jax.lax.stop_gradient(weight), weight) before the lookup "
               "(as equivcheck.layers.flax_bridge.embedding does)", "nn.embedding", symptom=_padding_row),
)

BY_ID = {d.id: d for d in TABLE}


def matching(evidence: Evidence) -> list[Divergence]:
    """The rows whose symptom the evidence shows."""
    out = []
    for d in TABLE:
        try:
            if d.symptom is not None and d.symptom(evidence):
                out.append(d)
        except Exception:  # a symptom that cannot read this evidence does not match it
            continue
    return out


def markdown_section(records: Sequence[dict[str, Any]]) -> list[str]:
    """Report lines: the rows whose pair ran, with this run's outcome and observed size."""
    seen = {}
    for r in records:
        for key in (r["pair"], f"{r['pair']}::{r['check']}", f"{r['pair']}::{r['check']}::{r['dtype']}"):
            if key in BY_ID and r["outcome"] != "skipped":
                seen.setdefault(key, r)
    if not seen:
        return []
    # a twin passes when its forward does (loss.bce_saturated also carries a vjp divergence)
    outcome = {r["pair"]: r["outcome"] for r in records if r["check"] == "forward" and r["outcome"] != "skipped"}
    rows = []
    for d in TABLE:
        if d.id not in seen:
            continue
        r = seen[d.id]
        observed = f"{r['max_abs_err']:.2g}" if isinstance(r.get("max_abs_err"), float) and r["max_abs_err"] else \
            (r.get("message", "").split(":")[-1].strip()[:60] or "-")
        twin = f"`{d.twin}` {outcome.get(d.twin, 'not run')}" if d.twin else "-"
        rows.append([f"`{d.id}`", r["outcome"], observed, d.cause, d.effect, d.reconcile, twin])
    header = ["id", "outcome", "observed", "cause", "measured", "reconciling setting", "twin"]
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = ["", "## Default-configuration traps and known layer divergences", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return lines
