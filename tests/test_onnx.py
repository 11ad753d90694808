"""The `onnx` model check (equivcheck.onnx): planted deployment bugs are caught and blamed on the
ONNX side, a correct export passes, and bad exports or files give one clear message. CPU only."""
from __future__ import annotations

import functools
import os

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="pip install equivcheck[onnx]")
pytest.importorskip("onnxscript", reason="pip install equivcheck[onnx]")

import torch

from equivcheck.engine.records import RunSettings
from equivcheck.engine.tolerance import lookup
from equivcheck.models.zoo import DigitsCNN, cnn_pair, mlp_pair
from equivcheck.onnx import EXTRA_HINT, ExportError, Graph, LoadError, export_model, three_way
from equivcheck.onnx import check as onnx_check

RUN = RunSettings(examples=4, seed=20261201, shrink_seconds=2)


def run_onnx(pair, dtype="float32"):
    (rec,) = pair.replace(checks=("onnx",)).run_checks(dtype=dtype, run=RUN)
    return rec


def test_a_correct_export_passes_and_records_exporter_and_opset():
    rec = run_onnx(mlp_pair("onnx_mlp_ok"))
    assert rec.outcome == "passed", rec.message
    assert rec.examples >= 1 and rec.worst_ratio < 1
    assert rec.extra["exporter"] == "dynamo" and rec.extra["opset"] >= 18
    assert set(rec.extra["pairs"]) == {"torch-onnx", "torch-jax", "onnx-jax"}


def _train_mode_export(model, args, directory, name):
    return export_model(model, args, directory, name, train=True)


def test_a_graph_exported_in_training_mode_is_blamed_on_onnx():
    # dropout active and BatchNorm on batch statistics in the graph; torch and the port run eval mode
    rec = run_onnx(cnn_pair("onnx_cnn_train", onnx_export=_train_mode_export))
    assert rec.outcome == "failed" and rec.kind == "values"
    assert rec.side == "onnx", (rec.side, rec.diagnosis)
    assert "onnx disagrees with both others" in rec.diagnosis


def test_a_fixed_batch_export_run_on_another_batch_is_one_clear_message():
    rec = run_onnx(mlp_pair("onnx_mlp_fixed", onnx_export=functools.partial(export_model, dynamic_batch=False)))
    assert rec.outcome == "failed" and rec.kind == "structure" and rec.side == "onnx"
    assert "batch size was fixed at export" in rec.message and "dynamic batch dimension" in rec.message


def _other_checkpoint(model, args, directory, name):
    torch.manual_seed(12345)  # another checkpoint of the same architecture
    return export_model(type(model)(), args, directory, name)


def test_weights_from_another_checkpoint_are_blamed_on_onnx():
    rec = run_onnx(mlp_pair("onnx_mlp_ckpt", onnx_export=_other_checkpoint))
    assert rec.outcome == "failed" and rec.kind == "values" and rec.side == "onnx"
    assert "onnx vs jax" in rec.message and "torch vs onnx" in rec.message


class _Unexportable(torch.nn.Module):
    def forward(self, x):
        return torch.linalg.eigvals(x)  # complex eigenvalues: no ONNX operator in either exporter


def test_an_export_failure_names_the_model_and_leaves_nothing(tmp_path):
    with pytest.raises(ExportError, match=r"model 'strange' is not exportable to ONNX: dynamo: .*torchscript: .*linalg_eigvals"):
        export_model(_Unexportable(), (torch.randn(2, 3, 3),), str(tmp_path), "strange")
    assert os.listdir(tmp_path) == []


def _raises(model, args, directory, name):
    raise ExportError(f"model {name!r} is not exportable to ONNX: planted")


def test_a_model_that_does_not_export_is_recorded_not_exportable():
    rec = run_onnx(mlp_pair("onnx_mlp_noexport", onnx_export=_raises))
    assert rec.outcome == "skipped" and rec.kind == "not-exportable"
    assert rec.message.startswith("not exportable: model 'onnx_mlp_noexport-float32-")


def _garbage(model, args, directory, name):
    path = os.path.join(directory, f"{name}.onnx")
    with open(path, "wb") as f:
        f.write(b"this is no protobuf")
    return onnx_check.Exported(path, "planted", 0)


def test_a_file_that_does_not_load_is_one_clear_message(tmp_path):
    rec = run_onnx(mlp_pair("onnx_mlp_garbage", onnx_export=_garbage))
    assert rec.outcome == "failed" and rec.kind == "error" and rec.side == "onnx"
    assert "does not load" in rec.message and "onnx_mlp_garbage" in rec.message
    bad = tmp_path / "x.onnx"
    bad.write_bytes(b"\x00\x01")
    with pytest.raises(LoadError, match="does not load"):
        Graph(str(bad))


