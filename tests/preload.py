"""Load the frameworks, and the parts of torch an optimizer step loads lazily, before pytester.

pytester's in-process runs forget the modules first imported inside them, and some of torch's
cannot be imported twice into one process: the second import of the modules an optimizer step
pulls in lazily raised "Only a single TORCH_LIBRARY can be used to register the namespace
_inductor_test" in the next in-process run (test_report before test_optim_plugin, one process).
A test module that runs pytester imports this first.
"""
from __future__ import annotations

import torch

import equivcheck.backends.jax  # noqa: F401
import equivcheck.backends.torch  # noqa: F401
import equivcheck.fixture  # noqa: F401


def _one_step() -> None:
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.ones(2)
    torch.optim.Adam([p]).step()


_one_step()
