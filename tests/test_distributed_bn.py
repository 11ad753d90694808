"""BatchNorm under data parallelism: torch's plain BatchNorm1d under DDP (per-replica statistics, rank 0's
running statistics broadcast at every forward) against the JAX port's hand-written norm in shard_map, and
the JAX port's synced choice (axis_name: pmean-ed statistics) against the float64 reference of
global-batch statistics where torch's SyncBatchNorm cannot run (CPU). Correct ports pass at N = 2 and 4;
each planted slip fails naming the side and the slip. Real process groups (gloo), closed at the end."""
from __future__ import annotations

import numpy as np
import pytest

from equivcheck.distributed import WorkerFailure, bn_pair, ddp_pair, pool_for
from equivcheck.distributed import batchnorm as bn
from equivcheck.distributed import reference as ref
from equivcheck.engine.records import RunSettings
from equivcheck.engine.tolerance import lookup

RUN = RunSettings(examples=8, seed=7)


pytestmark = pytest.mark.usefixtures("pools_closed_at_the_end")  # tests/conftest.py


def _run(pair, dtype="float32"):
    return pair.run_checks(dtype=dtype, run=RUN, known=lambda _id: None)


def test_the_reference_is_torchs_batchnorm_on_one_process():
    """world=1: the hand-written float64 forward, backward and running statistics against torch's own
    BatchNorm1d in float64 (one SGD step, then the buffers)."""
    import torch

    params, x, y = bn.example_params(bn_pair(2), "float64", 3, 4)
    want = bn.train(params, x, y, world=1, lr=0.1, steps=1, sync=False)
    d, h, o = params["l1.weight"].shape[1], params["l1.weight"].shape[0], params["l2.weight"].shape[0]
    net = torch.nn.Sequential(torch.nn.Linear(d, h), torch.nn.BatchNorm1d(h), torch.nn.Tanh(),
                              torch.nn.Linear(h, o)).double()
    with torch.no_grad():
        for k, p in zip(bn.BN_NAMES, net.parameters()):
            p.copy_(torch.from_numpy(params[k]))
    out = net(torch.from_numpy(x))
    torch.nn.functional.mse_loss(out, torch.from_numpy(y)).backward()
    tol = lookup("float64", check="grads")
    assert ref.close(out.detach().numpy(), want["out"], tol)
    assert ref.close({k: p.grad.numpy() for k, p in zip(bn.BN_NAMES, net.parameters())}, want["grads"], tol)
    assert ref.close({"m": net[1].running_mean.numpy(), "v": net[1].running_var.numpy()},
                     {"m": want["running_mean"][0], "v": want["running_var"][0]}, tol)


def test_synced_statistics_are_the_single_process_full_batch_ones():
    params, x, y = bn.example_params(bn_pair(4), "float64", 4, 4)
    synced = bn.train(params, x, y, world=4, lr=0.1, steps=2, sync=True)
    whole = bn.train(params, x, y, world=1, lr=0.1, steps=2, sync=False)
    tol = lookup("float64", check="train")
    for key in ("out", "grads", "params"):
        assert ref.close(synced[key], whole[key], tol), key
    assert ref.close(synced["running_mean"], np.repeat(whole["running_mean"], 4, 0), tol)
    apart = bn.train(params, x, y, world=4, lr=0.1, steps=2, sync=False)
    assert not ref.close(apart["out"], whole["out"], tol)  # per-replica statistics do differ


@pytest.mark.parametrize("world", [2, 4])
def test_per_replica_batchnorm_under_ddp_and_the_port_agree(world):
    [rec] = _run(bn_pair(world))
    assert rec.check == "bn" and rec.outcome == "passed" and rec.examples == RUN.examples, rec.failure_text()


@pytest.mark.parametrize("world", [2, 4])
def test_synced_torch_side_is_a_skip_on_cpu_and_the_synced_port_is_checked(world):
    skip, port = _run(bn_pair(world, sync=True))
    assert (skip.check, skip.outcome) == ("bn", "skipped") and "SyncBatchNorm refuses CPU" in skip.message
    assert port.check == "bn_port" and port.outcome == "passed" and port.examples == RUN.examples, port.failure_text()


