"""Framework-neutral inputs: NumPy arrays drawn by Hypothesis, one master copy for both sides.

Shapes come from a small per-check *palette* rather than fresh each example: JAX compiles
anew for every input shape (~0.1-0.2 s), a cached call costs ~0.1 ms. The palette is
sampled from the full shape space with the run's seed (a new seed, new shapes), its first
entry is the smallest valid shape, so Hypothesis still shrinks towards it. Values are drawn
element by element by Hypothesis, with each op's special points mixed in.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from hypothesis import strategies as st

from equivcheck.engine.dtypes import np_dtype
from equivcheck.ops.bulk import bulk_array, float_fill, step_off
from equivcheck.ops.matrices import Matrices
from equivcheck.ops.shapes import Broadcast, Same, Shape, ShapeSpec, call_rule

_WIDTH = {"float16": 16, "float32": 32, "float64": 64, "bfloat16": 32}
_TINY = {"float16": 2.0**-14, "float32": 2.0**-126, "float64": 2.0**-1022, "bfloat16": 2.0**-126}


# --------------------------------------------------------------------------- values


def _representable(x: float, dtype: str, direction: float) -> float:
    """`x` rounded into the dtype, moving towards `direction` if rounding left the range."""
    dt = np.float32 if dtype == "bfloat16" else np_dtype(dtype).type
    y = dt(x)
    if (float(y) - x) * (direction - x) < 0:
        y = np.nextafter(y, dt(direction))
    return float(y)


@dataclasses.dataclass(frozen=True)
class Floats:
    """Values for one floating-point argument.

    lo, hi     closed range (kept inside the dtype's finite range); a range holding no number of
               the dtype (Floats(1e-9, 1e-9) in float32) draws the dtype's nearest to its middle
    special    values the op treats specially (kinks, zeros, poles): drawn often
    near       points approached within a few ulps from both sides (singularities)
    tiny       also draw magnitudes near the smallest normal number
    nonfinite  also draw NaN and +-inf
    fill       arrays mostly of one repeated value (ties for max, all-zero vectors for
               norms); otherwise every element is drawn on its own
    unique     no two elements equal (std/var away from a constant array)
    exclude    values never drawn (x**y at y == 0 has its own pair)
    min_magnitude  nonzero values have at least this magnitude (keeps an op whose
               derivatives blow up near 0 away from overflow; specials still drawn)
    """

    lo: float = -10.0
    hi: float = 10.0
    special: tuple[float, ...] = ()
    near: tuple[float, ...] = ()
    tiny: bool = True
    nonfinite: bool = False
    fill: bool = False
    unique: bool = False
    exclude: tuple[float, ...] = ()
    min_magnitude: float = 0.0

    def _range(self, dtype: str) -> tuple[float, float]:
        if self.lo > self.hi:
            raise ValueError(f"Floats(lo={self.lo}, hi={self.hi}): lo is above hi, so there is nothing to draw")
        finfo = np.finfo(np.float32 if dtype == "bfloat16" else np_dtype(dtype))
        lo = _representable(max(self.lo, float(finfo.min)), dtype, math.inf)
        hi = _representable(min(self.hi, float(finfo.max)), dtype, -math.inf)
        if lo > hi:  # no number of the dtype inside: the range stands for the value it rounds to
            mid = float(np.float32(np_dtype(dtype).type((self.lo + self.hi) / 2)) if dtype == "bfloat16"
                        else np_dtype(dtype).type((self.lo + self.hi) / 2))
            return mid, mid
        return lo, hi

    def elements(self, dtype: str) -> st.SearchStrategy[float]:
        lo, hi = self._range(dtype)
        width = _WIDTH[dtype]
        parts = [st.floats(a, b, width=width, allow_nan=False, allow_infinity=False, allow_subnormal=False)
                 for a, b in self._bands(lo, hi, dtype)]
        inside = [float(v) for v in self.special if lo <= v <= hi]
        spacing = np.finfo(np.float32 if dtype == "bfloat16" else np_dtype(dtype)).eps
        for x0 in self.near:
            step = spacing * max(abs(x0), 1.0) * (256 if dtype == "bfloat16" else 1)
            inside += [v for k in (1, 2, 8) for v in (x0 - k * step, x0 + k * step) if lo <= v <= hi]
        if inside:
            parts.append(st.sampled_from(inside))
        tiny = _TINY[dtype]
        if self.tiny and self.min_magnitude <= tiny:
            # tiny * 2**e * (1 + m/16) is exact in every float dtype: no rejection sampling.
            mags = st.tuples(st.integers(0, 20), st.integers(0, 15)).map(lambda em: tiny * 2.0 ** em[0] * (1 + em[1] / 16))
            top = tiny * 2.0**21  # above every magnitude drawn
            if hi >= tiny and lo <= top:
                parts.append(mags if lo <= tiny and hi >= top else mags.filter(lambda v: lo <= v <= hi))
            if lo <= -tiny and hi >= -top:
                neg = mags.map(lambda v: -v)
                parts.append(neg if lo <= -top and hi >= -tiny else neg.filter(lambda v: lo <= v <= hi))
        if self.nonfinite:
            parts.append(st.sampled_from([math.nan, math.inf, -math.inf]))
        values = st.one_of(parts)
        if self.exclude:
            values = values.filter(lambda v: v not in self.exclude)
        return values

    def _bands(self, lo: float, hi: float, dtype: str) -> list[tuple[float, float]]:
        m = self.min_magnitude
        if m <= 0 or lo >= m or hi <= -m:
            return [(lo, hi)]
        bands = [(lo, _representable(-m, dtype, -math.inf)), (_representable(m, dtype, math.inf), hi)]
        kept = [(a, b) for a, b in bands if a <= b]
        return kept + ([(0.0, 0.0)] if lo <= 0 <= hi else [])

    def draw(self, dtype: str, shape: Shape, shapes: tuple[Shape, ...]) -> st.SearchStrategy[np.ndarray]:
        """Arrays drawn in bulk (equivcheck.ops.bulk): Hypothesis places the special values,
        NumPy fills the rest of the range."""
        lo, hi = self._range(dtype)
        store = np.dtype(np.float32) if dtype == "bfloat16" else np_dtype(dtype)
        fill = float_fill(lo, hi, self._bands(lo, hi, dtype), store, _TINY[dtype], self.exclude)
        arrays = bulk_array(store, shape, self.elements(dtype), fill, unique=self.unique, repeated=self.fill)
        if dtype == "bfloat16":
            # Unique float32 values can round to equal bfloat16 ones: unique stays best effort here.
            # Rounding can also land on an excluded value (0.50001 to 0.5): step off it in bfloat16.
            return arrays.map(lambda a: step_off(_clip_into(a.astype(np_dtype("bfloat16")), self.lo, self.hi),
                                                 self.exclude, hi, _TINY[dtype]))
        return arrays

    def sample(self, dtype: str, shape: Shape, shapes: tuple[Shape, ...], rng: np.random.Generator) -> np.ndarray:
        """Uniform in [lo, hi] from a NumPy generator (as every spec's `sample`: the batches of
        a model's train trajectory, too many values for Hypothesis to draw)."""
        return rng.uniform(self.lo, self.hi, shape).astype(np_dtype(dtype))


def _clip_into(a: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Rounding to bfloat16 can step just outside [lo, hi]: step back inside."""
    wide = a.astype(np.float64)
    bad = (wide < lo) | (wide > hi)
    if bad.any():
        a = a.copy()
        toward = np.where(wide[bad] < lo, np.inf, -np.inf).astype(a.dtype)
        a[bad] = np.nextafter(a[bad], toward)
    return a


@dataclasses.dataclass(frozen=True)
class Ints:
    """Integer values in [lo, hi] (int64 on the torch side; JAX keeps int32 without x64).

    `dtype` another integer type: `Ints(0, 255, dtype="uint8")` draws raw 8-bit images.
    `special` values a model treats apart (an Embedding's padding_idx): a quarter of the
    elements drawn in bulk take one of them, and element-by-element draws pick them often.
    Raises ValueError: a range outside the dtype, a special value outside [lo, hi].
    """

    lo: int = 0
    hi: int = 10
    dtype: str = "int64"
    special: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        info = np.iinfo(np.dtype(self.dtype))  # refuses a non-integer dtype
        if not info.min <= self.lo <= self.hi <= info.max:
            raise ValueError(f"Ints: [{self.lo}, {self.hi}] is not a range inside {self.dtype}")
        object.__setattr__(self, "special", tuple(int(v) for v in self.special))
        bad = [v for v in self.special if not self.lo <= v <= self.hi]
        if bad:
            raise ValueError(f"Ints: special values {bad} lie outside [{self.lo}, {self.hi}]")

    def _fill(self, rng: np.random.Generator, n: Any) -> np.ndarray:
        values = rng.integers(self.lo, self.hi, n, endpoint=True)
        if self.special:
            values = np.where(rng.random(n) < 0.25, rng.choice(np.array(self.special), n), values)
        return values

    def draw(self, dtype, shape, shapes):
        one = st.integers(self.lo, self.hi)
        if self.special:
            one = st.one_of(one, st.sampled_from(self.special))
        return bulk_array(np.dtype(self.dtype), shape, one, self._fill)

    def sample(self, dtype, shape, shapes, rng):
        return self._fill(rng, shape).astype(self.dtype)


@dataclasses.dataclass(frozen=True)
class Index:
    """Valid indices into axis `axis` of the array whose shape is `shapes[of]`."""

    of: int = 0
    axis: int = 0

    def _size(self, shape: Shape, shapes: tuple[Shape, ...]) -> int:
        size = shapes[self.of][self.axis]
        if size == 0 and math.prod(shape) > 0:
            raise ValueError(f"Index: axis {self.axis} of shape {shapes[self.of]} is empty but indices are needed")
        return size

    def draw(self, dtype, shape, shapes):
        top = max(self._size(shape, shapes) - 1, 0)
        return bulk_array(np.dtype(np.int64), shape, st.integers(0, top), lambda rng, n: rng.integers(0, top, n, endpoint=True))

    def sample(self, dtype, shape, shapes, rng):
        return rng.integers(0, max(self._size(shape, shapes), 1), shape).astype(np.int64)


@dataclasses.dataclass(frozen=True)
class Mask:
    """Boolean arrays, every element drawn on its own (a row may be all False: for attention
    masks that must keep a key per row, or padding that must be a suffix, use `Lengths`)."""

    def draw(self, dtype, shape, shapes):
        return bulk_array(np.dtype(np.bool_), shape, st.booleans(), lambda rng, n: rng.random(n) < 0.5)

    def sample(self, dtype, shape, shapes, rng):
        return rng.random(shape) < 0.5


@dataclasses.dataclass(frozen=True)
class Lengths:
    """Padding masks made from drawn lengths: for an argument of shape (..., L), a length n in
    [min_keep, L] is drawn per row (every index but the last axis) and the row keeps its first
    n positions, the rest padding (a suffix; `left=True`: a prefix). With min_keep >= 1 no
    row is fully masked, so masked attention has a key to attend to in every row (softmax over
    none is NaN on both sides, and compares nothing).

    padding   False: True (or 1) marks kept positions (JAX/Flax masks, Hugging Face's
              attention_mask); True: True marks padding (torch's key_padding_mask)
    dtype     "bool", or an integer dtype for 1/0 masks (Hugging Face's int64 attention_mask)
    edge      the share of rows drawn in bulk that keep min_keep positions exactly (nearly
              fully masked rows, where masked softmax goes wrong first); element-by-element
              draws pick min_keep often when edge > 0; None (unset): 0, and a model check
              sets it (equivcheck.models.edges), which edge=0.0 keeps from doing
    Raises ValueError: min_keep < 0, edge outside [0, 1], a dtype neither bool nor integer; when drawing, a 0-d
    shape or rows shorter than min_keep (the message names the shape).
    """

    min_keep: int = 1
    padding: bool = False
    left: bool = False
    dtype: str = "bool"
    edge: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.min_keep, int) or self.min_keep < 0:
            raise ValueError(f"Lengths: min_keep must be an int >= 0, got {self.min_keep!r}")
        if self.edge is not None and not 0.0 <= self.edge <= 1.0:
            raise ValueError(f"Lengths: edge is a share of rows, in [0, 1], got {self.edge!r}")
        if np.dtype(self.dtype).kind not in "biu":
            raise ValueError(f"Lengths: dtype {self.dtype!r} is neither bool nor an integer type")

    def _rows(self, shape: Shape) -> tuple[Shape, int]:
        if not shape:
            raise ValueError("Lengths: a mask needs an axis to pad (the last), got shape ()")
        if shape[-1] < self.min_keep and math.prod(shape[:-1]) > 0:
            raise ValueError(f"Lengths: rows of shape {shape} have {shape[-1]} positions, fewer than min_keep="
                             f"{self.min_keep}")
        return tuple(shape[:-1]), shape[-1]

    def mask(self, lengths: np.ndarray, length: int) -> np.ndarray:
        """The masks of rows of these lengths, each `length` long."""
        pos = np.arange(length)
        keep = pos >= length - lengths[..., None] if self.left else pos < lengths[..., None]
        return (~keep if self.padding else keep).astype(self.dtype)

    def _lengths(self, rng: np.random.Generator, n: Any, least: int, length: int) -> np.ndarray:
        drawn = rng.integers(least, length, n, endpoint=True)
        return np.where(rng.random(n) < self.edge, least, drawn) if self.edge else drawn

    def draw(self, dtype, shape, shapes):
        rows, length = self._rows(shape)
        least = min(self.min_keep, length)
        one = st.integers(least, length)
        if self.edge:
            one = st.one_of(one, st.just(least))
        return bulk_array(np.dtype(np.int64), rows, one,
                          lambda rng, n: self._lengths(rng, n, least, length)).map(lambda n: self.mask(n, length))

    def sample(self, dtype, shape, shapes, rng):
        rows, length = self._rows(shape)
        return self.mask(self._lengths(rng, rows, min(self.min_keep, length), length), length)


@dataclasses.dataclass(frozen=True)
class Static:
    """A non-array argument (axis, exponent, flag) drawn from a few values.

    Each value compiles its own JAX program, so keep the list short.
    """

    values: tuple[Any, ...]


ArgSpec = Floats | Ints | Index | Mask | Lengths | Matrices | Static


@dataclasses.dataclass(frozen=True)
class Inputs:
    """How to draw a pair's positional arguments: a shape rule and one spec per argument.

    Array arguments take the shapes from `shapes` in order; `Static` ones take none.
    """

    shapes: ShapeSpec
    args: tuple[ArgSpec, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "args", tuple(self.args))
        if not isinstance(self.shapes, ShapeSpec):
            raise TypeError(f"Inputs: the shape rule is a {type(self.shapes).__name__} ({self.shapes!r:.60}), not a "
                            f"shape rule: give Fixed(((shape, ...),)) for fixed shapes, or Same, Broadcast, MatMul, "
                            f"Custom")
        arrays = sum(not isinstance(a, Static) for a in self.args)
        if arrays != self.shapes.n:
            raise ValueError(f"Inputs: {arrays} array arguments but the shape rule makes {self.shapes.n} shapes")

    @property
    def n_args(self) -> int:
        return len(self.args)

    def palette(self, seed: int, size: int) -> list[tuple[Shape, ...]]:
        return self.shapes.palette(np.random.default_rng(seed), size)

    def strategy(self, dtype: str, palette: Sequence[tuple[Shape, ...]] | None = None) -> st.SearchStrategy[tuple]:
        """Argument tuples. With a palette, shapes come from it; without, fresh every example."""
        if palette:
            # The smallest shapes are cheap and quickly exhausted: give the others twice the weight.
            shapes = st.sampled_from(list(palette[:2]) + [s for s in palette[2:] for _ in (0, 1)])
        else:
            rule, n = self.shapes, self.shapes.n
            fresh = st.integers(0, 2**32 - 1).map(lambda s: call_rule(lambda: rule.sample(np.random.default_rng(s)), n))
            shapes = st.one_of(st.just(call_rule(rule.minimal, n)), fresh)
        # One strategy per shape set, built once: a fresh one per example is validated anew,
        # which cost more than drawing the values.
        built: dict[tuple[Shape, ...], st.SearchStrategy[tuple]] = {}

        def values(ss: tuple[Shape, ...]) -> st.SearchStrategy[tuple]:
            if ss not in built:
                built[ss] = self._values(dtype, ss)
            return built[ss]

        return shapes.flatmap(values)

    def shapes_of(self, args: Sequence[Any]) -> tuple[Shape, ...]:
        """The shapes of the array arguments in `args` (a drawn tuple), as a palette entry holds them."""
        return tuple(tuple(np.shape(a)) for a, spec in zip(args, self.args, strict=True) if not isinstance(spec, Static))

    def placeholders(self, dtype: str, shapes: tuple[Shape, ...]) -> list[tuple[Any, ...]]:
        """Zero-valued argument tuples with the dtypes the strategy draws, one per
        combination of static values: what a compiler needs, nothing more."""
        options: list[list[Any]] = []
        it = iter(shapes)
        for spec in self.args:
            if isinstance(spec, Static):
                options.append(list(spec.values))
            else:
                options.append([np.zeros(next(it), _array_dtype(spec, dtype))])
        return [tuple(combo) for combo in itertools.product(*options)]

    def cast(self, args: Sequence[Any], dtype: str) -> tuple[Any, ...]:
        """A given argument tuple (a witness: nested lists or arrays) as the strategy would
        have drawn it at `dtype`: floating arguments in `dtype`, integer, index and mask
        arguments in their own dtypes, `Static` values as given.

        Raises ValueError when the number of arguments or a static value does not fit."""
        if len(args) != len(self.args):
            raise ValueError(f"{len(args)} arguments given; the inputs draw {len(self.args)}")
        out: list[Any] = []
        for k, (spec, value) in enumerate(zip(self.args, args)):
            if isinstance(spec, Static):
                if value not in spec.values:
                    raise ValueError(f"argument {k}: {value!r} is not one of the static values {spec.values}")
                out.append(value)
                continue
            out.append(np.array(value, dtype=_array_dtype(spec, dtype)))
        return tuple(out)

    def _values(self, dtype: str, shapes: tuple[Shape, ...]) -> st.SearchStrategy[tuple]:
        parts, it = [], iter(shapes)
        for spec in self.args:
            if isinstance(spec, Static):
                parts.append(st.sampled_from(spec.values))
            else:
                parts.append(spec.draw(dtype, next(it), shapes))
        return st.tuples(*parts)


def _array_dtype(spec: ArgSpec, dtype: str) -> np.dtype:
    """The dtype a spec draws at the check's float dtype: its own where it has one."""
    if isinstance(spec, (Ints, Lengths)):
        return np.dtype(spec.dtype)
    return {Index: np.dtype(np.int64), Mask: np.dtype(np.bool_)}.get(type(spec), np_dtype(dtype))


# --------------------------------------------------------------------------- shorthands


def unary(elements: Floats | None = None, **shape_kw: Any) -> Inputs:
    """One floating array: `unary(Floats(lo=0), min_dims=1)`."""
    shape_kw.setdefault("zero_size", True)
    return Inputs(Same(n=1, **shape_kw), (elements or Floats(),))


def binary(a: Floats | None = None, b: Floats | None = None, *, broadcast: bool = True, **shape_kw: Any) -> Inputs:
    """Two floating arrays, broadcastable (default) or of one shape."""
    shape_kw.setdefault("zero_size", True)
    rule = Broadcast(n=2, **shape_kw) if broadcast else Same(n=2, **shape_kw)
    return Inputs(rule, (a or Floats(), b or Floats()))


def tangent_like(seed: int, leaves: Sequence[np.ndarray], dtype: str) -> list[np.ndarray]:
    """Standard-normal arrays shaped like `leaves`: cotangents, tangents, HVP directions."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(np.shape(x)).astype(np_dtype(dtype)) for x in leaves]
