"""What a report's records and benchmarks must hold, checked as a file is read (`read_report`), so
that a hand-edited or foreign report is refused with the file, the record and the field named,
instead of comparing wrong (a ratio "0.5" as text is no ratio: compare skipped its drift) or
failing later with a bare KeyError or TypeError.

Only fields present are checked, apart from `id` and `outcome`: a report of an older version
lacks some, and every reader takes a missing one as absent.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from equivcheck.report.runs import OUTCOMES


class ReportError(ValueError):
    """A report file that is not as equivcheck writes it: the message names the file, the record
    or benchmark (its place and id) and the field."""


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)  # JSON's true is no number


def _measure(v: Any) -> bool:
    # CheckRecord.to_json writes an infinite measure as "inf" and NaN as null: JSON has neither.
    return v is None or _number(v) or v in ("inf", "-inf")


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _seconds(v: Any) -> bool:
    return v is None or (_number(v) and math.isfinite(v) and v >= 0)


def _text(v: Any) -> bool:
    return isinstance(v, str)


def _texts(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


# field -> (test, what it must be, in words)
_Rule = tuple[Callable[[Any], bool], str]
_MEASURE: _Rule = (_measure, 'a number, null or "inf"')
_COUNT: _Rule = (_count, "a whole number >= 0")
_TEXT: _Rule = (_text, "a string")
RECORD: dict[str, _Rule] = {
    "id": (lambda v: isinstance(v, str) and bool(v), "a non-empty string"),
    "outcome": (lambda v: v in OUTCOMES, f"one of {', '.join(OUTCOMES)}"),
    **dict.fromkeys(("worst_ratio", "max_abs_err", "max_rel_err", "max_ulp"), _MEASURE),
    "seconds": (_seconds, "a finite number of seconds >= 0 or null"),
    **dict.fromkeys(("examples", "ill_conditioned", "low_precision", "witnessed"), _COUNT),
    **dict.fromkeys(("pair", "check", "dtype", "device", "precision", "nodeid", "family", "kind", "message",
                     "diagnosis", "inputs", "known_reason", "known_pattern", "replay"), _TEXT),
    "side": (lambda v: v is None or isinstance(v, str), "a string or null"),
    **dict.fromkeys(("notes", "tags"), (_texts, "a list of strings")),
    **dict.fromkeys(("tolerance", "extra"), (lambda v: isinstance(v, dict), "an object")),
}
REQUIRED = ("id", "outcome")
STATS = ("median", "q1", "q3")  # what compare reads of a benchmark's stats


def _shown(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def check_records(path: str, records: Any) -> None:
    """Raise ReportError naming `path`, the record (its id and place) and the field when `records`
    is not a list of records as equivcheck writes them, or holds two records of one id (a
    report keys records by id: the second would hide the first from compare)."""
    if not isinstance(records, list):
        raise ReportError(f"{path}: 'records' must be a list of objects with 'id' and 'outcome', not a "
                         f"{type(records).__name__}")
    seen: dict[str, int] = {}
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise ReportError(f"{path}: records[{i}] is a {type(r).__name__}, not an object with 'id' and 'outcome'")
        which = f"records[{i}]" + (f" ({r['id']})" if isinstance(r.get("id"), str) else "")
        for field in REQUIRED:
            if field not in r:
                raise ReportError(f"{path}: {which}: field '{field}' missing; every record has 'id' and 'outcome'")
        for field, (ok, what) in RECORD.items():
            if field in r and not ok(r[field]):
                raise ReportError(f"{path}: {which}: field '{field}' is {_shown(r[field])}, not {what}")
        if r["id"] in seen:
            raise ReportError(f"{path}: {which}: id {r['id']} is also records[{seen[r['id']]}]'s: one record per "
                             "check (edited by hand, or two reports pasted together?)")
        seen[r["id"]] = i


def check_benchmarks(path: str, benches: Any) -> None:
    """Raise ReportError naming `path`, the benchmark and the field when `benches` is not a list of
    pytest-benchmark entries (group, name, stats with finite median, q1, q3) as `--equiv-bench`
    puts them in a report."""
    head = f"{path}: 'benchmarks' must be a list of pytest-benchmark entries (group, name, stats with median, q1, q3)"
    if not isinstance(benches, list):
        raise ReportError(f"{head}, not a {type(benches).__name__}")
    for i, b in enumerate(benches):
        if not isinstance(b, dict):
            raise ReportError(f"{head}: benchmarks[{i}] is a {type(b).__name__}")
        which = f"benchmarks[{i}]" + (f" ({b['group']} {b.get('name')})" if isinstance(b.get("group"), str) else "")
        for field in ("group", "name"):
            if not isinstance(b.get(field), str):
                raise ReportError(f"{head}: {which}: field '{field}' is {_shown(b.get(field))}, not a string")
        stats = b.get("stats")
        if not isinstance(stats, dict):
            raise ReportError(f"{head}: {which}: field 'stats' is {_shown(stats)}, not an object")
        for key in STATS:
            if key not in stats:
                raise ReportError(f"{head}: {which}: field 'stats.{key}' missing")
            if not (_number(stats[key]) and math.isfinite(stats[key]) and stats[key] >= 0):
                raise ReportError(f"{head}: {which}: field 'stats.{key}' is {_shown(stats[key])}, not a finite "
                                 "number of seconds >= 0")
