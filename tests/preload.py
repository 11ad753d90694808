"""Load the frameworks, and the parts of torch an optimizer step loads lazily, before pytester.

pytester's in-process runs forget the modules first imported inside them, and some of torch's
cannot be imported twice into one process: the second import of the modules an optimizer step
pulls in lazily raised "Only a single TORCH_LIBRARY can be used to register the namespace
_inductor_test" in the next in-process run (test_report before test_optim_plugin, one process).
A test module that runs pytester imports this first.
"""
from __future__ import annotations

import torch

# The classes a plugin module checks with isinstance are here too: imported first inside an
# in-process run, they were forgotten after it, and the next run's fresh copy was not the class
# equivcheck's lazily cached attribute (`ec.Pair`) still gave (equivcheck.benchmarking found no pair).
import equivcheck.backends.jax
import equivcheck.backends.torch
import equivcheck.fixture
import equivcheck.ops.pairs
import equivcheck.optim  # noqa: F401 - loaded for the side effect above


def _one_step() -> None:
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.ones(2)
    torch.optim.Adam([p]).step()


_one_step()
