"""Model migration: a torch nn.Module against its JAX port, checked as a whole (`ModelPair`).

pair        ModelPair, Loss (mse, cross_entropy), Fit: the record a user declares
tap         tap, dropout, capturing: what a port calls to expose layers and match dropout masks
mapping     the torch model's weights as the port's tree, gradients back by torch name
sides       both sides of a model check, NumPy in and out
runner      a ModelPair's checks under Hypothesis: CheckRecords
fit         the `fit` check: a whole training run on a data set
localise    the first diverging layer, and a hint at why
diagnose    why a model check failed: a layer, the gradient, else the optimizer
flax_ports  Flax linen and nnx modules as ports, tapped through Flax's own capture
zoo         built-in models and their ports (the suite's table)
"""
from equivcheck.models.flax_ports import linen_port, nnx_port
from equivcheck.models.mapping import fold_rnn_biases
from equivcheck.models.pair import MODEL_CHECKS, Fit, Loss, ModelPair, cross_entropy, mse
from equivcheck.models.tap import capturing, dropout, tap

__all__ = ["MODEL_CHECKS", "Fit", "Loss", "ModelPair", "capturing", "cross_entropy", "dropout", "fold_rnn_biases",
           "linen_port", "mse", "nnx_port", "tap"]
