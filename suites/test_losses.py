"""Losses: torch.nn.functional against optax (else jax.numpy), outputs and gradients, with
torch's reductions, class weights, ignore_index, label smoothing and extreme logits.

Tables: loss_pairs.py, and the loss traps in loss_traps.py.
"""
from __future__ import annotations

import pytest

from equivcheck import Registry
from suites import loss_pairs, loss_traps
from suites.witnesses import witnessed

PAIRS = Registry(witnessed([*loss_pairs.PAIRS, *loss_traps.PAIRS]))


@pytest.mark.parametrize("pair", PAIRS, ids=str)
def test_loss(pair, equiv):
    equiv.check(pair)
