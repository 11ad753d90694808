"""ONNX per layer: a model's modules found in the exported graph (torch vs ONNX Runtime vs the port's
taps, the first layer where ONNX leaves torch named), and the layer pairs' own `onnx` check (torch
function vs ONNX Runtime vs JAX, a layer that does not export skipped as not exportable). CPU only."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="pip install equivcheck[onnx]")
pytest.importorskip("onnxscript", reason="pip install equivcheck[onnx]")

import onnx
import torch
from onnx import numpy_helper

from equivcheck import Floats, Inputs, Pair, Same, Static
from equivcheck.engine.records import RunSettings
from equivcheck.models.zoo import mlp_pair
from equivcheck.onnx import export_model
from equivcheck.onnx.intermediates import module_values
from equivcheck.report import models as report_models
from tests import preload  # noqa: F401 - frameworks loaded before pytester (tests/preload.py)

RUN = RunSettings(examples=4, seed=20261201, shrink_seconds=2)


def run_onnx(pair):
    (rec,) = pair.replace(checks=("onnx",)).run_checks(dtype="float32", run=RUN)
    return rec


def _fc2_changed_in_the_file(model, args, directory, name):
    """A correct export whose fc2 weight is then changed in the ONNX file only (torch and the port keep theirs)."""
    exported = export_model(model, args, directory, name)
    proto = onnx.load(exported.path)
    (init,) = [i for i in proto.graph.initializer if i.name == "fc2.weight"]
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + np.float32(0.25), init.name))
    onnx.save(proto, exported.path)
    return exported


def test_a_weight_changed_in_the_onnx_file_only_is_named_at_its_layer():
    rec = run_onnx(mlp_pair("onnx_mlp_fc2_file", onnx_export=_fc2_changed_in_the_file))
    assert rec.outcome == "failed" and rec.kind == "values" and rec.side == "onnx", (rec.side, rec.message)
    assert rec.extra["onnx_first_layer"] == "fc2"
    assert "first layer where onnx departs from torch: fc2 (Linear)" in rec.diagnosis
    rows = {r["layer"]: r for r in rec.extra["layers"]}
    assert list(rows) == ["fc1", "act", "fc2"]
    # before fc2 all three agree; at fc2 onnx leaves torch and the port, which agree with each other
    for name in ("fc1", "act"):
        assert all(rows[name][c]["ok"] for c in ("torch-onnx", "torch-jax", "onnx-jax")), rows[name]
    assert rows["fc2"]["first"] and rows["fc2"]["torch-jax"]["ok"]
    assert not rows["fc2"]["torch-onnx"]["ok"] and not rows["fc2"]["onnx-jax"]["ok"]
    # the report shows the three columns, the layer marked
    md = "\n".join(report_models.markdown_section([json.loads(json.dumps(rec.to_json(), default=str))]))
    assert "| layer | module | torch vs onnx | torch vs jax | onnx vs jax | first where onnx leaves torch |" in md
    assert next(line for line in md.splitlines() if line.startswith("| fc2 |")).count("**first**") == 1


def test_a_correct_export_has_three_columns_per_layer():
    rec = run_onnx(mlp_pair("onnx_mlp_layers"))
    assert rec.outcome == "passed", rec.message
    rows = rec.extra["layers"]
    assert [r["layer"] for r in rows] == ["fc1", "act", "fc2"] and not any(r["first"] for r in rows)
    for r in rows:
        for column in ("torch-onnx", "torch-jax", "onnx-jax"):
            assert r[column]["ok"] and r[column]["ratio"] < 1, (r["layer"], column, r[column])


@pytest.mark.parametrize("make", ["lstm_pair", "gru_pair"])
def test_an_rnn_layer_gets_its_onnx_value_through_its_final_state(make):
    """ONNX's LSTM/GRU node returns the sequence in (seq, directions, batch, hidden) and the final state
    Y_h in torch's own h_n layout; the models read only the state, so that is what the graph keeps. The
    row compares torch's h_n with it (it had no ONNX value at all), and says which output it compared."""
    from equivcheck.models import zoo

    rec = run_onnx(getattr(zoo, make)(f"onnx_{make}_rows"))
    assert rec.outcome == "passed", rec.message
    rows = {r["layer"]: r for r in rec.extra["layers"]}
    rnn = rows["lstm" if make == "lstm_pair" else "gru"]
    assert rnn["torch-onnx"]["ok"] and rnn["torch-onnx"]["ratio"] < 1, rnn
    assert "the graph holds the module's output 2 of" in rnn["note"], rnn["note"]
    assert rnn["onnx-jax"]["ok"] is None  # the port's tap holds the sequence, not h_n
    assert rnn["torch-jax"]["ok"], rnn