def test_float64_passes():
    records = _run(bn_pair(2), "float64") + _run(bn_pair(2, sync=True, checks=("bn_port",)), "float64")
    assert [r.outcome for r in records] == ["passed", "passed"], [r.failure_text() for r in records]


# (world, sync, torch slips, jax slips, check, the side named, words the diagnosis must hold)
PLANTED = [
    (2, False, {}, {"sync": True}, "bn", "jax", "BatchNorm statistics synchronised where the other side does not"),
    (4, True, {}, {"sync": False}, "bn_port", "jax", ("BatchNorm statistics not synchronised where the other side "
     "syncs: jax normalises each replica by its own shard's statistics, torch's SyncBatchNorm")),
    (4, False, {}, {"carry": "mean"}, "bn", "jax", ("jax's running statistics are averaged over the replicas each "
     "step; DDP broadcasts rank 0's")),
    (2, False, {}, {"carry": 1}, "bn", "jax", "jax carries rank 1's running statistics into the next step"),
    (4, False, {}, {"carry": 3}, "bn", "jax", "jax carries rank 3's running statistics"),
    (2, False, {}, {"momentum": 0.1}, "bn", "jax", ("flax's momentum set to 0.1 (torch's number; flax's convention "
     "needs 0.9), a momentum slip")),
    (4, False, {"momentum": 0.9}, {}, "bn", "torch", "torch's momentum set to 0.9 (flax's number for torch's 0.1)"),
    (2, False, {"broadcast_buffers": False}, {}, "bn", "torch", "torch's ranks each keep their own running statistics"),
    (4, True, {}, {"momentum": 0.1}, "bn_port", "jax", "a momentum slip"),
]


@pytest.mark.parametrize(("world", "sync", "torch_slips", "jax_slips", "check", "side", "words"), PLANTED,
                         ids=[f"n{w}-{'sync' if s else 'local'}-{t or '-'}-{j or '-'}".replace(" ", "")
                              for w, s, t, j, *_ in PLANTED])
def test_a_planted_batchnorm_slip_is_caught_and_named(world, sync, torch_slips, jax_slips, check, side, words):
    pair = bn_pair(world, sync=sync, name="planted", checks=(check,), torch_slips=torch_slips, jax_slips=jax_slips)
    [rec] = _run(pair)
    assert rec.outcome == "failed" and rec.kind == "values", rec.failure_text()
    assert rec.side == side, rec.failure_text()
    assert words in rec.diagnosis, rec.failure_text()
    assert "float64 reference" in rec.message


def test_the_pair_and_its_validation():
    assert bn_pair(2).checks == ("bn",) and bn_pair(2, sync=True).checks == ("bn", "bn_port")
    assert bn_pair(4, sync=True).name == "syncbn_mlp_n4"
    with pytest.raises(ValueError, match="sync=True applies to job 'bn_mlp' only"):
        ddp_pair(2, sync=True)
    with pytest.raises(ValueError, match="do not apply"):
        bn_pair(2, checks=("grads",))


def test_syncbatchnorm_refuses_cpu_in_this_torch():
    """Why a synced pair's "bn" check is a skip on CPU, shown on the real ranks (the pool is then torn down)."""
    params, x, y = bn.example_params(bn_pair(2), "float32", 0, 4)
    with pytest.raises(WorkerFailure, match="SyncBatchNorm layers only work with GPU modules"):
        pool_for(2).torch("ddp_bn", [{"params": params, "x": x, "y": y, "sync": True}] * 2)


def test_on_gpus_a_synced_pair_needs_n_gpus_and_says_so():
    """The SyncBatchNorm path runs only on N GPUs (NCCL); with fewer both checks are skips naming why."""
    import torch

    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has 2 GPUs: the synced pair would run here")
    recs = bn_pair(2, sync=True).run_checks(dtype="float32", run=RunSettings(device="gpu"), known=lambda _id: None)
    assert [(r.check, r.outcome) for r in recs] == [("bn", "skipped"), ("bn_port", "skipped")]
    assert "needs 2 GPUs for NCCL ranks" in recs[0].message
