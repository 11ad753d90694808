"""Shape rules: which array shapes an operation's arguments take, drawn from a small palette.

JAX compiles anew for every input shape (~0.1-0.2 s), a cached call costs ~0.1 ms, so each check
draws its shapes from a palette sampled once with the run's seed; its first entry is the
smallest valid shape, so Hypothesis still shrinks towards it.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable

import numpy as np

from equivcheck.backends.results import SideError

Shape = tuple[int, ...]

__all__ = ["Broadcast", "Custom", "Fixed", "MatMul", "Same", "Shape", "ShapeRuleError", "ShapeSpec", "Square",
           "call_rule"]


class ShapeRuleError(ValueError):
    """A shape rule raised, or returned something that is not a tuple of its n shapes: the
    pair's own fault, which the runner reports as the pair's failed checks (the message reads
    on from "the shape rule of pair 'NAME' ")."""


def valid_shapes(value: object, n: int) -> tuple[Shape, ...]:
    """`value` as a tuple of n shapes, each a tuple of non-negative ints (or one such int), or
    ShapeRuleError.

    Checked here, where the rule's answer comes back, rather than where a shape is used: a bad
    one surfaced as a StopIteration from a generator, or as numpy's "negative dimensions"
    inside one side, blamed on the wrong code."""
    def dim(d: object) -> bool:
        return isinstance(d, numbers.Integral) and not isinstance(d, bool) and int(d) >= 0

    def shape(s: object) -> bool:
        return dim(s) or (isinstance(s, (tuple, list)) and all(dim(d) for d in s))

    if isinstance(value, (tuple, list)) and len(value) == n and all(shape(s) for s in value):
        # A bare int is NumPy's 1-D shape: Fixed(((3,),)) has always meant one argument of shape (3,).
        return tuple((int(s),) if dim(s) else tuple(int(d) for d in s) for s in value)
    text = repr(value)
    text = text if len(text) <= 80 else text[:77] + "..."
    raise ShapeRuleError(f"returned {text}, which is not a tuple of {n} shape{'s' if n != 1 else ''} "
                         "(each a tuple of non-negative ints)")


def call_rule(rule: Callable[[], object], n: int) -> tuple[Shape, ...]:
    """A shape rule's answer, checked; whatever it raises becomes a ShapeRuleError."""
    try:
        value = rule()
    except ShapeRuleError:
        raise
    except Exception as exc:
        err = SideError.from_exc("shape rule", "shapes", exc)
        raise ShapeRuleError(f"raised {err.type}: {err.message} ({err.where})") from exc
    return valid_shapes(value, n)


class ShapeSpec:
    """Draws a tuple of array shapes that fit together (one shape per array argument)."""

    n: int = 1
    zero_size: bool = False

    def sample(self, rng: np.random.Generator) -> tuple[Shape, ...]:
        raise NotImplementedError

    def minimal(self) -> tuple[Shape, ...]:
        raise NotImplementedError

    def empty(self) -> tuple[Shape, ...] | None:
        """A zero-size variant, where the op accepts one."""
        if not self.zero_size:
            return None
        shapes = self.minimal()
        # Zero the leading axis of every shape that has one: stays broadcast-compatible.
        out = tuple((0,) + s[1:] if s else (0,) for s in shapes)
        return out

    def palette(self, rng: np.random.Generator, size: int) -> list[tuple[Shape, ...]]:
        """`size` distinct shape tuples, smallest first so that shrinking heads there.

        The rest spread over the sizes seen in many samples, the largest included, so each
        run meets small, middling and large shapes; and, from three shapes on, one with the most
        axes seen (a batch axis where the rule allows one): spread by size alone, a palette of
        (1, 1), (2, 2), (4, 4) let a mutant that rolled slogdet's results across the batch pass.
        """
        found = [call_rule(self.minimal, self.n)]
        empty = call_rule(self.empty, self.n) if self.zero_size else None
        if empty is not None and size > 2:
            found.append(empty)
        pool = {call_rule(lambda: self.sample(rng), self.n) for _ in range(8 * size)} - set(found)
        pool = sorted(pool, key=lambda s: (sum(map(math.prod, s)), s))
        want = size - len(found)
        if want > 0 and pool:
            picks = {max(0, round(len(pool) * (i + 1) / want) - 1) for i in range(want)}
            found += [pool[i] for i in sorted(picks)]
        axes = lambda shapes: sum(map(len, shapes))
        if size > 2 and pool and max(map(axes, found)) < max(map(axes, pool)):
            deepest = next(s for s in pool if axes(s) == max(map(axes, pool)))  # the smallest such
            middle = [i for i in range(1, len(found) - 1) if found[i] != empty]
            if middle:
                found[middle[-1]] = deepest
        return found[:1] + sorted(found[1:], key=lambda s: (sum(map(math.prod, s)), s))


def _dims(rng: np.random.Generator, lo: int, hi: int) -> int:
    return int(rng.integers(lo, hi + 1))


