"""No acceptance takes one side's result as the truth: a NaN or an infinity on one side is never
"ill-conditioned" nor "beyond the dtype's range", in float32 or float64, in any check."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from equivcheck import Pair, RunSettings, run_pair, unary
from tests.verdicts import verdict_on

SEED = 20261211
REPLAY = "pytest --equiv tests/test_verdict_nonfinite.py"
POISON = {"nan": float("nan"), "inf": float("inf")}


def poisoned(side: str, poison: str) -> Pair:
    """tanh, with one side multiplied by NaN or divided by zero (inf away from 0)."""
    bad_t = (lambda x: torch.tanh(x) * POISON["nan"]) if poison == "nan" else (lambda x: torch.tanh(x) / 0.0)
    bad_j = (lambda x: jnp.tanh(x) * POISON["nan"]) if poison == "nan" else (lambda x: jnp.tanh(x) / 0.0)
    return Pair(f"tanh_{poison}_on_{side}", bad_t if side == "torch" else torch.tanh,
                bad_j if side == "jax" else jnp.tanh, unary(), reference=np.tanh, checks=("forward", "vjp", "hvp"))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("poison", ["nan", "inf"])
@pytest.mark.parametrize("side", ["torch", "jax"])
@pytest.mark.parametrize("check", ["forward", "vjp", "hvp"])
def test_a_nonfinite_side_is_never_accepted_and_is_named(check, side, poison, dtype):
    args = [np.array([0.5, -1.25], dtype)]
    verdict = verdict_on(poisoned(side, poison), check, args, dtype)
    assert verdict.side == side, (verdict.message, verdict.diagnosis)
    assert f"{side} is off" in verdict.diagnosis


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("poison", ["nan", "inf"])
@pytest.mark.parametrize("side", ["torch", "jax"])
def test_a_nonfinite_side_fails_every_check_of_a_run(side, poison, dtype):
    records = run_pair(poisoned(side, poison), dtype=dtype, run=RunSettings(examples=10, seed=SEED), replay=REPLAY)
    for rec in records:
        assert rec.outcome == "failed" and rec.side == side, rec.failure_text()
        assert rec.ill_conditioned == 0
        assert f"replay: {REPLAY}" in rec.failure_text() and f"which side: {side}" in rec.failure_text()
