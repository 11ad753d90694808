"""Every value a JAX port computes, and which of them is a torch module's output: localising a
port that has no taps (issue 12 section 1).

`port_values` traces the port with jax.make_jaxpr and evaluates the jaxpr equation by
equation (as jax.core.eval_jaxpr does), keeping every equation's outputs, including those of
the equations inside jit, custom_jvp/custom_vjp and remat calls; loops and branches (while,
cond) count by their outputs only, a scan's body values are kept stacked over its steps. The
port's own inputs (its parameters and arrays) are values too. The interpretation is itself
traced and compiled as one program returning every value: bound eagerly, each primitive of a
new shape compiled on its own (120 compilations, 10.5 of a 12 s localisation of a small U-Net).

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

from equivcheck.backends.jaxpr import call_body
from equivcheck.engine.compare import compare
from equivcheck.engine.tolerance import Tolerance

MAX_PERMUTED_RANK = 5  # 120 axis orders at most
MAX_UNROLLED = 256  # longer scans are bound whole: their body values, stacked, would hold every step
ARGUMENT = "the port's argument"
# What a port does to a module's output before passing it on: a change (ELEMENTWISE) or a move (LAYOUT).
ELEMENTWISE = frozenset({"mul", "add", "sub", "div", "neg", "select_n", "max", "min", "pow", "integer_pow", "exp",
                         "log", "tanh", "logistic", "abs", "sign", "sqrt", "rsqrt", "clamp", "erf", "square"})
LAYOUT = frozenset({"transpose", "reshape", "copy", "copy_p", "convert_element_type"})


@dataclasses.dataclass
class Value:
    """One array the port computes: a label for people ("tanh at port.py:12 (apply)"), the array,
    and the indices (in the same list) of the values it was computed from."""

    label: str
    array: Any
    parents: tuple[int, ...] = ()
    primitive: str = ""


def evaluate(fn: Callable[..., Any], *args: Any) -> list[Value]:
    """Every array `fn(*args)` computes, in program order, after the flattened arguments
    ("the port's argument [0]['fc1']['kernel']"). The body values of a `scan` of at most
    MAX_UNROLLED steps are kept stacked over the steps (as the scan's own outputs are), so a
    `lax.map` over the batch or an RNN's gates show as batched arrays. Values with no NumPy form
    (a typed PRNG key, a token) keep `array` None. Raises what tracing or running `fn` raises."""
    import jax
    from jax.extend.core import Literal
    from jax.extend.source_info_util import summarize

    closed = jax.make_jaxpr(fn)(*args)
    leaves = jax.tree_util.tree_flatten_with_path(args)[0]
    values = [Value(f"{ARGUMENT} {jax.tree_util.keystr(path)}", a) for path, a in leaves]
    sink = list(values)

    def run(jaxpr: Any, consts: Sequence[Any], operands: Sequence[Any], ids: Sequence[int | None],
            sink: list[Value]) -> tuple[list[Any], list[int | None]]:
        env: dict[Any, tuple[Any, int | None]] = {}
        read = lambda v: (v.val, None) if isinstance(v, Literal) else env[v]
        env.update((v, (c, None)) for v, c in zip(jaxpr.constvars, consts))
        env.update((v, (a, i)) for v, a, i in zip(jaxpr.invars, operands, ids))
        for eqn in jaxpr.eqns:
            ins, in_ids = zip(*(read(v) for v in eqn.invars)) if eqn.invars else ((), ())
            where = _where(summarize(eqn.source_info))
            label = eqn.primitive.name + (f" at {where}" if where else "")
            parents = tuple(i for i in in_ids if i is not None)
            body = call_body(eqn, len(ins))
            if body is not None:  # the call's outputs are its body's: kept once
                outs, out_ids = run(body[0], body[1], ins, in_ids, sink)
            else:
                if eqn.primitive.name == "scan" and 0 < eqn.params["length"] <= MAX_UNROLLED:
                    outs = _scan(eqn, list(ins), label, parents, sink, run)
                else:
                    with eqn.ctx.manager:
                        outs = eqn.primitive.bind(*ins, **eqn.primitive.get_bind_params(eqn.params))
                    outs = list(outs) if eqn.primitive.multiple_results else [outs]
                out_ids = []
                for val in outs:
                    sink.append(Value(label, val, parents, eqn.primitive.name))
                    out_ids.append(len(sink) - 1)
            env.update((v, (val, i)) for v, val, i in zip(eqn.outvars, outs, out_ids))
        return [read(v)[0] for v in jaxpr.outvars], [read(v)[1] for v in jaxpr.outvars]

    def every_value(*operands: Any) -> list[Any]:
        del sink[len(values):]
        run(closed.jaxpr, closed.consts, operands, range(len(values)), sink)
        return [v.array if _keepable(v.array) else None for v in sink[len(values):]]

    arrays = jax.jit(every_value)(*jax.tree.leaves(args))
    for v, a in zip(sink[len(values):], arrays):
        v.array = a
    return sink


def _keepable(a: Any) -> bool:
    """Whether a traced value can leave the program as an array with a NumPy form."""
    import jax

    dtype = getattr(a, "dtype", None)
    if dtype is None or jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return False
    return np.dtype(dtype).kind in "biufc"


def _scan(eqn: Any, ins: list[Any], label: str, parents: tuple[int, ...], sink: list[Value], run: Any) -> list[Any]:
    """A scan whose body also returns each of its values, stacked over the steps into `sink`; its outputs."""
    import jax

    p = eqn.params
    body, n_consts, n_carry, n = p["jaxpr"], p["num_consts"], p["num_carry"], p["length"]
    consts, carry, xs = ins[:n_consts], ins[n_consts:n_consts + n_carry], ins[n_consts + n_carry:]
    seen: list[Value] = []

    def step(c: list[Any], x: list[Any]) -> tuple[list[Any], tuple[list[Any], list[Any]]]:
        del seen[:]
        outs, _ = run(body.jaxpr, body.consts, [*consts, *c, *x], [None] * len(body.jaxpr.invars), seen)
        return outs[:n_carry], (outs[n_carry:], [v.array if _keepable(v.array) else None for v in seen])

    carry, (ys, stacked) = jax.lax.scan(step, list(carry), list(xs), length=n, reverse=p["reverse"])
    for v, a in zip(seen, stacked):
        if a is not None:
            sink.append(Value(f"{v.label}, stacked over the {n} steps of the {label}", a, parents, "scan"))
    return [*carry, *ys]


def _numeric(a: Any) -> np.ndarray | None:
    """a as a NumPy array; None for what has no NumPy form (a typed PRNG key, a token)."""
    try:
        return np.asarray(a)
    except (TypeError, ValueError):
        return None


def _where(summary: str) -> str:
    """"port.py:12 (apply)" from jax's "/path/to/port.py:12:4 (outer.<locals>.apply)"."""
    m = re.fullmatch(r"(.*):(\d+):\d+ \((.*)\)", summary)
    return f"{os.path.basename(m[1])}:{m[2]} ({m[3].rsplit('.', 1)[-1]})" if m else summary.strip(" ,")


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
    """The port's floating values (from `evaluate`), indexed by size, for looking torch outputs
    up; `Found.index` is a position in `values`."""

    def __init__(self, values: Sequence[Value], tol: Tolerance) -> None:
        self.tol = tol
        self.values = list(values)
        self.arrays: dict[int, np.ndarray] = {}
        self.by_size: dict[int, list[int]] = {}
        self.children: dict[int, list[int]] = {}
        for i, v in enumerate(self.values):
            for p in v.parents:
                self.children.setdefault(p, []).append(i)
            a = _numeric(v.array)
            if a is not None and a.dtype.kind == "f" and a.size:
                self.by_size.setdefault(a.size, []).append(i)
                self.arrays[i] = a

    def __len__(self) -> int:
        return len(self.arrays)

    def find(self, t: np.ndarray) -> Found:
        """The value equal to `t` within tolerance; else the closest one the port computed (one of
        its arguments only when it computes none of that size)."""
        t = np.asarray(t, np.float64)
        best = {True: Found(None), False: Found(None)}  # keyed by "is one of the port's arguments"
        for i in self.by_size.get(t.size, ()):
            for layout, v in _layouts(self.arrays[i], t.shape):
                ratio, max_abs, max_rel = _errors(t, v, self.tol)
                if ratio <= 1.0 and compare(t, v, self.tol).ok:
                    return Found(i, v, layout, max_abs, max_rel, ratio)
                arg = self.values[i].label.startswith(ARGUMENT)
                if ratio < best[arg].ratio:
                    best[arg] = Found(None, v, self.values[i].label + (f", {layout}" if layout else ""), max_abs,
                                      max_rel, ratio)
        return best[False] if best[False].value is not None else best[True]

    def changed_after(self, i: int, t: np.ndarray, depth: int = 3) -> tuple[int, Found] | None:
        """The value that replaces value i (torch's `t`) on its way on: i's only use, through at
        most `depth` elementwise or layout steps each the only use of the last, once it is no
        longer `t` (a scale, a mask applied to a module's output). None when i is used more than
        once (its next module's own computation, a residual) or stays `t`."""
        j = i
        for _ in range(depth):
            kids = sorted(set(self.children.get(j, ())))
            if len(kids) != 1:
                return None
            c = kids[0]
            kind = self.values[c].primitive
            if c not in self.arrays or self.arrays[c].size != self.arrays[i].size or kind not in ELEMENTWISE | LAYOUT:
                return None
            f = Matcher([self.values[c]], self.tol).find(t)
            if kind in ELEMENTWISE and not f.ok and f.value is not None:
                return c, dataclasses.replace(f, index=None, layout=self.values[c].label)
            j = c
        return None


def _layouts(v: np.ndarray, shape: tuple[int, ...]) -> list[tuple[str, np.ndarray]]:
    """v in torch's `shape`: as it is, axes permuted, reshaped in row-major order, and a
    permutation together with merging or splitting adjacent axes (torch's (B, C, H, W) against a
    port's (B, H*W, C) patch tokens; (B, L, H*D) against (B, H, L, D) heads)."""
    v = np.asarray(v, np.float64)
    out = [("", v)] if v.shape == shape else []
    if v.shape != shape:
        out.append(("reshaped", v.reshape(shape)))
    # equal sizes along different permutations are different layouts: none is skipped by shape
    if v.ndim <= MAX_PERMUTED_RANK:  # the port's axes permuted, then merged into torch's
        for q in itertools.permutations(range(v.ndim)):
            moved = tuple(v.shape[k] for k in q)
            if q != tuple(range(v.ndim)) and _merges(moved, shape):
                out.append((f"axes {q}" + (", reshaped" if moved != shape else ""), v.transpose(q).reshape(shape)))
    if len(shape) <= MAX_PERMUTED_RANK and v.ndim < len(shape):  # torch's axes permuted merge into the port's
        for p in itertools.permutations(range(len(shape))):
            moved = tuple(shape[k] for k in p)
            if p != tuple(range(len(shape))) and _merges(moved, v.shape):
                back = tuple(int(k) for k in np.argsort(p))
                out.append((f"reshaped to {moved}, axes {back}", v.reshape(moved).transpose(back)))
    return out


def _merges(fine: tuple[int, ...], coarse: tuple[int, ...]) -> bool:
    """Whether `coarse` is `fine` with runs of adjacent axes merged (sizes-1 axes ignored)."""
    fine, coarse = [d for d in fine if d != 1], [d for d in coarse if d != 1]
    k = 0
    for d in coarse:
        prod = 1
        while prod < d and k < len(fine):
            prod *= fine[k]
            k += 1
        if prod != d:
            return False
    return k == len(fine)


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
                dtype: str, device: str) -> list[Value]:
    """Every value the port computes on `inputs` (see `evaluate`)."""
    import jax

    from equivcheck.backends.jax import device_of, x64
    from equivcheck.models import mapping as mm
    from equivcheck.models.calls import apply_port
    from equivcheck.models.sides import _jnp_tree
    from equivcheck.models.tap import capturing

    with x64(dtype == "float64"), jax.default_device(device_of(device)):
        p, s, x, m = (_jnp_tree(a, dtype) for a in (params, stats, list(inputs), masks))
        with capturing(m, False):
            values = evaluate(lambda tree, *xs: apply_port(pair, tree, xs, train), mm.merge(p, s), *x)
    return values
