"""The PyTorch side: placement, precision mode, NumPy round trip, and eager derivatives."""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.autograd.forward_ad as fwd_ad

from equivcheck.backends import deadline
from equivcheck.backends.results import SideResult, Vectors
from equivcheck.engine.dtypes import np_dtype

NAME = "torch"

# torch.func.jvp's first use scripts its decompositions with torch.jit.script, which warns of its
# own deprecation: torch's internal affair, not the user's. Load them once, quietly.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*torch.jit.script.* is deprecated")  # Deprecation- or FutureWarning
    try:
        import torch._decomp.decompositions_for_jvp  # noqa: F401
    except ImportError:  # another torch layout: the warning, if any, is harmless
        pass

_TORCH_DTYPES = {
    "float16": torch.float16, "float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
}


_NP_OF = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64,
          torch.bfloat16: np_dtype("bfloat16"), torch.int64: np.int64, torch.int32: np.int32, torch.bool: np.bool_}


def version() -> str:
    return torch.__version__


def available(device: str) -> bool:
    return device == "cpu" or torch.cuda.is_available()


def device_of(device: str) -> torch.device:
    if device == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("torch sees no CUDA device (torch.cuda.is_available() is False)")
    return torch.device("cuda", 0)


def placed(dev: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Torch's default device set to `dev` while a user's torch function runs on a GPU: a tensor
    it makes (a mask from torch.ones, a module it builds, a constant from torch.tensor) lands
    beside its inputs instead of on the CPU ("Expected all tensors to be on the same device").
    On the CPU nothing is entered: cpu is already the default, and the mode costs a Python call
    per torch call."""
    return torch.device(dev) if dev.type != "cpu" else contextlib.nullcontext()


def device_name(device: str) -> str:
    return torch.cuda.get_device_name(0) if device == "gpu" else "cpu"


def set_precision(mode: str) -> dict[str, Any]:
    """highest: float32 everywhere (TF32 off for matmul and cuDNN); default: torch's own."""
    if mode == "highest":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
    else:
        torch.backends.cuda.matmul.allow_tf32 = False  # torch's defaults since 1.12
        torch.backends.cudnn.allow_tf32 = True
    return {"matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32}


def sync(device: str) -> None:
    if device == "gpu":
        torch.cuda.synchronize()


def memory(device: str) -> dict[str, int]:
    if device != "gpu":
        return {}
    return {"peak_allocated": torch.cuda.max_memory_allocated(), "reserved": torch.cuda.memory_reserved()}


def to_torch(a: Any, dev: torch.device, requires_grad: bool = False) -> Any:
    """A private copy on `dev`: a user's in-place op never touches the shared master copy."""
    if not isinstance(a, np.ndarray):
        return a
    if a.dtype.name == "bfloat16":
        t = torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    else:
        t = torch.from_numpy(np.array(a, copy=True))
    t = t.to(dev)
    return t.requires_grad_(True) if requires_grad else t


def to_numpy(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x._is_zerotensor():  # autograd's symbolic zero (e.g. abs'' ): materialise it
            return np.zeros(tuple(x.shape), dtype=_NP_OF[x.dtype])
        if x.dtype == torch.bfloat16:
            return x.view(torch.int16).numpy().view(np_dtype("bfloat16")).copy()
        return x.resolve_conj().resolve_neg().numpy().copy()
    if isinstance(x, Mapping):
        return {k: to_numpy(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_numpy(v) for v in x]
    if x is None:
        return None
    return np.asarray(x)


def _leaves(tree: Any) -> list[Any]:
    if isinstance(tree, Mapping):
        return [leaf for k in sorted(tree, key=str) for leaf in _leaves(tree[k])]
    if isinstance(tree, (list, tuple)):
        return [leaf for v in tree for leaf in _leaves(v)]
    return [tree]


def _float_leaves(tree: Any) -> list[torch.Tensor]:
    return [x for x in _leaves(tree) if isinstance(x, torch.Tensor) and x.is_floating_point()]


def _graph_of(out: Any, wants_grad: bool) -> tuple[str, str]:
    """Why autograd cannot see the outputs: (lost, detached), each empty when it can."""
    leaves = _leaves(out)
    lost = ""
    if any(isinstance(x, (np.ndarray, np.generic)) and x.dtype.kind == "f" for x in leaves):
        lost = "the torch side returned a NumPy array (the graph is lost)"
    elif any(isinstance(x, float) for x in leaves):
        lost = "the torch side returned a Python float (the graph is lost)"
    detached = ""
    if wants_grad and any(isinstance(x, torch.Tensor) and x.is_floating_point() and not x.requires_grad
                          for x in leaves):
        detached = "the torch side's output does not require grad / is detached"
    return lost, detached


def _grad(outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor], grad_outputs: Sequence[torch.Tensor],
          create_graph: bool) -> list[torch.Tensor]:
    """autograd.grad that treats outputs or inputs outside the graph as zero contributions."""
    live = [(o, g) for o, g in zip(outputs, grad_outputs) if o.requires_grad]
    if not live:
        return [torch.zeros_like(x) for x in inputs]
    grads = torch.autograd.grad([o for o, _ in live], list(inputs), [g for _, g in live],
                                create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]


float_leaves = _float_leaves  # public to equivcheck.bench, which times what the checks run
grad = _grad


@deadline.side(NAME)
def run(fn: Callable[..., Any], args: Sequence[Any], diff: Sequence[int], checks: Sequence[str],
        device: str, vectors_for: Callable[[list[np.ndarray]], Vectors]) -> tuple[SideResult, Vectors | None]:
    """Forward, VJP (reverse), JVP (forward mode) and HVP (reverse over reverse), eagerly, with
    torch's default device the check's (`placed`). Errors are per check in the result; SideTimeout
    past the time limit (equivcheck.backends.deadline)."""
    dev = device_of(device)
    with placed(dev):
        return _run(fn, args, diff, checks, dev, vectors_for)


def _run(fn: Callable[..., Any], args: Sequence[Any], diff: Sequence[int], checks: Sequence[str],
         dev: torch.device, vectors_for: Callable[[list[np.ndarray]], Vectors]) -> tuple[SideResult, Vectors | None]:
    res = SideResult(NAME)
    wants_grad = bool(set(checks) & {"vjp", "hvp"})
    try:
        targs = [to_torch(a, dev, requires_grad=wants_grad and i in diff) for i, a in enumerate(args)]
        out = fn(*targs)
        res.values["forward"] = to_numpy(out)
    except Exception as exc:  # the user's callable: any failure is a finding, not a crash
        res.fail(checks, exc)
        return res, None
    out_leaves = _float_leaves(out)
    res.outputs = [tuple(x.shape) for x in out_leaves]
    res.lost, res.detached = _graph_of(out, wants_grad)
    vec = vectors_for([to_numpy(x) for x in out_leaves])
    if not out_leaves:
        # Nothing autograd can differentiate: the engine says why (a lost graph, or no floating
        # output at all) instead of comparing zeros made up for the occasion.
        res.values = {c: v for c, v in res.values.items() if c in checks}
        return res, vec
    primals = [targs[i] for i in diff]
    if wants_grad:
        try:
            cts = [to_torch(c, dev) for c in vec.ct]
            grads = _grad(out_leaves, primals, cts, create_graph="hvp" in checks)
            res.values["vjp"] = [to_numpy(g) for g in grads]
        except Exception as exc:
            res.fail(["vjp", "hvp"], exc)
        if "hvp" in checks and "hvp" not in res.errors:
            try:
                vs = [to_torch(v, dev) for v in vec.v]
                dots = [(g * v).sum() for g, v in zip(grads, vs)]
                total = [sum(dots)] if dots else []
                res.values["hvp"] = [to_numpy(h) for h in _grad(total, primals, [torch.ones_like(x) for x in total], False)]
            except Exception as exc:
                res.fail("hvp", exc)
    if "jvp" in checks:
        _jvp(fn, targs, diff, vec, dev, res)
    for check in list(res.values):
        if check not in checks:
            del res.values[check]
    return res, vec


def _dual_jvp(f: Callable[..., tuple[torch.Tensor, ...]], primals: tuple[torch.Tensor, ...],
              tangents: tuple[torch.Tensor, ...]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(outputs, tangents) by autograd's forward mode on dual tensors: the formulas
    torch.func.jvp uses, without its functorch wrapping, which cost 4x the op itself on small
    inputs (1.2 ms against 0.3 ms for tanh on a (4, 5) array, measured here)."""
    with fwd_ad.dual_level():
        outs = f(*(fwd_ad.make_dual(p, t) for p, t in zip(primals, tangents)))
        unpacked = [fwd_ad.unpack_dual(o) for o in outs]
        return ([u.primal for u in unpacked],
                [torch.zeros_like(u.primal) if u.tangent is None else u.tangent for u in unpacked])


def _jvp(fn: Callable[..., Any], targs: list[Any], diff: Sequence[int], vec: Vectors, dev: torch.device, res: SideResult) -> None:
    base = [a.detach() if isinstance(a, torch.Tensor) else a for a in targs]
    primals = tuple(base[i] for i in diff)
    tangents = tuple(to_torch(t, dev) for t in vec.t)

    def f(*d: torch.Tensor) -> tuple[torch.Tensor, ...]:
        a = list(base)
        for i, x in zip(diff, d):
            a[i] = x
        return tuple(_float_leaves(fn(*a)))

    try:
        try:
            outs, tang = _dual_jvp(f, primals, tangents)
        except Exception:  # noqa: BLE001 - functorch's jvp decides: its error is the one reported
            outs, tang = torch.func.jvp(f, primals, tangents)
        # torch 2.14's forward AD promotes a 0-d float32 tensor times a Python float to a float64
        # tangent (the primal stays float32): the JVP's value is right, its dtype an artifact.
        promoted = [(t.dtype, o.dtype) for o, t in zip(outs, tang) if t.dtype != o.dtype]
        if promoted:
            res.note("jvp", f"torch's forward AD returned {promoted[0][0]} tangents for a {promoted[0][1]} "
                            f"output (another dtype than the output's); cast to the output's dtype")
        res.values["jvp"] = [to_numpy(t.to(o.dtype)) for o, t in zip(outs, tang)]
        return
    except Exception as exc:
        text = str(exc)
        no_formula = "forward AD" in text or "forward-mode" in text.lower() or (
            isinstance(exc, NotImplementedError) and "_jvp" in text)  # e.g. glu_jvp_cpu for bfloat16
        if not no_formula:
            res.fail("jvp", exc)
            return
    # No forward-mode formula in torch for this op: J t through two reverse passes
    # (the transpose of a VJP is a JVP), so the check still runs; the report notes it.
    try:
        prim = [p.clone().requires_grad_(True) for p in primals]
        outs = f(*prim)
        us = [torch.zeros_like(o, requires_grad=True) for o in outs]
        gs = _grad(outs, prim, us, create_graph=True)
        total = [sum((g * t).sum() for g, t in zip(gs, tangents))] if gs else []
        res.values["jvp"] = [to_numpy(x) for x in _grad(total, us, [torch.ones_like(x) for x in total], False)]
        res.note("jvp", "torch has no forward-mode AD for this op here; its JVP was taken as the transpose of its VJP")
    except Exception as exc:
        res.fail("jvp", exc)
