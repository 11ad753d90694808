"""Known divergences: a file of id patterns, each with the reason the two sides differ.

One entry per line, `PATTERN  REASON` (any white space between them, tabs included); `#` at a line's start or after a space starts a comment:

    abs::vjp                      abs'(0): torch 0, JAX 1 (jax-ml/jax#37820)
    gelu_default::forward::*::gpu jax.nn.gelu defaults to the tanh approximation
    suites/test_models.py::test_train[cnn-*]   dropout RNG streams differ

A pattern is a check id `pair::check::dtype::device` (segments left off match anything)
or a pytest node id (anything naming a `.py` file). Only `*` and `?` are wildcards, so
the brackets of node ids match themselves.

A file path may hold `{torch}` and `{jax}`, replaced by the installed versions' major.minor
(`suites/known_divergences-torch{torch}.txt`): entries only some versions show. Such a path that
does not exist is no error (that combination has none).

A node-id entry covers every check its test runs through the `equiv` fixture, exactly as a
check-id pattern would (known-divergence, xpass, fixed); a test without the fixture matched by
one is marked xfail as it stands. Across the files the first matching entry wins, of either form.

Strictness: a check that matches an entry and passes although its kind ran a witness first
(the input where the divergence shows) is *fixed*: `settle` fails it with a message saying
the divergence is gone; lenient runs keep it as `xpass` with a warning.

An entry is about values that differ: a check whose side raised (record kind "error") or did
not return (kind "timeout") stays a failure although an entry matches, since a crash in a port is
no known divergence and would hide behind one. The exception: an entry whose reason says the
word "raises" (`mlp_naive::forward ... the JAX side raises TypeError`) expects a side to raise, and
still covers errors (never timeouts).
"""
from __future__ import annotations

import dataclasses
import fnmatch
import importlib.metadata
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any


@dataclasses.dataclass(frozen=True)
class Entry:
    pattern: str
    reason: str
    source: str  # file:line, for messages
    regex: re.Pattern[str]

    @property
    def is_node(self) -> bool:
        return ".py" in self.pattern


def _compile(pattern: str) -> re.Pattern[str]:
    if ".py" not in pattern:
        parts = pattern.split("::")
        if len(parts) > 4:
            raise ValueError("a check id has at most four parts: pair::check::dtype::device")
        pattern = "::".join(parts + ["*"] * (4 - len(parts)))
    body = re.escape(pattern).replace(r"\*", ".*").replace(r"\?", ".")
    return re.compile(f"^{body}$")


def _decode(data: bytes, path: str) -> str:
    """The file as text; a byte that is not UTF-8 is named with its line, which the bare
    UnicodeDecodeError does not (nor the file)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                         "save the file as UTF-8") from None


class KnownDivergences:
    def __init__(self, entries: list[Entry] | None = None) -> None:
        self.entries = entries or []

    @classmethod
    def load(cls, paths: list[str]) -> KnownDivergences:
        """Entries of every file in `paths`, in order (the first matching entry wins).

        Raises ValueError naming the file (and line) for an unreadable file, text that is
        not UTF-8, an entry without a reason or a pattern with more than four segments."""
        entries: list[Entry] = []
        for template in paths:
            path = versioned(template)
            if path != template and not Path(path).exists():
                continue
            try:
                data = Path(path).read_bytes()
            except OSError as exc:
                raise ValueError(f"known-divergences file {path}: {exc.strerror or exc}") from None
            text = _decode(data, path)
            for n, raw in enumerate(text.splitlines(), 1):
                # A comment is a `#` at the start or after white space: `jax#123` stays.
                line = "" if raw.lstrip().startswith("#") else re.sub(r"\s+#.*$", "", raw).strip()
                if not line:
                    continue
                # Split at any white space: an editor's tab would otherwise end up inside the pattern.
                pattern, reason = (line.split(None, 1) + [""])[:2]
                reason = reason.strip()
                if not reason:
                    raise ValueError(f"{path}:{n}: {pattern!r} has no reason; write `PATTERN  REASON`")
                try:
                    regex = _compile(pattern)
                except ValueError as exc:
                    raise ValueError(f"{path}:{n}: {pattern!r}: {exc}") from None
                entries.append(Entry(pattern, reason, f"{path}:{n}", regex))
        return cls(entries)

    def match(self, check_id: str, nodeid: str = "") -> tuple[str, str] | None:
        """(pattern, reason) of the first entry matching the check id or, for a node-id entry,
        the test's node id: both forms cover the check alike."""
        for e in self.entries:
            if e.regex.match(nodeid if e.is_node else check_id):
                return e.pattern, e.reason
        return None

    def match_check(self, check_id: str) -> tuple[str, str] | None:
        for e in self.entries:
            if not e.is_node and e.regex.match(check_id):
                return e.pattern, e.reason
        return None

    def match_node(self, nodeid: str) -> tuple[str, str] | None:
        for e in self.entries:
            if e.is_node and e.regex.match(nodeid):
                return e.pattern, e.reason
        return None

    def unmatched(self, matched: set[str]) -> list[Entry]:
        return [e for e in self.entries if e.pattern not in matched]

    def __len__(self) -> int:
        return len(self.entries)


