"""The session state the plugin builds once, and the `equiv` fixture's object.

`equiv.check(pair)` runs one pair at the item's dtype and device, files its records for the
report, and turns the outcome into pytest's: fail with the diagnosis and a replay command,
xfail for a known divergence, xpass for one that did not show, skip for a dtype the pair does
not declare.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import math
import os
import shlex
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import pytest

from equivcheck.backends import maps
from equivcheck.backends.deadline import SideTimeout, limit
from equivcheck.engine.kind import SIDES, CheckKind, family_of
from equivcheck.engine.knowns import KnownDivergences, settle, xpass_reason
from equivcheck.engine.records import CheckRecord, RunSettings

if TYPE_CHECKING:
    from equivcheck.report.shards import ShardPlan

RECORDS_KEY = "equivcheck"
KNOWN_KEY = "equivcheck-known"  # a node-id pattern from the known-divergence files matched this test


class _NeverRaised(Exception):
    """The only exception the xfail mark of an xpass check expects: the mark turns the test's pass
    into pytest's XPASS, while any failure after the check still fails the test."""


class KnownDivergenceFixed(UserWarning):
    """A known divergence's witness now agrees (under --equiv-known-lenient; else a failure)."""


@dataclasses.dataclass
class SessionState:
    enabled: bool
    run: RunSettings = dataclasses.field(default_factory=RunSettings)
    dtypes: tuple[str, ...] = ("float32", "float64")
    devices: tuple[str, ...] = ("cpu",)
    known: KnownDivergences = dataclasses.field(default_factory=KnownDivergences)
    report_dir: str | None = "reports"
    started: dt.datetime = dataclasses.field(default_factory=lambda: dt.datetime.now(dt.timezone.utc))
    records: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    matched_known: set[str] = dataclasses.field(default_factory=set)
    precision_settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    unavailable: dict[str, str] = dataclasses.field(default_factory=dict)  # device -> why
    device_names: dict[str, str] = dataclasses.field(default_factory=dict)
    report_paths: tuple[Any, ...] = ()
    report_error: str = ""  # why the report could not be written, for the terminal summary
    report_problems: tuple[str, ...] = ()  # a part of it left out (plots, the page), or latest.* kept
    journal: Any = None  # the controller's equivcheck.report.journal.Journal (None: no report, or a worker)
    # Tests selected to run (None until collection finishes) and those that reached an outcome:
    # fewer ran than were selected when Ctrl-C, a stuck side or -x cut the run short.
    selected: int | None = None
    finished: set[str] = dataclasses.field(default_factory=set)
    extra_args: tuple[str, ...] = ()  # options a replay must repeat
    # Node and check ids collected before -k/-m deselection (an xdist controller's: its workers'
    # collections); None while unknown, so entries matching nothing are warned about one by one.
    collected: set[str] | None = None
    narrowed: bool = False  # node ids on the command line: the rest of their files went uncollected
    known_lenient: bool = False  # a fixed known divergence is a warning, not a failure
    record_owner: dict[str, str] = dataclasses.field(default_factory=dict)  # record id -> the test that made it
    # --equiv-shard's plan (equivcheck.report.shards.ShardPlan); the report's run.shard
    # (equivcheck.report.shards.describe) once this shard's tests are known.
    shard: ShardPlan | None = None
    shard_info: dict[str, Any] | None = None
    # Called from the watchdog thread when a side is stuck in C code past its limit and grace
    # (equivcheck.backends.deadline): files the check's records, writes the report, ends the run.
    abort: Callable[[list[CheckRecord], SideTimeout], None] | None = None

    def replay(self, nodeid: str, dtype: str, device: str) -> str:
        args = ["pytest", "--equiv", nodeid, "--equiv-seed", str(self.run.seed), "--device", device,
                "--equiv-dtypes", dtype, "--equiv-precision", self.run.precision,
                "--equiv-examples", str(self.run.examples), "--equiv-shapes", str(self.run.palette),
                *self.extra_args]
        return shlex.join(args)


def _from_invocation_dir(item: pytest.Item) -> str:
    """`item`'s node id with its file as a path from the directory pytest was started in. Node ids
    are relative to the rootdir: a run started in suites/ printed `suites/test_losses.py::...`, which
    named no file when pasted there, and a test outside the rootdir got a bare file name."""
    _, sep, rest = item.nodeid.partition("::")
    try:
        where = os.path.relpath(item.path, item.config.invocation_params.dir)
    except (ValueError, AttributeError):  # another drive (Windows); an item with no file
        return item.nodeid
    return where.replace(os.sep, "/") + sep + rest


