"""Derivative checks that cannot compare derivatives say why, in the record: not applicable (nothing
floating goes in or comes out), a graph the torch side lost (its output is a Python float, a NumPy
array or a detached tensor), or outputs of different shapes (no common cotangent, no side named)."""
from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from equivcheck import Fixed, Floats, Inputs, Ints, Pair, RunSettings, Same, run_pair, unary
from equivcheck.engine import tolerance
from equivcheck.ops.autodiff import evaluate, judge
from tests import preload  # noqa: F401 - frameworks loaded before pytester (tests/preload.py)
from tests.helpers import by_check

RUN = RunSettings(examples=10, seed=20261211)
REPLAY = "pytest --equiv tests/test_verdict_structure.py"
DERIVATIVES = ("vjp", "jvp", "hvp")
ARGMAX = Pair("argmax_flat", torch.argmax, jnp.argmax, unary(min_dims=1, zero_size=False))
INT_INPUT = Pair("double_ints", lambda x: x * 2, lambda x: x * 2, Inputs(Same(), (Ints(),)))
THREE = Inputs(Fixed(((3,),)), (Floats(),))


@pytest.mark.parametrize("pair, why", [(ARGMAX, "no floating-point output to differentiate"),
                                       (INT_INPUT, "no floating-point input to differentiate")], ids=str)
def test_nothing_to_differentiate_is_not_applicable_never_ok(pair, why):
    records = by_check(run_pair(pair, dtype="float32", run=RUN))
    assert records["forward"].outcome == "passed"
    for check in DERIVATIVES:
        rec = records[check]
        assert rec.outcome == "skipped" and rec.kind == "not-applicable", rec
        assert rec.message == f"{check}: {why}" and rec.examples > 0


def one(pair, check, args, dtype="float32"):
    """The verdict of `check` when all the pair's checks run together, as the runner runs them."""
    ev = evaluate(pair, args, 0, dtype=dtype, device="cpu", checks=pair.checks)
    return judge(pair, ev, check, tolerance.lookup(dtype, check=check), args)


LOST = [
    ("the torch side returned a Python float (the graph is lost)", lambda x: torch.sum(torch.tanh(x)).item(),
     lambda x: jnp.sum(jnp.tanh(x))),
    ("the torch side returned a NumPy array (the graph is lost)", lambda x: np.tanh(x.detach().numpy()), jnp.tanh),
    ("the torch side's output does not require grad / is detached", lambda x: torch.tanh(x).detach(), jnp.tanh),
]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("cause, torch_fn, jax_fn", LOST, ids=["item", "numpy", "detach"])
def test_a_lost_graph_is_named_on_the_torch_side(cause, torch_fn, jax_fn, dtype):
    pair = Pair("graph_lost", torch_fn, jax_fn, THREE)
    args = [np.array([0.5, -1.0, 2.0], dtype)]
    for check in DERIVATIVES:
        verdict = one(pair, check, args, dtype)
        assert not verdict.ok and verdict.side == "torch", verdict
        assert verdict.message.startswith(f"{cause}, so no {check.upper()}"), verdict.message
        assert "jax side" not in verdict.message


def test_a_python_float_forward_names_its_cause_not_a_dtype_of_torch():
    pair = Pair("item", lambda x: torch.sum(x).item(), jnp.sum, THREE)
    verdict = one(pair, "forward", [np.array([0.5, -1.0, 2.0], np.float32)])
    assert not verdict.ok and verdict.side == "torch"
    assert verdict.message.startswith("the torch side returned a Python float (the graph is lost): "), verdict.message


def test_outputs_of_different_shapes_fail_the_derivatives_naming_no_side():
    pair = Pair("column", torch.tanh, lambda x: jnp.tanh(x)[:, None], THREE)
    args = [np.array([0.5, -1.0, 2.0], np.float32)]
    for check in ("vjp", "hvp"):
        verdict = one(pair, check, args)
        assert not verdict.ok and verdict.kind == "structure" and verdict.side is None, verdict
        assert verdict.message == (f"outputs have different shapes (torch (3,), jax (3, 1)), so no common cotangent: "
                                   f"the {check.upper()} could not run")
    verdict = one(pair, "jvp", args)
    assert not verdict.ok and verdict.side is None
    assert verdict.message.startswith("outputs have different shapes (torch (3,), jax (3, 1))")


