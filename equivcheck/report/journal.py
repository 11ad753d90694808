"""The records of a run as they are made, so a process that dies keeps them.

A run writes its report at the end; a crash in native code (a segmentation fault in XLA's compiler
ended a serial run of the suites after 19 minutes), an out-of-memory kill or a CI job's SIGKILL ends
the process before that, and every record gathered went with it. So the controller appends each
test's records to `<report dir>/unfinished-<start>-<pid>-<token>.jsonl` as the test reports (one JSON
object per line, flushed: the operating system keeps them whatever happens to the process), and
deletes the file once the report is written. A file left behind by a process that is gone is what
that run had checked: `python -m equivcheck recover FILE` writes its report, marked interrupted and
crashed, and the next run's header names such files.

Lines: first `{"run": <the report's run section as at the first record>, "writer": <who writes it>}`
(`writer`: PID, host name and the process's start time, so that a PID reused by another process
or a journal copied from another machine does not read as a run still going), then `{"record": ...}`.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import re
import secrets
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

__all__ = ["CRASHED", "Journal", "leftovers", "recover", "writer_alive"]

PREFIX = "unfinished-"
CRASHED = ("the process ended before writing its report (killed by a signal such as SIGSEGV or SIGKILL, or out "
           "of memory); these are the records it had written to its journal")
_NAME = re.compile(rf"^{PREFIX}\d{{8}}-\d{{6}}-(\d+)-[0-9a-f]+\.jsonl$")


class Journal:
    """Appends records to `<directory>/unfinished-<started>-<pid>-<token>.jsonl`; `run_section()` gives the
    first line, taken when the first records arrive (collection is over by then)."""

    def __init__(self, directory: str | os.PathLike[str], started: dt.datetime,
                 run_section: Callable[[], dict[str, Any]]) -> None:
        # a random token too: two sessions of one process (pytester's) may start within one second
        stamp = started.strftime("%Y%m%d-%H%M%S")
        self.path = Path(directory) / f"{PREFIX}{stamp}-{os.getpid()}-{secrets.token_hex(3)}.jsonl"
        self._run_section = run_section
        self._file: IO[str] | None = None
        self.error = ""  # why the journal could not be written: the run goes on without it

    def append(self, records: Sequence[dict[str, Any]]) -> None:
        if not records or self.error:
            return
        try:
            if self._file is None:
                self._file = open(self.path, "x", encoding="utf-8")  # noqa: SIM115 - open for the run's length
                self._file.write(json.dumps({"run": self._run_section(), "writer": identity(os.getpid())},
                                            default=str) + "\n")
            self._file.writelines(json.dumps({"record": r}, default=str) + "\n" for r in records)
            self._file.flush()
        except OSError as exc:
            self.error = f"the record journal {self.path} could not be written: {exc.strerror or exc}"

    def discard(self) -> None:
        """The report is written: the journal has served."""
        if self._file is not None:
            self._file.close()
            self._file = None
            self.path.unlink(missing_ok=True)


def leftovers(directory: str | os.PathLike[str]) -> list[Path]:
    """Journals in `directory` whose process is gone: runs that ended without their report."""
    return [path for path in sorted(Path(directory).glob(f"{PREFIX}*.jsonl"))
            if _NAME.match(path.name) and _live_writer(path) is None]


def identity(pid: int) -> dict[str, Any]:
    """Who process `pid` is: its PID, this host's name and its start time in clock ticks since boot
    (field 22 of /proc/PID/stat; None where there is no /proc)."""
    return {"pid": pid, "host": socket.gethostname(), "start": _start_ticks(pid)}


def _start_ticks(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may hold spaces: count fields after it
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[19]) if len(fields) > 19 and fields[19].isdigit() else None


def writer_alive(path: str | os.PathLike[str]) -> int | None:
    """The PID of the process writing journal `path` when it is still running (its run is not over
    and writes its own report), else None. The journal's first line says who wrote it; a process
    under that PID on another host, started at another time (the PID reused: PID 1 in every
    container) or this very process is not its writer. A journal without that line (an older
    one) is judged by the PID in its name alone; a name not of the journal's pattern gives None."""
    pid = _live_writer(path)
    return None if pid == os.getpid() else pid


def _live_writer(path: str | os.PathLike[str]) -> int | None:
    m = _NAME.match(Path(path).name)
    if m is None:
        return None
    writer = _writer(path) or {"pid": int(m.group(1))}
    pid = writer.get("pid")
    if not isinstance(pid, int) or not _alive(pid):
        return None
    if writer.get("host") not in (None, socket.gethostname()):
        return None
    if writer.get("start") is not None and _start_ticks(pid) not in (None, writer["start"]):
        return None
    return pid


def _writer(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            writer = json.loads(f.readline()).get("writer")
    except (OSError, ValueError, AttributeError):
        return None
    return writer if isinstance(writer, dict) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _is_record(entry: Any) -> bool:
    record = entry.get("record") if isinstance(entry, dict) else None
    return isinstance(record, dict) and {"id", "outcome"} <= record.keys()


def recover(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The report of the run that left journal `path`: its records, its run section marked interrupted,
    `crashed` and partial (`ran`: the tests with records; `collected`: as the run had counted). A last
    line cut short by the crash is dropped, and `run["journal"]["cut_line"]` gives its number (else
    None): the test it belonged to may lack records. Raises ValueError naming the file and line when the file is
    not a journal."""
    from equivcheck.report.runs import build

    run: dict[str, Any] | None = None
    records: list[dict[str, Any]] = []
    cut, started = None, None
    lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    for n, line in enumerate(lines, 1):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):  # the write the crash cut short
                cut = n
                break
            raise ValueError(f"{path}:{n}: not a JSON line of a record journal") from None
        if n == 1:
            if not isinstance(entry, dict) or not isinstance(entry.get("run"), dict):
                raise ValueError(f"{path}:1: a record journal starts with its run section ({{\"run\": ...}})")
            lacks = [k for k, kind in (("id", str), ("started", str), ("versions", dict), ("machine", dict))
                     if not isinstance(entry["run"].get(k), kind) or not entry["run"][k]]
            if lacks:
                raise ValueError(f"{path}:1: the run section lacks {', '.join(lacks)}, which the report needs")
            started = _instant(entry["run"]["started"])
            if started is None:
                raise ValueError(f"{path}:1: the run's start {entry['run']['started']!r} is not an ISO 8601 time "
                                 "with its UTC offset")
            run = entry["run"]
        elif _is_record(entry):
            records.append(entry["record"])
        else:
            raise ValueError(f"{path}:{n}: expected {{\"record\": {{\"id\": ..., \"outcome\": ...}}}}")
    if run is None or started is None:
        raise ValueError(f"{path}: empty: the run had written no record")
    last = dt.datetime.fromtimestamp(os.stat(path).st_mtime, dt.timezone.utc)
    tests = {r.get("nodeid") for r in records}
    run.update(finished=last.isoformat(timespec="seconds"), seconds=(last - started).total_seconds(),
               interrupted=True, crashed=CRASHED,
               partial={"ran": len(tests), "collected": (run.get("partial") or {}).get("collected")},
               unmatched_known=[], unchecked_known=[], journal={"path": str(path), "cut_line": cut})
    return build(records, run)


def _instant(text: str) -> dt.datetime | None:
    """`text` as an aware datetime (ISO 8601 with a UTC offset), else None."""
    try:
        when = dt.datetime.fromisoformat(text)
    except (TypeError, ValueError):
        return None
    return when if when.tzinfo is not None else None
