"""The built-in pairs' float64 NumPy references agree with the sides they judge.

A reference decides which side is off when the two differ in float64 (equivcheck.ops.diagnose):
a reference with a slip of its own would blame the right side for it. Each one is held to the
float64 forward bound against torch's float64 forward on drawn inputs (torch, not JAX: JAX's
float64 needs x64 mode, and one trusted side is enough to catch a slip in the reference).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings

from equivcheck.backends import torch_side
from equivcheck.engine.compare import compare, float_leaves
from equivcheck.engine.tolerance import lookup
from suites.test_autodiff import PAIRS

WITH_REFERENCE = [p for p in PAIRS if p.reference is not None and "float64" in p.dtypes]


def test_every_built_in_pair_has_a_reference():
    # Without one a pair whose sides differ in float64 blames nobody (the mutation benchmark's
    # qr rows): a new pair brings its reference, or is listed here with the reason it has none.
    assert [p.name for p in PAIRS if p.reference is None] == []


@pytest.mark.parametrize("pair", WITH_REFERENCE, ids=str)
def test_the_reference_agrees_with_torch_in_float64(pair):
    tb = torch_side()
    cpu = tb.device_of("cpu")
    tol = lookup("float64", check="forward", tags=pair.tags, override=pair.tolerance_for("float64", "forward"))
    strategy = pair.inputs.strategy("float64", pair.inputs.palette(0, 4))

    @settings(max_examples=8, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def agrees(args):
        want = tb.to_numpy(pair.torch_fn(*[tb.to_torch(a, cpu) for a in args]))
        got = pair.reference(*[np.array(a) if isinstance(a, np.ndarray) else a for a in args])
        t = [np.asarray(x, np.float64) for x in float_leaves(want)]
        r = [np.asarray(x, np.float64) for x in float_leaves(got if isinstance(got, (list, tuple)) else
                                                             np.asarray(got))]
        verdict = compare(t, r, tol)
        assert verdict.ok, f"{pair.name}: the reference differs from torch's float64 forward: {verdict.message}"

    with torch.no_grad():
        agrees()
