"""The end of an `--equiv` session: the run's report, and ending a run whose side is stuck.

The plugin calls `write_report` from pytest_sessionfinish; the fixture's time limit calls `abort`
(through `SessionState.abort`) from the watchdog thread when a side is stuck in C code that
ignores signals (equivcheck.backends.deadline).
"""
from __future__ import annotations

import datetime as dt
import os
import sys
from typing import Any

import pytest


def _drop(record: Any) -> bool:
    return False


def quiet_torch_trace() -> None:
    """Keep torch's structured-trace logger `torch.__trace` out of pytest's log capture. pytest attaches
    its capture handlers to every non-propagating logger (pytest 8.4's catching_logs), and that one
    (non-propagating, always DEBUG, its level and handlers reset by torch's own logging setup during
    torch.export) emits whenever it holds a handler: each torch.export (the ONNX check's dynamo
    exporter) put its graph dumps in later failures' "Captured log" (45 DEBUG lines for a model check).
    A filter on the logger drops its records before any handler, and torch leaves filters alone;
    with TORCH_TRACE set (the user asked for the trace) it is left as it is. A no-op before torch is
    imported."""
    if "torch" not in sys.modules or os.environ.get("TORCH_TRACE"):
        return
    import logging

    trace = logging.getLogger("torch.__trace")
    if _drop not in trace.filters:
        trace.addFilter(_drop)


def write_report(config: pytest.Config, state: Any, *, interrupted: bool, stuck: str = "") -> None:
    """The JSON and Markdown reports of `state.records` (a SessionState's), under
    `state.report_dir`. `interrupted`: Ctrl-C or a stuck side cut the run short, so the records
    are a partial run; `stuck`: what was stuck, with its stack. Once written, the run's record
    journal (equivcheck.report.journal) is deleted."""
    from equivcheck import report

    run = run_section(config, state, interrupted=interrupted, stuck=stuck)
    # an interrupted run leaves a report even before its first record: it says the run stopped;
    # a shard always does, empty or not, since merge needs every share's
    if state.report_dir and (state.records or interrupted or state.shard_info is not None):
        try:
            built = report.build(state.records, run)
            if config.getoption("equiv_bench", False):
                from equivcheck.benchmarking import session_benchmarks

                built["benchmarks"] = session_benchmarks(config)
            state.report_paths, state.report_problems = report.write(built, state.report_dir)
            if state.journal is not None:
                state.journal.discard()
        except OSError as exc:  # checked at the start, yet gone since (removed, full, read-only)
            from equivcheck.report.files import unwritable

            state.report_error = f"no report written to {state.report_dir}: {unwritable(state.report_dir, exc)}"


def sigterm_as_interrupt(config: pytest.Config) -> None:
    """SIGTERM (`kill`, a CI job's timeout or cancel) ends the run as Ctrl-C does: pytest's
    KeyboardInterrupt path prints the summary and the report is written, marked interrupted. By
    default SIGTERM ended the process at once with only the record journal left. Python acts on a
    signal between bytecodes: a side stuck in C code holds it until its time limit fires
    (equivcheck.backends.deadline); a second SIGTERM, once the first was acted on, ends the process
    at once. Only the main thread may set handlers; the old one returns at unconfigure."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def stop(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise KeyboardInterrupt("SIGTERM: the run was asked to stop; its report is written, marked interrupted")

    before = signal.signal(signal.SIGTERM, stop)
    # None: a handler set outside Python, which signal.signal cannot put back; the default then
    config.add_cleanup(lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL if before is None else before))


def run_section(config: pytest.Config, state: Any, *, interrupted: bool, stuck: str = "") -> dict[str, Any]:
    """The report's `run` section as of now: settings, versions, machine, timing, partial, the
    known-divergence entries unmatched; written at the end, and as the journal's first line."""
    from equivcheck import report
    from equivcheck.backends import jax_side
    from equivcheck.engine.knowns import sort_unmatched

    finished = dt.datetime.now(dt.timezone.utc)
    state.matched_known |= {r["known_pattern"] for r in state.records if r.get("known_pattern")}
    versions = report.versions()
    count, seconds = jax_side().COMPILES.snapshot()
    run = {
        "id": report.run_id(state.started, versions, state.devices),
        "started": state.started.isoformat(timespec="seconds"),
        "finished": finished.isoformat(timespec="seconds"),
        "seconds": (finished - state.started).total_seconds(),
        "interrupted": interrupted, "partial": partial(state, interrupted=interrupted),
        "seed": state.run.seed, "profile": state.run.profile, "examples": state.run.examples,
        "palette": state.run.palette, "precision": state.run.precision, "timeout": state.run.timeout,
        "precision_settings": state.precision_settings, "dtypes": list(state.dtypes),
        "devices": list(state.devices), "unavailable": state.unavailable, "device_names": state.device_names,
        "versions": versions, "machine": report.machine(), "matrix": os.environ.get("TOX_ENV_NAME"),
        # an xdist controller compiles nothing: its count would read as none at all; merge sums shards'
        "jax_compilations": None if getattr(config.option, "numprocesses", None)
        else {"count": count, "seconds": round(seconds, 3)},
        "failures_db": state.run.failures_db,
        "replay": state.replay("<node id>", ",".join(state.dtypes), ",".join(state.devices)),
    }
    # Sorted as the terminal summary sorts them: an entry the selection left out is not stale.
    stale, left_out = sort_unmatched(state.known.unmatched(state.matched_known), dtypes=state.dtypes,
                                     devices=state.devices, collected=state.collected, narrowed=state.narrowed)
    run["unmatched_known"] = [{"pattern": e.pattern, "reason": e.reason, "source": e.source} for e in stale]
    run["unchecked_known"] = [{"pattern": e.pattern, "reason": e.reason, "source": e.source, "why": why}
                              for why, es in left_out.items() for e in es]
    if state.shard_info is not None:  # with the ids of the records each test made, for merge to check them against
        from equivcheck.report.shards import tally

        run["shard"] = {**state.shard_info, "records": tally(state.records)}
    if stuck:
        run["stuck"] = stuck
    return run


