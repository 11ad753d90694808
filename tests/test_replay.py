"""A seed replays the same examples whatever else the process has imported.

Hypothesis mixes literals from loaded local modules into generation; a replay command runs one
test, where the full run had imported every test module, so the runner keeps that pool out.
"""
from __future__ import annotations

import importlib
import sys

import jax.numpy as jnp
import numpy as np
import torch

from equivcheck import Floats, Pair, RunSettings, run_pair, unary


def _drawn(seed: int) -> list[bytes]:
    seen: list[bytes] = []

    def torch_fn(x):
        seen.append(x.detach().cpu().numpy().tobytes())
        return torch.sin(x)

    pair = Pair("replay_probe", torch_fn, jnp.sin, unary(Floats(-10, 10)), checks=("forward",))
    run_pair(pair, dtype="float32", run=RunSettings(examples=40, seed=seed))
    return seen


def test_same_seed_draws_the_same_examples_after_more_modules_load(tmp_path, monkeypatch):
    before = _drawn(7)
    # A module full of float literals, as a test module or a user's code would be.
    literals = ", ".join(repr(float(v)) for v in np.linspace(-9.75, 9.75, 40).round(3))
    (tmp_path / "many_literals_mod.py").write_text(f"VALUES = [{literals}, -2.5, 0.125, 3.0e-5]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.import_module("many_literals_mod")
    try:
        after = _drawn(7)
    finally:
        sys.modules.pop("many_literals_mod", None)
    assert len(before) >= 40 and before == after
    assert _drawn(8) != before  # the seed does choose the examples