def _lstm_weights_changed_in_the_file(model, args, directory, name):
    exported = export_model(model, args, directory, name)
    proto = onnx.load(exported.path)
    # the exporter folds the weights into ONNX's layout (directions, 4 x hidden, hidden) under names of its own
    (lstm,) = [n for n in proto.graph.node if n.op_type == "LSTM"]
    changed = [i for i in proto.graph.initializer if i.name == lstm.input[2]]  # R, the recurrence weights
    assert changed, [i.name for i in proto.graph.initializer]
    for init in changed:
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + np.float32(0.25), init.name))
    onnx.save(proto, exported.path)
    return exported


def test_an_rnn_weight_changed_in_the_onnx_file_only_is_named_at_the_rnn():
    from equivcheck.models.zoo import lstm_pair

    rec = run_onnx(lstm_pair("onnx_lstm_file", onnx_export=_lstm_weights_changed_in_the_file))
    assert rec.outcome == "failed" and rec.side == "onnx", (rec.side, rec.message)
    assert rec.extra["onnx_first_layer"] == "lstm", rec.extra["layers"]


def test_module_names_come_from_the_exporters_name_scopes(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Sequential(torch.nn.Linear(8, 3)))
    exported = export_model(model.eval(), (torch.zeros(3, 4),), str(tmp_path), "nested")
    names = [n for n, _ in model.named_modules() if n]
    found = module_values(onnx.load(exported.path), names)
    assert {"0", "1", "2.0"} <= set(found), found  # the nested Linear by its dotted name


# --------------------------------------------------------------------------- layer pairs


def test_a_layer_pair_runs_three_ways_and_records_the_opset():
    pair = Pair("onnx_layer_tanh", torch.tanh, np.tanh, Inputs(Same(n=1, min_dims=1, max_dims=3, min_side=2),
                                                                 (Floats(-3, 3),)), checks=("forward", "onnx"))
    import jax.numpy as jnp

    pair = pair.replace(jax_fn=jnp.tanh)
    recs = {r.check: r for r in pair.run_checks(dtype="float32", run=RUN)}
    rec = recs["onnx"]
    assert rec.outcome == "passed", rec.message
    assert rec.examples == RUN.examples and rec.extra["opset"] >= 18 and rec.extra["exporter"] == "dynamo"
    assert set(rec.extra["pairs"]) == {"torch-onnx", "torch-jax", "onnx-jax"}
    assert all(isinstance(d, int) for shape in rec.extra["onnx"]["shapes"] for d in shape)  # every dim pinned


def _eigvals(x):
    return torch.linalg.eigvals(x).real  # complex eigenvalues: no ONNX operator


def test_a_layer_that_does_not_export_is_skipped_with_the_exporters_message():
    import jax.numpy as jnp

    pair = Pair("onnx_layer_eig", _eigvals, lambda x: jnp.linalg.eigvals(x).real,
                Inputs(Same(n=1, min_dims=2, max_dims=2, min_side=2, max_side=2), (Floats(-1, 1),)),
                checks=("onnx",))
    (rec,) = pair.run_checks(dtype="float32", run=RUN)
    assert rec.outcome == "skipped" and rec.kind == "not-exportable", (rec.outcome, rec.message)
    assert rec.message.startswith("not exportable: model 'layer-onnx_layer_eig-float32") and "dynamo:" in rec.message


def _sign_flipped_torch(x):
    # torch's own eager result is right; what the exporter traces is another function
    return -x if torch.compiler.is_exporting() else x


def test_a_layer_whose_graph_computes_otherwise_is_blamed_on_onnx():
    pair = Pair("onnx_layer_traced_otherwise", _sign_flipped_torch, lambda x: x,
                Inputs(Same(n=1, min_dims=1, max_dims=2, min_side=2), (Floats(1, 2),)), checks=("onnx",))
    (rec,) = pair.run_checks(dtype="float32", run=RUN)
    assert rec.outcome == "failed" and rec.side == "onnx", (rec.outcome, rec.side, rec.message)
    assert "onnx disagrees with both others" in rec.diagnosis


def _wrong_graph_for_stride_2(x, s):
    flip = -1.0 if torch.compiler.is_exporting() and s == 2 else 1.0
    return x * (s * flip)


def _unexportable_for_stride_2(x, s):
    if torch.compiler.is_exporting() and s == 2:
        raise NotImplementedError("planted: no graph for s=2")
    return x * s


