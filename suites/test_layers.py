"""Layers: torch.nn modules against their Flax counterparts, outputs and the gradient with
respect to the input and every parameter (by name), on drawn shapes and hyperparameters.

The tables live in layer_pairs.py, sequence_pairs.py (attention, recurrent) and
trap_pairs.py (each framework's defaults ported naively, beside their reconciled twins).
"""
from __future__ import annotations

import pytest

from equivcheck import Registry
from suites import layer_pairs, sequence_pairs, trap_pairs
from suites.witnesses import witnessed

PAIRS = Registry(witnessed([*layer_pairs.PAIRS, *sequence_pairs.PAIRS, *trap_pairs.PAIRS]))


@pytest.mark.parametrize("pair", PAIRS, ids=str)
def test_layer(pair, equiv):
    equiv.check(pair)
