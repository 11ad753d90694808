"""ONNX Runtime as a third implementation: the torch model exported to ONNX, run, and checked three ways.

export      export_model (dynamo exporter, TorchScript fallback, dynamic batch, every other dimension
            pinned and checked, eval mode), Exported, ExportError, available (the optional extra `equivcheck[onnx]`)
session     Graph: an ONNX file in an InferenceSession, validated against the model (GraphMismatch,
            LoadError, DeviceUnavailable)
threeway    three_way: torch vs ONNX Runtime vs the JAX port pairwise, and which one is off; two_way:
            torch vs ONNX Runtime alone
check       run_onnx_check: the `onnx` check of a ModelPair (equivcheck.models.runner calls it), with
            per-layer columns from
intermediates  module_values, with_outputs, layer_rows: torch modules found in the graph through the
            exporter's name scopes, exposed as extra outputs, compared three ways
layers      run_layer_onnx: the `onnx` check of a layer Pair (equivcheck.ops.runner calls it; --equiv-onnx)
cli         run: `python -m equivcheck onnx MODEL.onnx --torch ...`, a file exported elsewhere

onnx, onnxscript and onnxruntime are imported only when a function here runs.
"""
from equivcheck.onnx.export import EXTRA_HINT, Exported, ExportError, available, export_model, input_names, opset_of
from equivcheck.onnx.session import DeviceUnavailable, Graph, GraphMismatch, LoadError, providers_for
from equivcheck.onnx.threeway import SIDES, ThreeWay, three_way, two_way

__all__ = ["EXTRA_HINT", "SIDES", "DeviceUnavailable", "ExportError", "Exported", "Graph", "GraphMismatch",
           "LoadError", "ThreeWay", "available", "export_model", "input_names", "opset_of", "providers_for",
           "three_way", "two_way"]
