"""The uneven last batch: torch's DistributedSampler(drop_last=False) pads a dataset N does not divide with
its first samples; the JAX port pads the same way; both are held to the float64 epoch on the padded
batches, and a port that drops the remainder or pads otherwise fails naming the side and what it did.
Real process groups (gloo) through the session's pools, closed at the module's end."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import find

from equivcheck.distributed import pool_for, uneven_pair
from equivcheck.distributed import reference as ref
from equivcheck.distributed import uneven as un
from equivcheck.engine.records import RunSettings
from equivcheck.engine.tolerance import lookup

RUN = RunSettings(examples=8, seed=5)


pytestmark = pytest.mark.usefixtures("pools_closed_at_the_end")  # tests/conftest.py


def _run(pair, dtype="float32"):
    return pair.run_checks(dtype=dtype, run=RUN, known=lambda _id: None)


@pytest.mark.parametrize("size", [1, 3, 4, 5, 7, 9, 12])
@pytest.mark.parametrize("world", [2, 4])
def test_the_restated_padding_is_torchs_own_sampler(size, world):
    from torch.utils.data.distributed import DistributedSampler

    for drop_last, policy in ((False, "pad"), (True, "drop")):
        got = [list(DistributedSampler(range(size), num_replicas=world, rank=r, shuffle=False, drop_last=drop_last))
               for r in range(world)]
        assert got == un.rank_indices(size, world, policy)


def test_torch_ranks_see_the_first_samples_again():
    params, x, y = un.dataset(uneven_pair(4), "float32", 0, 5)
    out = pool_for(4).torch("ddp_epoch", [{"params": params, "x": x, "y": y, "batch": 2}] * 4)
    assert [r["indices"].tolist() for r in out] == [[0, 4], [1, 0], [2, 1], [3, 2]]  # 0, 1, 2 padded in
    assert [r["steps"] for r in out] == [1] * 4


def test_hypothesis_draws_even_and_uneven_sizes():
    for world in (2, 4):
        strategy = un.strategy(uneven_pair(world))
        assert find(strategy, lambda d, w=world: d[2] % w == 0)[2] % world == 0
        assert find(strategy, lambda d, w=world: d[2] % w != 0)[2] % world != 0


@pytest.mark.parametrize("world", [2, 4])
def test_a_port_that_pads_as_torch_does_passes(world):
    [rec] = _run(uneven_pair(world, rows=(2, 3)))
    assert rec.outcome == "passed" and rec.examples == RUN.examples, rec.failure_text()


def test_float64_passes():
    [rec] = _run(uneven_pair(2), "float64")
    assert rec.outcome == "passed", rec.failure_text()


# (world, torch slips, jax slips, the side named, words the diagnosis must hold)
PLANTED = [
    (2, {}, {"remainder": "drop"}, "jax", ("torch's ranks see a padded batch (sample 0 repeated); the JAX side "
     "dropped the last 1 sample")),
    (4, {}, {"remainder": "drop"}, "jax", "the JAX side dropped the last"),
    (4, {}, {"remainder": "pad_last"}, "jax", "the JAX side padded with sample"),
    (4, {}, {"remainder": "mask"}, "jax", "the JAX side masked the"),
    (4, {"drop_last": True}, {}, "torch", "torch's ranks dropped the last"),
]


@pytest.mark.parametrize(("world", "torch_slips", "jax_slips", "side", "words"), PLANTED,
                         ids=[f"n{w}-{t or '-'}-{j or '-'}".replace(" ", "") for w, t, j, *_ in PLANTED])
def test_a_port_that_drops_or_pads_otherwise_is_caught_and_named(world, torch_slips, jax_slips, side, words):
    [rec] = _run(uneven_pair(world, name="planted", torch_slips=torch_slips, jax_slips=jax_slips))
    assert rec.outcome == "failed" and rec.kind == "values", rec.failure_text()
    assert rec.side == side, rec.failure_text()
    assert words in rec.diagnosis, rec.failure_text()
    assert "float64 reference" in rec.message and f"over {world} ranks" in rec.inputs
    size = int(rec.inputs.split("dataset of ")[1].split()[0])
    assert size % world, "a slip in the remainder shows only where N does not divide the dataset"


def test_the_reference_epoch_is_full_batch_sgd_where_nothing_is_padded():
    pair = uneven_pair(2)
    params, x, y = un.dataset(pair, "float64", 1, 8)
    got = un.epoch(params, x, y, 2, batch=4, lr=0.1)  # one step: the whole dataset
    assert got["steps"] == 1 and ref.close(got["params"], ref.sgd(params, x, y, 0.1, 1)[0],
                                           lookup("float64", check="train"))
    with pytest.raises(ValueError, match="no remainder policy 'wrap'"):
        un.rank_indices(5, 2, "wrap")


def test_padding_repeats_from_the_start_when_the_dataset_is_smaller_than_the_world():
    assert un.rank_indices(1, 4) == [[0], [0], [0], [0]]
    assert np.concatenate(un.rank_indices(6, 4)).tolist() == [0, 4, 1, 5, 2, 0, 3, 1]


def test_the_masked_reference_is_the_mean_over_the_real_samples_only():
    """D = 5 over N = 2 pads with sample 0 (positions 0..5, position 5 the padding); one step of 3 rows per
    rank: "mask" is the gradient over samples 0..4 once each, "pad" over 0..4 with sample 0 twice."""
    from equivcheck.distributed import reference as ref
    from equivcheck.distributed.uneven import epoch

    rng = np.random.default_rng(0)
    params = {"l1.weight": rng.normal(size=(4, 3)), "l1.bias": rng.normal(size=4),
              "l2.weight": rng.normal(size=(2, 4)), "l2.bias": rng.normal(size=2)}
    x, y = rng.normal(size=(5, 3)), rng.normal(size=(5, 2))
    masked = epoch(params, x, y, world=2, batch=3, lr=0.1, remainder="mask")["grads"]
    padded = epoch(params, x, y, world=2, batch=3, lr=0.1, remainder="pad")["grads"]
    for k, v in ref.grads(params, x, y).items():
        np.testing.assert_allclose(masked[k], v, rtol=1e-12)
    rows = [0, 2, 4, 1, 3, 0]
    for k, v in ref.grads(params, x[rows], y[rows]).items():
        np.testing.assert_allclose(padded[k], v, rtol=1e-12)
