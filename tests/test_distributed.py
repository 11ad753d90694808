"""Distributed checks on real process groups: a correct DDP / sharded-JAX pair and the collectives pass
at N = 2 and 4 (no false alarm), and each planted migration slip fails naming the side and the slip.

The pools for N = 2 and 4 are started once for the module (equivcheck.distributed.pool_for) and
closed at its end, when no worker may survive."""
from __future__ import annotations

import pytest

from equivcheck.distributed import COLLECTIVES, collective_pair, ddp_pair, fsdp_pair
from equivcheck.engine.records import RunSettings

RUN = RunSettings(examples=8, seed=3)


pytestmark = pytest.mark.usefixtures("pools_closed_at_the_end")  # tests/conftest.py


def _run(pair, dtype="float32"):
    return pair.run_checks(dtype=dtype, run=RUN, known=lambda _id: None)


@pytest.mark.parametrize("world", [2, 4])
def test_a_correct_pair_passes(world):
    pairs = [ddp_pair(world), fsdp_pair(world), *(collective_pair(op, world) for op in COLLECTIVES)]
    records = [r for p in pairs for r in _run(p)]
    assert [(r.pair, r.check, r.outcome) for r in records if r.outcome != "passed"] == []
    assert all(r.examples == RUN.examples for r in records)
    assert {r.check for r in records} == {"collective", "grads", "train"}


def test_float64_pairs_pass():
    records = _run(ddp_pair(2), "float64") + _run(collective_pair("reduce_scatter", 2), "float64")
    assert [r.outcome for r in records] == ["passed"] * 3


# (world, torch slips, jax slips, checks, the side named, words the diagnosis must hold)
PLANTED = [
    (2, {"grad_reduce": "sum"}, {}, ("grads",), "torch",
     "torch's gradient is 2x the full-batch gradient: summed, not averaged, over replicas"),
    (4, {}, {"grad_reduce": "sum"}, ("grads",), "jax",
     "jax's gradient is 4x the full-batch gradient: summed, not averaged, over replicas"),
    (2, {}, {"loss_reduce": "shard_mean_sum"}, ("grads",), "jax",
     "each shard's mean loss summed over ranks"),
    (4, {"lr_scale": 4}, {}, ("train",), "torch",
     ("torch's gradient matches the full-batch one but its first step is 4x the reference's: the learning rate is "
      "scaled by N=4 on this side")),
    (2, {}, {"lr_scale": 2}, ("train",), "jax", "the learning rate is scaled by N=2 on this side"),
    (2, {"shard_of": [0, 0]}, {}, ("grads",), "torch", "rank 1 reads the same shard as rank 0"),
    (4, {}, {"shard_of": [0, 1, 3, 3]}, ("grads",), "jax", "rank 2 reads the same shard as rank 3"),
    (2, {"grad_reduce": "sum"}, {"grad_reduce": "sum"}, ("grads",), "both", "torch's gradient is 2x"),
]


@pytest.mark.parametrize(("world", "torch_slips", "jax_slips", "checks", "side", "words"), PLANTED,
                         ids=[f"n{w}-{t or '-'}-{j or '-'}".replace(" ", "") for w, t, j, *_ in PLANTED])
def test_a_planted_slip_is_caught_and_named(world, torch_slips, jax_slips, checks, side, words):
    pair = ddp_pair(world, name="planted", checks=checks, torch_slips=torch_slips, jax_slips=jax_slips)
    [rec] = _run(pair)
    assert rec.outcome == "failed" and rec.kind == "values", rec.failure_text()
    assert rec.side == side, rec.failure_text()
    assert words in rec.diagnosis, rec.failure_text()
    assert "float64 reference" in rec.message and rec.replay == "" and rec.inputs


@pytest.mark.parametrize(("torch_slips", "jax_slips", "side", "words"), [
    ({"lr_scale": 2}, {}, "torch", "the learning rate is scaled by N=2 on this side"),
    ({}, {"shard_of": [1, 1]}, "jax", "rank 0 reads the same shard as rank 1"),
])
def test_a_planted_slip_under_fsdp_is_named(torch_slips, jax_slips, side, words):
    pair = fsdp_pair(2, name="planted", checks=("train",), torch_slips=torch_slips, jax_slips=jax_slips)
    [rec] = _run(pair)
    assert rec.outcome == "failed" and rec.side == side, rec.failure_text()
    assert words in rec.diagnosis, rec.failure_text()


def test_gradient_accumulation_with_no_sync():
    good = ddp_pair(2, name="accumulate", accumulate=2, rows=(2, 4))
    assert [r.outcome for r in _run(good)] == ["passed", "passed"]
    summed = good.replace(checks=("grads",), torch_slips={"accumulate_reduce": "sum"})
    [rec] = _run(summed.replace(world=4))
    assert rec.outcome == "failed" and rec.side == "torch", rec.failure_text()
    assert "torch's gradient is 2x the full-batch gradient: the 2 micro-batches' gradients summed" in rec.diagnosis
    [rec] = _run(good.replace(checks=("grads",), torch_slips={"no_sync_all": True}))
    assert rec.outcome == "failed" and rec.side == "torch", rec.failure_text()
    assert "torch ranks disagree" in rec.message and "no_sync around every micro-batch" in rec.diagnosis
    with pytest.raises(ValueError, match="multiples of accumulate=2"):
        ddp_pair(2, accumulate=2)  # rows (2, 3): 3 rows do not split into 2 equal micro-batches


def test_train_names_the_first_diverging_step():
    [rec] = _run(ddp_pair(2, name="planted", checks=("train",), torch_slips={"grad_reduce": "sum"}))
    assert rec.outcome == "failed" and rec.side == "torch"
    assert "parameters after step 1 of 3 (the first step that diverges" in rec.message
    assert "summed, not averaged, over replicas" in rec.diagnosis


def test_a_planted_collective_slip_names_the_side():
    # the torch side's mean computed as a sum (a "mean" all-reduce that forgot to divide by N)
    pair = collective_pair("all_reduce_mean", 2, torch_job="tests.distributed_probes:mean_without_divide")
    [rec] = _run(pair)
    assert rec.outcome == "failed" and rec.side == "torch", rec.failure_text()
    assert "all_reduce_mean over 2 ranks: torch is off the float64 reference" in rec.message
