"""The distributed pools' failure handling: a worker that exits, raises or hangs gives a failing record
naming the rank and the cause, within the deadline; no worker process survives; two pools started at
once (as under pytest -n 2) do not collide. Real processes throughout (gloo on CPU)."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import numpy as np
import psutil
import pytest

from equivcheck.backends.deadline import MAX_STRETCH
from equivcheck.distributed import DistributedPair, Pool, WorkerFailure, ddp_pair
from equivcheck.distributed.pool import DRAIN_SECONDS
from equivcheck.engine.kind import CheckKind
from equivcheck.engine.records import RunSettings

RUN = RunSettings(examples=3, seed=0)


def _alive(pids: list[int]) -> list[int]:
    return [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


@pytest.fixture
def no_stray_children():
    """Fails the test if a child process started during it is still alive after it."""
    before = {c.pid for c in psutil.Process().children(recursive=True)}
    yield
    time.sleep(0.2)
    stray = [c for c in psutil.Process().children(recursive=True) if c.pid not in before and c.is_running()
             and c.status() != psutil.STATUS_ZOMBIE]
    assert not stray, f"child processes survived the test: {[(c.pid, c.cmdline()[:4]) for c in stray]}"


@pytest.fixture(scope="module")
def pool():
    p = Pool(2)
    yield p
    p.close()


def test_results_are_numpy_and_a_pool_serves_fewer_ranks(pool):
    out = pool.torch("collective", [{"op": "all_gather", "x": np.arange(2.0) + r} for r in range(2)])
    assert isinstance(out[0], np.ndarray) and out[0].tolist() == [0.0, 1.0, 1.0, 2.0]
    one = pool.torch("collective", [{"op": "all_reduce_sum", "x": np.ones(2)}])  # a group of rank 0 alone
    assert [a.tolist() for a in one] == [[1.0, 1.0]]
    assert pool.jax("collective", {"op": "all_reduce_sum", "x": np.ones((1, 2))}, world=1).tolist() == [[1.0, 1.0]]


@pytest.mark.parametrize(("job", "cause"), [
    ("tests.distributed_probes:exit_on_rank1", "exited with status 3"),
    ("tests.distributed_probes:raise_on_rank1", "ZeroDivisionError: planted: rank 1 divides by zero"),
    ("tests.distributed_probes:hang_on_rank1", "rank 1 did not answer within 3 s"),
])
def test_a_failing_rank_fails_the_check_naming_rank_and_cause(job, cause, no_stray_children):
    pair = ddp_pair(2, name="probe", checks=("grads",), torch_job=job, seconds=3.0)
    began = time.monotonic()
    [rec] = pair.run_checks(dtype="float32", run=RUN, known=lambda _id: None)
    assert time.monotonic() - began < 60  # within the deadline (plus a pool start), not a hung session
    assert rec.outcome == "failed" and rec.kind == "error" and rec.side == "torch"
    assert rec.message.startswith("torch rank 1:"), rec.message
    assert cause in rec.message, rec.message
    from equivcheck.distributed import close_all

    close_all()  # the session's end: the fixture then checks that every worker is gone


def test_pool_is_torn_down_after_a_crash_and_its_processes_reaped(pool, no_stray_children):
    pids = list(pool.pids)
    assert len(pids) == 3 and _alive(pids) == pids
    with pytest.raises(WorkerFailure) as err:
        pool.torch("probe", [{"rank": 1, "action": "exit"}] * 2, seconds=20)
    assert err.value.rank == 1 and "exited with status 3" in err.value.cause
    assert pool.closed and _alive(pids) == []
    with pytest.raises(RuntimeError, match="closed"):
        pool.torch("probe", [{"rank": 0, "action": "none"}] * 2)


def test_a_hung_rank_and_the_jax_worker(no_stray_children):
    p = Pool(2)
    pids = list(p.pids)
    assert p.torch("probe", [{"rank": 0, "action": "none"}] * 2) == [0, 1]  # healthy first
    began = time.monotonic()
    with pytest.raises(WorkerFailure, match="rank 0 did not answer within 1.5 s"):
        p.torch("probe", [{"rank": 0, "action": "hang"}] * 2, seconds=1.5)
    assert time.monotonic() - began < 10 and _alive(pids) == []
    q = Pool(2)
    with pytest.raises(WorkerFailure) as err:
        q.jax("probe", {"action": "raise"})
    assert err.value.side == "jax" and "planted failure in the JAX worker" in err.value.cause
    assert "the JAX worker process" in str(err.value)
    q.close()


def test_a_job_that_raises_leaves_the_pool_serving_when_every_worker_answered(no_stray_children):
    """A user's job that raises costs its check, not a pool restart (tens of seconds): the pool stays
    when the other ranks answered and the group still meets. A rank that raises while a peer waits for
    it (as inside a collective) still restarts the pool, within DRAIN_SECONDS of the raise."""
    p = Pool(2)
    pids = list(p.pids)
    with pytest.raises(WorkerFailure) as err:
        p.torch("probe", [{"rank": 1, "action": "raise"}] * 2)
    assert err.value.rank == 1 and "planted failure on rank 1" in err.value.cause
    assert not p.closed and _alive(pids) == pids
    out = p.torch("collective", [{"op": "all_reduce_sum", "x": np.full(2, r + 1.0)} for r in range(2)])
    assert [a.tolist() for a in out] == [[3.0, 3.0], [3.0, 3.0]]  # the answers are this request's, in order
    with pytest.raises(WorkerFailure) as err:
        p.jax("probe", {"action": "raise"})
    assert err.value.side == "jax" and not p.closed
    assert p.jax("collective", {"op": "all_reduce_sum", "x": np.ones((2, 2))}).tolist() == [[2.0, 2.0]] * 2
    began = time.monotonic()
    with pytest.raises(WorkerFailure, match="divides by zero"):
        p.torch("tests.distributed_probes:raise_on_rank1", [{}] * 2)
    assert p.closed and _alive(pids) == []
    assert time.monotonic() - began < DRAIN_SECONDS * MAX_STRETCH + 10


_SCRIPT = textwrap.dedent("""
    import numpy as np, sys
    from equivcheck.distributed import Pool
    p = Pool(2)
    out = p.torch("collective", [{"op": "all_reduce_sum", "x": np.full(3, r + 1.0)} for r in range(2)])
    j = p.jax("collective", {"op": "all_reduce_sum", "x": np.stack([np.full(3, r + 1.0) for r in range(2)])})
    print(p._store.port if p._store else 0, out[0].tolist(), j[1].tolist())
    p.close()
