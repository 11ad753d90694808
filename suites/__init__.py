"""The built-in equivalence suites: each file a table of pairs and one generic test."""
from __future__ import annotations

from typing import Any


def built_in_kinds() -> list[Any]:
    """Every check of the built-in suites (op, layer, loss and transform pairs, data checks,
    optimizer pairs, model pairs): what witnesses are searched for and required of. Imports
    torch and JAX, so only on call."""
    from suites import test_autodiff, test_data, test_layers, test_losses, test_models, test_optimizers
    from suites.transform_pairs import PAIRS as TRANSFORMS

    return [*test_autodiff.PAIRS, *test_layers.PAIRS, *test_losses.PAIRS, *TRANSFORMS,
            *test_data.LOADER_CHECKS.values(), *test_optimizers.PAIRS, *test_models.MODELS]
