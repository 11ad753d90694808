"""Shapes from a ring of palettes, values from the run's seed: a new seed reuses compiled programs."""
from __future__ import annotations

import dataclasses

from equivcheck import RunSettings
from equivcheck.ops.runner import _palette
from tests.helpers import SUITE


def test_seeds_below_the_ring_keep_the_palettes_they_always_had():
    # CI's --equiv-seed 1 and every replay line written before the ring draw the same shapes.
    run = RunSettings(seed=1)
    assert run.shape_seed("matmul", "float32", "cpu") == run.item_seed("matmul", "float32", "cpu")


def test_seeds_a_ring_apart_share_shapes_and_draw_their_own_values():
    a, b = RunSettings(seed=5), RunSettings(seed=5 + RunSettings.shape_ring)
    pair = SUITE["matmul"]
    assert _palette(pair, "float32", a) == _palette(pair, "float32", b)
    assert a.item_seed("matmul", "float32", "cpu") != b.item_seed("matmul", "float32", "cpu")


def test_neighbouring_seeds_draw_other_palettes_and_no_ring_means_the_run_seed():
    pair = SUITE["matmul"]
    palettes = {repr(_palette(pair, "float32", RunSettings(seed=s))) for s in range(RunSettings.shape_ring)}
    assert len(palettes) > RunSettings.shape_ring // 2  # a ring of one palette would be no search at all
    off = RunSettings(seed=123456, shape_ring=0)
    assert off.shape_seed("x") == off.item_seed("x")
    assert dataclasses.replace(off, shape_ring=8).shape_seed("x") == RunSettings(seed=123456 % 8).item_seed("x")
