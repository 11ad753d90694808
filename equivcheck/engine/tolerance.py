"""The one tolerance table: dtype x device x precision mode, plus named per-pair overrides.

Values are compared as |torch - jax| <= atol + rtol * max(|torch|, |jax|): neither side is
"expected", so the bound is symmetric. Starting point: torch.testing.assert_close's
defaults. Each later change records the measurement that justified it.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """rtol/atol, and what rtol is relative to: each element ("element"), or the largest
    magnitude in the leaf ("leaf": a norm-wise bound, for low precision). `unit`: the relative
    rounding unit of the arithmetic where it is coarser than the dtype's epsilon (TF32: 2^-10,
    10 explicit mantissa bits, NVIDIA's A100 whitepaper), which the rounding rule
    (equivcheck.ops.conditioning) nudges inputs by; None: the dtype's own."""

    rtol: float
    atol: float
    reason: str = ""
    per: str = "element"
    unit: float | None = None

    def __post_init__(self) -> None:
        if not (self.rtol >= 0 and self.atol >= 0):
            raise ValueError(f"tolerances must be non-negative, got rtol={self.rtol} atol={self.atol}")
        if self.per not in ("element", "leaf"):
            raise ValueError(f"Tolerance.per is 'element' or 'leaf', got {self.per!r}")

    def scaled(self, factor: float, why: str) -> Tolerance:
        return dataclasses.replace(self, rtol=self.rtol * factor, atol=self.atol * factor,
                                   reason=f"{self.reason}; x{factor:g} {why}")

    def describe(self) -> str:
        return f"rtol={self.rtol:.3g} atol={self.atol:.3g}" + (" (relative to the leaf's largest value)"
                                                               if self.per == "leaf" else "")


# torch.testing.assert_close defaults (torch/testing/_comparison.py). In bfloat16/float16 the two
# frameworks round different intermediates: torch's kernels compute in float32 and round once, XLA
# rounds after each primitive of a composite op or derivative. Measured on the autodiff suite
# (10 examples, CPU): elementwise bounds failed 60 checks on cancellation near zeros of
# derivatives (tanh' = 1 - y^2 near |y| = 1) with both sides within a few ulps of the leaf's
# scale, so low precision is bounded norm-wise: relative to the leaf's largest value.
BASE: dict[str, Tolerance] = {
    "float64": Tolerance(1e-7, 1e-7, "float64 default (torch.testing)"),
    "float32": Tolerance(1.3e-6, 1e-5, "float32 default (torch.testing)"),
    "bfloat16": Tolerance(1.6e-2, 1e-5, "bfloat16 default (torch.testing), norm-wise", per="leaf"),
    "float16": Tolerance(1e-3, 1e-5, "float16 default (torch.testing), norm-wise", per="leaf"),
}

# Under --equiv-precision=default on a GPU, JAX runs float32 matmul/conv in TF32 (10-bit
# mantissa, relative error ~3e-4 against float64 on an H100; grows with the reduction
# length), torch runs matmul in float32 but conv in TF32. Pairs tagged "matmul"/"conv" get
# a TF32-level bound there; every other op keeps the float32 row.
# A chain of such ops (a model's layers) compounds that: the rounding rule then judges the gap at
# TF32's unit (measured on an H200: a 3-layer CNN from a checkpoint, JAX 0.0117 off an output of
# -0.0094 where torch was 3e-6 off: 1000x float32's rounding band, inside TF32's).
TF32 = Tolerance(2e-3, 2e-3, "float32 under TF32 (GPU, default precision): measured 3e-4 relative on H100",
                 unit=2.0**-10)
TF32_TAGS = frozenset({"matmul", "conv"})

# Derivatives chain several roundings (an HVP runs the op's graph three times over), so the
# bound widens with the order. Measured on the autodiff suite at float32 (30 examples, seeds
# 0-2): the worst VJP/JVP reached ~0.5 of these scaled bounds (det), the worst HVP ~0.8 (std).
# Distributed checks (equivcheck.distributed): a collective is one reduction, held to the forward
# bound; a data-parallel gradient is a VJP summed over shards, held to the VJP bound, and a training
# step to that bound times the step number (the optimizer trajectories' linear growth).
CHECK_SCALE: dict[str, float] = {"forward": 1.0, "vjp": 2.0, "jvp": 2.0, "hvp": 4.0, "collective": 1.0,
                                 "grads": 2.0, "train": 2.0}



def lookup(
    dtype: str,
    *,
    device: str = "cpu",
    precision: str = "highest",
    check: str = "forward",
    tags: frozenset[str] = frozenset(),
    override: Tolerance | None = None,
) -> Tolerance:
    """The bound for one comparison, with `reason` saying where it came from."""
    if override is not None:
        base = override
    elif dtype == "float32" and device == "gpu" and precision == "default" and tags & TF32_TAGS:
        base = TF32
    else:
        try:
            base = BASE[dtype]
        except KeyError:
            raise ValueError(f"no tolerance for dtype {dtype!r}; known: {', '.join(BASE)}") from None
    factor = CHECK_SCALE.get(check, 1.0)
    return base if factor == 1.0 else base.scaled(factor, f"for {check}")


def table() -> list[dict[str, object]]:
    """The table as rows, for the report."""
    rows: list[dict[str, object]] = [
        {"dtype": d, "device": "any", "precision": "any", "rtol": t.rtol, "atol": t.atol, "per": t.per,
         "reason": t.reason}
        for d, t in BASE.items()
    ]
    rows.append({"dtype": "float32", "device": "gpu", "precision": "default", "rtol": TF32.rtol, "atol": TF32.atol,
                 "per": TF32.per, "reason": TF32.reason + " (tags: matmul, conv)"})
    return rows


def require_reasons(owner: str, tolerance: Any) -> None:
    """Every tolerance override (one, or a mapping of them) states why: the rule of every
    matched-pair record (Pair, OptimizerPair, ModelPair). Blank text states nothing, so it
    counts as missing."""
    tols = tolerance.values() if isinstance(tolerance, Mapping) else [tolerance]
    if any(t is not None and not str(t.reason).strip() for t in tols):
        raise ValueError(f"{owner}: a tolerance override must state its reason")
