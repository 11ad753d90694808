"""Small models written twice, torch (NCHW, weight (out, in)) and Flax (NHWC, kernel (in, out)),
with the rules that map one's parameters onto the other's and a NumPy float64 forward of the
torch layout (the reference). The checkpoint suite and the planted-bug tests share them."""
from __future__ import annotations

import flax.linen as fnn
import jax.numpy as jnp
import numpy as np
import torch
from torch import nn

from equivcheck.weights import Rule

SIDE = 8  # input images are (N, 1, 8, 8), as scikit-learn's digits


class TorchCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.classifier = nn.Sequential(nn.Linear(4 * SIDE * SIDE, 16), nn.ReLU(), nn.Linear(16, 10))

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


class FlaxCNN(fnn.Module):
    @fnn.compact
    def __call__(self, x):  # x: NHWC
        x = fnn.relu(fnn.Conv(4, (3, 3), padding=1)(x))
        x = fnn.relu(fnn.Dense(16)(x.reshape(x.shape[0], -1)))
        return fnn.Dense(10)(x)


CNN_RULES = [Rule("features.0", "params/Conv_0", "conv2d"),
             Rule("classifier.0", "params/Dense_0", "linear_after_flatten", (4, SIDE, SIDE)),
             Rule("classifier.2", "params/Dense_1", "linear")]


def torch_mlp() -> nn.Module:
    # Square first layer: a weight left untransposed still fits, so only values can tell.
    return nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3))


class FlaxMLP(fnn.Module):
    @fnn.compact
    def __call__(self, x):
        h = jnp.tanh(fnn.Dense(6)(x))  # Flax names submodules in the order they are built
        return fnn.Dense(3)(h)


MLP_RULES = [Rule("0", "params/Dense_0", "linear"), Rule("2", "params/Dense_1", "linear")]


def torch_state(model: nn.Module, seed: int) -> dict[str, np.ndarray]:
    torch.manual_seed(seed)
    for p in model.parameters():
        nn.init.normal_(p, std=0.5)
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def cnn_reference(state, x):
    """float64 NumPy forward of TorchCNN's state on NCHW x."""
    w, b = state["features.0.weight"], state["features.0.bias"]
    xp = np.pad(x, [(0, 0), (0, 0), (1, 1), (1, 1)])
    patches = np.stack([xp[:, :, i:i + SIDE, j:j + SIDE] for i in range(3) for j in range(3)], axis=-1)
    h = np.maximum(np.einsum("nchwk,ock->nohw", patches, w.reshape(4, 1, 9)) + b[:, None, None], 0)
    h = np.maximum(h.reshape(len(x), -1) @ state["classifier.0.weight"].T + state["classifier.0.bias"], 0)
    return h @ state["classifier.2.weight"].T + state["classifier.2.bias"]


def mlp_reference(state, x):
    return np.tanh(x @ state["0.weight"].T + state["0.bias"]) @ state["2.weight"].T + state["2.bias"]