def test_a_structural_failure_keeps_its_replay_line_and_says_why_no_side():
    pair = Pair("column_run", torch.tanh, lambda x: jnp.tanh(x)[:, None], THREE)
    records = by_check(run_pair(pair, dtype="float32", run=RUN, replay=REPLAY))
    for check in DERIVATIVES:
        text = records[check].failure_text()
        assert records[check].outcome == "failed" and records[check].side is None, text
        assert "outputs have different shapes" in text and "raised" not in text
        assert f"replay: {REPLAY}" in text and "which side: undecided: no side is named" in text


APPLICABLE = """
import pytest, torch, jax.numpy as jnp
import equivcheck as ec

@pytest.mark.parametrize("pair", [ec.Pair("argmax", torch.argmax, jnp.argmax, ec.unary(min_dims=1, zero_size=False),
                                          checks=("forward", "vjp"))], ids=str)
def test_pair(pair, equiv):
    equiv.check(pair)
"""


def test_the_fixture_passes_a_forward_whose_derivative_is_not_applicable_and_reports_the_skip(pytester):
    pytester.makepyfile(test_argmax=APPLICABLE)
    result = pytester.runpytest("--equiv", "--equiv-examples", "10", "--equiv-seed", "1", "--equiv-dtypes", "float32",
                                "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    report = json.loads((pytester.path / "reports" / "latest.json").read_text())
    rec = {r["check"]: r for r in report["records"]}
    assert rec["forward"]["outcome"] == "passed"
    assert rec["vjp"]["outcome"] == "skipped"
    assert rec["vjp"]["message"] == "vjp: no floating-point output to differentiate"
    assert report["summary"]["skipped"] == 1 and report["summary"]["passed"] == 1


@pytest.mark.parametrize("path", ["dual tensors", "torch.func.jvp"])
def test_a_tangent_promoted_by_torchs_forward_ad_is_compared_at_the_output_dtype(path, monkeypatch):
    # torch.func.jvp of a 0-d float32 tensor times a Python float returns a float64 tangent;
    # forward AD on dual tensors (the first path tried) does not. torch.func.jvp is the fallback
    # where dual tensors raise: made to run here by a dual-tensor path that raises.
    from equivcheck.backends import torch as torch_backend

    if path == "torch.func.jvp":
        def refuse(*_):
            raise RuntimeError("dual tensors refused (test)")
        monkeypatch.setattr(torch_backend, "_dual_jvp", refuse)
    pair = Pair("sinh_scaled", lambda x: torch.sinh(x) * 1.01, lambda x: jnp.sinh(x) * 1.01,
                Inputs(Fixed(choices=(((),),)), [Floats(-3, 3)]), checks=("forward", "jvp"),
                reference=lambda x: np.sinh(x) * 1.01)
    (fwd, jvp) = run_pair(pair, dtype="float32", run=RunSettings(examples=5, seed=0))
    assert (fwd.outcome, jvp.outcome) == ("passed", "passed"), jvp.failure_text()
    promoted = any("another dtype than the output" in n for n in jvp.notes)
    assert promoted == (path == "torch.func.jvp")


def test_a_forward_shape_mismatch_is_named_by_the_reference_shape():
    """logsumexp over axis 0 on torch, over the last axis on JAX and in the reference: on (2, 4, 4)
    torch gives [4, 4], JAX [2, 4]. The reference's shape names torch; without a reference no side
    (found by a planted-bug trial: the forward named no side although the reference decides)."""
    import jax
    import scipy.special

    from equivcheck.ops.diagnose import diagnose

    x = np.random.default_rng(0).uniform(-5, 5, (2, 4, 4)).astype(np.float32)
    pair = Pair("logsumexp_axis0_torch", lambda a: torch.logsumexp(a, dim=0), lambda a: jax.nn.logsumexp(a, axis=-1),
                Inputs(Fixed((((2, 4, 4),),)), (Floats(-5, 5),)), reference=lambda a: scipy.special.logsumexp(a, axis=-1))
    for ref, side in ((pair.reference, "torch"), (None, None)):
        p = pair.replace(reference=ref)
        ev = evaluate(p, [x], 0, dtype="float32", device="cpu", checks=("forward",))
        verdict = judge(p, ev, "forward", tolerance.lookup("float32", check="forward"), [x])
        assert verdict.kind == "shape", verdict
        diagnose(p, "forward", [x], ev, verdict, dtype="float32")
        assert verdict.side == side, verdict.diagnosis