def journal_for(config: pytest.Config, state: Any) -> Any:
    """The controller's record journal, whose first line is the run section at its first record
    (equivcheck.report.journal); None without a report."""
    if not state.report_dir:
        return None
    from equivcheck.report.journal import Journal

    return Journal(state.report_dir, state.started, lambda: run_section(config, state, interrupted=True))


def leftover_lines(report_dir: str | None) -> list[str]:
    """Header lines naming the journals of runs that ended without their report (none without a report)."""
    from equivcheck.report.journal import leftovers

    if not report_dir:
        return []
    return [f"equivcheck: a run that ended without its report left its records in {p}: "
            f"python -m equivcheck recover {p}" for p in leftovers(report_dir)]


def empty_share(state: Any, exitstatus: int) -> bool:
    """This run is a shard whose share of a non-empty selection is empty (more shards than tests):
    pytest's "no tests collected" (exit 5) would fail a CI fleet for a machine with nothing to do."""
    info = state.shard_info
    return (exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED and info is not None and not info["tests"]
            and info["selected"] > 0)


def partial(state: Any, *, interrupted: bool) -> dict[str, int | None] | None:
    """`{"ran": N, "collected": M}` when the records are not the whole run, else None: Ctrl-C or a
    stuck side (`interrupted`), or fewer tests reaching an outcome than were selected (-x,
    --maxfail). Without it a cut-short run's report reads as complete and compare as "gone"."""
    ran = len(state.finished)
    if interrupted or (state.selected is not None and ran < state.selected):
        return {"ran": ran, "collected": state.selected}
    return None


def onnx_left_out(records: list[dict[str, Any]]) -> str:
    """Under --equiv-onnx, the pairs with a forward check that ran no onnx check: the option adds it to
    layer pairs (family="layers") only, and a user's own Pair left out silently read as covered."""
    has = {r["pair"] for r in records if r["check"] == "onnx"}
    left = sorted({r["pair"] for r in records if r["check"] == "forward"} - has)
    if not left:
        return ""
    shown = ", ".join(left[:8]) + (f" and {len(left) - 8} more" if len(left) > 8 else "")
    return (f"--equiv-onnx: {len(left)} pair{'s' if len(left) != 1 else ''} with a forward check ran no onnx check "
            f"({shown}): the option adds it to layer pairs (family=\"layers\") only; give a Pair "
            f"checks=(..., \"onnx\") to run it")


def report_lines(state: Any, *, interrupted: bool) -> list[tuple[str, str]]:
    """The end of the terminal's equivcheck section, as (colour, text): a partial run said first,
    where the report went or why it could not go there."""
    from equivcheck.report.runs import partial_text

    lines = []
    text = partial_text({"partial": partial(state, interrupted=interrupted), "interrupted": interrupted})
    if text:
        lines.append(("red", f"PARTIAL RUN: {text}; the checks above are not the whole run"))
    if state.shard_info is not None:
        s = state.shard_info
        text = (f"shard {s['index']}/{s['count']}: {len(s['tests'])} of {s['selected']} selected tests "
                f"(balanced by {s['balanced_by']}); merge the shards' reports with python -m equivcheck merge")
        lines.append(("", text))
    if state.report_error:
        lines.append(("red", state.report_error))
    lines += [("red", f"report: {problem}") for problem in state.report_problems]
    if state.journal is not None and state.journal.error:
        lines.append(("red", state.journal.error))
    lines += [("", f"report: {path}") for path in state.report_paths]
    return lines


def abort(config: pytest.Config, state: Any, records: list[Any], exc: Any) -> None:
    """End the run: a side is stuck in C code that ignores signals (`exc`, a SideTimeout), and
    `records` are its check's failures. Called on the watchdog thread while the checking thread
    is still stuck: prints the failures, writes the report, and exits with pytest's "interrupted"
    status (2) without the interpreter's shutdown, which would wait on the stuck thread. An
    xdist worker only prints and exits: its controller reports the crashed worker and goes on."""
    from equivcheck.backends.deadline import end_process

    state.records.extend(r.to_json() for r in records)
    capman = config.pluginmanager.getplugin("capturemanager")
    if capman is not None:  # the test's output is being captured: the message must reach the terminal
        capman.suspend_global_capture(in_=True)
    lines = ["", "equivcheck: the run ends: a side is stuck", *(r.failure_text() for r in records)]
    if not hasattr(config, "workerinput"):
        write_report(config, state, interrupted=True, stuck=exc.describe())
        lines += [text for _, text in report_lines(state, interrupted=True)]
    print("\n".join(lines), file=sys.__stderr__, flush=True)
    end_process(pytest.ExitCode.INTERRUPTED)
