"""Data pipelines: batches and their order from torch's DataLoader, Grain and NumPy, and image transforms.

loaders  epoch orders both sides share, both pipelines' batches, compare_epochs (the first batch that parts)
check    DataCheck: a pipeline comparison run under Hypothesis as a check kind; run_check
vision   image transforms with torchvision.transforms.v2 semantics for NumPy and jax.numpy
"""
from equivcheck.data.check import DATA_CHECKS, DataCheck, run_check
from equivcheck.data.loaders import (
    Batch,
    DataVerdict,
    EpochOrderSampler,
    Epochs,
    ExplicitOrderSampler,
    compare_epochs,
    explicit_orders,
    grain_epochs,
    grain_loader_epochs,
    grain_shuffle_orders,
    numpy_epochs,
    sampler_orders,
    stack,
    to_numpy,
    torch_epochs,
    torch_shuffle_orders,
)

__all__ = [
    "DATA_CHECKS", "Batch", "DataCheck", "DataVerdict", "EpochOrderSampler", "Epochs", "ExplicitOrderSampler",
    "compare_epochs", "explicit_orders", "grain_epochs", "grain_loader_epochs", "grain_shuffle_orders",
    "numpy_epochs", "run_check", "sampler_orders", "stack", "to_numpy", "torch_epochs", "torch_shuffle_orders",
]