def test_every_static_value_drawn_gets_its_own_graph():
    """A static hyperparameter (a stride, a padding mode) makes another graph: a graph wrong only for the
    second value is caught (the export once pinned every Static to its first value); a value that does not
    export is noted and the others are still checked."""
    static = Inputs(Same(n=1, min_dims=1, max_dims=2, min_side=2), (Floats(1, 2), Static((1, 2))))
    run = dataclasses.replace(RUN, examples=10)
    pair = Pair("onnx_layer_static_wrong", _wrong_graph_for_stride_2, lambda x, s: x * s, static, checks=("onnx",),
                arg_names=("x", "s"))
    (rec,) = pair.run_checks(dtype="float32", run=run)
    assert rec.outcome == "failed" and rec.side == "onnx", (rec.outcome, rec.side, rec.message)
    assert rec.inputs.endswith("arg1: 2"), rec.inputs  # the graph of s=2, the second value
    assert sorted(d["s"] for d in rec.extra["statics"]) == ["1", "2"]
    pair = Pair("onnx_layer_static_refused", _unexportable_for_stride_2, lambda x, s: x * s, static,
                checks=("onnx",), arg_names=("x", "s"))
    (rec,) = pair.run_checks(dtype="float32", run=run)
    assert rec.outcome == "passed", rec.message
    assert rec.extra["statics"] == [{"s": "1"}]
    assert list(rec.extra["statics_refused"]) == ["s=2"]
    assert any(n.startswith("not exportable with s=2:") and "planted: no graph for s=2" in n for n in rec.notes)


LAYER_SUITE = """
import pytest, torch, jax.numpy as jnp
import equivcheck as ec

PAIRS = [ec.Pair("layer_tanh", torch.tanh, jnp.tanh, ec.unary(), checks=("forward",), family="layers"),
         ec.Pair("op_tanh", torch.tanh, jnp.tanh, ec.unary(), checks=("forward",))]

@pytest.mark.parametrize("pair", PAIRS, ids=str)
def test_pair(pair, equiv):
    equiv.check(pair)
"""


def test_equiv_onnx_adds_the_check_to_layer_pairs_only(pytester):
    pytester.makepyfile(test_layers=LAYER_SUITE)
    fast = ("--equiv-examples", "3", "--equiv-seed", "1", "--equiv-dtypes", "float32", "-p", "no:cacheprovider")
    for flag, want in (((), set()), (("--equiv-onnx",), {"layer_tanh"})):
        result = pytester.runpytest("--equiv", *fast, *flag, "--equiv-report", f"rep{len(flag)}")
        result.assert_outcomes(passed=2)
        recs = json.loads((pytester.path / f"rep{len(flag)}" / "latest.json").read_text())["records"]
        onnx_recs = [r for r in recs if r["check"] == "onnx"]
        assert {r["pair"] for r in onnx_recs} == want
        assert all(r["outcome"] == "passed" and r["extra"]["opset"] >= 18 for r in onnx_recs)
        # a replay without the option would not run the record
        assert all("--equiv-onnx" in r["replay"] for r in onnx_recs)


def test_an_onnx_known_divergence_unmatched_without_the_option_is_left_out_not_stale(tmp_path):
    from equivcheck.engine.knowns import KnownDivergences, sort_unmatched

    path = tmp_path / "known.txt"
    path.write_text("nn.batch_norm_train::onnx  the exporter drops the update\nnn.typo::forward  stale\n")
    entries = KnownDivergences.load([str(path)]).unmatched(set())
    collected = {"nn.batch_norm_train::forward::float32::cpu", "nn.typo_not::forward::float32::cpu"}
    stale, quiet = sort_unmatched(entries, dtypes=["float32"], devices=["cpu"], collected=collected, narrowed=False)
    assert [e.pattern for e in stale] == ["nn.typo::forward"]
    assert [e.pattern for e in quiet["onnx checks this run did not run (a layer's: --equiv-onnx)"]] == \
        ["nn.batch_norm_train::onnx"]
    # a model's onnx checks run by default (tox -e equiv under xdist warned of all four layer entries as stale):
    # they say nothing of whether this layer's onnx check ran
    stale, quiet = sort_unmatched(entries, dtypes=["float32"], devices=["cpu"], narrowed=False,
                                  collected=collected | {"mlp::onnx::float32::cpu", "nn.batch_norm_eval::onnx::float32::cpu"})
    assert [e.pattern for e in stale] == ["nn.typo::forward"]
    assert [e.pattern for e in quiet["onnx checks this run did not run (a layer's: --equiv-onnx)"]] == \
        ["nn.batch_norm_train::onnx"]
