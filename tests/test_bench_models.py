"""Benchmarks of model checks (`--equiv-bench` over a ModelPair, equivcheck.bench.models): forward,
grad and one train step on both sides, skipped with the reason where a side cannot be timed; and the
claims report's torch.compile rows."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tests import preload  # noqa: F401 - frameworks loaded before pytester (tests/preload.py)
from tests.test_bench import _bench, _write


@pytest.fixture(autouse=True)
def _not_an_xdist_worker(monkeypatch):
    """In-process pytest runs time benchmarks; inside an xdist worker pytest-benchmark is off."""
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)


MODELS = """
import pytest
from equivcheck.models.zoo import mlp_apply, mlp_pair

def picky(params, x, train=False):
    if x.shape[0] > 64:  # shapes are static under jit: a port written for batches up to 64
        raise ValueError("this port takes batches up to 64")
    return mlp_apply(params, x, train)

MODELS = [mlp_pair(checks=("forward", "grad", "train"), steps=2), mlp_pair("picky", picky, checks=("forward",))]

@pytest.mark.parametrize("pair", MODELS, ids=str)
def test_model(pair, equiv):
    equiv.check(pair)
"""
FAST = ("--equiv", "--equiv-examples", "2", "--equiv-seed", "1", "--equiv-dtypes", "float32", "-p", "no:cacheprovider",
        "--equiv-report", "none", "--equiv-bench", "--equiv-bench-threads", "1", "--benchmark-max-time", "0.01",
        "--benchmark-min-rounds", "3", "--benchmark-json", "b.json", "-rs")


def test_a_model_check_gets_torch_and_jax_benchmarks_of_forward_grad_and_train(pytester):
    pytester.makepyfile(test_models=MODELS)
    result = pytester.runpytest_subprocess(*FAST)
    # mlp: forward and grad at x1, x4, x16 and train, 2 sides each; picky: forward at three sizes
    result.assert_outcomes(passed=2 + 14 + 5, skipped=1)
    out = result.stdout.str()
    assert "picky@x16::forward::float32::cpu: not timed: the port does not trace and compile under jax.jit" in out
    assert "this port takes batches up to 64" in out
    data = json.loads((pytester.path / "b.json").read_text())
    by = {(b["group"], b["name"]): b["extra_info"] for b in data["benchmarks"]}
    for check in ("forward", "grad", "train"):
        group = f"mlp::{check}::float32::cpu"
        torch_info, jax_info = by[(group, "torch")], by[(group, "jax")]
        assert torch_info["family"] == jax_info["family"] == "models" and jax_info["domain"] == "other"
        assert torch_info["compile_seconds"] is None and jax_info["compile_seconds"] > 0
        assert torch_info["shapes"] == jax_info["shapes"] == [[[16, 10], "float32"], [[16, 1], "float32"]]
        assert jax_info["precision"] == "highest" and jax_info["threads"] == torch_info["threads"] == 1
        assert "the model's weights converted to the port by the pair's own mapping" in jax_info["rules"]
        assert "inputs on the device before timing; the same arrays on both sides" in torch_info["rules"]
    assert any("updated in place" in r for r in by[("mlp::train::float32::cpu", "torch")]["rules"])
    assert any("donated" in r for r in by[("mlp::train::float32::cpu", "jax")]["rules"])
    assert any(r.startswith("dropout in the train step") for r in by[("mlp::train::float32::cpu", "torch")]["rules"])
    assert by[("mlp@x16::grad::float32::cpu", "jax")]["shapes"][0] == [[256, 10], "float32"]
    assert ("mlp@x4::train::float32::cpu", "jax") not in by  # the sweep times forward and grad only


def _unjittable_pair():
    import jax

    from equivcheck.models.zoo import mlp_apply, mlp_pair

    def port(params, x, train=False):
        if float(jax.numpy.abs(x).sum()) > 0:  # a Python branch on a value: fine eagerly, not under jit
            return mlp_apply(params, x, train)
        return mlp_apply(params, -x, train)

    return mlp_pair("eager_only", port, checks=("forward", "grad"))


def test_a_port_that_does_not_jit_is_not_timed_and_says_why():
    from equivcheck.bench import draw_inputs
    from equivcheck.bench.models import NotTimed, build_model

    pair = _unjittable_pair()
    args = draw_inputs(pair, "float32")
    assert build_model(pair, "forward", "torch", args, "float32", "cpu").call() is not None  # torch is timed
    for check in ("forward", "grad"):
        with pytest.raises(NotTimed, match=r"does not trace and compile under jax.jit \(" + check +
                           r".*Concretization|TracerBool"):
            build_model(pair, check, "jax", args, "float32", "cpu")
    with pytest.raises(NotTimed, match="torch.compile of a whole optimizer step is not timed"):
        build_model(pair, "train", "torch.compile", args, "float32", "cpu")


def test_one_train_step_updates_torch_in_place_and_carries_jax_on():
    import jax

    from equivcheck.bench import draw_inputs
    from equivcheck.bench.models import build_model, scaled_batch
    from equivcheck.models.zoo import cnn_pair

    pair = cnn_pair(steps=2)
    args = draw_inputs(pair, "float32")
    jax_wl = build_model(pair, "train", "jax", args, "float32", "cpu")
    before = [np.asarray(a).copy() for a in jax.tree_util.tree_leaves(jax_wl.call()[0])]
    after = jax.tree_util.tree_leaves(jax_wl.call()[0])  # the next step starts where the last one ended
    assert not all(np.array_equal(a, b) for a, b in zip(before, after))
    torch_wl = build_model(pair, "train", "torch", args, "float32", "cpu")
    first, second = (float(torch_wl.call().detach()) for _ in range(2))
    assert first != second and torch_wl.compile_seconds is None  # the same batch after one step in place
    big = scaled_batch(args, 4)
    assert [a.shape[0] for a in big] == [4 * args[0].shape[0]] * 2
    assert np.shape(build_model(pair, "forward", "jax", big, "float32", "cpu").call()[0])[0] == big[0].shape[0]


def test_claims_show_torch_compile_beside_eager_and_label_the_evidence(tmp_path):
    from equivcheck.bench import claim_rows, load, render
    from equivcheck.bench.claims import _sections

    benches = []
    for pair, eager, compiled, jax in (("conv", 4e-3, 1e-3, 2e-3), ("pool", 4e-3, 1e-3, 2e-3),
                                       ("mm", 4e-3, 1e-3, 2e-3), ("gelu", 4e-3, None, 2e-3)):
        benches += [_bench(pair, "forward", "torch", eager), _bench(pair, "forward", "jax", jax)]
        if compiled is not None:
            benches.append(_bench(pair, "forward", "torch.compile", compiled))
            benches[-1]["extra_info"]["compile_seconds"] = 3.5
    text = render(load([_write(tmp_path, "c.json", benches)]))
    lines = text.splitlines()
    row = lines.index(next(ln for ln in lines if ln.startswith("conv::forward::float32::cpu")))
    assert lines[row + 1].split() == ["torch.compile", "1.000", "ms", "0.50x", "0.45-0.55", "3500", "ms", "1.00x"]
    assert not lines[lines.index(next(ln for ln in lines if ln.startswith("gelu::"))) + 1].strip().startswith("torch.")
    assert "* JAX is faster [evidence: torch eager vs JAX]: supported" in text
    assert "* JAX is faster [evidence: torch.compile vs JAX]: contradicted" in text
    assert max(len(line) for line in lines) <= 120
    (groups,) = _sections(load([_write(tmp_path, "c.json", benches)])).values()
    compiled = {claim: (verdict, pro) for claim, verdict, pro, _ in claim_rows(groups, "torch.compile")}
    assert compiled["JAX is faster"][0].startswith("contradicted; geomean torch.compile/JAX 0.5x steady state")
    assert compiled["JAX is faster"][1] == "0/3 groups JAX faster, steady state: none"
    assert text.index("faster [evidence: torch eager") < text.index("faster [evidence: torch.compile") < text.index(
        "memory [evidence: torch eager")  # each claim on both kinds of evidence, one after the other