@dataclasses.dataclass(frozen=True)
class _Ranked(ShapeSpec):
    """Shapes of min_dims..max_dims axes, each of min_side..max_side."""

    n: int = 1
    min_dims: int = 0
    max_dims: int = 3
    min_side: int = 1
    max_side: int = 5
    zero_size: bool = False

    def _full(self, rng: np.random.Generator) -> list[int]:
        return [_dims(rng, self.min_side, self.max_side) for _ in range(_dims(rng, self.min_dims, self.max_dims))]

    def minimal(self):
        return ((self.min_side,) * self.min_dims,) * self.n


@dataclasses.dataclass(frozen=True)
class Same(_Ranked):
    """`n` arrays of one shape."""

    def sample(self, rng):
        return (tuple(self._full(rng)),) * self.n


@dataclasses.dataclass(frozen=True)
class Broadcast(_Ranked):
    """`n` shapes that broadcast together (some axes 1, some missing)."""

    n: int = 2

    def sample(self, rng):
        full = self._full(rng)
        out = []
        for _ in range(self.n):
            drop = _dims(rng, 0, len(full) - self.min_dims) if full else 0
            out.append(tuple(1 if rng.random() < 0.3 else d for d in full[drop:]))
        return tuple(out)


@dataclasses.dataclass(frozen=True)
class MatMul(ShapeSpec):
    """(..., m, k) and (..., k, n) with `batch` leading dims shared (or broadcast)."""

    min_batch: int = 0
    max_batch: int = 2
    min_side: int = 1
    max_side: int = 5
    n: int = 2

    def sample(self, rng):
        batch = tuple(_dims(rng, 1, 3) for _ in range(_dims(rng, self.min_batch, self.max_batch)))
        m, k, n = (_dims(rng, self.min_side, self.max_side) for _ in range(3))
        return (batch + (m, k), batch + (k, n))

    def minimal(self):
        b = (1,) * self.min_batch
        s = self.min_side
        return (b + (s, s), b + (s, s))


@dataclasses.dataclass(frozen=True)
class Square(ShapeSpec):
    """(..., k, k) matrices, optionally with a right-hand side (..., k, r)."""

    min_batch: int = 0
    max_batch: int = 1
    min_side: int = 1
    max_side: int = 4
    rhs: bool = False

    @property
    def n(self) -> int:  # type: ignore[override]
        return 2 if self.rhs else 1

    def _make(self, batch, k, r):
        return (batch + (k, k), batch + (k, r)) if self.rhs else (batch + (k, k),)

    def sample(self, rng):
        batch = tuple(_dims(rng, 1, 3) for _ in range(_dims(rng, self.min_batch, self.max_batch)))
        return self._make(batch, _dims(rng, self.min_side, self.max_side), _dims(rng, 1, 3))

    def minimal(self):
        return self._make((1,) * self.min_batch, self.min_side, 1)


@dataclasses.dataclass(frozen=True)
class Fixed(ShapeSpec):
    """Exactly these shapes (a palette of one, or several to choose from).

    `choices` is a tuple of choices, each a tuple of one shape per array argument: one
    argument of shape (4, 4) is `Fixed((((4, 4),),))`; two arguments, (3,) and (3, 2), as
    one choice are `Fixed((((3,), (3, 2)),))`.

    Raises ValueError: no choice, a choice that is not a tuple of shapes, or choices with
    different numbers of shapes (the message shows the form to write)."""

    choices: tuple[tuple[Shape, ...], ...] = ((),)

    def __post_init__(self) -> None:
        hint = "e.g. Fixed((((4, 4),),)) for one argument of shape (4, 4)"
        choices = self.choices
        if not isinstance(choices, (tuple, list)) or not choices or not all(isinstance(c, (tuple, list)) for c in choices):
            raise ValueError(f"Fixed({choices!r}): give a tuple of choices, each a tuple of one shape per array "
                             f"argument ({hint})")
        n = len(choices[0])
        out = []
        for c in choices:
            try:
                out.append(valid_shapes(c, n))
            except ShapeRuleError:
                raise ValueError(f"Fixed({choices!r}): the choice {c!r} is not a tuple of {n} shape(s) like the "
                                 f"first; each choice is a tuple of one shape per array argument ({hint})") from None
        object.__setattr__(self, "choices", tuple(out))

    @property
    def n(self) -> int:  # type: ignore[override]
        return len(self.choices[0])

    def sample(self, rng):
        return self.choices[int(rng.integers(len(self.choices)))]

    def minimal(self):
        return self.choices[0]

    def palette(self, rng: np.random.Generator, size: int) -> list[tuple[Shape, ...]]:
        """Every choice, the first first, whatever `size` (--equiv-shapes): the choices are the user's
        own list, and one left out is never drawn on any seed. Cut to four, a port wrong on the fifth
        of six shapes passed on every seed (a new user's trial, 2026-12-02)."""
        return list(dict.fromkeys(self.choices))


@dataclasses.dataclass(frozen=True)
class Custom(ShapeSpec):
    """Any joint shape rule: `sample(rng) -> shapes`, `smallest` the minimal shapes."""

    sampler: Callable[[np.random.Generator], tuple[Shape, ...]] = lambda rng: ((),)
    smallest: tuple[Shape, ...] = ((),)

    @property
    def n(self) -> int:  # type: ignore[override]
        return len(self.smallest)

    def sample(self, rng):
        return valid_shapes(self.sampler(rng), self.n)

    def minimal(self):
        return valid_shapes(self.smallest, self.n)
