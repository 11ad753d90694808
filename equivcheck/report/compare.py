"""Two runs' reports compared: what changed, and whether anything regressed (for nightly CI)."""
from __future__ import annotations

import json
import math
from typing import Any

from equivcheck.report.fields import check_benchmarks, check_records
from equivcheck.report.runs import SCHEMA, partial_text


def read_report(path: str) -> dict[str, Any]:
    """A report file, or a ValueError naming it and what is wrong: `schema`, `run.versions`,
    `run.partial`, and every record and benchmark field present (report.fields: the types
    equivcheck writes, one record per id), so a hand-edited report is refused naming the record
    and the field rather than read wrong."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read ({exc.strerror or type(exc).__name__})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
                         "not a report") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON ({json_problem(exc, text)})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: holds a JSON {type(data).__name__}, not a report (an object)")
    if data.get("schema") != SCHEMA:
        raise ValueError(f"{path}: schema {data.get('schema')!r}, expected {SCHEMA!r}")
    check_records(path, data.get("records"))
    run = data.get("run")
    if not isinstance(run, dict) or not isinstance(run.get("versions"), dict):
        raise ValueError(f"{path}: 'run' must be an object holding 'versions'")
    check_benchmarks(path, data.get("benchmarks", []))
    partial = run.get("partial")
    if partial is not None and not (isinstance(partial, dict) and isinstance(partial.get("ran"), int)):
        raise ValueError(f"{path}: 'run.partial' must be null or an object with 'ran' (and 'collected')")
    return data


def json_problem(exc: json.JSONDecodeError, text: str) -> str:
    """What is wrong with `text`, the JSON that raised `exc`, in words: the parser's message and
    where, and "truncated?" where the file ends inside the value. Every command that reads JSON
    says it this way."""
    where = f"line {exc.lineno} column {exc.colno}"
    # Some of json's messages end in "at" ("Unterminated string starting at"): the place follows
    # directly, or the line would read "starting at at line 1".
    said = f"{exc.msg} {where}" if exc.msg.endswith(" at") else f"{exc.msg} at {where}"
    # An unterminated string runs to the end of the text (json reports where it started); any
    # other error at the very end is a cut-off file too. The position alone does not say why.
    if exc.msg.startswith("Unterminated string"):
        said += "; the file ends inside that string: truncated?"
    elif exc.pos >= len(text.rstrip()):
        said += "; the file ends there: truncated?"
    return said


def check_growth(growth: Any) -> float:
    """`growth` as a float, or ValueError saying why it is no growth factor."""
    try:
        value = float(growth)
    except (TypeError, ValueError):
        raise ValueError(f"{growth!r} is not a number; give a growth factor >= 1, e.g. 2") from None
    if not (math.isfinite(value) and value >= 1):
        raise ValueError(f"{growth!r} is not a finite growth factor >= 1, e.g. 2")
    return value


def speed_changes(old: dict[str, Any], new: dict[str, Any], growth: float = 1.5) -> tuple[list[str], bool]:
    """Lines for the benchmarks (`--equiv-bench`) whose median time changed by `growth` or more
    between two runs that both carry them; True if one got slower. A change counts only when the
    spreads over rounds do not overlap too (slower: the new first quartile above the old third),
    since a median alone moves that much on a shared machine. Runs on different machines or at
    different precision modes are not compared (one line says so)."""
    check_growth(growth)
    a = {(b["group"], b["name"]): b for b in old.get("benchmarks") or []}
    b = {(x["group"], x["name"]): x for x in new.get("benchmarks") or []}
    if not a or not b:
        return [], False
    for what, get in (("machines", lambda r: (r.get("machine") or {}).get("platform")),
                      ("CPU counts", lambda r: (r.get("machine") or {}).get("cpus")),
                      ("precision modes", lambda r: r.get("precision"))):
        if get(old["run"]) != get(new["run"]):
            return [f"speed    not compared: the runs differ in {what} ({get(old['run'])} -> {get(new['run'])})"], False
    lines, slower = [], False
    for key in sorted(a.keys() & b.keys()):
        sa, sb = a[key]["stats"], b[key]["stats"]
        ma, mb = sa["median"], sb["median"]
        if ma <= 0 or mb <= 0:
            continue
        if mb >= growth * ma and sb["q1"] > sa["q3"]:
            slower = True
            lines.append(f"SLOWER   {key[0]} {key[1]}: median {ma * 1e3:.4g} -> {mb * 1e3:.4g} ms (x{mb / ma:.2f})")
        elif ma >= growth * mb and sa["q1"] > sb["q3"]:
            lines.append(f"faster   {key[0]} {key[1]}: median {ma * 1e3:.4g} -> {mb * 1e3:.4g} ms (x{mb / ma:.2f})")
    return lines, slower


def compare_runs(old: dict[str, Any], new: dict[str, Any], growth: float = 2.0) -> tuple[list[str], bool]:
    """Lines describing what changed between two runs; True if anything regressed. `growth` is
    the factor by which a check's worst error/allowed must grow to be reported: a finite number
    of at least 1 (below 1 a shrinking margin would read as drift; NaN compares false with
    everything, so it would silently report nothing)."""
    check_growth(growth)
    if old.get("schema") != SCHEMA or new.get("schema") != SCHEMA:
        raise ValueError(f"both reports must have schema {SCHEMA!r}")
    a = {r["id"]: r for r in old["records"]}
    b = {r["id"]: r for r in new["records"]}
    lines, regressed = [], False
    good = ("passed", "known-divergence", "xpass", "skipped")
    for cid in sorted(a.keys() | b.keys()):
        ra, rb = a.get(cid), b.get(cid)
        if ra is None:
            lines.append(f"new      {cid}: {rb['outcome']}")
            regressed |= rb["outcome"] == "failed"
        elif rb is None:
            lines.append(f"gone     {cid} (was {ra['outcome']})")
        elif ra["outcome"] != rb["outcome"]:
            worse = ra["outcome"] in good and rb["outcome"] == "failed"
            regressed |= worse
            lines.append(f"{'REGRESS' if worse else 'changed':8} {cid}: {ra['outcome']} -> {rb['outcome']}")
        else:
            xa, xb = ra.get("worst_ratio"), rb.get("worst_ratio")
            if isinstance(xa, float) and isinstance(xb, float) and xa > 0 and xb > growth * xa and xb > 0.1:
                lines.append(f"drift    {cid}: worst error/allowed {xa:.2g} -> {xb:.2g}")
    va, vb = old["run"]["versions"], new["run"]["versions"]
    changed = [f"{k} {va.get(k)} -> {vb.get(k)}" for k in sorted(va.keys() | vb.keys()) if va.get(k) != vb.get(k)]
    if changed:
        lines.insert(0, "versions: " + ", ".join(changed))
    # First of all: a cut-short run's unrun checks read as "gone" (or its counterpart's as "new").
    lines[:0] = [f"PARTIAL  {side} run {run.get('id')}: {text}; checks it did not run show as gone or new"
                 for side, run in (("old", old["run"]), ("new", new["run"])) if (text := partial_text(run))]
    return lines, regressed
