"""A data pipeline as a check kind: `DataCheck` (a comparison body run under Hypothesis) and
`run_check`, which runs one and returns its report record.

The batches a pipeline yields are its forward output: a data check has one check, "forward",
whose body returns a `DataVerdict` (equivcheck.data.compare_epochs makes one).
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

from hypothesis.errors import HypothesisException

from equivcheck.backends import deadline
from equivcheck.backends.results import SideError
from equivcheck.data.loaders import DataVerdict
from equivcheck.engine import tolerance as tolerance_table
from equivcheck.engine.compare import format_args
from equivcheck.engine.dtypes import DTYPES
from equivcheck.engine.kind import Known, check_name
from equivcheck.engine.records import CheckRecord, RunSettings
from equivcheck.engine.search import FLAKY_NOTE, Search

DATA_CHECKS = ("forward",)

__all__ = ["DATA_CHECKS", "DataCheck", "run_check"]


@dataclasses.dataclass(frozen=True, eq=False)
class DataCheck:
    """A data pipeline compared under Hypothesis: `equiv.check(DataCheck(...))`.

    name          unique id (report rows, known-divergence patterns)
    body          body(example, dtype) -> DataVerdict: build both pipelines for one drawn
                  example (sizes, seeds, batch size...) and compare their batches
    examples      a Hypothesis strategy drawing the examples
    dtypes        dtypes the body supports (default: every dtype, the body decides what it means)
    max_examples  cap on examples per run (a slow pipeline), else the run's profile
    witnesses     examples (as `examples` would draw them) run first, in order, on every seed:
                  the example where a known divergence shows
    """

    name: str
    body: Callable[[Any, str], DataVerdict]
    examples: Any
    dtypes: tuple[str, ...] = DTYPES
    max_examples: int | None = None
    checks: tuple[str, ...] = DATA_CHECKS
    witnesses: tuple[Any, ...] = ()

    family = "data"  # the report section (engine.kind.FAMILIES)
    all_checks = DATA_CHECKS

    def __post_init__(self) -> None:
        check_name("DataCheck", self.name)
        if not callable(self.body):
            raise TypeError(f"DataCheck {self.name!r}: body must be callable, got {self.body!r}")
        if not hasattr(self.examples, "example"):
            raise TypeError(f"DataCheck {self.name!r}: examples must be a Hypothesis strategy")
        object.__setattr__(self, "dtypes", tuple(self.dtypes))
        object.__setattr__(self, "checks", tuple(self.checks))
        object.__setattr__(self, "witnesses", tuple(self.witnesses))
        bad = [c for c in self.checks if c not in DATA_CHECKS]
        if bad or not self.checks:
            raise ValueError(f"DataCheck {self.name!r}: checks {bad or '()'} not among {DATA_CHECKS}")

    def __str__(self) -> str:
        return self.name

    def replace(self, **changes: Any) -> DataCheck:
        return dataclasses.replace(self, **changes)

    def prepare(self, dtype: str, run: RunSettings) -> None:
        """Nothing to compile ahead: pipelines run eagerly."""

    def run_checks(self, *, dtype: str, run: RunSettings, known: Known = lambda _id: None, nodeid: str = "",
                   replay: str = "") -> list[CheckRecord]:
        body = self.body
        return [run_check(self.name, lambda example: body(example, dtype), self.examples, dtype=dtype, run=run,
                          known=known, nodeid=nodeid, replay=replay, max_examples=self.max_examples,
                          witnesses=self.witnesses)]


class _Mismatch(Exception):
    def __init__(self, verdict: DataVerdict, example: Any) -> None:
        super().__init__(verdict.message)
        self.verdict, self.example = verdict, example


def run_check(name: str, body: Callable[[Any], DataVerdict], examples: Any, *, dtype: str, run: Any,
              known: Callable[[str], tuple[str, str] | None] = lambda _id: None, nodeid: str = "",
              replay: str = "", max_examples: int | None = None, witnesses: Sequence[Any] = ()) -> Any:
    """Run `body(example)` over the examples Hypothesis draws from `examples` (seeded by the
    run and `name`, `run.examples` of them or `max_examples` if fewer, shrunk to a minimal
    failing one), after the `witnesses` (run first, in order), and return one
    CheckRecord (check "forward": the batches a pipeline yields are its forward output).
    In a suite: `equiv.conclude([run_check(..., dtype=equiv.dtype, run=equiv.run,
    known=equiv.known, nodeid=equiv.nodeid, replay=equiv.replay)])`."""
    start, stats = time.perf_counter(), {"n": 0, "worst": 0.0, "batches": 0}

    def test(example: Any) -> None:
        try:
            with deadline.side("data check's body"):  # both pipelines run inside: no one side to name
                verdict = body(example)
        except HypothesisException:  # assume() and friends steer the search; they are no finding
            raise
        except Exception as exc:
            # The body is the user's code: its exception is this check's failure, recorded
            # like a side that raises, so the run and its report go on.
            err = SideError.from_exc("body", "forward", exc)
            raise _Mismatch(DataVerdict(False, "error", f"the DataCheck body {name!r} raised {err.type}: "
                                        f"{err.message} ({err.where})"), example) from exc
        if not isinstance(verdict, DataVerdict):
            raise _Mismatch(DataVerdict(False, "error", f"the DataCheck body {name!r} returned "
                                        f"{type(verdict).__name__}, not a DataVerdict (equivcheck.data."
                                        "compare_epochs returns one)"), example)
        stats["n"] += 1
        if not verdict.ok:
            raise _Mismatch(verdict, example)
        stats["worst"], stats["batches"] = max(stats["worst"], verdict.worst), stats["batches"] + verdict.batches

    tol = tolerance_table.lookup(dtype)
    rec = CheckRecord(name, "forward", dtype, run.device, run.precision, "passed", nodeid=nodeid, replay=replay,
                      tolerance={"rtol": tol.rtol, "atol": tol.atol, "per": getattr(tol, "per", "element"),
                                 "reason": "floating leaves: " + tol.reason},
                      tags=["data"], family="data")
    search = Search(run, _Mismatch)
    m = search(test, examples, digest=f"data:{name}:{dtype}", seed=run.item_seed(name, dtype, run.device),
               max_examples=max_examples, explicit=witnesses)
    rec.witnessed = len(witnesses)
    if m is not None:
        rec.outcome, rec.kind, rec.side, rec.message = "failed", m.verdict.kind, m.verdict.side, m.verdict.message
        rec.worst_ratio = float("inf")
        rec.inputs = format_args(m.example if isinstance(m.example, tuple) else (m.example,))
        if search.flaky:
            rec.notes.append(FLAKY_NOTE)
    rec.examples, rec.max_abs_err, rec.seconds = stats["n"], stats["worst"], time.perf_counter() - start
    if rec.outcome == "passed":
        rec.notes.append(f"{stats['batches']} batches compared")
    hit = known(rec.id)
    if hit:
        rec.outcome = "known-divergence" if rec.outcome == "failed" else "xpass"
        rec.known_pattern, rec.known_reason = hit
    return rec
