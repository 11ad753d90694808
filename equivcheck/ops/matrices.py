"""Structured matrices as drawn inputs: SPD, full-rank, symmetric with gapped spectra."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
from hypothesis import strategies as st

from equivcheck.engine.dtypes import np_dtype
from equivcheck.ops.bulk import bulk_array


@dataclasses.dataclass(frozen=True)
class Matrices:
    """Square matrices of a structure that keeps the op well-posed at float32.

    kind  "spd"       symmetric positive definite (cholesky, solve): eigenvalues in [1, 10]
          "general"   any (.., m, n), full rank, singular values in [1, 10] (inv, solve, det, qr)
          "symmetric" symmetric, eigenvalues at least 1 apart (eigh: gradients need gaps)
          "distinct"  any (.., m, n), singular values at least 1 apart (svd)
          "cholesky"  the lower Cholesky factor of an "spd" draw: lower triangular, positive
                      diagonal, L @ L.T with eigenvalues in [1, 10] (cholesky_inverse, cho_solve)
    Drawn as a random orthogonal basis (from a seed Hypothesis draws) and a spectrum (drawn by
    Hypothesis), composed in float64 and rounded once, so both sides get the same bits.
    """

    kind: str = "spd"

    KINDS = ("spd", "general", "symmetric", "distinct", "cholesky")

    def __post_init__(self):
        if self.kind not in self.KINDS:
            raise ValueError(f"Matrices: kind {self.kind!r} is not one of {', '.join(self.KINDS)}")

    def draw(self, dtype, shape, shapes):
        m, n = (shape[-2], shape[-1]) if len(shape) >= 2 else (1, 1)
        batch = shape[:-2]
        k = min(m, n)
        count = math.prod(batch) if batch else 1
        # The basis from a seed (it shrinks to seed 0's basis), the spectrum drawn: what the
        # ops are sensitive to.
        basis = st.integers(0, 2**32 - 1).map(
            lambda s: np.random.default_rng(s).uniform(-1, 1, (count, 2, max(m, n), max(m, n))))
        spectrum = bulk_array(np.float64, (count, k), st.floats(0.0, 1.0), lambda rng, size: rng.random(size))
        return st.tuples(basis, spectrum).map(lambda bs: self._compose(bs[0], bs[1], shape, m, n, dtype))

    def sample(self, dtype, shape, shapes, rng):
        m, n = (shape[-2], shape[-1]) if len(shape) >= 2 else (1, 1)
        count = math.prod(shape[:-2]) if shape[:-2] else 1
        basis = rng.uniform(-1, 1, (count, 2, max(m, n), max(m, n)))
        return self._compose(basis, rng.random((count, min(m, n))), shape, m, n, dtype)

    def _compose(self, basis, spectrum, shape, m, n, dtype):
        k = min(m, n)
        out = np.empty((len(basis), m, n))
        for i, (b, s) in enumerate(zip(basis, spectrum)):
            q1 = _orthogonal(b[0][:m, :m] + 2 * np.eye(m))
            q2 = _orthogonal(b[1][:n, :n] + 2 * np.eye(n))
            if self.kind in ("symmetric", "distinct"):
                sig = 1.0 + 2.0 * np.arange(len(s)) + s  # gaps >= 1 keep eigen/svd grads finite
                if self.kind == "symmetric":
                    sig = sig * np.where(np.arange(len(s)) % 2, -1, 1)
            else:
                sig = 1.0 + 9.0 * s
            if self.kind in ("spd", "symmetric", "cholesky"):
                a = (q1 * sig) @ q1.T
                a = (a + a.T) / 2
                if self.kind == "cholesky":
                    a = np.linalg.cholesky(a)
            else:
                a = (q1[:, :k] * sig) @ q2[:, :k].T
            out[i] = a
        return out.reshape(shape).astype(np_dtype(dtype))


def _orthogonal(b: np.ndarray) -> np.ndarray:
    q, r = np.linalg.qr(b)
    return q * np.where(np.diag(r) < 0, -1.0, 1.0)


__all__ = ["Matrices"]