def test_graph_names_and_ranks_are_validated(tmp_path):
    model = DigitsCNN().eval()
    exported = export_model(model, (torch.zeros(3, 1, 8, 8),), str(tmp_path), "cnn")
    graph = Graph(exported.path)
    x = np.zeros((5, 1, 8, 8), np.float32)
    graph.validate([x], ["x"], [2])  # fits: a dynamic batch of 5
    with pytest.raises(Exception, match=r"named \['x'\], the model's arguments \['image'\]"):
        graph.validate([x], ["image"], [2])
    with pytest.raises(Exception, match="rank 4 in the graph, 3 in the model"):
        graph.validate([x[0]], None, [2])


def test_float64_and_a_missing_extra_are_skips_with_the_reason(monkeypatch):
    rec = run_onnx(mlp_pair("onnx_mlp_f64"), dtype="float64")
    assert rec.outcome == "skipped" and "float32 only" in rec.message
    monkeypatch.setattr(onnx_check, "available", lambda: f"onnxruntime not installed: {EXTRA_HINT}")
    rec = run_onnx(mlp_pair("onnx_mlp_noextra"))
    assert rec.outcome == "skipped" and rec.message.endswith("pip install equivcheck[onnx]")


def test_three_way_names_the_odd_one_and_falls_back_to_float64():
    tol = lookup("float32")
    ref = [np.array([1.0, 2.0])]
    right = [np.array([1.0, 2.0], np.float32)]
    off = [np.array([1.0, 2.5], np.float32)]
    assert three_way({"torch": right, "onnx": right, "jax": off}, tol).side == "jax"
    assert three_way({"torch": off, "onnx": right, "jax": right}, tol).side == "torch"
    far = [np.array([1.0, 3.0], np.float32)]
    tw = three_way({"torch": right, "onnx": off, "jax": far}, tol, lambda: ref)
    assert not tw.ok and tw.side == "onnx+jax" and "float64" in tw.how
    assert three_way({"torch": right, "onnx": right, "jax": right}, tol).ok


def test_the_export_pins_every_dimension_but_the_batch(tmp_path):
    # torch 2.14's dynamo exporter left a Linear's input width symbolic ('s27') under Dim.AUTO
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).eval()
    exported = export_model(model, (torch.zeros(3, 4),), str(tmp_path), "pinned")
    import onnx

    (shape,) = [[d.dim_value if d.HasField("dim_value") else d.dim_param for d in i.type.tensor_type.shape.dim]
                for i in onnx.load(exported.path).graph.input]
    assert isinstance(shape[0], str) and shape[0], shape  # the batch: a symbol
    assert shape[1] == 4, shape
    assert exported.shapes == ((shape[0], 4),) and exported.describe()["shapes"] == [[shape[0], 4]]
    Graph(exported.path).validate([np.zeros((5, 4), np.float32)], None, [2])  # another batch fits


def test_a_varying_axis_stays_dynamic_and_a_wrong_graph_is_refused():
    from equivcheck.onnx.check import varying_axes
    from equivcheck.onnx.export import check_shapes

    palette = [((2, 3), (2,)), ((4, 7), (4,))]
    assert varying_axes(palette, 1) == [(1,)]
    args = (np.zeros((3, 4)),)
    check_shapes([("batch", 4)], args, [{0}])
    with pytest.raises(ValueError, match=r"dimension 1 is 's27' in the graph, pinned to 4"):
        check_shapes([("batch", "s27")], args, [{0}])
    with pytest.raises(ValueError, match="dimension 0 is fixed at 3, exported as dynamic"):
        check_shapes([(3, 4)], args, [{0}])


def test_all_three_disagreeing_is_said_and_ranked_against_float64():
    tol = lookup("float32")
    ref = lambda: [np.array([1.0, 2.0])]
    sides = {"torch": [np.array([1.0, 2.2], np.float32)], "onnx": [np.array([1.0, 2.5], np.float32)],
             "jax": [np.array([1.0, 3.0], np.float32)]}
    tw = three_way({"onnx": sides["onnx"], "jax": sides["jax"], "torch": sides["torch"]}, tol, ref)
    assert not tw.ok and tw.side == "torch+onnx+jax", tw.side  # all three off, nearest first
    assert [s for s, _ in tw.ranking] == ["torch", "onnx", "jax"]
    assert np.allclose([d for _, d in tw.ranking], [0.2, 0.5, 1.0], rtol=1e-6)
    assert tw.how.startswith("all three disagree; ranked against torch's float64 forward, nearest first: torch 0.2")
    assert tw.how.endswith("torch and onnx and jax are off")
    # one of the three within the bound of the reference: ranked first and said so, the two others named
    sides["torch"] = [np.array([1.0, 2.0], np.float32)]
    tw = three_way(sides, tol, ref)
    assert tw.side == "onnx+jax" and "torch 0 (within the bound), onnx 0.5, jax 1" in tw.how, tw.how
    # two witnesses against one need no reference and no ranking
    tw = three_way({"torch": sides["torch"], "onnx": sides["torch"], "jax": sides["jax"]}, tol, ref)
    assert tw.side == "jax" and tw.ranking == [] and "disagrees with both others" in tw.how
