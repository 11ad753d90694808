"""Bad input from users' pairs: each becomes a failing check that names the side and the
cause; the rest of the run goes on and reaches the report."""
from __future__ import annotations

import json

import pytest

from tests import preload  # noqa: F401 - frameworks loaded before pytester (tests/preload.py)

BAD = """
import numpy as np, pytest, torch, jax.numpy as jnp
import equivcheck as ec

def raises(x):
    raise ValueError("user code broke")

def bad_sampler(rng):
    raise RuntimeError("strategy broke")

PAIRS = [
    ec.Pair("good", torch.tanh, jnp.tanh, ec.unary()),
    ec.Pair("torch_raises", raises, jnp.tanh, ec.unary()),
    ec.Pair("jax_raises", torch.tanh, raises, ec.unary()),
    ec.Pair("other_shape", torch.tanh, lambda x: jnp.tanh(x)[None], ec.unary(), checks=("forward",)),
    ec.Pair("other_dtype", torch.tanh, lambda x: jnp.tanh(x).astype(jnp.float16), ec.unary(), checks=("forward",)),
    ec.Pair("other_tree", lambda x: (torch.tanh(x), x), jnp.tanh, ec.unary(), checks=("forward",)),
    ec.Pair("nan_on_jax", torch.tanh, lambda x: jnp.where(x > 1, jnp.nan, jnp.tanh(x)), ec.unary(ec.Floats(special=(2.0,))),
            checks=("forward",)),
    ec.Pair("returns_none", lambda x: None, jnp.tanh, ec.unary(), checks=("forward",)),
    ec.Pair("jax_item", torch.tanh, lambda x: float(jnp.tanh(x).sum()) + x, ec.unary(), checks=("forward",)),
    ec.Pair("bad_strategy", torch.tanh, jnp.tanh, ec.Inputs(ec.Custom(bad_sampler, ((2,),)), (ec.Floats(),))),
]

@pytest.mark.parametrize("pair", PAIRS, ids=str)
def test_pair(pair, equiv):
    equiv.check(pair)
"""


def run(pytester):
    pytester.makepyfile(test_bad=BAD)
    result = pytester.runpytest("--equiv", "--equiv-examples", "10", "--equiv-seed", "2", "--equiv-dtypes", "float32",
                                "-p", "no:cacheprovider")
    records = json.loads((pytester.path / "reports" / "latest.json").read_text())["records"]
    return result, {r["id"]: r for r in records}


def test_each_bad_pair_fails_with_its_side_and_cause_and_the_run_goes_on(pytester):
    result, rec = run(pytester)
    out = result.stdout.str()
    result.assert_outcomes(passed=1, failed=9, errors=0)
    assert rec["good::hvp::float32::cpu"]["outcome"] == "passed"

    torch_raises = rec["torch_raises::forward::float32::cpu"]
    assert torch_raises["outcome"] == "failed" and torch_raises["side"] == "torch"
    assert "the torch side raised ValueError in forward: user code broke" in torch_raises["message"]
    assert "test_bad.py" in torch_raises["message"]  # where in the user's code

    jax_raises = rec["jax_raises::vjp::float32::cpu"]
    assert jax_raises["side"] == "jax" and "the jax side raised ValueError in vjp" in jax_raises["message"]

    assert "shape differs: torch" in rec["other_shape::forward::float32::cpu"]["message"]
    other_dtype = rec["other_dtype::forward::float32::cpu"]
    assert "dtype differs: torch float32, jax float16" in other_dtype["message"]
    assert other_dtype["side"] == "jax" and "jax returns float16 at out where the inputs" in other_dtype["diagnosis"]
    assert "tree structure differs" in rec["other_tree::forward::float32::cpu"]["message"]
    none = rec["returns_none::forward::float32::cpu"]
    assert none["side"] == "torch" and "the torch side returned None" in none["diagnosis"], none
    item = rec["jax_item::forward::float32::cpu"]
    assert item["side"] == "jax" and "the jax side runs traced" in item["message"], item
    nan = rec["nan_on_jax::forward::float32::cpu"]
    assert nan["side"] == "jax" and "jax gives NaN" in nan["message"]
    assert "bad_strategy" in out and "strategy broke" in out  # a broken strategy is that test's failure


