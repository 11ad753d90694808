"""Every shape of a check's palette is run. Hypothesis draws the shapes of a 10-example search from a
palette of 4 (the larger ones at twice the weight): a shape goes undrawn about 1 time in 20 (3/4^10
for the smallest), and a fault that shows only at that shape is then missed (slogdet's batch-rolling
mutant passed seed 0's 10 examples, none drawing the palette's one batched shape). A palette shape
the search never drew gets a search of its own (equivcheck.ops.runner.run_pair)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch

from equivcheck import Fixed, Floats, Inputs, Pair, RunSettings, Same, run_pair


def _tanh_pair(seen: set) -> Pair:
    def torch_tanh(x):
        seen.add(tuple(x.shape))
        return torch.tanh(x)

    return Pair("tanh_seen", torch_tanh, jnp.tanh, Inputs(Same(max_dims=3), (Floats(-3, 3),)), checks=("forward",))


def test_every_palette_shape_is_run_on_every_seed():
    """At 4 examples and a palette of 4 the search alone leaves shapes out on most seeds."""
    topped_up = 0
    for seed in range(12):
        seen: set = set()
        pair = _tanh_pair(seen)
        run = RunSettings(examples=4, seed=seed, palette=4)
        palette = {s[0] for s in pair.inputs.palette(run.shape_seed(pair.name, "float32", "cpu"), 4)}
        [rec] = run_pair(pair, dtype="float32", run=run)
        assert rec.outcome == "passed", rec.failure_text()
        assert palette <= seen, (seed, palette - seen)
        topped_up += rec.examples > 4
    assert topped_up >= 3  # the case is exercised: top-up searches ran


def test_a_fault_at_one_palette_shape_is_found_on_every_seed():
    """The JAX side is wrong only on arrays of three axes: every seed finds it."""
    def jax_tanh(x):
        return jnp.tanh(x) * (1.01 if x.ndim == 3 else 1.0)

    for seed in range(8):
        pair = Pair("tanh_3d_slip", torch.tanh, jax_tanh, Inputs(Same(min_dims=1, max_dims=3), (Floats(-3, 3),)),
                    checks=("forward",), reference=np.tanh)
        run = RunSettings(examples=4, seed=seed, palette=4)
        palette = pair.inputs.palette(run.shape_seed(pair.name, "float32", "cpu"), 4)
        if not any(len(s[0]) == 3 for s in palette):
            continue
        [rec] = run_pair(pair, dtype="float32", run=run)
        assert rec.outcome == "failed", (seed, rec.outcome)
        assert rec.side == "jax", rec.failure_text()


def test_every_choice_of_a_fixed_rule_is_drawn_past_the_palette_size():
    """Six Fixed choices under a palette of 4: the palette kept the first and three spread by size, so a
    port wrong only at (5, 3) passed on every seed (a new user's trial, 2026-12-02). The user's list is
    drawn whole."""
    choices = (((4,),), ((3, 5),), ((2, 3, 2),), ((2, 6),), ((5, 3),), ((2, 2, 7),))

    def jax_softmax(x):
        return jax.nn.softmax(x, 0) if x.shape == (5, 3) else jax.nn.softmax(x, -1)

    def softmax64(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    for seed in (1, 2, 3):
        pair = Pair("softmax_mid_shape_slip", lambda x: torch.softmax(x, -1), jax_softmax,
                    Inputs(Fixed(choices), (Floats(-5, 5),)), reference=softmax64, checks=("forward",))
        run = RunSettings(examples=10, seed=seed, palette=4)
        assert set(pair.inputs.palette(run.shape_seed(pair.name, "float32", "cpu"), 4)) == set(choices)
        [rec] = run_pair(pair, dtype="float32", run=run)
        assert rec.outcome == "failed" and rec.side == "jax", (seed, rec.failure_text())
