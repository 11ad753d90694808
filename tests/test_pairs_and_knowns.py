"""The declarative records: Pair validation, the Registry, known-divergence files."""
from __future__ import annotations

import jax.numpy as jnp
import pytest
import torch

from equivcheck import Convention, Floats, Inputs, Ints, KnownDivergences, Pair, Registry, Same, Tolerance, unary


def pair(**kw):
    base = dict(name="exp", torch_fn=torch.exp, jax_fn=jnp.exp, inputs=unary())
    return Pair(**(base | kw))


@pytest.mark.parametrize("kw, message", [
    (dict(name="has space"), "use letters, digits"),
    (dict(torch_fn=1), "torch_fn must be callable"),
    (dict(inputs="x"), "inputs must be an equivcheck.ops.strategies.Inputs"),
    (dict(checks=("forward", "hessian")), "not among"),
    (dict(dtypes=("float8",)), "not among"),
    (dict(diff_args=(3,)), "inputs draw 1 arguments"),
    (dict(diff_args=(), checks=("vjp",)), "derivative checks need diff_args"),
    (dict(tolerance=Tolerance(1e-3, 1e-3)), "must state its reason"),
    (dict(tolerance={"float32": Tolerance(1e-3, 1e-3)}), "must state its reason"),
    (dict(tolerance=Tolerance(1e-3, 1e-3, "   ")), "must state its reason"),
    (dict(tolerance={"float32": Tolerance(1e-3, 1e-3, "\t\n")}), "must state its reason"),
    (dict(arg_names=("a", "b")), "arg_names needs 1 distinct names"),
    (dict(tolerance={"float32/grad": Tolerance(1e-3, 1e-3, "r")}), "use a dtype, a check or 'dtype/check'"),
    (dict(conventions=(Convention("c", lambda x: x == 0, 0, 1, "doc", arg=1),)), "not differentiable"),
])
def test_pair_refuses_bad_declarations(kw, message):
    with pytest.raises((ValueError, TypeError), match=message):
        pair(**kw)


def test_pair_accepts_a_string_tag_and_copies_with_replace():
    p = pair(tags="matmul")
    assert p.tags == frozenset({"matmul"}) and str(p) == "exp"
    q = p.replace(name="exp2")
    assert q.name == "exp2" and q.torch_fn is p.torch_fn


def test_tolerance_overrides_pick_the_most_specific_key():
    a, b, c = (Tolerance(x, x, "r") for x in (1.0, 2.0, 3.0))
    p = pair(tolerance={"float32/vjp": a, "float32": b, "hvp": c})
    assert p.tolerance_for("float32", "vjp") is a and p.tolerance_for("float32", "jvp") is b
    assert p.tolerance_for("float64", "hvp") is c and p.tolerance_for("float64", "vjp") is None


def test_gradient_keys_follow_argument_names():
    p = Pair("lin", torch.mul, jnp.multiply, Inputs(Same(n=2), (Floats(), Floats())), diff_args=(0, 1),
             arg_names=("input", "weight"))
    assert p.grad_path(1) == "out['weight']" and p.grad_index("out['weight']") == 1
    assert pair().grad_path(0) == "out[0]"


def test_registry_refuses_duplicates_and_selects_by_tag():
    a, b = pair(), pair(name="log", torch_fn=torch.log, jax_fn=jnp.log, tags={"elementwise"})
    reg = Registry([a, b])
    reg.register(a)  # the same record twice is fine
    with pytest.raises(ValueError, match="duplicate pair name 'exp'"):
        reg.register(pair())
    assert reg.names() == ["exp", "log"] and reg["log"] is b and "exp" in reg
    assert reg.select(tags=["elementwise"]) == [b]
    with pytest.raises(KeyError, match="no pair named 'tan'"):
        reg["tan"]
    with pytest.raises(TypeError):
        reg.register("exp")


def test_diff_args_must_be_floating(tmp_path):
    from equivcheck import RunSettings, run_pair

    p = Pair("bad_diff", lambda x, n: x * n, lambda x, n: x * n, Inputs(Same(n=2), (Floats(), Ints())), diff_args=(1,))
    with pytest.raises(TypeError, match="diff_args names argument 1, which is drawn as int64"):
        run_pair(p, dtype="float32", run=RunSettings(examples=2))


def write(tmp_path, text):
    path = tmp_path / "known.txt"
    path.write_text(text)
    return str(path)


def test_known_divergences_match_check_ids_and_node_ids(tmp_path):
    known = KnownDivergences.load([write(tmp_path, """
# a comment
abs::vjp          abs'(0) differs (jax-ml/jax#37820)   # trailing comment
gelu::*::*::gpu   TF32
suites/test_x.py::test_a[b-*]   node pattern with brackets
""")])
    assert len(known) == 3
    assert known.match_check("abs::vjp::float32::cpu") == ("abs::vjp", "abs'(0) differs (jax-ml/jax#37820)")
    assert known.match_check("abs::jvp::float32::cpu") is None
    assert known.match_check("gelu::forward::float64::gpu")[0] == "gelu::*::*::gpu"
    assert known.match_check("gelu::forward::float64::cpu") is None
    assert known.match_node("suites/test_x.py::test_a[b-float32]")[1] == "node pattern with brackets"
    assert known.match_node("suites/test_x.py::test_ab") is None
    assert [e.pattern for e in known.unmatched({"abs::vjp"})] == ["gelu::*::*::gpu", "suites/test_x.py::test_a[b-*]"]
    # A check of a test sees both forms, the file's first matching entry winning.
    assert known.match("b::forward::float32::cpu", "suites/test_x.py::test_a[b-float32]")[0] == "suites/test_x.py::test_a[b-*]"
    assert known.match("abs::vjp::float32::cpu", "suites/test_x.py::test_a[b-float32]")[0] == "abs::vjp"
    assert known.match("b::forward::float32::cpu", "suites/test_x.py::test_c") is None


@pytest.mark.parametrize("text, message", [
    ("abs::vjp\n", "known.txt:1: 'abs::vjp' has no reason"),
    ("a::b::c::d::e reason\n", "at most four parts"),
])
def test_known_divergence_file_errors_name_the_line(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        KnownDivergences.load([write(tmp_path, text)])


def test_a_tab_or_any_white_space_separates_pattern_and_reason(tmp_path):
    known = KnownDivergences.load([write(tmp_path, "abs::vjp\tabs'(0) differs\ntanh::hvp \t  near saturation\n")])
    assert known.match_check("abs::vjp::float32::cpu") == ("abs::vjp", "abs'(0) differs")
    assert known.match_check("tanh::hvp::float64::cpu") == ("tanh::hvp", "near saturation")


def test_a_file_that_is_not_utf8_is_named_with_its_line(tmp_path):
    path = tmp_path / "known.txt"
    path.write_bytes(b"abs::vjp  fine\n# caf\xe9 in Latin-1\n")
    with pytest.raises(ValueError, match=r"known.txt:2: not UTF-8 text \(byte 0xe9"):
        KnownDivergences.load([str(path)])


def test_missing_known_divergence_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="known-divergences file .*nope.txt"):
        KnownDivergences.load([str(tmp_path / "nope.txt")])
