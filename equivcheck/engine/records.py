"""What every kind of check produces and is run with: `RunSettings` (examples, seed, device,
precision) and `CheckRecord` (one report row: a pair x check x dtype x device)."""
from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Any

from equivcheck.engine.search import PROFILES


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """How one check runs; the plugin builds it from the command line, scripts directly."""

    examples: int = PROFILES["dev"]
    profile: str = "dev"
    seed: int = 0
    device: str = "cpu"
    precision: str = "highest"
    palette: int = 4  # distinct shapes per check; 0 draws a fresh shape every example
    shrink_seconds: float = 20.0  # then report the smallest failing example found so far
    timeout: float = 60.0  # seconds one side's call may take (0: no limit); equivcheck.backends.deadline
    target: bool | None = None  # Hypothesis's target phase; None: the profile's choice (equivcheck.engine.search)
    # Hypothesis's example database of failing examples (a directory), replayed first by the next
    # run; None: none, so a seed replays exactly on any machine (equivcheck.engine.search)
    failures_db: str | None = None

    # Palettes per check across seeds (0: each seed its own). Seeds below it keep the palettes
    # they always had: run seed s draws ring entry s % SHAPE_RING.
    shape_ring: int = 8
    # --equiv-onnx: every layer pair also runs the `onnx` check (equivcheck.onnx.layers); off by default,
    # it adds an export per layer to the run
    onnx: bool = False

    def item_seed(self, *parts: str) -> int:
        return _crc(self.seed, parts)

    def shape_seed(self, *parts: str) -> int:
        """The seed a check's shape palette is drawn from: the run's seed modulo `shape_ring`.
        Every new seed (a nightly's, `tox -e equiv`'s) drew new shapes, and each shape costs one XLA
        compilation per program (~160 ms, against ~0.1 ms for a cached call): with a ring, runs
        share `shape_ring` palettes per check, which JAX's persistent compilation cache keeps,
        while values still come from the run's seed. `--equiv-shapes 0` draws a fresh shape
        every example instead."""
        return _crc(self.seed % self.shape_ring if self.shape_ring > 0 else self.seed, parts)


def _crc(seed: int, parts: tuple[str, ...]) -> int:
    return zlib.crc32(":".join([str(seed), *parts]).encode())


@dataclasses.dataclass
class CheckRecord:
    """One row of the report: a pair x check x dtype x device."""

    pair: str
    check: str
    dtype: str
    device: str
    precision: str
    outcome: str  # passed | failed | known-divergence | xpass | skipped
    examples: int = 0
    worst_ratio: float = 0.0
    max_abs_err: float = 0.0
    max_rel_err: float = 0.0
    max_ulp: float = 0.0
    tolerance: dict[str, Any] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0
    kind: str = ""
    side: str | None = None
    message: str = ""
    diagnosis: str = ""
    inputs: str = ""
    notes: list[str] = dataclasses.field(default_factory=list)
    known_reason: str = ""
    known_pattern: str = ""
    tags: list[str] = dataclasses.field(default_factory=list)
    nodeid: str = ""
    replay: str = ""
    ill_conditioned: int = 0  # examples past the table bound that input rounding explains
    low_precision: int = 0  # bfloat16/float16 examples past the table bound that agree in float32
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # per-kind detail (models: layers, curves)
    family: str = ""  # the report section (engine.kind.FAMILIES): operations, layers, optimizers, ...
    witnessed: int = 0  # witnesses run first (a passing known divergence with one is strict: it is fixed)

    @property
    def id(self) -> str:
        return check_id(self.pair, self.check, self.dtype, self.device)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["id"] = self.id
        for k in ("worst_ratio", "max_abs_err", "max_rel_err", "max_ulp"):
            if not math.isfinite(d[k]):
                d[k] = None if math.isnan(d[k]) else str(d[k])
        return d

    def settle_known(self, failed: bool, hit: tuple[str, str] | None, worst: Any = None) -> None:
        """Set the outcome of a check that ran: failed, or a known divergence where `hit` (the matching
        entry's (pattern, reason), kept for the report) matched; passed, or an xpass where it matched.
        `worst` (the failing LeafDiff, if any) gives the error columns."""
        if worst is not None:
            self.max_abs_err, self.max_rel_err, self.max_ulp = worst.max_abs, worst.max_rel, worst.max_ulp
        if failed:
            self.outcome = "known-divergence" if hit else "failed"
        elif hit:
            self.outcome = "xpass"
        if hit:
            self.known_pattern, self.known_reason = hit

    def failure_text(self) -> str:
        lines = [f"{self.id} [precision {self.precision}] failed: {self.message}"]
        if self.diagnosis:
            lines.append(f"  which side: {self.side or 'undecided'}: {self.diagnosis}")
        if self.inputs:
            lines.append(f"  minimal inputs: {self.inputs}")
        tol = self.tolerance
        if tol:
            lines.append(f"  tolerance: rtol={tol['rtol']:.3g} atol={tol['atol']:.3g} ({tol['reason']})")
        lines += [f"  note: {n}" for n in self.notes]
        if self.replay:
            lines.append(f"  replay: {self.replay}")
        return "\n".join(lines)


def check_id(pair: str, check: str, dtype: str, device: str) -> str:
    return f"{pair}::{check}::{dtype}::{device}"
