"""Data pipelines: planted bugs in transforms and loaders must fail with the right diagnosis;
the order adapters must reproduce what each framework really does."""
from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from equivcheck import RunSettings, run_pair
from equivcheck import data as D
from equivcheck.data import vision as V
from equivcheck.engine.tolerance import lookup
from tests import preload  # noqa: F401 - frameworks loaded before pytester (tests/preload.py)
from tests.helpers import by_check

grain = pytest.importorskip("grain", reason="grain is not installed: pip install 'equivcheck[data]'")
SEED = 20261126


def records(n):
    return [{"index": i, "x": np.full(2, i, np.float32), "label": i % 3} for i in range(n)]


# ---------------------------------------------------------------- transforms (need torchvision)


@pytest.fixture(scope="module")
def tv_pairs():
    pytest.importorskip("torchvision", reason="torchvision is not installed: pip install 'equivcheck[vision]'")
    from suites.transform_pairs import PAIRS

    return {p.name: p for p in PAIRS}


def _floor_center_crop(x, size):
    """The off-by-one: floor((H - h) / 2) where torchvision rounds half to even."""
    h, w = x.shape[-2:]
    top, left = (h - size[0]) // 2, (w - size[1]) // 2
    return x[..., top:top + size[0], left:left + size[1]] if size[0] <= h and size[1] <= w else V.center_crop(x, size, jnp)


PLANTED = {  # suite pair: (bug name, wrong JAX side)
    "normalize": ("normalize_mean_std_swapped_bug", functools.partial(V.normalize, mean=(0.229, 0.224, 0.225),
                                                                      std=(0.485, 0.456, 0.406), xp=jnp)),
    "to_image_to_dtype": ("chw_hwc_confusion_bug", lambda x: V.to_dtype(
        x.reshape(x.shape[2], x.shape[0], x.shape[1]), np.float32, scale=True, xp=jnp)),
    "resize_bilinear": ("resize_antialias_mismatch_bug", functools.partial(V.resize, size=(6, 5), antialias=True, xp=jnp)),
    "center_crop": ("center_crop_off_by_one_bug", _floor_center_crop),
}


@pytest.mark.parametrize("good", list(PLANTED))
def test_planted_transform_bug_is_caught_and_blamed_on_jax(tv_pairs, good):
    name, wrong = PLANTED[good]
    bad = tv_pairs[good].replace(name=name, jax_fn=wrong)
    rec = by_check(run_pair(bad, dtype="float32", run=RunSettings(examples=60, seed=SEED)))["forward"]
    assert rec.outcome == "failed", rec
    assert rec.side == "jax" and "jax is off" in rec.diagnosis, rec.failure_text()
    assert "reference decides" in rec.diagnosis


@pytest.mark.parametrize("good", list(PLANTED))
def test_correct_transform_passes(tv_pairs, good):
    records_ = run_pair(tv_pairs[good], dtype="float32", run=RunSettings(examples=100, seed=SEED))
    assert [r.outcome for r in records_] == ["passed"], [r.failure_text() for r in records_]


def test_numpy_and_jax_sides_agree_on_torchvision_rules():
    tol = lookup("float32")
    x = np.arange(2 * 5 * 7, dtype=np.float32).reshape(2, 5, 7)
    # Python's round: (5 - 2) / 2 = 1.5 -> 2, (7 - 2) / 2 = 2.5 -> 2
    assert V.center_crop(x, (2, 2))[0, 0, 0] == x[0, 2, 2]
    assert V.output_size(3, 12, 5) == (5, 20) and V.output_size(3, 12, 5, max_size=8) == (2, 8)
    for mode in V.INTERPOLATIONS:
        for aa in (False, True):
            a = V.resize(x.astype(np.float64), (4, 9), mode, aa)
            b = np.asarray(V.resize(jnp.asarray(x), (4, 9), mode, aa, xp=jnp))
            np.testing.assert_allclose(a, b, rtol=tol.rtol, atol=tol.atol, err_msg=f"{mode} aa={aa}")
    with pytest.raises(ValueError, match="interpolation"):
        V.resize(x, (2, 2), "lanczos")
    with pytest.raises(TypeError, match="float image"):
        V.normalize(x.astype(np.uint8), [0], [1])


# ---------------------------------------------------------------- loaders


