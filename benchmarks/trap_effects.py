"""The measured size of each default-configuration trap (equivcheck/divergences.py `effect`).

For every trap pair in the layer and loss suites: a few inputs drawn with NumPy from the
pair's own shapes and value ranges (seeded), both sides' forward, and the largest
|torch - jax| (or the shape mismatch). Prints one line per trap; figures, not assertions.

    python benchmarks/trap_effects.py [--seed 0] [--draws 5]
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from equivcheck.engine.compare import flatten
from equivcheck.ops.autodiff import evaluate
from suites._kit import sample_args
from suites.loss_traps import PAIRS as LOSS_TRAPS
from suites.trap_pairs import PAIRS as LAYER_TRAPS


def effect(pair, rng, draws):
    worst, shapes = 0.0, None
    for _ in range(draws):
        args = sample_args(pair, rng, "float32")
        ev = evaluate(pair, args, 0, dtype="float32", device="cpu", checks=("forward",))
        for side in (ev.torch, ev.jax):
            if "forward" in side.errors:
                return f"{side.side} raised: {side.errors['forward'].message[:80]}"
        t, j = ev.torch.values["forward"], ev.jax.values["forward"]
        for (path, a), (_, b) in zip(flatten(t), flatten(j)):
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            if a.shape != b.shape:
                shapes = f"{path}: shape torch {list(a.shape)} vs jax {list(b.shape)}"
                continue
            with np.errstate(invalid="ignore"):
                d = np.abs(a - b)
            worst = max(worst, float(np.nanmax(np.where(np.isnan(d) & ~(np.isnan(a) & np.isnan(b)), np.inf, d),
                                                initial=0.0)))
    if "init" in pair.name:  # statistics of the initialisers: show both sides
        return f"statistics torch {np.round(np.asarray(t, float), 2).tolist()} jax {np.round(np.asarray(j, float), 2).tolist()}"
    return shapes or f"max abs {worst:.2g}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--draws", type=int, default=5)
    opts = ap.parse_args()
    torch.set_num_threads(1)
    for pair in [*LAYER_TRAPS, *LOSS_TRAPS]:
        if ".trap." in pair.name:
            print(f"{pair.name:45s} {effect(pair, np.random.default_rng(opts.seed), opts.draws)}")


if __name__ == "__main__":
    main()
