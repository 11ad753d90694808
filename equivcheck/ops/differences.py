"""Finite differences of a float64 function at the primals, on steps relative to each input element:
the reads `equivcheck.ops.finite` decides derivative verdicts with.

Element e moves by REL * scale_e, scale_e = |x_e| (the argument's largest magnitude where x_e = 0,
1 where all are 0), so an input of 1e-9 is differentiated on its own scale and never stepped
across zero. A step that changes the function by float64 rounding only, while a step of REL in
the input's own units changes it, is recorded in `Differences.unresolved` with what the wider
step reads, for the verdict to weigh.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from equivcheck.backends import Vectors
from equivcheck.ops.autodiff import leaf_at

__all__ = ["REL", "REL2", "RESOLVED", "SPREAD", "Differences"]

# Central first differences in float64 err by ~(h/x)^2 in truncation and ~eps*x/h in rounding:
# a step of 1e-5 relative balances them near 1e-10 (Nocedal & Wright, "Numerical
# Optimization", 2nd ed., sec. 8.1: h ~ eps^(1/3)); Richardson removes the h^2 term.
REL = 1e-5
# A mixed second difference (HVP) errs by ~h^2 in truncation and ~eps/h^2 in rounding:
# h ~ eps^(1/4) ~ 1e-4 relative balances them near 1e-8 (same source).
REL2 = 1e-4
# Elements whose step ratios differ by more than this get separate steps (`Differences.by_scale`):
# within it, the smallest effective relative step is REL2 / SPREAD = 1e-6, and a mixed second
# difference's rounding error eps / (REL2 * 1e-6) ~ 2e-6 of the value.
SPREAD = 100.0
# A change within this many float64 ulps of the values it came from is rounding, not the function:
# x**y at y = 1.5e-32 moved by a step relative to y changes by 1e-37 against a value of 1, and both
# steps read an exact 0, agreeing with each other and wrong (a rolled torch pow was blamed on both).
RESOLVED = 4.0

def _unresolved(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    """Whether outputs `a` and `b` (finite, not all zero) differ by float64 rounding of their values only."""
    tol = RESOLVED * np.finfo(np.float64).eps
    pairs = [(np.asarray(x, np.float64), np.asarray(y, np.float64)) for x, y in zip(a, b)]
    if not pairs or not all(np.all(np.isfinite(x)) and np.all(np.isfinite(y)) for x, y in pairs):
        return False
    return (all(np.all(np.abs(x - y) <= tol * np.maximum(np.abs(x), np.abs(y))) for x, y in pairs)
            and any(np.any(x != 0) for x, _ in pairs))


class Differences:
    """Finite differences of f at the primals, with steps relative to each element."""

    def __init__(self, f: Callable[[Sequence[np.ndarray]], list[np.ndarray]], primals: list[np.ndarray],
                 vec: Vectors) -> None:
        self.f, self.primals, self.vec = f, primals, vec
        # (argument, element) no relative step resolves -> what a step in the input's own units reads there
        self.unresolved: dict[tuple[int, int], Any] = {}
        # what has been retaken at the wider step, which does not depend on the step scale s: `at`
        # runs at s = 1 and 1/2, and an HVP's part retaken at both was counted twice
        self._retaken: set[tuple[int, ...]] = set()
        # per step scale s of `at`: elementwise, what float64 rounding of the function's values can
        # make the differences read (inf where not bounded: the HVP's second differences)
        self.noise: dict[float, np.ndarray] = {}
        self._noise: list[np.ndarray] = []
        self.scale = []
        for p in primals:
            top = float(np.max(np.abs(p), initial=0.0)) or 1.0
            self.scale.append(np.where(p != 0, np.abs(p), top))

    def shifted(self, steps: Sequence[tuple[float, Sequence[np.ndarray]]]) -> list[np.ndarray]:
        return self.f([np.asarray(p + sum(h * d[k] for h, d in steps)) for k, p in enumerate(self.primals)])

    def unit(self, k: int, e: int) -> list[np.ndarray]:
        d = [np.zeros_like(p) for p in self.primals]
        d[k].flat[e] = 1.0
        return d

    def step(self, d: Sequence[np.ndarray], rel: float) -> float:
        """REL times the smallest element scale along direction d (per unit of d)."""
        ratios = [s[x != 0] / np.abs(x[x != 0]) for s, x in zip(self.scale, d)]
        return rel * float(min((np.min(r) for r in ratios if r.size), default=1.0))

    def weighted(self, outs: list[np.ndarray]) -> float:
        ct = self.vec.ct
        if len(outs) != len(ct) or any(o.shape != np.shape(c) for o, c in zip(outs, ct)):
            raise ValueError("the arbiter's outputs do not match the cotangents' shapes")
        return sum(float(np.sum(o * c)) for o, c in zip(outs, ct))

    def central(self, d: Sequence[np.ndarray], h: float, key: tuple[int, int] | None = None) -> list[np.ndarray]:
        """Central differences along d; along a unit direction `key`, one whose change is rounding while a
        step of REL in the input's own units changes the function is recorded in `unresolved`."""
        plus, minus = self.shifted([(h, d)]), self.shifted([(-h, d)])
        eps = RESOLVED * np.finfo(np.float64).eps
        self._noise = [eps * np.maximum(np.abs(a), np.abs(b)) / (2 * h) for a, b in zip(plus, minus)]
        if key is not None and key not in self._retaken and h < REL and _unresolved(plus, minus):
            self._retaken.add(key)
            wide = self.shifted([(REL, d)]), self.shifted([(-REL, d)])
            if not _unresolved(*wide):
                self.unresolved[key] = [(a - b) / (2 * REL) for a, b in zip(*wide)]
        return [(a - b) / (2 * h) for a, b in zip(plus, minus)]

    def at(self, pair: Any, check: str, path: str, s: float) -> np.ndarray | None:
        """The derivative at `path` with every step scaled by s."""
        if check == "jvp":
            # Element by element, each on its own scale: J t = sum_e t_e J[:, e].
            total: list[np.ndarray] | None = None
            noise: list[np.ndarray] | None = None
            for k, p in enumerate(self.primals):
                for e in range(p.size):
                    te = float(self.vec.t[k].flat[e])
                    if te == 0:
                        continue
                    u = self.unit(k, e)
                    col = self.central(u, s * self.step(u, REL), (k, e))
                    total = [te * c for c in col] if total is None else [a + te * c for a, c in zip(total, col)]
                    noise = ([abs(te) * n for n in self._noise] if noise is None
                             else [a + abs(te) * n for a, n in zip(noise, self._noise)])
            if total is None:
                total = [np.zeros_like(o) for o in self.f(self.primals)]
                noise = [np.zeros_like(o) for o in total]
            self.noise[s] = np.asarray(leaf_at(noise, path), np.float64)
            return leaf_at(total, path)
        k = pair.grad_index(path)
        ref = np.zeros_like(self.primals[k])
        self.noise[s] = np.full(ref.shape, np.inf if check == "hvp" else 0.0)
        parts = self.by_scale(self.vec.v) if check == "hvp" else []
        for e in range(ref.size):
            u = self.unit(k, e)
            if check == "vjp":
                ref.flat[e] = self.weighted(self.central(u, s * self.step(u, REL), (k, e)))
                self.noise[s].flat[e] = sum(float(np.sum(n * np.abs(c))) for n, c in zip(self._noise, self.vec.ct))
                continue
            # (H v)_e of the cotangent-weighted output: a mixed second difference along e and v,
            # H v summed over v's parts of one scale each.
            hu = s * self.step(u, REL2)
            for j, v in enumerate(parts):
                hv = s * self.step(v, REL2)
                # Combined output by output before the cotangent weights: summing first would
                # round each corner to the total's ulp, far above a small element's change.
                value, flat = self.mixed(u, v, hu, hv)
                ref.flat[e] += value
                if flat and hu < REL2 and (k, e, j) not in self._retaken:  # rounding along u: retake once, wider
                    self._retaken.add((k, e, j))
                    big, flat = self.mixed(u, v, REL2, REL2 / float(max(np.max(np.abs(x)) for x in v)))
                    if not flat:
                        self.unresolved[(k, e)] = self.unresolved.get((k, e), 0.0) + big
        return ref

    def mixed(self, u: Sequence[np.ndarray], v: Sequence[np.ndarray], hu: float, hv: float) -> tuple[float, bool]:
        """The cotangent-weighted mixed second difference along u and v, output by output first, and
        whether the step along u changed the function by rounding only (at both steps along v)."""
        pp, pm, mp, mm = (self.shifted([(a * hu, u), (b * hv, v)]) for a, b in ((1, 1), (1, -1), (-1, 1), (-1, -1)))
        value = self.weighted([(a - b - c + d) / (4 * hu * hv) for a, b, c, d in zip(pp, pm, mp, mm)])
        return value, _unresolved(pp, mp) and _unresolved(pm, mm)

    def by_scale(self, d: Sequence[np.ndarray]) -> list[list[np.ndarray]]:
        """Direction d split into parts, each with the elements whose step ratios (scale / |d_e|)
        lie in one power of SPREAD; the parts sum to d. One step along all of d is set by its
        smallest ratio (so that no element steps across zero): with elements of 1e-38 and 3 in
        one direction, it moves the 3 by less than its float64 ulp, and the differences read an
        exact 0 at both step sizes, agreeing with each other and wrong."""
        with np.errstate(divide="ignore"):
            buckets = [np.floor(np.log(s / np.abs(x)) / np.log(SPREAD)) for s, x in zip(self.scale, d)]
        keys = np.unique(np.concatenate([b[x != 0].ravel() for b, x in zip(buckets, d)]))
        if not keys.size:
            return [list(d)]
        return [[np.where((x != 0) & (b == key), x, 0.0) for x, b in zip(d, buckets)] for key in keys]

    def one_sided(self, pair: Any, check: str, path: str, index: tuple[int, ...]
                  ) -> tuple[list[tuple[float, float]], str]:
        """(left, right) differences at the failing element for steps h and h/2, and where
        they were taken. VJP: along that input element, cotangent-weighted; JVP: that output
        element along the tangent; HVP: that element of the gradient (a central difference on
        a step 1/64 of the outer one, so that it reads the gradient on either side, not
        across) along the HVP direction."""
        # Each read is the output leaves (or the HVP's inner difference of them), differenced
        # output by output before the cotangent weights: weighting first rounds a small
        # element's change away against the total (an input of 4e-17 beside ones read 0).
        weigh: Callable[[list[np.ndarray]], float] = self.weighted
        if check == "vjp":
            k = pair.grad_index(path)
            e = int(np.ravel_multi_index(index, self.primals[k].shape)) if index else 0
            d, rel = self.unit(k, e), REL
            read = lambda shift, s: self.shifted(shift)  # noqa: E731
            where = f"along element {list(index)} of the differentiated argument, cotangent-weighted"
        elif check == "jvp":
            d, rel = self.vec.t, REL
            read = lambda shift, s: [np.asarray(leaf_at(self.shifted(shift), path))[index]]  # noqa: E731
            weigh = lambda leaves: float(leaves[0])
            where = f"at output element {list(index)} along the tangent"
        else:
            k = pair.grad_index(path)
            e = int(np.ravel_multi_index(index, self.primals[k].shape)) if index else 0
            u, d, rel = self.unit(k, e), self.vec.v, REL2

            def read(shift: list[tuple[float, Sequence[np.ndarray]]], s: float) -> list[np.ndarray]:
                # The inner step shrinks with the outer one: its error, a fixed share of the
                # outer difference, then does not drift as the step halves.
                hu = s * self.step(u, REL2) / 64
                plus, minus = (self.shifted([*shift, (a * hu, u)]) for a in (1, -1))
                return [(p - m) / (2 * hu) for p, m in zip(plus, minus)]

            where = (f"along the HVP direction, at element {list(index)} of the cotangent-weighted gradient of the "
                     f"differentiated argument")
        one_sided = []
        for s in (1.0, 0.5):
            h, base = s * self.step(d, rel), read([], s)
            left, right = read([(-h, d)], s), read([(h, d)], s)
            one_sided.append((weigh([(b - x) / h for b, x in zip(base, left)]),
                              weigh([(x - b) / h for b, x in zip(base, right)])))
        return one_sided, where
