"""Planted migration bugs: each wrong port must fail and be localised to the right layer (or the
right optimizer/schedule cause); the correct ports pass 100 examples without a false alarm."""
from __future__ import annotations

import optax
import pytest

from equivcheck.engine.records import RunSettings
from equivcheck.models.zoo import (
    cnn_apply,
    cnn_pair,
    encoder_apply,
    encoder_pair,
    lstm_apply,
    lstm_pair,
    mlp_apply,
    mlp_pair,
    planted,
)
from equivcheck.optim import Schedule, optimizer_pair
from equivcheck.optim.mapping import ADAM_STATE, Mapped
from equivcheck.optim.naive import NAIVE_PORTS

SEED = 20261126
RUN = RunSettings(examples=10, seed=SEED, shrink_seconds=5)


def check(pair, name, dtype="float32", run=RUN):
    (rec,) = pair.replace(checks=(name,)).run_checks(dtype=dtype, run=run)
    return rec


# (pair, check, dtype, the first diverging layer, what the hint or cause must say)
LAYER_SLIPS = [
    ("gelu_tanh", encoder_pair("p_gelu", planted(encoder_apply, gelu_approximate=True)), "forward", "float32",
     "act (GELU)", "approximate"),
    ("layer_norm_eps", encoder_pair("p_ln", planted(encoder_apply, ln_eps=1e-6)), "forward", "float64",
     "norm1 (LayerNorm)", "eps"),
    ("batch_norm_momentum", cnn_pair("p_bn", planted(cnn_apply, bn_momentum=0.1)), "modes", "float32",
     "bn1 (running stats)", "momentum"),
    ("square_linear_untransposed", mlp_pair("p_lin", planted(mlp_apply, transpose_bug=True)), "forward", "float32",
     "fc1 (Linear)", "untransposed"),
    ("conv_pad_one_border", cnn_pair("p_pad", planted(cnn_apply, padding=((1, 1), (1, 0)))), "forward", "float32",
     "conv1 (Conv2d)", "right by 0"),
    ("dropout_in_eval", cnn_pair("p_drop", planted(cnn_apply, eval_dropout=True)), "forward", "float32",
     "drop (Dropout)", "dropout active in eval"),
    ("attention_mask_inverted", encoder_pair("p_mask", planted(encoder_apply, invert_mask=True)), "forward", "float32",
     "attn (MultiheadAttention)", "key_padding_mask True = ignore"),
    ("lstm_gate_swap", lstm_pair("p_gates", planted(lstm_apply, swap_gates=True)), "forward", "float32",
     "lstm (LSTM)", "gate order"),
]


@pytest.mark.parametrize("slip", LAYER_SLIPS, ids=[s[0] for s in LAYER_SLIPS])
def test_layer_slip_is_localised(slip):
    _, pair, name, dtype, layer, why = slip
    rec = check(pair, name, dtype)
    assert rec.outcome == "failed", rec.message
    assert f"first diverging layer: {layer}" in rec.diagnosis, rec.diagnosis
    assert why in rec.diagnosis, rec.diagnosis
    assert rec.side == "jax"
    rows = rec.extra["layers"]
    first = [r for r in rows if r["first"]]
    assert [r["layer"] for r in first] == [layer.split(" (")[0] if "running" not in layer else "bn1 (running stats)"]


def _adam_eps_inside(cls, hp, lr):
    """torch's eps moved inside the square root (optax's eps_root): the slip of an Adam port."""
    b1, b2 = hp["betas"]
    rate = hp["lr"] if lr is None else lr  # lr: the schedule, when there is one
    return Mapped(optax.adam(rate, b1=b1, b2=b2, eps=0.0, eps_root=hp["eps"]), ADAM_STATE, ("optax.adam(eps_root=eps)",))


def _shifted_steplr():
    good = optimizer_pair("p_sched.sgd", "SGD", lr=0.01, momentum=0.9,
                          schedule=Schedule("StepLR", step_size=3, gamma=0.5))
    shifted = lambda count: good.optax_schedule(count + 1)  # noqa: E731
    tx = optax.sgd(shifted, momentum=0.9)
    return good.replace(optax_transform=lambda: tx, optax_schedule=shifted, rebuild=None)


NAIVE_ADAMW = next(p for p in NAIVE_PORTS if p.name == "naive_adamw")

OPTIMIZER_SLIPS = [
    ("adam_eps_placement", mlp_pair("p_eps", optimizer=optimizer_pair("p_eps.adam", "Adam", lr=1e-2, eps=1e-3,
                                                                      optax_map=_adam_eps_inside)), "with eps=0.0 on both sides"),
    ("adamw_weight_decay_default", mlp_pair("p_wd", optimizer=NAIVE_ADAMW.build()), "with weight_decay=0.0 on both sides"),
    ("lr_schedule_shifted", mlp_pair("p_sched", optimizer=_shifted_steplr()), "schedule shifted by one step"),
]


