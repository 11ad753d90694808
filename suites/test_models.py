"""Model migration suite: torch models against their JAX ports, as a migration checks them.

One table, one generic test (the same `equiv.check` a user's own model test calls). Rows
(equivcheck.models.zoo): the two-layer MLP and its naive `W @ x` port (a known divergence:
the report shows the first diverging layer and the shape error), a small CNN (conv,
BatchNorm, pooling, dropout, linear) with its forward/grad/modes/20-step checks and, as its
own row, three epochs on scikit-learn's digits (loss curves and test accuracy of both), a
transformer encoder block, an LSTM classifier and GRU classifiers (one layer; two bidirectional
layers through linen.Bidirectional), each with a short trajectory (5 steps). Every model that
exports also runs the `onnx` check (its ONNX export in ONNX Runtime against torch and the port;
skipped, saying why, without `pip install equivcheck[onnx]`, at float64, and for a model that is
not exportable).
"""
from __future__ import annotations

import pytest

from equivcheck.models.evaluate import Example
from equivcheck.models.zoo import cnn_pair, encoder_pair, gru_pair, lstm_pair, mlp_naive_apply, mlp_pair

# Any input shows the naive port's divergence (a transposed kernel, then a shape error): one
# example of batch 1 with weights from torch.manual_seed(0) witnesses it.
MLP_WITNESS = Example(args=([[1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]], [[0.0]]), seed=0)



def with_onnx(pair):
    """The pair with the `onnx` check added to its own (equivcheck.onnx: export once per model and dtype)."""
    return pair.replace(checks=(*pair.checks, "onnx"))


# The naive MLP port (its known divergence is the port's, on forward only) and the digits run (fit
# only) do not take it: the onnx check of mlp and cnn covers those torch models.
MODELS = [
    with_onnx(mlp_pair()),
    mlp_pair("mlp_naive", mlp_naive_apply, checks=("forward",), witnesses={"forward": (MLP_WITNESS,)}),
    with_onnx(cnn_pair()),
    cnn_pair("cnn_digits", checks=("fit",)),
    with_onnx(encoder_pair()),
    with_onnx(lstm_pair()),
    with_onnx(gru_pair()),
    with_onnx(gru_pair("gru_bi", layers=2, bidirectional=True)),
]


@pytest.mark.parametrize("pair", MODELS, ids=str)
def test_model(pair, equiv):
    if pair.fit is not None and "fit" in pair.checks:
        pytest.importorskip("sklearn", reason="the digits data set comes from scikit-learn")
    equiv.check(pair)
