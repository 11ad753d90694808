"""The session state the plugin builds once, and the `equiv` fixture's object.

`equiv.check(pair)` runs one pair at the item's dtype and device, files its records for the
report, and turns the outcome into pytest's: fail with the diagnosis and a replay command,
xfail for a known divergence, skip for a dtype the pair does not declare.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import shlex
from collections.abc import Sequence
from typing import Any

import pytest

from equivcheck.knowns import KnownDivergences
from equivcheck.pairs import CHECKS, Pair
from equivcheck.runner import CheckRecord, RunSettings, run_pair

RECORDS_KEY = "equivcheck"
KNOWN_KEY = "equivcheck-known"  # a node-id pattern from the known-divergence files matched this test


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
    extra_args: tuple[str, ...] = ()  # options a replay must repeat

    def replay(self, nodeid: str, dtype: str, device: str) -> str:
        args = ["pytest", "--equiv", nodeid, "--equiv-seed", str(self.run.seed), "--device", device,
                "--equiv-dtypes", dtype, "--equiv-precision", self.run.precision,
                "--equiv-examples", str(self.run.examples), "--equiv-shapes", str(self.run.palette),
                *self.extra_args]
        return shlex.join(args)


class Equiv:
    """What a test gets as `equiv`: the item's dtype and device, and `check`."""

    def __init__(self, item: pytest.Item, state: SessionState, dtype: str, device: str) -> None:
        self._item, self._state = item, state
        self.dtype, self.device = dtype, device
        self.run = dataclasses.replace(state.run, device=device)

    def __repr__(self) -> str:
        return f"<equiv {self.dtype} on {self.device}>"

    def check(self, pair: Pair, *, checks: Sequence[str] | None = None) -> list[CheckRecord]:
        """Run `pair` (all its checks, or `checks`) and fail, xfail or pass this test.

        Besides a `Pair`, any record with `run_checks(dtype=, run=, known=, nodeid=,
        replay=)` and `all_checks` runs here the same way (equivcheck.optim.OptimizerPair).
        """
        __tracebackhide__ = True
        own = not isinstance(pair, Pair) and callable(getattr(pair, "run_checks", None))
        if not isinstance(pair, Pair) and not own:
            raise TypeError(f"equiv.check takes a Pair, got {type(pair).__name__}")
        if checks is not None:
            valid = getattr(pair, "all_checks", CHECKS)
            unknown = set(checks) - set(valid)
            if unknown:
                raise ValueError(f"unknown checks {sorted(unknown)}; choose from {valid}")
            pair = pair.replace(checks=tuple(c for c in pair.checks if c in checks))
        if self.dtype not in pair.dtypes:
            why = f"{pair.name} declares dtypes {', '.join(pair.dtypes)}; not {self.dtype}"
            self._file([CheckRecord(pair.name, c, self.dtype, self.device, self.run.precision, "skipped",
                                    message=why, nodeid=self._item.nodeid) for c in pair.checks])
            pytest.skip(why)
        runner = pair.run_checks if own else functools.partial(run_pair, pair)
        records = runner(dtype=self.dtype, run=self.run, known=self.known, nodeid=self.nodeid, replay=self.replay)
        return self.conclude(records)

    @property
    def nodeid(self) -> str:
        return self._item.nodeid

    @property
    def replay(self) -> str:
        """The command line that replays this test."""
        return self._state.replay(self._item.nodeid, self.dtype, self.device)

    def known(self, check_id: str) -> tuple[str, str] | None:
        """(pattern, reason) of the known divergence matching `check_id`, if any."""
        return self._state.known.match_check(check_id)

    def conclude(self, records: list[CheckRecord]) -> list[CheckRecord]:
        """File records made outside `check` (e.g. by `equivcheck.data.run_check`, which compares
        batches rather than a Pair) for the report, and fail, xfail or pass this test like `check`."""
        __tracebackhide__ = True
        self._file(records)
        if records and all(r.outcome == "skipped" for r in records):
            pytest.skip(records[0].message)
        failed = [r for r in records if r.outcome == "failed"]
        if failed:
            pytest.fail("\n\n".join(r.failure_text() for r in failed), pytrace=False)
        known = [r for r in records if r.outcome == "known-divergence"]
        if known:
            pytest.xfail("; ".join(sorted({f"{r.check}: {r.known_reason}" for r in known})))
        return records

    def _file(self, records: list[CheckRecord]) -> None:
        # user_properties travel with the test report, also from xdist workers.
        self._item.user_properties.append((RECORDS_KEY, [r.to_json() for r in records]))
