"""What a person reads: the terminal grid (one row per pair x dtype x device, a column per
check) and the Markdown summary of a run's report."""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from equivcheck.engine import tolerance
from equivcheck.engine.knowns import xpass_reason
from equivcheck.engine.records import CheckRecord
from equivcheck.layers import traps as divergences
from equivcheck.ops.autodiff import CHECKS
from equivcheck.report import models as report_models
from equivcheck.report.runs import OUTCOMES, by_family, partial_text

_CELL = {"passed": "ok", "failed": "FAIL", "known-divergence": "known", "xpass": "XPASS", "skipped": "skip"}


def _ratio(r: dict[str, Any]) -> str:
    x = r.get("worst_ratio")
    if x is None or isinstance(x, str):
        return "inf" if x else "-"
    return f"{x:.2g}"


def cells(records: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[tuple[str, str]]]]:
    """One row per pair x dtype x device, one column per check: each cell (text, outcome), the
    text the outcome and worst error/allowed, the outcome '' where the row lacks that check."""
    rows: dict[tuple[str, str, str], dict[str, dict[str, Any]]] = defaultdict(dict)
    for r in records:
        rows[(r["pair"], r["dtype"], r["device"])][r["check"]] = r
    # The core's checks in their order, then other kinds' (optimizer steps, trajectories) in order
    # of first appearance; a check no record of this table has gets no column.
    present = {r["check"] for r in records}
    columns = [c for c in CHECKS if c in present] + [c for c in dict.fromkeys(r["check"] for r in records)
                                                     if c not in CHECKS]
    header = ["pair", "dtype", "device", *columns]
    body = []
    for key in sorted(rows):
        row = [(k, "") for k in key]
        for check in columns:
            r = rows[key].get(check)
            if r is None:
                row.append(("-", ""))
            elif r["outcome"] in ("passed", "xpass"):
                row.append((f"{_CELL[r['outcome']]} {_ratio(r)}", r["outcome"]))
            else:
                row.append((_CELL[r["outcome"]], r["outcome"]))
        body.append(row)
    return header, body


def grid(records: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """One row per pair x dtype x device, one column per check: outcome and worst error/allowed."""
    header, body = cells(records)
    return header, [[text for text, _ in row] for row in body]


def xpass_lines(records: Sequence[dict[str, Any]]) -> list[str]:
    """A line per reason known divergences did not show (xpass), naming the checks: the terminal
    shows why, as pytest's XPASS reason does."""
    why: dict[str, list[str]] = defaultdict(list)
    for r in records:
        if r["outcome"] == "xpass":
            why[xpass_reason(r["known_pattern"], r["notes"])].append(r["id"])
    return [f"XPASS {', '.join(dict.fromkeys(ids))}: {text}" for text, ids in why.items()]


def text_table(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*row) for row in body])


WIDTH = 120  # columns the terminal summary keeps within


def summary_tables(records: Sequence[dict[str, Any]], width: int = WIDTH) -> list[str]:
    """The terminal summary: a titled grid per kind of check (engine.kind.FAMILIES), each line
    within `width` columns: long pair names are cut (the failure text names them whole) and a
    kind with more checks than fit gets its check columns over several tables."""
    out = []
    for family, rs in by_family(records).items():
        header, body = grid(rs)
        out.append(f"{family} ({len(rs)} checks)")
        out += [text_table(h, b) for h, b in _fit(header, body, width)]
    return out


def _fit(header: list[str], body: list[list[str]], width: int) -> list[tuple[list[str], list[list[str]]]]:
    gap = 2  # text_table's column separator
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    keys, checks = widths[:3], widths[3:]
    widest_check = max(checks, default=0) + gap
    room = width - sum(keys[1:]) - gap * 2 - widest_check  # the pair column's share with one check beside it
    if keys[0] > room:
        cut = max(room, 8)
        body = [[_cut(row[0], cut), *row[1:]] for row in body]
        keys[0] = min(keys[0], cut)
    fixed = sum(keys) + gap * 2
    parts, start = [], 0
    while True:
        end, used = start, fixed
        while end < len(checks) and (end == start or used + gap + checks[end] <= width):
            used += gap + checks[end]
            end += 1
        cols = [0, 1, 2, *range(3 + start, 3 + end)]
        parts.append(([header[i] for i in cols], [[row[i] for i in cols] for row in body]))
        start = end
        if start >= len(checks):
            return parts


