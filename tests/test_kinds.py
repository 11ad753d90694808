"""One interface for every kind of check: the built-in kinds implement CheckKind, `equiv.check`
and the precompile hook call nothing else, and a user's own kind (the README's) runs the same way."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from equivcheck import CheckKind, DataCheck, Pair, Registry, unary
from equivcheck.models import ModelPair
from equivcheck.optim import OptimizerPair
from tests import preload  # noqa: F401 - frameworks loaded before pytester (tests/preload.py)

FAST = ("--equiv", "--equiv-examples", "5", "--equiv-seed", "1", "--equiv-dtypes", "float32", "-p",
        "no:cacheprovider")
README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_kind() -> str:
    """The README's own-kind example, as the README prints it."""
    text = README.read_text()
    section = text[text.index("### Your own kind of check"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_every_built_in_kind_implements_the_protocol():
    for kind in (Pair, OptimizerPair, ModelPair, DataCheck):
        for member in ("replace", "prepare", "run_checks", "all_checks"):
            assert hasattr(kind, member), (kind.__name__, member)
    import jax.numpy as jnp
    import torch
    from hypothesis import strategies as st

    assert isinstance(Pair("tanh", torch.tanh, jnp.tanh, unary()), CheckKind)
    assert isinstance(DataCheck("d", lambda ex, dtype: None, st.integers()), CheckKind)
    assert not isinstance(object(), CheckKind)


def test_a_registry_holds_any_kind_and_refuses_other_objects():
    from hypothesis import strategies as st

    reg = Registry([DataCheck("d", lambda ex, dtype: None, st.integers())])
    assert reg.names() == ["d"]
    with pytest.raises(TypeError, match="CheckKind"):
        reg.register("not a record")


def test_equiv_check_refuses_a_non_kind_naming_what_it_lacks(pytester):
    pytester.makepyfile(test_bad="""
        def test_bad(equiv):
            equiv.check(object())
    """)
    result = pytester.runpytest(*FAST)
    result.assert_outcomes(failed=1)
    assert "lacks name, dtypes, checks, all_checks, replace, prepare, run_checks" in result.stdout.str()


def test_a_users_own_kind_from_the_readme_runs_reports_and_fails(pytester):
    pytester.makepyfile(test_own=_readme_kind() + """
import pytest

KINDS = [SameCount("same", lambda: 3, lambda: 3), SameCount("differs", lambda: 3, lambda: 4)]

@pytest.mark.parametrize("kind", KINDS, ids=str)
def test_kind(kind, equiv):
    equiv.check(kind)

def test_subset(equiv):
    equiv.check(KINDS[0], checks=["forward"])
""")
    result = pytester.runpytest(*FAST)
    result.assert_outcomes(passed=2, failed=1)
    assert "differs::forward::float32::cpu [precision highest] failed: counts differ" in result.stdout.str()
    assert "replay: pytest --equiv" in result.stdout.str()
    records = json.loads((pytester.path / "reports" / "latest.json").read_text())["records"]
    assert {(r["pair"], r["outcome"]) for r in records} == {("same", "passed"), ("differs", "failed")}
    assert {r["family"] for r in records} == {"other"}  # no `family` attribute: the report's "other" section


def test_a_data_check_runs_through_equiv_check_and_a_dtype_it_does_not_declare_is_skipped(pytester):
    pytester.makepyfile(test_data_kind="""
import numpy as np, pytest
from hypothesis import strategies as st
from equivcheck.data import DataCheck, compare_epochs

def body(n, dtype):
    return compare_epochs([[np.arange(n)]], [[np.arange(n) + (n > 2)]], index=None)

CHECK = DataCheck("off_above_2", body, st.integers(0, 99), dtypes=("float32",))

def test_data(equiv):
    equiv.check(CHECK)
""")
    result = pytester.runpytest(*FAST[:-3], "float32,float64", "-p", "no:cacheprovider", "-rs")
    result.assert_outcomes(failed=1, skipped=1)
    assert "minimal inputs: arg0: 3" in result.stdout.str()
    assert "off_above_2 declares dtypes float32; not float64" in result.stdout.str()


def test_the_precompile_hook_calls_prepare_on_the_next_kind(pytester):
    pytester.makepyfile(test_prep=_readme_kind() + """
import pytest

PREPARED = []

class Recorded(SameCount):
    def prepare(self, dtype, run):
        PREPARED.append((self.name, dtype, run.device))

    def run_checks(self, **kw):
        # the hook prepares the *next* test's kind as this one starts: "b" before "a" runs, and
        # nothing prepares "a", the first
        seen = dataclasses.replace(self, torch_fn=lambda: PREPARED, jax_fn=lambda: [("b", "float32", "cpu")])
        return SameCount.run_checks(seen, **kw)

KINDS = [Recorded("a", None, None), Recorded("b", None, None)]

@pytest.mark.parametrize("kind", KINDS, ids=str)
def test_kind(kind, equiv):
    equiv.check(kind)
""")
    pytester.runpytest(*FAST).assert_outcomes(passed=2)


def test_each_kind_names_its_report_section_and_a_pair_refuses_an_unknown_one():
    import jax.numpy as jnp
    import torch
    from hypothesis import strategies as st

    from equivcheck.engine.kind import FAMILIES, family_of

    assert [family_of(k) for k in (OptimizerPair, ModelPair, DataCheck("d", lambda ex, dtype: None, st.integers()))] \
        == ["optimizers", "models", "data"]
    assert family_of(Pair("tanh", torch.tanh, jnp.tanh, unary())) == "operations"
    assert family_of(Pair("tanh", torch.tanh, jnp.tanh, unary(), family="layers")) == "layers"
    assert family_of(object()) == "other" and "other" in FAMILIES  # a user's kind without one
    with pytest.raises(ValueError, match="family 'layer' is not one of operations, layers"):
        Pair("tanh", torch.tanh, jnp.tanh, unary(), family="layer")