""")


def test_two_pools_started_at_once_do_not_collide(no_stray_children):
    procs = [subprocess.Popen([sys.executable, "-c", _SCRIPT], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for _, e in outs]
    ports = [o.split()[0] for o, _ in outs]
    assert ports[0] != ports[1]
    for o, _ in outs:
        assert "[3.0, 3.0, 3.0] [3.0, 3.0, 3.0]" in o


def test_the_kind_and_its_validation():
    pair = ddp_pair(4)
    assert isinstance(pair, CheckKind) and pair.family == "distributed" and pair.checks == ("grads", "train")
    assert pair.replace(checks=("train",)).checks == ("train",)
    with pytest.raises(ValueError, match="job 'all_reduce_prod'"):
        DistributedPair("x", "all_reduce_prod")
    with pytest.raises(ValueError, match="do not apply"):
        DistributedPair("x", "all_gather", checks=("grads",))
    with pytest.raises(ValueError, match="module:function"):
        ddp_pair(2, torch_job="nocolon")


def test_gpu_with_fewer_gpus_than_ranks_is_a_skip_with_the_reason():
    import torch

    if torch.cuda.device_count() >= 4:
        pytest.skip("this machine has 4 GPUs: nothing to skip")
    recs = ddp_pair(4).run_checks(dtype="float32", run=RunSettings(device="gpu"), known=lambda _id: None)
    assert [r.outcome for r in recs] == ["skipped", "skipped"]
    assert "needs 4 GPUs for NCCL ranks; torch sees" in recs[0].message
