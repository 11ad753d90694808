"""Every value a JAX port computes, and which of them is a torch module's output: localising a
port that has no taps (issue 12 section 1).

`port_values` traces the port with jax.make_jaxpr and evaluates the jaxpr equation by
equation (as jax.core.eval_jaxpr does), keeping every equation's outputs, including those of
the equations inside jit, custom_jvp/custom_vjp and remat calls; loops and branches (scan,
while, cond) count by their outputs only. The port's own inputs (its parameters and arrays)
are values too.

`Matcher.find` looks a torch module's output up among those values: same size, then equal
within the forward tolerance as it is, with its axes permuted (NCHW against NHWC, (out, in)
against (in, out)), or reshaped in row-major order (heads split or merged, a flatten).
"""
from __future__ import annotations

import dataclasses
import itertools
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from equivcheck.engine.compare import compare
from equivcheck.engine.tolerance import Tolerance

# Call-like primitives whose body is a jaxpr taking the equation's operands one for one: their
# inner equations are the port's own code (a jitted helper, a custom_vjp activation, remat).
_CALLS = frozenset({"pjit", "jit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
                    "custom_vjp_call_jaxpr", "checkpoint", "remat"})
MAX_PERMUTED_RANK = 5  # 120 axis orders at most
ARGUMENT = "the port's argument"


def _body(eqn: Any, operands: int) -> tuple[Any, Sequence[Any]] | None:
    from jax.extend.core import ClosedJaxpr, Jaxpr

    if eqn.primitive.name not in _CALLS:
        return None
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        sub = eqn.params.get(key)
        if isinstance(sub, ClosedJaxpr) and len(sub.jaxpr.invars) == operands:
            return sub.jaxpr, sub.consts
        if isinstance(sub, Jaxpr) and not sub.constvars and len(sub.invars) == operands:
            return sub, ()
    return None


def evaluate(fn: Callable[..., Any], *args: Any) -> list[tuple[str, Any]]:
    """Every array `fn(*args)` computes, in program order, after the flattened arguments, each
    with a label for people ("tanh at port.py:12 (apply)", "the port's argument [0]['fc1']").
    Raises what tracing or running `fn` raises."""
    import jax
    from jax.extend.core import Literal

    from jax.extend.source_info_util import summarize

    closed = jax.make_jaxpr(fn)(*args)
    leaves = jax.tree_util.tree_flatten_with_path(args)[0]
    values: list[tuple[str, Any]] = [(f"{ARGUMENT} {jax.tree_util.keystr(path)}", a) for path, a in leaves]

    def run(jaxpr: Any, consts: Sequence[Any], operands: Sequence[Any]) -> list[Any]:
        env: dict[Any, Any] = {}
        read = lambda v: v.val if isinstance(v, Literal) else env[v]  # noqa: E731
        env.update(zip(jaxpr.constvars, consts))
        env.update(zip(jaxpr.invars, operands))
        for eqn in jaxpr.eqns:
            ins = [read(v) for v in eqn.invars]
            body = _body(eqn, len(ins))
            if body is not None:
                outs = run(body[0], body[1], ins)
            else:
                with eqn.ctx.manager:
                    outs = eqn.primitive.bind(*ins, **eqn.primitive.get_bind_params(eqn.params))
                outs = list(outs) if eqn.primitive.multiple_results else [outs]
            for v, val in zip(eqn.outvars, outs):
                env[v] = val
                values.append((f"{eqn.primitive.name} at {_where(summarize(eqn.source_info))}", val))
        return [read(v) for v in jaxpr.outvars]

    run(closed.jaxpr, closed.consts, jax.tree.leaves(args))
    return values


def _where(summary: str) -> str:
    """"port.py:12 (apply)" from jax's "/path/to/port.py:12:4 (outer.<locals>.apply)"."""
    m = re.fullmatch(r"(.*):(\d+):\d+ \((.*)\)", summary)
    return f"{os.path.basename(m[1])}:{m[2]} ({m[3].rsplit('.', 1)[-1]})" if m else summary


