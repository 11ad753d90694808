"""Pytrees in, a Verdict out: structure, shape, dtype, NaN/Inf positions, then values.

Works on NumPy trees only (the backends convert), so it imports without torch or jax.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from equivcheck.engine.dtypes import np_dtype
from equivcheck.engine.tolerance import Tolerance

Leaf = np.ndarray
_FLOAT_KINDS = "fc"


def flatten(tree: Any, path: str = "out") -> list[tuple[str, Any]]:
    """(path, leaf) pairs; mappings by sorted key, sequences by position."""
    if isinstance(tree, Mapping):
        return [kv for k in sorted(tree, key=str) for kv in flatten(tree[k], f"{path}[{k!r}]")]
    if isinstance(tree, (list, tuple)):
        return [kv for i, v in enumerate(tree) for kv in flatten(v, f"{path}[{i}]")]
    return [(path, tree)]


def leaves(tree: Any) -> list[Any]:
    """The leaves in `flatten`'s order, without building their paths (a 100-step trajectory has
    thousands of leaf-steps; the paths are needed only for the failing one)."""
    if isinstance(tree, Mapping):
        return [x for k in sorted(tree, key=str) for x in leaves(tree[k])]
    if isinstance(tree, (list, tuple)):
        return [x for v in tree for x in leaves(v)]
    return [tree]


def _describe(tree: Any) -> str:
    if isinstance(tree, Mapping):
        return f"dict with keys {sorted(map(str, tree))}"
    if isinstance(tree, (list, tuple)):
        return f"{type(tree).__name__} of {len(tree)}"
    if tree is None:
        return "None"
    a = np.asarray(tree)
    return f"array {a.dtype}{list(a.shape)}"


def _structure_diff(t: Any, j: Any, path: str = "out") -> str | None:
    """Where the two trees stop having the same shape of containers, in words."""
    t_map, j_map = isinstance(t, Mapping), isinstance(j, Mapping)
    t_seq, j_seq = isinstance(t, (list, tuple)), isinstance(j, (list, tuple))
    if t_map and j_map:
        if set(map(str, t)) != set(map(str, j)):
            return f"{path}: torch gives {_describe(t)}, jax gives {_describe(j)}"
        jk = {str(k): k for k in j}
        for k in t:
            d = _structure_diff(t[k], j[jk[str(k)]], f"{path}[{k!r}]")
            if d:
                return d
        return None
    if t_seq and j_seq:
        if len(t) != len(j):
            return f"{path}: torch gives {_describe(t)}, jax gives {_describe(j)}"
        for i, (a, b) in enumerate(zip(t, j)):
            d = _structure_diff(a, b, f"{path}[{i}]")
            if d:
                return d
        return None
    if t_map or j_map or t_seq or j_seq or (t is None) != (j is None):
        return f"{path}: torch gives {_describe(t)}, jax gives {_describe(j)}"
    return None


@dataclasses.dataclass
class LeafDiff:
    """How far apart one leaf is, at its worst element."""

    path: str
    shape: tuple[int, ...]
    dtype: str
    max_abs: float
    max_rel: float
    max_ulp: float
    ratio: float  # worst |t - j| / allowed; > 1 fails
    frac_bad: float
    worst_index: tuple[int, ...] | None
    torch_value: float | None
    jax_value: float | None
    reference_value: float | None = None

    def summary(self) -> str:
        if self.worst_index is None:
            return f"{self.path}: empty"
        ref = "" if self.reference_value is None else f", float64 reference {self.reference_value:.9g}"
        return (
            f"{self.path} {self.dtype}{list(self.shape)}: worst at index {list(self.worst_index)}: "
            f"torch {self.torch_value:.9g}, jax {self.jax_value:.9g}{ref}; "
            f"max abs err {self.max_abs:.3g}, max rel err {self.max_rel:.3g}, {self.max_ulp:.3g} ulp; "
            f"{100 * self.frac_bad:.3g}% of elements out of tolerance"
        )


@dataclasses.dataclass
class Verdict:
    """The outcome of comparing one check's two results."""

    ok: bool
    kind: str  # match | structure | shape | dtype | nonfinite | values | error
    message: str = ""
    ratio: float = 0.0  # worst error over allowed error, across leaves (the margin)
    leaves: list[LeafDiff] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    side: str | None = None  # which side is off, once diagnosed: torch | jax | both | None
    diagnosis: str = ""
    path: str | None = None  # the leaf that failed
    # No side could be named at this example only (a kink, unstable finite differences):
    # another failing example of the same check may still decide.
    local: bool = False

    @property
    def worst(self) -> LeafDiff | None:
        return max(self.leaves, key=lambda leaf: leaf.ratio, default=None)


def _as_array(x: Any) -> np.ndarray:
    return np.asarray(x)


def _wide(a: np.ndarray) -> np.ndarray:
    if a.dtype.kind in "iub":
        return a.astype(np.float64)
    return a.astype(np.float64) if a.dtype != np.float64 else a