def test_a_failing_check_does_not_hide_the_others_of_its_pair(pytester):
    _, rec = run(pytester)
    # jax_raises fails every check; each is reported on its own.
    assert {rec[f"jax_raises::{c}::float32::cpu"]["outcome"] for c in ("forward", "vjp", "jvp", "hvp")} == {"failed"}


USER_FUNCTIONS = """
import pytest, torch, jax.numpy as jnp
from hypothesis import strategies as st
import equivcheck as ec

def body(n, dtype):
    raise ValueError(f"body broke at {n}")

CHECKS = [
    ec.Pair("good", torch.tanh, jnp.tanh, ec.unary()),
    ec.DataCheck("raising_body", body, st.integers(0, 9)),
    ec.DataCheck("no_verdict", lambda n, dtype: True, st.integers(0, 9)),
    ec.Pair("rule_gives_int", torch.tanh, jnp.tanh, ec.Inputs(ec.Custom(lambda rng: 5, ((2,),)), (ec.Floats(),))),
    ec.Pair("rule_gives_two", torch.tanh, jnp.tanh,
            ec.Inputs(ec.Custom(lambda rng: ((2,), (3,)), ((2,),)), (ec.Floats(),))),
    ec.Pair("rule_gives_negative", torch.tanh, jnp.tanh,
            ec.Inputs(ec.Custom(lambda rng: ((-2,),), ((2,),)), (ec.Floats(),))),
]

@pytest.mark.parametrize("kind", CHECKS, ids=str)
def test_kind(kind, equiv):
    equiv.check(kind)
"""


@pytest.mark.parametrize("shapes", ["4", "0"])  # a palette drawn before the search, or shapes drawn in it
def test_a_raising_data_body_or_a_garbage_shape_rule_is_a_failed_record_naming_it(pytester, shapes):
    pytester.makepyfile(test_user=USER_FUNCTIONS)
    result = pytester.runpytest("--equiv", "--equiv-examples", "5", "--equiv-seed", "2", "--equiv-dtypes",
                                "float32", "--equiv-shapes", shapes, "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=5, errors=0)
    assert "Traceback" not in result.stdout.str()
    rec = {r["id"]: r for r in json.loads((pytester.path / "reports" / "latest.json").read_text())["records"]}
    assert rec["good::hvp::float32::cpu"]["outcome"] == "passed"  # the run went on
    body = rec["raising_body::forward::float32::cpu"]
    assert body["outcome"] == "failed" and body["kind"] == "error" and body["side"] is None
    assert "the DataCheck body 'raising_body' raised ValueError: body broke at 0 (" in body["message"]
    assert "test_user.py" in body["message"] and body["inputs"] == "arg0: 0"  # where, and shrunk
    assert ("the DataCheck body 'no_verdict' returned bool, not a DataVerdict"
            in rec["no_verdict::forward::float32::cpu"]["message"])
    garbage = {"rule_gives_int": "returned 5, which is not a tuple of 1 shape",
               "rule_gives_two": "returned ((2,), (3,)), which is not a tuple of 1 shape",
               "rule_gives_negative": "returned ((-2,),), which is not a tuple of 1 shape"}
    for name, said in garbage.items():
        for check in ("forward", "vjp", "jvp", "hvp"):
            r = rec[f"{name}::{check}::float32::cpu"]
            assert r["outcome"] == "failed" and r["kind"] == "error" and r["side"] is None, r
            assert r["message"].startswith(f"the shape rule of pair '{name}' {said}"), r["message"]
