"""Model migration suite: torch models against their JAX ports, as a migration checks them.

One table, one generic test (the same `equiv.check` a user's own model test calls). Rows
(equivcheck.models.zoo): the two-layer MLP and its naive `W @ x` port (a known divergence:
the report shows the first diverging layer and the shape error), a small CNN (conv,
BatchNorm, pooling, dropout, linear) with its forward/grad/modes/20-step checks and, as its
own row, three epochs on scikit-learn's digits (loss curves and test accuracy of both), a
transformer encoder block, an LSTM classifier and GRU classifiers (one layer; two bidirectional
layers through linen.Bidirectional), each with a short trajectory (5 steps).
"""
from __future__ import annotations

import pytest

from equivcheck.models.evaluate import Example
from equivcheck.models.zoo import cnn_pair, encoder_pair, gru_pair, lstm_pair, mlp_naive_apply, mlp_pair

# Any input shows the naive port's divergence (a transposed kernel, then a shape error): one
# example of batch 1 with weights from torch.manual_seed(0) witnesses it.
MLP_WITNESS = Example(args=([[1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]], [[0.0]]), seed=0)

MODELS = [
    mlp_pair(),
    mlp_pair("mlp_naive", mlp_naive_apply, checks=("forward",), witnesses={"forward": (MLP_WITNESS,)}),
    cnn_pair(),
    cnn_pair("cnn_digits", checks=("fit",)),
    encoder_pair(),
    lstm_pair(),
    gru_pair(),
    gru_pair("gru_bi", layers=2, bidirectional=True),
]


@pytest.mark.parametrize("pair", MODELS, ids=str)
def test_model(pair, equiv):
    if pair.fit is not None and "fit" in pair.checks:
        pytest.importorskip("sklearn", reason="the digits data set comes from scikit-learn")
    equiv.check(pair)