def _subnormal_floor(dtype: np.dtype) -> float:
    """The smallest normal number of a floating `dtype` (0 for others): every bound admits a
    difference below it. XLA flushes subnormals to zero on CPU (and FTZ kernels do on GPU) where
    torch keeps them, so a relative-only bound (atol 0, as for log1p) failed on 1.4e-45 against 0,
    a difference of one subnormal ulp that says nothing of the function."""
    if dtype.name == "bfloat16":
        return float(np.finfo(np.float32).smallest_normal)  # bfloat16 keeps float32's exponent range
    return float(np.finfo(dtype).smallest_normal) if dtype.kind == "f" else 0.0


def allowed(tol: Tolerance, t: Any, j: Any, dtype: Any = None) -> np.ndarray:
    """The difference `tol` admits between t and j, element by element, in float64: atol (at
    least `dtype`'s smallest normal, see `_subnormal_floor`) plus rtol times the larger magnitude,
    the element's or, for `tol.per == "leaf"`, the leaf's largest finite one. `dtype` is the
    tested dtype (default: t's). Every bound outside `compare_leaf` comes from here, so a helper
    never judges stricter or looser than the verdict it explains."""
    t64, j64 = np.asarray(t, np.float64), np.asarray(j, np.float64)
    with np.errstate(invalid="ignore"):
        mag = np.maximum(np.abs(t64), np.abs(j64))
    if tol.per != "element":
        mag = np.max(np.where(np.isfinite(mag), mag, 0.0), initial=0.0)
    floor = _subnormal_floor(np_dtype(dtype) if isinstance(dtype, str) else np.dtype(dtype) if dtype is not None
                             else np.asarray(t).dtype)
    return np.broadcast_to(max(tol.atol, floor) + tol.rtol * mag, np.broadcast(t64, j64).shape)


def within(tol: Tolerance, t: Any, j: Any, dtype: Any = None) -> np.ndarray:
    """Elementwise: t and j within `allowed`, or equal (the same infinity); NaN is within nothing."""
    t64, j64 = np.asarray(t, np.float64), np.asarray(j, np.float64)
    bound = allowed(tol, t64, j64, np.asarray(t).dtype if dtype is None else dtype)  # float64 in: no second copy
    with np.errstate(invalid="ignore"):
        return (np.abs(t64 - j64) <= bound) | (t64 == j64)


