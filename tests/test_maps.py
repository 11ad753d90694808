"""A long run must not exhaust the process's memory maps: XLA maps every compiled executable, the
jit caches keep them, and past vm.max_map_count the process died with a segmentation fault (a serial
run of the suites after 883 s, the mutation benchmark after 68 of 84 pairs). equivcheck.backends.maps
releases every compiled program once half the cap is held."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from equivcheck import Pair, RunSettings, run_pair, unary
from equivcheck.backends import maps

pytestmark = pytest.mark.skipif(maps.held() is None, reason="no /proc/self/maps here (not Linux)")


def _pairs(n):
    return [Pair(f"tanh_scaled_{k}", lambda x, k=k: torch.tanh(x) * k, lambda x, k=k: jnp.tanh(x) * k, unary(),
                 checks=("forward",), reference=lambda x, k=k: np.tanh(x) * k) for k in range(n)]


def test_a_release_frees_the_maps_of_every_pairs_programs():
    """Each pair's programs stay mapped while the pair lives (the check programs are cached by its
    functions); a release gives the maps back, and the pairs still check afterwards."""
    pairs = _pairs(40)
    run = RunSettings(examples=2, seed=0, palette=2)
    for pair in pairs:
        assert run_pair(pair, dtype="float32", run=run)[0].outcome == "passed"
    before = maps.held()[0]
    assert maps.release()
    after = maps.held()[0]
    assert before - after >= 40, (before, after)
    assert run_pair(pairs[0], dtype="float32", run=run)[0].outcome == "passed"


def test_relieve_releases_only_past_the_high_water_mark(monkeypatch):
    calls = []
    monkeypatch.setattr(maps, "release", lambda: calls.append(1) or True)
    monkeypatch.setattr(maps, "_last", [float("-inf")])
    monkeypatch.setattr(maps, "held", lambda: (1000, 65530))
    assert not maps.relieve() and not calls
    monkeypatch.setattr(maps, "_last", [float("-inf")])
    monkeypatch.setattr(maps, "held", lambda: (40000, 65530))
    assert maps.relieve() and calls == [1]
    assert not maps.relieve()  # counted again only CHECK_EVERY seconds later
    assert calls == [1]


def test_a_release_reaches_the_optimizer_programs_compiled_ahead():
    from equivcheck.optim import sides

    sides._PROGRAMS[("placeholder",)] = (None, None)
    assert maps.release()
    assert ("placeholder",) not in sides._PROGRAMS
    assert jax.numpy.ones(2).sum() == 2  # JAX works on after its caches are cleared


def test_every_check_asks_for_relief_first(pytester, monkeypatch):
    from tests import preload  # noqa: F401 - frameworks loaded before pytester (tests/preload.py)

    asked = []
    monkeypatch.setattr(maps, "relieve", lambda: asked.append(1) or False)
    pytester.makepyfile(test_two="""
import jax.numpy as jnp, pytest, torch
import equivcheck as ec

@pytest.mark.parametrize("pair", [ec.Pair("tanh", torch.tanh, jnp.tanh, ec.unary(), checks=("forward",)),
                                  ec.Pair("sin", torch.sin, jnp.sin, ec.unary(), checks=("forward",))], ids=str)
def test_pair(pair, equiv):
    equiv.check(pair)
""")
    result = pytester.runpytest("--equiv", "--equiv-examples", "2", "--equiv-dtypes", "float32", "--equiv-report",
                                "none", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    assert len(asked) == 2
