"""A user's own distributed jobs (the fresh-user trial's findings D1-D8, D13, D14): every malformed result
is a failed record naming the side, the job and what was expected; a dtype other than the one asked is
blamed on the side that returned it; a custom model is judged against the user's float64 reference_job,
or torch against JAX with no side named, never against the built-in MLP's reference; rank-against-rank
messages name ranks; a hang inside a collective names every silent rank; a worker outlives no parent.

Real pools of 2 ranks (gloo on CPU), shared by the module and closed at its end."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from equivcheck.distributed import collective_pair, ddp_pair
from equivcheck.distributed.common import NO_REFERENCE
from equivcheck.engine.records import RunSettings

RUN = RunSettings(examples=4, seed=1)
J = "tests.distributed_user_jobs:"


pytestmark = pytest.mark.usefixtures("pools_closed_at_the_end")  # tests/conftest.py


def _one(pair, dtype="float32"):
    [rec] = pair.run_checks(dtype=dtype, run=RUN, known=lambda _id: None)
    return rec


def _pair(torch_job, jax_job, check="grads", **fields):
    return ddp_pair(2, name="mine", checks=(check,), torch_job=J + torch_job, jax_job=J + jax_job, **fields)


# (torch job, jax job, check, the side named, the record's kind, words the message must hold)
MALFORMED = [
    ("torch_missing_key", "jax_ok", "grads", "torch", "structure",
     "tests.distributed_user_jobs:torch_missing_key (rank 0) returned 'grads' with keys"),
    ("torch_ok", "jax_list", "grads", "jax", "structure", "expected the Flax layout"),
    ("torch_ok", "jax_none", "grads", "jax", "structure",
     "the jax job tests.distributed_user_jobs:jax_none returned None, expected a dict with keys 'grads' and 'params'"),
    ("torch_wrong_shape", "jax_ok", "grads", "torch", "shape", "returned 'grads'['l1.weight'] of shape [3, 8]"),
    ("torch_no_trail", "jax_ok", "train", "torch", "structure", "returned 0 parameter snapshots, 3 steps were asked"),
    ("torch_one_step", "jax_ok", "train", "torch", "structure", "returned 1 parameter snapshot, 3 steps were asked"),
    ("jax_ok", "jax_one_step", "train", "jax", "structure", "returned 1 parameter snapshot, 3 steps were asked"),
    ("torch_f16", "jax_ok", "grads", "torch", "dtype", "returned 'grads'['l1.weight'] in float16, expected float32"),
    ("torch_ok", "jax_f16", "grads", "jax", "dtype", "returned 'grads'['l1']['kernel'] in float16, expected float32"),
]


@pytest.mark.parametrize(("torch_job", "jax_job", "check", "side", "kind", "words"), MALFORMED,
                         ids=[f"{t}-{j}-{c}" for t, j, c, *_ in MALFORMED])
def test_a_malformed_result_fails_naming_the_side(torch_job, jax_job, check, side, kind, words):
    if torch_job == "jax_ok":  # the jax-side snapshot count: torch's job is the good one
        torch_job = "torch_ok"
    rec = _one(_pair(torch_job, jax_job, check))
    assert rec.outcome == "failed" and rec.side == side and rec.kind == kind, rec.failure_text()
    assert words in rec.message, rec.message
    assert f"the {side} job" in rec.message and "the pool was torn down" not in " ".join(rec.notes)


def test_both_sides_one_snapshot_is_not_a_pass():
    # cutting both sides to one step used to compare one step and pass
    rec = _one(_pair("torch_one_step", "jax_one_step", "train"))
    assert rec.outcome == "failed" and "1 parameter snapshot, 3 steps were asked" in rec.message


@pytest.mark.parametrize(("torch_job", "jax_job", "side"), [("torch_coll_f16", "", "torch"), ("", "jax_coll_f16", "jax")])
def test_a_collective_in_another_dtype_blames_its_side(torch_job, jax_job, side):
    pair = collective_pair("all_reduce_sum", 2, name="mine", torch_job=torch_job and J + torch_job,
                           jax_job=jax_job and J + jax_job)
    rec = _one(pair)
    assert rec.outcome == "failed" and rec.side == side and rec.kind == "dtype", rec.failure_text()
    assert f"the {side} job" in rec.message and "in float16, expected float32" in rec.message, rec.message


def test_a_custom_model_is_never_judged_against_the_builtin_mlp():
    # a correct ReLU MLP on both sides failed "both sides are off the float64 reference" (the tanh MLP's)
    for check in ("grads", "train"):
        rec = _one(_pair("torch_relu", "jax_relu", check))
        assert rec.outcome == "passed", rec.failure_text()
        assert any(NO_REFERENCE in n for n in rec.notes), rec.notes
        rec = _one(_pair("torch_relu", "jax_relu", check, reference_job=J + "relu_reference"))
        assert rec.outcome == "passed", rec.failure_text()


def test_a_custom_model_names_the_side_only_with_a_reference():
    rec = _one(_pair("torch_relu", "jax_relu_forgot_pmean"))
    assert rec.outcome == "failed" and rec.side is None, rec.failure_text()
    assert "torch and jax differ" in rec.message and NO_REFERENCE in rec.message
    from tests.distributed_user_jobs import relu_reference

    for reference in (J + "relu_reference", relu_reference):  # "module:function" or a callable
        rec = _one(_pair("torch_relu", "jax_relu_forgot_pmean", reference_job=reference))
        assert rec.outcome == "failed" and rec.side == "jax", rec.failure_text()
        assert "jax is off the float64 reference" in rec.message and "x the full-batch" not in rec.diagnosis


def test_a_nan_on_one_rank_names_ranks_not_sides():
    rec = _one(_pair("torch_nan_rank1", "jax_ok"))
    assert rec.outcome == "failed" and rec.side == "torch", rec.failure_text()
    assert "torch ranks disagree" in rec.message and "rank 1 gives NaN, rank 0" in rec.message, rec.message
    assert "jax gives NaN" not in rec.message and "the other side" not in rec.message


def test_a_hang_inside_a_collective_names_every_silent_rank():
    # rank 1 sleeps, rank 0 waits for it in all_reduce: rank 0 is not the culprit, so neither is singled out
    rec = _one(_pair("torch_hang_rank1", "jax_ok", seconds=3))
    assert rec.outcome == "failed" and rec.side == "torch" and rec.kind == "error", rec.failure_text()
    assert rec.message.startswith("torch ranks 0 and 1: rank 0 and rank 1 did not answer within 3 s"), rec.message


@pytest.mark.parametrize(("make", "words"), [
    (lambda: ddp_pair(2, seconds=0), "must be > 0"),
    (lambda: ddp_pair(True), "world must be a positive int"),
    (lambda: ddp_pair(2, sizes=(3, 0, 2)), "sizes must be three positive ints"),
    (lambda: collective_pair("all_reduce_sum", 2, checks=("grads",)), "do not apply"),
    (lambda: ddp_pair(2, reference_job=J + "relu_reference"), "reference_job applies to a model job of your own"),
    (lambda: ddp_pair(2, torch_job=J + "torch_relu", reference_job="nocolon"), "reference_job must read"),
])
def test_the_constructor_refuses(make, words):
    with pytest.raises(ValueError, match=words):
        make()


def test_a_job_module_that_does_not_exist_fails_before_any_pool(monkeypatch):
    from equivcheck.distributed import runner

    def no_pool(*_args):
        raise AssertionError("a pool was asked for a job that cannot be imported")

    monkeypatch.setattr(runner, "pool_for", no_pool)
    records = ddp_pair(2, name="mine", torch_job="no_such_module_here:fn", jax_job=J + "jax_ok").run_checks(
        dtype="float32", run=RUN, known=lambda _id: None)
    assert [(r.check, r.outcome, r.side, r.kind) for r in records] == [("grads", "failed", "torch", "error"),
                                                                      ("train", "failed", "torch", "error")]
    assert "the torch job no_such_module_here:fn: no module 'no_such_module_here'" in records[0].message


def test_collective_pair_takes_checks():
    assert collective_pair("all_reduce_sum", 2, checks=("collective",)).checks == ("collective",)


def test_a_worker_ends_when_its_parent_dies():
    # the parent forks a child that watches it (as a worker does), then dies without closing anything
    script = textwrap.dedent("""
        import os, time
        from equivcheck.distributed.worker import _orphan_watch
        pid = os.fork()
        if pid == 0:
            _orphan_watch(os.getppid())
            time.sleep(120)
            os._exit(0)
        print(pid, flush=True)
        time.sleep(1.0)
        os._exit(0)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    orphan = int(out.stdout.split()[0])
    end = time.monotonic() + 20
    while time.monotonic() < end and psutil.pid_exists(orphan) and psutil.Process(orphan).status() != "zombie":
        time.sleep(0.2)
    assert not psutil.pid_exists(orphan) or psutil.Process(orphan).status() == "zombie", "the orphan lived on"
    code = "from equivcheck.distributed.worker import _orphan_watch; _orphan_watch(1); print('alive')"
    late = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert late.returncode == 1 and "alive" not in late.stdout  # its parent gone before it looked: it ends at once


@pytest.mark.parametrize(("value", "kind", "words"), [
    ([[1.0, 2.0], [3.0]], "structure", "that is no array"),
    (None, "structure", "returned None as its result"),
    ({"a": 1.0}, "structure", "a dict with keys ['a']"),
    ([1.0, 2.0], "dtype", "in float64, expected float32"),
    ([1.0], "shape", "of shape [1], expected [2] float32"),
])
def test_a_malformed_array_is_a_bad_result_naming_the_side(value, kind, words):
    from equivcheck.distributed.results import BadResult, array

    with pytest.raises(BadResult) as err:
        array("the torch job mine (rank 1)", "its result", value, (2,), "float32")
    assert err.value.side == "torch" and err.value.kind == kind and words in str(err.value), str(err.value)
    assert str(err.value).startswith("the torch job mine (rank 1) returned")