def _major_minor(dist: str) -> str:
    try:
        return ".".join(importlib.metadata.version(dist).split("+")[0].split(".")[:2])
    except importlib.metadata.PackageNotFoundError:
        return "none"


def versioned(path: str) -> str:
    """`path` with `{torch}` and `{jax}` replaced by the installed major.minor versions
    ("2.14", "0.10"; "none" when not installed)."""
    for key, dist in (("{torch}", "torch"), ("{jax}", "jax")):
        if key in path:
            path = path.replace(key, _major_minor(dist))
    return path


NO_WITNESS = ("no witness ran: the drawn examples may have missed the inputs where this divergence shows; give "
              "the check a witness to make the entry strict")
RAISED = ("error", "timeout")  # record kinds where a side raised or did not return, rather than differed
_SAYS_RAISES = re.compile(r"\braises\b", re.IGNORECASE)


def settle(records: list[Any], *, lenient: bool = False) -> list[str]:
    """Make known divergences strict, in place.

    A record that matched an entry because a side raised or timed out is failed: the entry
    names values that differ, and a crash behind it would read as the known difference (unless
    the entry's reason says the side "raises"). A record that passed against an entry (`xpass`)
    after running its kind's witnesses is failed as *fixed*, since the input where the
    divergence showed now agrees. Lenient: it stays `xpass` and its message is returned for a
    warning. An `xpass` without a witness stays one, with a note: the run may not have drawn the
    inputs where the divergence shows."""
    warnings = []
    for rec in records:
        if rec.outcome == "known-divergence" and rec.kind in RAISED and not (
                rec.kind == "error" and _SAYS_RAISES.search(rec.known_reason)):
            who = f"the {rec.side} side" if rec.side else "a side"
            did = "raised" if rec.kind == "error" else "did not return"
            rec.outcome = "failed"
            rec.message = (f"known divergence {rec.known_pattern!r} matched, but {who} {did} instead of giving "
                           f"other values: {rec.message}\n  an entry covers values that differ, not a side that "
                           "raises: fix that side, or, if raising is the known behaviour, say \"raises\" in the "
                           "entry's reason")
            continue
        if rec.outcome != "xpass":
            continue
        if not rec.witnessed:
            rec.notes.append(NO_WITNESS)
            continue
        message = (f"known divergence {rec.known_pattern!r} no longer shows: its witness"
                   f"{'es' * (rec.witnessed > 1)} and {max(rec.examples - rec.witnessed, 0)} drawn examples agree "
                   "within the table. Either the port was fixed, the installed torch/jax changed or this device "
                   f"({rec.device}) rounds otherwise: remove the entry, or, if other versions still show it, move "
                   "it to a per-version file (`{torch}` or `{jax}` in its path stands for the installed "
                   "major.minor version), or, if other devices do, name theirs in its pattern "
                   "(`pair::check::*::cpu`); --equiv-known-lenient makes this a warning")
        if lenient:
            rec.notes.append(message)
            warnings.append(f"{rec.id}: {message}")
        else:
            rec.outcome, rec.kind, rec.side, rec.message = "failed", "fixed", None, message
    return warnings