class Equiv:
    """What a test gets as `equiv`: the item's dtype and device, and `check`."""

    def __init__(self, item: pytest.Item, state: SessionState, dtype: str, device: str) -> None:
        self._item, self._state = item, state
        self.dtype, self.device = dtype, device
        self.run = dataclasses.replace(state.run, device=device)

    def __repr__(self) -> str:
        return f"<equiv {self.dtype} on {self.device}>"

    def check(self, pair: CheckKind, *, checks: Sequence[str] | None = None) -> list[CheckRecord]:
        """Run `pair` (all its checks, or `checks`) and fail, xfail or pass this test.

        `pair` is any `CheckKind`: a Pair, an OptimizerPair, a ModelPair, a DataCheck, or a
        user's own record with the same six members (equivcheck.engine.kind).
        """
        __tracebackhide__ = True
        if not isinstance(pair, CheckKind):
            missing = [m for m in ("name", "dtypes", "checks", "all_checks", "replace", "prepare", "run_checks")
                       if not hasattr(pair, m)]
            raise TypeError(f"equiv.check takes a check record (a CheckKind such as Pair), got "
                            f"{type(pair).__name__}, which lacks {', '.join(missing)}")
        if checks is not None:
            unknown = set(checks) - set(pair.all_checks)
            if unknown:
                raise ValueError(f"unknown checks {sorted(unknown)}; choose from {tuple(pair.all_checks)}")
            pair = pair.replace(checks=tuple(c for c in pair.checks if c in checks))
        if self.dtype not in pair.dtypes:
            why = f"{pair.name} declares dtypes {', '.join(pair.dtypes)}; not {self.dtype}"
            self._file([CheckRecord(pair.name, c, self.dtype, self.device, self.run.precision, "skipped",
                                    message=why, nodeid=self._item.nodeid, family=family_of(pair))
                        for c in pair.checks])
            pytest.skip(why)
        maps.relieve()  # a long run must not exhaust the process's memory maps (equivcheck.backends.maps)
        abort = self._state.abort
        on_stuck = None if abort is None else lambda exc: abort(self.timed_out(pair, exc), exc)
        try:
            with limit(self.run.timeout, on_stuck):
                records = pair.run_checks(dtype=self.dtype, run=self.run, known=self.known, nodeid=self.nodeid,
                                          replay=self.replay)
        except SideTimeout as exc:  # the one place every kind's timeout becomes failed records
            records = self.timed_out(pair, exc)
        for r in records:  # the kind's report section, whatever made the record
            r.family = r.family or family_of(pair)
        return self.conclude(records)

    def timed_out(self, pair: CheckKind, exc: SideTimeout) -> list[CheckRecord]:
        """A failed record per check of `pair`: one side's call did not return within the limit.
        Every check is failed: the example that hung was checking them together (operations) or
        the check stopped there, leaving the rest unrun."""
        side = exc.side if exc.side in SIDES else None
        return [CheckRecord(pair.name, c, self.dtype, self.device, self.run.precision, "failed", kind="timeout",
                            side=side, message=exc.describe(), worst_ratio=math.inf, nodeid=self.nodeid,
                            replay=self.replay, tags=sorted(getattr(pair, "tags", ())),
                            notes=[f"the limit is --equiv-timeout {self.run.timeout:g} (seconds)"])
                for c in pair.checks]

    @property
    def nodeid(self) -> str:
        return self._item.nodeid

    @property
    def replay(self) -> str:
        """The command line that replays this test, pasted where the run was started."""
        return self._state.replay(_from_invocation_dir(self._item), self.dtype, self.device)

    def known(self, check_id: str) -> tuple[str, str] | None:
        """(pattern, reason) of the known divergence matching `check_id`, or this test's node id:
        a node-id entry covers the test's checks as a check-id pattern would, so its records are
        known divergences, xpasses or fixed like any other."""
        return self._state.known.match(check_id, self.nodeid)

    def conclude(self, records: list[CheckRecord]) -> list[CheckRecord]:
        """File records made outside `check` (e.g. by `equivcheck.data.run_check`) for the report,
        and fail, xfail or pass this test like `check`."""
        __tracebackhide__ = True
        for message in settle(records, lenient=self._state.known_lenient):
            warnings.warn(message, KnownDivergenceFixed, stacklevel=2)
        self._file(records)
        if records and all(r.outcome == "skipped" for r in records):
            pytest.skip(records[0].message)
        failed = [r for r in records if r.outcome == "failed"]
        if failed:
            pytest.fail("\n\n".join(r.failure_text() for r in failed), pytrace=False)
        known = [r for r in records if r.outcome == "known-divergence"]
        if known:
            pytest.xfail("; ".join(sorted({f"{r.check}: {r.known_reason}" for r in known})))
        xpass = [r for r in records if r.outcome == "xpass"]
        if xpass:  # pytest says XPASS, as the equivcheck table does, with the reason it is no failure
            why: dict[str, list[str]] = {}
            for r in xpass:
                why.setdefault(xpass_reason(r.known_pattern, r.notes), []).append(r.check)
            reason = "; ".join(f"{', '.join(checks)}: {text}" for text, checks in why.items())
            self._item.add_marker(pytest.mark.xfail(reason=reason, strict=False, raises=_NeverRaised))
        return records

    def _file(self, records: list[CheckRecord]) -> None:
        # user_properties travel with the test report, also from xdist workers.
        self._item.user_properties.append((RECORDS_KEY, [r.to_json() for r in records]))