@dataclasses.dataclass
class Found:
    """A torch output looked up among the port's values: `index` of the one within tolerance
    (None: none is), else the closest of the same size; `value` in torch's layout."""

    index: int | None
    value: np.ndarray | None = None
    layout: str = ""
    max_abs: float = float("inf")
    max_rel: float = float("inf")
    ratio: float = float("inf")

    @property
    def ok(self) -> bool:
        return self.index is not None


class Matcher:
    """The port's floating values, indexed by size, for looking torch outputs up."""

    def __init__(self, values: Sequence[tuple[str, Any]], tol: Tolerance) -> None:
        self.tol = tol
        self.values: list[np.ndarray] = []
        self.labels: list[str] = []
        self.by_size: dict[int, list[int]] = {}
        for label, v in values:
            a = np.asarray(v)
            if a.dtype.kind == "f" and a.size:
                self.by_size.setdefault(a.size, []).append(len(self.values))
                self.values.append(a)
                self.labels.append(label)

    def __len__(self) -> int:
        return len(self.values)

    def find(self, t: np.ndarray) -> Found:
        """The value equal to `t` within tolerance; else the closest one the port computed (one of
        its arguments only when it computes none of that size)."""
        t = np.asarray(t, np.float64)
        best = {True: Found(None), False: Found(None)}  # keyed by "is one of the port's arguments"
        for i in self.by_size.get(t.size, ()):
            for layout, v in _layouts(self.values[i], t.shape):
                ratio, max_abs, max_rel = _errors(t, v, self.tol)
                if ratio <= 1.0 and compare(t, v, self.tol).ok:
                    return Found(i, v, layout, max_abs, max_rel, ratio)
                arg = self.labels[i].startswith(ARGUMENT)
                if ratio < best[arg].ratio:
                    best[arg] = Found(None, v, self.labels[i] + (f", {layout}" if layout else ""), max_abs, max_rel,
                                      ratio)
        return best[False] if best[False].value is not None else best[True]


def _layouts(v: np.ndarray, shape: tuple[int, ...]) -> list[tuple[str, np.ndarray]]:
    v = np.asarray(v, np.float64)
    out = [("", v)] if v.shape == shape else []
    if v.ndim == len(shape) and v.ndim <= MAX_PERMUTED_RANK and sorted(v.shape) == sorted(shape):
        for perm in itertools.permutations(range(v.ndim)):
            if perm != tuple(range(v.ndim)) and tuple(v.shape[k] for k in perm) == shape:
                out.append((f"axes {perm}", v.transpose(perm)))
    if v.shape != shape:
        out.append(("reshaped", v.reshape(shape)))
    return out


def _errors(t: np.ndarray, v: np.ndarray, tol: Tolerance) -> tuple[float, float, float]:
    """(max error / (atol + rtol*|t|), max abs, max rel); NaN where both are NaN counts as equal."""
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        err = np.abs(t - v)
        both = np.isnan(t) & np.isnan(v)
        err = np.where(both, 0.0, np.where(np.isnan(err), np.inf, err))
        rel = np.where(t != 0, err / np.abs(t), np.where(err == 0, 0.0, np.inf))
        ratio = err / (tol.atol + tol.rtol * np.abs(t))
    return float(ratio.max()), float(err.max()), float(rel.max())


def port_values(pair: Any, params: Any, stats: Any, inputs: Sequence[Any], masks: Mapping[str, Any], train: bool,
                dtype: str, device: str) -> list[tuple[str, np.ndarray]]:
    """Every value the port computes on `inputs`, labelled (see `evaluate`), as NumPy arrays."""
    import jax

    from equivcheck.backends.jax import device_of, x64
    from equivcheck.models import mapping as mm
    from equivcheck.models.sides import _jnp_tree
    from equivcheck.models.tap import capturing

    with x64(dtype == "float64"), jax.default_device(device_of(device)):
        p, s, x, m = (_jnp_tree(a, dtype) for a in (params, stats, list(inputs), masks))
        with capturing(m, False):
            values = evaluate(lambda tree, *xs: pair.jax_apply(tree, *xs, train=train), mm.merge(p, s), *x)
    return [(label, np.asarray(v)) for label, v in values]
