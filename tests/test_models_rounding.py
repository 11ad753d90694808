"""A model's first Adam step amplifies gradient rounding (lr * g / (|g| + eps) at a gradient near eps),
and XLA's float32 tanh/sigmoid are a few ulps off where torch's are within one: seed 7 of the default
profile failed `lstm::train::float32` at step 1, the port 2.8e-5 from float64 and torch 1.4e-6, under
a rule that compared the two sides' distances (4 x 1.4e-6 + 2.07e-5 allowed). The step's own
sensitivity to each side's float32 gradient error (equivcheck.models.sensitivity) accepts it; a port
whose float32 gradient is off by more than the table is still refused."""
from __future__ import annotations

import numpy as np

from equivcheck.engine import tolerance
from equivcheck.engine.compare import flatten
from equivcheck.engine.records import RunSettings
from equivcheck.models import mapping as mm
from equivcheck.models import sides as ms
from equivcheck.models.evaluate import mapping
from equivcheck.models.sensitivity import first_step_within_gradient_rounding
from equivcheck.models.zoo import lstm_pair


def test_seed_7s_lstm_first_step_is_rounding_amplified_by_adam(monkeypatch):
    """Seed 7 went past the bound at step 1 (1.06x) with the packages of 2026-11-30; with those of
    2026-12-01 (a fresh install) its first step reaches 0.97 of it, and seed 22's first step is the
    one the rule must accept: both pass, seed 22 through the first-step rule."""
    from equivcheck.models import sensitivity

    verdicts = []
    rule = sensitivity.first_step_within_gradient_rounding
    monkeypatch.setattr(sensitivity, "first_step_within_gradient_rounding",
                        lambda *args: verdicts.append(rule(*args)) or verdicts[-1])
    for seed, ruled in ((7, None), (22, [True])):
        verdicts.clear()
        run = RunSettings(examples=30, seed=seed, palette=4, device="cpu")
        [rec] = lstm_pair().replace(checks=("train",)).run_checks(dtype="float32", run=run)
        assert rec.outcome == "passed", rec.failure_text()
        if ruled:
            assert verdicts == ruled and rec.ill_conditioned >= 1, (seed, verdicts, rec.notes)


def test_a_float32_step_off_by_more_than_rounding_is_not_excused():
    pair = lstm_pair()
    ents = mapping(pair, "float64", "cpu")
    rng = np.random.default_rng(0)
    batch = (rng.integers(0, 20, size=(4, 5)), rng.integers(0, 3, size=(4,)))
    model = ms.build_torch(pair, 0, "float64", "cpu")
    ms.torch_step(pair, model, pair.optimizer.torch_optimizer(list(model.parameters())), None,
                  ms.to_torch_args(batch, "cpu"))
    ref = [np.asarray(v, np.float64) for _, v in flatten(mm.to_jax(ents, ms.torch_state(model))[0])]
    bound = tolerance.lookup("float32", device="cpu", precision="highest", check="vjp")
    rounded = [r.astype(np.float32).astype(np.float64) for r in ref]
    assert first_step_within_gradient_rounding(pair, ents, batch, batch, 0, "cpu", rounded, rounded, ref, ref, bound, 2.0)
    off = [r + 1e-3 for r in rounded]  # every weight 1e-3 from float64's step: no gradient rounding explains it
    assert not first_step_within_gradient_rounding(pair, ents, batch, batch, 0, "cpu", rounded, off, ref, ref, bound,
                                                  2.0)