def ulp_distance(a: np.ndarray, b: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Units in the last place of `dtype` between a and b (both given in float64)."""
    finfo = np.finfo(np.float32) if dtype.name == "bfloat16" else np.finfo(dtype)
    mant = 7 if dtype.name == "bfloat16" else finfo.nmant
    mag = np.maximum(np.maximum(np.abs(a), np.abs(b)), float(finfo.smallest_normal))
    spacing = 2.0 ** (np.floor(np.log2(mag)) - mant)
    return np.abs(a - b) / spacing


def compare_leaf(path: str, t: np.ndarray, j: np.ndarray, tol: Tolerance, *, mask: np.ndarray | None = None) -> tuple[Verdict | None, LeafDiff | None]:
    """Compare one pair of arrays. Returns a failing Verdict, or the LeafDiff of a pass."""
    if t.shape != j.shape:
        return Verdict(False, "shape", f"{path}: shape differs: torch {list(t.shape)}, jax {list(j.shape)}"), None
    if t.dtype != j.dtype:
        both_int = t.dtype.kind in "iu" and j.dtype.kind in "iu"
        if not both_int:
            return Verdict(False, "dtype", f"{path}: dtype differs: torch {t.dtype}, jax {j.dtype}"), None
    tw, jw = _wide(t), _wide(j)
    if mask is not None:
        tw, jw = tw[~mask], jw[~mask]
    shape = t.shape
    if tw.size == 0:
        return None, LeafDiff(path, shape, str(t.dtype), 0, 0, 0, 0, 0, None, None, None)
    t_nan, j_nan = np.isnan(tw), np.isnan(jw)
    if (t_nan != j_nan).any():
        idx = np.flatnonzero(t_nan != j_nan)
        who = "torch" if t_nan.flat[idx[0]] else "jax"
        other = jw.flat[idx[0]] if who == "torch" else tw.flat[idx[0]]
        return Verdict(
            False, "nonfinite",
            f"{path}: NaN positions differ at {len(idx)} of {tw.size} elements; first at flat index {idx[0]}: "
            f"{who} gives NaN, the other side {other:.9g}",
            side=who,
        ), None
    t_inf, j_inf = np.isinf(tw), np.isinf(jw)
    if (t_inf != j_inf).any() or (t_inf & (tw != jw)).any():
        idx = np.flatnonzero((t_inf != j_inf) | (t_inf & (tw != jw)))
        return Verdict(
            False, "nonfinite",
            f"{path}: infinities differ at {len(idx)} of {tw.size} elements; first at flat index {idx[0]}: "
            f"torch {tw.flat[idx[0]]:.9g}, jax {jw.flat[idx[0]]:.9g}",
        ), None
    finite = ~(t_nan | t_inf)
    tf, jf = np.where(finite, tw, 0.0), np.where(finite, jw, 0.0)
    err = np.abs(tf - jf)
    mag = np.maximum(np.abs(tf), np.abs(jf))
    scale = mag if tol.per == "element" else np.max(mag, initial=0.0)
    allowed = max(tol.atol, _subnormal_floor(t.dtype)) + tol.rtol * scale
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(allowed > 0, err / allowed, np.where(err > 0, np.inf, 0.0))
        rel = np.where(mag > 0, err / mag, 0.0)
    flat = int(np.argmax(ratio))
    if mask is not None:
        full_index = tuple(int(i) for i in np.argwhere(~mask)[flat])
    else:
        full_index = tuple(int(i) for i in np.unravel_index(flat, shape)) if shape else ()
    ulps = ulp_distance(tf, jf, t.dtype) if t.dtype.kind == "f" or t.dtype.name == "bfloat16" else err
    diff = LeafDiff(
        path=path, shape=shape, dtype=str(t.dtype),
        max_abs=float(err.max()), max_rel=float(rel.max()), max_ulp=float(np.max(ulps)),
        ratio=float(ratio.flat[flat]), frac_bad=float(np.mean(ratio > 1)),
        worst_index=full_index, torch_value=float(tw.flat[flat]), jax_value=float(jw.flat[flat]),
    )
    if diff.ratio > 1:
        return Verdict(False, "values", f"values differ beyond {tol.describe()} ({tol.reason})", ratio=diff.ratio, leaves=[diff]), diff
    return None, diff


def compare(torch_tree: Any, jax_tree: Any, tol: Tolerance, *, masks: Mapping[str, np.ndarray] | None = None,
            per_path: Mapping[str, Tolerance] | None = None) -> Verdict:
    """Compare two result trees leaf by leaf under one tolerance.

    `masks` (path -> bool array) removes elements from the value comparison; the caller
    checks them separately (derivative conventions at kinks). `per_path` (path ->
    Tolerance) replaces `tol` for those leaves.
    """
    d = _structure_diff(torch_tree, jax_tree)
    if d:
        return Verdict(False, "structure", f"tree structure differs at {d}")
    leaves: list[LeafDiff] = []
    notes: list[str] = []
    failed: Verdict | None = None
    for (path, t), (_, j) in zip(flatten(torch_tree), flatten(jax_tree)):
        ta, ja = _as_array(t), _as_array(j)
        if ta.dtype != ja.dtype and ta.dtype.kind in "iu" and ja.dtype.kind in "iu":
            notes.append(f"{path}: integer widths differ (torch {ta.dtype}, jax {ja.dtype}); values compared")
        bad, diff = compare_leaf(path, ta, ja, (per_path or {}).get(path, tol), mask=(masks or {}).get(path))
        if bad is not None:
            bad.path = path
        if diff is not None:
            leaves.append(diff)
        if bad is not None and (failed is None or (failed.kind == "values" and bad.kind != "values")):
            failed = bad
        elif bad is not None and bad.kind == "values" and failed.kind == "values" and bad.ratio > failed.ratio:
            failed = bad
    ratio = max((leaf.ratio for leaf in leaves), default=0.0)
    if failed is not None:
        failed.leaves, failed.notes = leaves, notes
        failed.ratio = ratio if failed.kind == "values" else math.inf
        if failed.kind == "values":
            worst = failed.worst
            failed.message = f"{worst.path}: {failed.message}"
        return failed
    return Verdict(True, "match", ratio=ratio, leaves=leaves, notes=notes)


def n_elements(tree: Any) -> int:
    return sum(int(np.size(leaf)) for _, leaf in flatten(tree))


def is_float(x: Any) -> bool:
    a = np.asarray(x)
    return a.dtype.kind in _FLOAT_KINDS or a.dtype.name == "bfloat16"


def float_leaves(tree: Any) -> list[np.ndarray]:
    return [np.asarray(x) for _, x in flatten(tree) if is_float(x)]


def format_args(args: Sequence[Any], limit: int = 24) -> str:
    """Inputs in a failure message: small arrays in full (copy-pasteable), large ones summarised."""
    parts = []
    for i, a in enumerate(args):
        if isinstance(a, np.ndarray):
            if a.size <= limit:
                body = np.array2string(a.astype(np.float64) if a.dtype.name == "bfloat16" else a,
                                       separator=", ", precision=9, floatmode="maxprec")
                parts.append(f"arg{i}: {a.dtype}{list(a.shape)} {body}")
            else:
                wide = a.astype(np.float64)
                finite = wide[np.isfinite(wide)]
                rng = f"range [{finite.min():.4g}, {finite.max():.4g}]" if finite.size else "no finite values"
                parts.append(f"arg{i}: {a.dtype}{list(a.shape)} {rng}")
        else:
            parts.append(f"arg{i}: {a!r}")
    return "; ".join(parts)