def _cut(text: str, n: int) -> str:
    """`text` in at most n characters, cut in the middle: names that share a long prefix
    (nn.layer_norm_offset, nn.layer_norm_offset_eps) still differ at their ends."""
    if len(text) <= n:
        return text
    head = (n - 3 + 1) // 2
    return text[:head] + "..." + text[len(text) - (n - 3 - head):]  # ASCII: any terminal's encoding


def _md_table(header: list[str], body: list[list[str]]) -> str:
    esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(map(esc, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(esc, row)) + " |" for row in body]
    return "\n".join(lines)


def markdown(report: dict[str, Any], images: dict[str, str] | None = None) -> str:
    run, records, summary = report["run"], report["records"], report["summary"]
    vers = " · ".join(f"{k} {v}" for k, v in run["versions"].items() if v)
    mach = run["machine"]
    out = [
        "# equivcheck report",
        "",
        f"- run `{run['id']}`, {run['started']} → {run['finished']} ({run['seconds']:.0f} s)",
        f"- seed {run['seed']} · profile {run['profile']} ({run['examples']} examples per check) · "
        f"precision `{run['precision']}` · devices {', '.join(run['devices'])} · shapes per check {run['palette']}",
        f"- {vers}",
        f"- {mach['platform']}, {mach['cpus']} CPUs, Python {mach['python']}"
        + (f" · GPU {run['device_names'].get('gpu')}" if run.get("device_names", {}).get("gpu") else ""),
        f"- replay any run: `{run['replay']}`",
        *_partial_warning(run),
        "",
        "## Summary",
        "",
        _md_table(["outcome", "checks"], [[k, str(summary[k])] for k in OUTCOMES] + [["total", str(summary["total"])]]),
    ]
    failed = [r for r in records if r["outcome"] == "failed"]
    if failed:
        out += ["", "## Failures", ""]
        for r in failed:
            out += [f"### `{r['id']}`", "", "```text", failure_text(r), "```", ""]
    known = [r for r in records if r["outcome"] in ("known-divergence", "xpass")]
    if known:
        out += ["", "## Known divergences", "",
                _md_table(["check", "outcome", "reason", "observed"],
                          [[f"`{r['id']}`", r["outcome"], r["known_reason"], observed(r)] for r in known])]
    out += divergences.markdown_section(records)
    out += report_models.markdown_section(records, images)
    stale = run.get("unmatched_known", [])
    if stale:
        out += ["", "Known-divergence entries that matched nothing in this run:", ""]
        out += [f"- `{e['pattern']}` ({e['source']})" for e in stale]
    left_out = run.get("unchecked_known", [])
    if left_out:
        out += ["", "Known-divergence entries for what this run left out (not checked):", ""]
        out += [f"- `{e['pattern']}` ({e['source']}): for {e['why']}" for e in left_out]
    out += ["", "## All checks", "", "Cells: outcome and worst error / allowed error over all examples (1 = at tolerance)."]
    for family, rs in by_family(records).items():
        out += ["", f"### {family} ({len(rs)} checks)", "", _md_table(*grid(rs))]
    out += ["", "## Tolerance table", "",
            _md_table(["dtype", "device", "precision", "rtol", "atol", "relative to", "reason"],
                      [[str(v) for v in row.values()] for row in report["tolerances"]])]
    scale = ", ".join(f"{k} x{v:g}" for k, v in tolerance.CHECK_SCALE.items())
    out += ["", f"Derivative checks scale the row: {scale}. Per-pair overrides are in each record's `tolerance`.", ""]
    return "\n".join(out)


def _partial_warning(run: dict[str, Any]) -> list[str]:
    """A cut-short run says so before its counts, which otherwise read as a whole run's."""
    text = partial_text(run)
    return ["", f"> **Partial run** ({text}): checks that did not run are absent from every table below."] if text else []


def observed(r: dict[str, Any]) -> str:
    """What a known divergence's row shows: the failure's first line, or why it did not show."""
    if r["outcome"] == "xpass":
        return xpass_reason(r["known_pattern"], r["notes"])[:160]
    return r["message"].split("\n")[0][:160]


def failure_text(r: dict[str, Any]) -> str:
    """A failed record's failure text (CheckRecord.failure_text) from its JSON form."""
    fields = {k: v for k, v in r.items() if k in CheckRecord.__dataclass_fields__}
    for k in ("worst_ratio", "max_abs_err", "max_rel_err", "max_ulp"):
        fields[k] = float(fields[k]) if fields[k] is not None else float("nan")
    return CheckRecord(**fields).failure_text()