def xpass_reason(pattern: str, notes: Sequence[str]) -> str:
    """Why a check that matched entry `pattern` passed, from the note `settle` left on its record:
    one text for pytest's XPASS reason, the terminal summary and the report."""
    for note in notes:
        if note == NO_WITNESS:
            return f"known divergence {pattern!r} did not show: {note}"
        if note.startswith(f"known divergence {pattern!r} no longer shows"):
            return note
    return f"known divergence {pattern!r} did not show"


_LEFT_OUT = ("dtypes or devices this run did not select", "checks this selection (-k, -m) left out",
             "pairs or files this run did not collect", "onnx checks this run did not run (a layer's: --equiv-onnx)")


def sort_unmatched(entries: Sequence[Entry], *, dtypes: Sequence[str], devices: Sequence[str],
                   collected: set[str] | None, narrowed: bool) -> tuple[list[Entry], dict[str, list[Entry]]]:
    """Entries that matched nothing this run, in two: (those within what ran, so stale or a typo;
    those the run left out, by what it left out). The terminal summary and the report both
    sort them here, so that the two agree.

    `collected`: the node and check ids collected before -k/-m deselection (None: unknown, then
    every entry within the selected dtypes and devices is stale); `narrowed`: paths or node ids
    on the command line collected only part of the project."""
    stale: list[Entry] = []
    quiet: dict[str, list[Entry]] = {why: [] for why in _LEFT_OUT}
    for e in entries:
        why = _why_unchecked(e, dtypes, devices, collected, narrowed)
        if why:
            quiet[why].append(e)
        else:
            stale.append(e)
    return stale, {why: es for why, es in quiet.items() if es}


def unchecked(entries: Sequence[Entry], *, dtypes: Sequence[str], devices: Sequence[str],
              collected: set[str] | None, narrowed: bool) -> tuple[list[str], list[str]]:
    """Of entries that matched nothing this run (`sort_unmatched`): (a warning per entry that was
    within what ran; one line per kind of what the run left out, counting the entries for it)."""
    stale, quiet = sort_unmatched(entries, dtypes=dtypes, devices=devices, collected=collected, narrowed=narrowed)
    warnings = [f"known divergence {e.pattern!r} ({e.source}) matched no check or test" for e in stale]
    counts = [f"{len(es)} known divergences are for {why} (e.g. {es[0].pattern!r}): not checked"
              for why, es in quiet.items()]
    return warnings, counts


def _why_unchecked(entry: Entry, dtypes: Sequence[str], devices: Sequence[str], collected: set[str] | None,
                   narrowed: bool) -> str | None:
    """Why an entry that matched nothing run was not checked, or None if it should have been."""
    if not _selected(entry.pattern, dtypes, devices):
        return _LEFT_OUT[0]
    if "::onnx" in entry.pattern and not any(fnmatch.fnmatchcase(i, entry.pattern.split("::")[0] + "::onnx::*")
                                             for i in collected or ()):
        # opt-in for layers (--equiv-onnx): this pair ran no onnx check to match, whatever models' onnx checks ran
        return _LEFT_OUT[3]
    if collected is None:
        return None
    if any(map(entry.regex.match, collected)):
        return _LEFT_OUT[1]
    # The same pair, or the same file, was collected: the entry is within what ran, yet wrong.
    scope = entry.pattern.split("::")[0]
    owners = {i.split("::")[0] for i in collected}
    if not narrowed or any(fnmatch.fnmatchcase(o, scope) for o in owners):
        return None
    return _LEFT_OUT[2]


def _selected(pattern: str, dtypes: Sequence[str], devices: Sequence[str]) -> bool:
    """False for a check-id pattern naming a dtype or device the run left out: it cannot match,
    which says nothing about whether the divergence still exists."""
    if ".py" in pattern:
        return True
    parts = pattern.split("::")
    dtype = parts[2] if len(parts) > 2 else "*"
    device = parts[3] if len(parts) > 3 else "*"

    def plain(v: str) -> bool:
        return not any(c in v for c in "*?")

    return not ((plain(dtype) and dtype not in dtypes) or (plain(device) and device not in devices))