@pytest.mark.parametrize("slip", OPTIMIZER_SLIPS, ids=[s[0] for s in OPTIMIZER_SLIPS])
def test_optimizer_slip_is_named(slip):
    _, pair, why = slip
    rec = check(pair, "train", "float64")
    assert rec.outcome == "failed", rec.message
    assert "every tapped layer is within tolerance" in rec.diagnosis, rec.diagnosis
    assert "the optimizer differs" in rec.diagnosis and why in rec.diagnosis, rec.diagnosis
    assert rec.extra["curves"]["torch"] and len(rec.extra["curves"]["jax"]) == len(rec.extra["curves"]["torch"])


def test_correct_ports_pass_100_examples():
    run = RunSettings(examples=100, seed=SEED)
    for pair in (mlp_pair(), cnn_pair(), encoder_pair(), lstm_pair()):
        for rec in pair.replace(checks=("forward", "grad", "modes")).run_checks(dtype="float32", run=run):
            assert rec.outcome == "passed", rec.failure_text()
            assert rec.examples >= 100, (rec.id, rec.examples)
            assert rec.extra["layers"] and all(r["ok"] for r in rec.extra["layers"])


def _small_digits():
    from equivcheck.models.zoo import load_digits_split

    x, y, xt, yt = load_digits_split()
    return x[:96], y[:96], xt[:50], yt[:50]


def test_fit_reports_both_accuracies_and_catches_a_slip():
    pytest.importorskip("sklearn")
    from equivcheck.models import Fit

    fit = Fit(_small_digits, epochs=2, batch_size=32)
    good = check(cnn_pair("fit_ok", fit=fit, checks=("fit",)), "fit")
    assert good.outcome == "passed", good.failure_text()
    assert set(good.extra["accuracy"]) == {"torch", "jax"} and len(good.extra["curves"]["jax"]) == 6
    assert "test accuracy torch" in good.notes[0]
    bad = check(cnn_pair("fit_bn", planted(cnn_apply, bn_momentum=0.1), fit=fit, checks=("fit",)), "fit")
    assert bad.outcome == "failed" and "first diverging layer: bn1 (running stats)" in bad.diagnosis, bad.diagnosis


def _clipped(optax_max_norm, optax_lr=0.5):
    """torch: SGD(lr=0.5) after clip_grad_norm_(0.05); optax: a chain of the user's own, its
    clipping at `optax_max_norm` and its lr at `optax_lr`; `unclipped` is the same pair with
    the clipping taken out of both sides (the lr kept as each side has it)."""
    import torch

    from equivcheck.optim import OptimizerPair
    from equivcheck.optim import transforms as ot

    def pair(clip):
        return OptimizerPair(
            f"p_clip_{optax_max_norm}_{optax_lr}" + ("" if clip else "_unclipped"),
            lambda ps: torch.optim.SGD(ps, lr=0.5),
            lambda: optax.chain(ot.clip_by_global_norm_torch(optax_max_norm), optax.sgd(optax_lr)) if clip
            else optax.sgd(optax_lr),
            torch_clip=(lambda ps: torch.nn.utils.clip_grad_norm_(ps, 0.05)) if clip else None,
            clip_reports_norm=clip, unclipped=(lambda: pair(False)) if clip else None)

    return pair(True)


def test_a_clipping_slip_is_named_as_clipping_not_the_optimizer():
    rec = check(mlp_pair("p_clip", optimizer=_clipped(0.1)), "train", "float64")
    assert rec.outcome == "failed", rec.message
    assert "clipping differs: 'p_clip_0.1_0.5' fails its" in rec.diagnosis, rec.diagnosis
    assert "the optimizer differs" not in rec.diagnosis


def test_an_optimizer_slip_under_clipping_is_still_the_optimizer():
    rec = check(mlp_pair("p_clip_lr", optimizer=_clipped(0.05, optax_lr=0.4)), "train", "float64")
    assert rec.outcome == "failed", rec.message
    assert "the optimizer differs" in rec.diagnosis and "clipping differs" not in rec.diagnosis, rec.diagnosis


def test_replacing_a_side_drops_the_unclipped_and_rebuilt_pairs():
    good = optimizer_pair("p_keep", "SGD", lr=0.1, clip_norm=1.0)
    assert good.unclipped is not None and good.unclipped().torch_clip is None
    swapped = good.replace(optax_transform=lambda: optax.sgd(0.2))
    assert swapped.unclipped is None and swapped.rebuild is None
    assert good.replace(doc="same sides").unclipped is good.unclipped