def test_shuffle_without_the_shared_permutation_is_named():
    ds = records(10)
    loader = DataLoader(ds, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(3))
    v = D.compare_epochs(D.torch_epochs(loader, 2), D.grain_epochs(ds, D.grain_shuffle_orders(10, 3, 2), 4, False))
    assert not v.ok and v.kind == "order", v
    assert v.epoch == 0 and v.batch == 0 and "the shuffles differ" in v.message and "explicit" in v.message


def test_drop_last_mismatch_is_named_with_the_side_that_keeps_it():
    ds = records(10)
    t = D.torch_epochs(DataLoader(ds, batch_size=4, drop_last=True), 1)
    v = D.compare_epochs(t, D.grain_epochs(ds, [np.arange(10)], 4, drop_remainder=False))
    assert not v.ok and v.kind == "batches" and v.side == "jax", v
    assert "jax keeps the last, partial batch of 2" in v.message and "drop_last" in v.message


def test_a_content_difference_names_field_and_row():
    ds = records(6)
    order = [np.arange(6)]
    jax_side = D.grain_epochs(ds, order, 4, False, transform=lambda r: {**r, "x": r["x"] * 2})
    v = D.compare_epochs(D.torch_epochs(DataLoader(ds, batch_size=4), 1), jax_side)
    assert not v.ok and v.kind == "values" and v.path == "out['x']", v
    assert "epoch 0, batch 0, out['x']" in v.message and "worst at row 3" in v.message and "6 of 8" in v.message


def test_a_batch_across_an_epoch_boundary_is_named():
    ds, orders = records(5), D.explicit_orders(5, 2, 1)
    torch_side = D.torch_epochs(DataLoader(ds, batch_size=2, sampler=D.EpochOrderSampler(orders)), 2)
    v = D.compare_epochs(torch_side, D.grain_loader_epochs(ds, orders, 2, False, per_epoch=False))
    assert not v.ok and v.kind == "batches" and "epoch boundaries differ" in v.message, v


def test_structure_and_dtype_differences_are_named():
    t = [[{"x": np.zeros((2, 3), np.float32), "y": np.zeros(2, np.int64)}]]
    assert D.compare_epochs(t, [[{"x": np.zeros((2, 3), np.float32)}]], index=None).kind == "structure"
    assert D.compare_epochs(t, [[{"x": np.zeros((2, 3), np.float64), "y": np.zeros(2, np.int64)}]],
                            index=None).kind == "dtype"
    assert D.compare_epochs(t, [], index=None).kind == "epochs"


@pytest.mark.parametrize("n, batch, drop", [(7, 3, False), (8, 4, True), (5, 2, True), (1, 1, False)])
def test_torch_shuffle_orders_reproduce_the_seeded_dataloader(n, batch, drop):
    loader = DataLoader(list(range(n)), batch_size=batch, drop_last=drop, shuffle=True,
                        generator=torch.Generator().manual_seed(11))
    seen = [np.concatenate([b.numpy() for b in loader]) for _ in range(3)]
    want = [o[:len(s)] for o, s in zip(D.torch_shuffle_orders(n, 11, 3), seen)]
    assert all(np.array_equal(a, b) for a, b in zip(seen, want)), (seen, want)


def test_grain_shuffle_orders_are_grains_index_sampler_orders():
    sampler = grain.samplers.IndexSampler(9, shuffle=True, seed=4, num_epochs=2)
    got = np.concatenate(D.grain_shuffle_orders(9, 4, 2))
    assert np.array_equal(got, [sampler[i].record_key for i in range(18)])


def test_epoch_order_sampler_refuses_a_pass_beyond_its_orders():
    loader = DataLoader(list(range(3)), batch_size=2, sampler=D.EpochOrderSampler([[2, 0, 1]]))
    assert [b.tolist() for b in loader] == [[2, 0], [1]]
    with pytest.raises(RuntimeError, match="holds 1 epochs"):
        list(loader)


