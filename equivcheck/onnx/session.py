"""An ONNX file run in ONNX Runtime, its graph checked against the model it stands for.

One `Graph` per file: the InferenceSession is made once and reused for every example (making it
parses and optimises the graph, ~10-100 ms). `validate` runs before every call, so a graph that does
not fit the model (input or output names, ranks, a batch size fixed at export) is one clear
`GraphMismatch` message instead of ONNX Runtime's shape error from deep inside a kernel.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["DeviceUnavailable", "Graph", "GraphMismatch", "LoadError", "providers_for"]

# ONNX tensor element types as ONNX Runtime names them -> NumPy
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(int64)": np.int64,
              "tensor(int32)": np.int32, "tensor(bool)": np.bool_, "tensor(float16)": np.float16}


class LoadError(Exception):
    """The ONNX file does not load (not a model, fails onnx's checker, or ONNX Runtime refuses it)."""


class GraphMismatch(Exception):
    """The graph's inputs or outputs do not fit the model's (names, count, rank, a fixed dimension)."""


class DeviceUnavailable(Exception):
    """The check's device has no ONNX Runtime execution provider here (the reason is the message)."""


def providers_for(device: str) -> list[str]:
    """ONNX Runtime providers for an equivcheck device: cpu -> CPU; gpu -> CUDA (then CPU for the ops
    CUDA lacks). Raises DeviceUnavailable when the gpu device has no CUDAExecutionProvider."""
    import onnxruntime as ort

    if device == "cpu":
        return ["CPUExecutionProvider"]
    have = ort.get_available_providers()
    if "CUDAExecutionProvider" not in have:
        raise DeviceUnavailable(f"ONNX Runtime here has no CUDAExecutionProvider (providers: {', '.join(have)}); "
                                "install onnxruntime-gpu to run the onnx check on the GPU")
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


class Graph:
    """An ONNX file loaded into an InferenceSession.

    path    the .onnx file; device "cpu" or "gpu" (providers_for)
    Raises LoadError naming the file and the loader's message when it does not load,
    DeviceUnavailable when the device has no provider.
    """

    def __init__(self, path: str, device: str = "cpu") -> None:
        import onnx
        import onnxruntime as ort

        providers = providers_for(device)
        try:
            onnx.checker.check_model(path)  # by path: also reads a model with external data
            opts = ort.SessionOptions()
            opts.log_severity_level = 3  # warnings about unused initializers are not the user's concern
            self.session = ort.InferenceSession(path, opts, providers=providers)
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [""])[0]
            raise LoadError(f"the ONNX file {path} does not load: {type(exc).__name__}: {first}"[:800]) from exc
        self.path, self.device = path, device
        self.inputs = [(i.name, list(i.shape), i.type) for i in self.session.get_inputs()]
        self.outputs = [(o.name, list(o.shape), o.type) for o in self.session.get_outputs()]

    def validate(self, args: Sequence[np.ndarray], names: Sequence[str] | None = None,
                 output_ranks: Sequence[int] | None = None) -> None:
        """Raise GraphMismatch (one message, every finding) unless the graph takes `args` (NumPy
        arrays, batch first) as its inputs, by count, name (`names`: the model's argument names;
        None skips the names), rank and every fixed dimension, and gives as many outputs as
        `output_ranks` with those ranks."""
        found: list[str] = []
        if len(self.inputs) != len(args):
            found.append(f"the graph takes {len(self.inputs)} inputs {[n for n, _, _ in self.inputs]}, "
                         f"the model {len(args)}")
        if names is not None and [n for n, _, _ in self.inputs] != list(names)[:len(self.inputs)]:
            found.append(f"the graph's inputs are named {[n for n, _, _ in self.inputs]}, the model's arguments "
                         f"{list(names)}")
        for (name, shape, _), a in zip(self.inputs, args):
            if len(shape) != np.ndim(a):
                found.append(f"input {name!r} has rank {len(shape)} in the graph, {np.ndim(a)} in the model "
                             f"(shape {list(np.shape(a))})")
                continue
            for axis, (g, m) in enumerate(zip(shape, np.shape(a))):
                if isinstance(g, int) and g != m:
                    what = ("its batch size was fixed at export: export with a dynamic batch dimension "
                            "(dynamic_shapes / dynamic_axes)") if axis == 0 else "a dimension fixed at export"
                    found.append(f"input {name!r} has dimension {axis} = {g} in the graph, {m} in this "
                                 f"example (shape {list(np.shape(a))}): {what}")
        if output_ranks is not None:
            if len(self.outputs) != len(output_ranks):
                found.append(f"the graph gives {len(self.outputs)} outputs {[n for n, _, _ in self.outputs]}, "
                             f"the model {len(output_ranks)}")
            for (name, shape, _), r in zip(self.outputs, output_ranks):
                if len(shape) != r:
                    found.append(f"output {name!r} has rank {len(shape)} in the graph, {r} in the model")
        if found:
            raise GraphMismatch(f"the ONNX graph {self.path} does not fit the model: " + "; ".join(found))

    def feed(self, args: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """input name -> `args` (NumPy arrays, in input order), each cast to the dtype the graph declares
        for it (an int32 token array fed to an int64 input)."""
        feed = {}
        for (name, _, kind), a in zip(self.inputs, args):
            want = _ORT_TYPES.get(kind)
            feed[name] = np.ascontiguousarray(a if want is None else np.asarray(a).astype(want, copy=False))
        return feed

    def run(self, args: Sequence[np.ndarray], names: Sequence[str] | None = None) -> list[np.ndarray]:
        """The graph's outputs (NumPy arrays; those named in `names`, default all) on `args` (feed)."""
        return [np.asarray(o) for o in self.session.run(None if names is None else list(names), self.feed(args))]
