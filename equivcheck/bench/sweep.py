"""The size sweep of a few heavy operations: the same draw with its batch repeated x4 and x16, so the
claims report shows how each side's cost grows with the work, not only what one small call costs.
Models' forward and grad are swept too (equivcheck.bench.models.scaled_batch: axis 0 of every input).

SWEEP names, per built-in pair, the (argument, axis) pairs that carry the batch: every one of them is
repeated, so shapes stay consistent (the LSTM's states carry the batch on axis 1).
"""
from __future__ import annotations

from typing import Any

import numpy as np

FACTORS = (4, 16)
SWEEP: dict[str, tuple[tuple[int, int], ...]] = {
    "matmul": ((0, -2),),  # the rows of (..., m, k) @ (..., k, n)
    "nn.conv2d": ((0, 0),),  # N of (N, C, H, W)
    "nn.scaled_dot_product_attention": ((0, 0), (1, 0), (2, 0), (3, 0)),  # B of q, k, v and the mask
    "nn.lstm": ((0, 0), (5, 1), (6, 1)),  # N of the batch-first input, of h0 and of c0
}


def scaled_name(pair: str, factor: int) -> str:
    return pair if factor == 1 else f"{pair}@x{factor}"


def scaled(pair: str, args: tuple[Any, ...], factor: int) -> tuple[Any, ...]:
    """`args` with the batch of `pair` (a SWEEP entry) repeated `factor` times; KeyError for another pair."""
    out = list(args)
    for i, axis in SWEEP[pair]:
        out[i] = np.concatenate([np.asarray(args[i])] * factor, axis=axis)
    return tuple(out)


def growth(groups: dict[str, dict[str, Any]]) -> list[str]:
    """Lines of the claims report: per swept pair (an operation of SWEEP, a model: any group with
    `@x4`/`@x16` siblings) and check, each side's median at x1, x4, x16 and torch/JAX at each, from the
    groups of one device and precision mode."""
    lines = []
    for g in sorted(groups):
        pair, check, dtype, device = g.split("::")
        if "@x" in pair or not any(f"{scaled_name(pair, k)}::{check}::{dtype}::{device}" in groups for k in FACTORS):
            continue
        row = []
        for factor in (1, *FACTORS):
            sides = groups.get(f"{scaled_name(pair, factor)}::{check}::{dtype}::{device}", {})
            if "torch" in sides and "jax" in sides:
                t, j = sides["torch"]["stats"]["median"], sides["jax"]["stats"]["median"]
                row.append(f"x{factor}: torch {t * 1e3:.3f} ms, jax {j * 1e3:.3f} ms ({t / j:.2f}x)")
        if len(row) > 1:
            lines.append(f"{g}: " + "; ".join(row))
    return lines