def test_run_check_records_examples_failures_and_known_divergences():
    run = RunSettings(examples=25, seed=SEED)
    ok = D.run_check("always_same", lambda n: D.compare_epochs([[np.arange(n)]], [[np.arange(n)]], index=None),
                     st.integers(1, 1000), dtype="float32", run=run)
    assert ok.outcome == "passed" and ok.examples == 25 and ok.check == "forward"

    def body(n):
        return D.compare_epochs([[np.arange(n)]], [[np.arange(n) + (n > 3)]], index=None)

    bad = D.run_check("off_above_3", body, st.integers(0, 50), dtype="float32", run=run)
    assert bad.outcome == "failed" and bad.kind == "values", bad
    assert bad.inputs == "arg0: 4", bad.inputs  # shrunk to the smallest failing size
    known = D.run_check("off_above_3", body, st.integers(0, 50), dtype="float32", run=run,
                        known=lambda cid: ("off_above_3::forward", "planted") if cid.startswith("off_above_3") else None)
    assert known.outcome == "known-divergence" and known.known_reason == "planted"


# ---------------------------------------------------------------- plumbing: Ints(dtype), equiv.conclude


def test_ints_draw_raw_uint8_images_and_refuse_a_range_outside_their_dtype():
    from hypothesis import given, settings

    from equivcheck import Custom, Inputs, Ints

    inputs = Inputs(Custom(lambda rng: ((2, 3, 3),), ((1, 1, 3),)), (Ints(0, 255, dtype="uint8"),))
    assert inputs.placeholders("float32", ((2, 3, 3),))[0][0].dtype == np.uint8

    @settings(max_examples=20, database=None)
    @given(inputs.strategy("float32"))
    def draws(args):
        assert args[0].dtype == np.uint8

    draws()
    with pytest.raises(ValueError, match="not a range inside uint8"):
        Ints(0, 256, dtype="uint8")


LOADER_SUITE = """
import numpy as np
from hypothesis import strategies as st
from equivcheck import data as D

def body(n):
    return D.compare_epochs([[np.arange(n)]], [[np.arange(n) + (n > 2)]], index=None)

def test_loader(equiv):
    equiv.conclude([D.run_check("off_above_2", body, st.integers(0, 99), dtype=equiv.dtype, run=equiv.run,
                                known=equiv.known, nodeid=equiv.nodeid, replay=equiv.replay)])
"""


def test_conclude_files_records_and_fails_or_xfails_the_test(pytester):
    import json

    pytester.makepyfile(test_loader=LOADER_SUITE)
    fast = ("--equiv", "--equiv-examples", "10", "--equiv-seed", "1", "--equiv-dtypes", "float32", "-p",
            "no:cacheprovider")
    result = pytester.runpytest(*fast)
    result.assert_outcomes(failed=1)
    assert "off_above_2::forward::float32::cpu [precision highest] failed" in result.stdout.str()
    assert "minimal inputs: arg0: 3" in result.stdout.str() and "replay: pytest --equiv" in result.stdout.str()
    rec = json.loads((pytester.path / "reports" / "latest.json").read_text())["records"][0]
    assert rec["id"] == "off_above_2::forward::float32::cpu" and rec["outcome"] == "failed"
    (pytester.path / "known.txt").write_text("off_above_2::forward   planted\n")
    pytester.runpytest(*fast, "--equiv-known-divergences", "known.txt").assert_outcomes(xfailed=1)


def test_a_data_check_body_that_returns_no_verdict_is_named():
    check = D.DataCheck("returns_bool", lambda example, dtype: True, st.integers(0, 3))
    (rec,) = check.run_checks(dtype="float32", run=RunSettings(examples=3, seed=0))
    assert rec.outcome == "failed" and rec.kind == "error" and rec.side is None
    assert "the DataCheck body 'returns_bool' returned bool, not a DataVerdict" in rec.message


def test_a_data_check_body_that_raises_is_a_failed_record_naming_it():
    def body(n, dtype):
        if n > 1:
            raise ValueError(f"no batch {n}")
        return D.compare_epochs([[np.arange(3)]], [[np.arange(3)]], index=None)

    (rec,) = D.DataCheck("raises_above_1", body, st.integers(0, 9)).run_checks(
        dtype="float32", run=RunSettings(examples=20, seed=0))
    assert rec.outcome == "failed" and rec.kind == "error" and rec.side is None
    assert "the DataCheck body 'raises_above_1' raised ValueError: no batch 2 (" in rec.message
    assert "test_data.py" in rec.message and rec.inputs == "arg0: 2"
