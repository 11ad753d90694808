"""reports/: one JSON file per run (schema-versioned, one record per check), a Markdown
summary a person reads, the terminal table, and the comparison of two runs.

Records are plain dicts (CheckRecord.to_json) so that they cross xdist workers unchanged.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import platform
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from equivcheck import divergences, report_models, tolerance
from equivcheck.pairs import CHECKS

SCHEMA = "equivcheck.report/1"
OUTCOMES = ("passed", "failed", "known-divergence", "xpass", "skipped")
_CELL = {"passed": "ok", "failed": "FAIL", "known-divergence": "known", "xpass": "XPASS", "skipped": "skip"}
_PACKAGES = ("equivcheck", "torch", "jax", "jaxlib", "flax", "optax", "numpy", "hypothesis", "pytest")


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }


def build(records: Sequence[dict[str, Any]], run: dict[str, Any]) -> dict[str, Any]:
    counts = Counter(r["outcome"] for r in records)
    return {
        "schema": SCHEMA,
        "run": run,
        "summary": {k: counts.get(k, 0) for k in OUTCOMES} | {"total": len(records)},
        "tolerances": tolerance.table(),
        "records": sorted(records, key=lambda r: r["id"]),
    }


def write(report: dict[str, Any], directory: str | os.PathLike[str]) -> tuple[Path, Path]:
    """reports/<run id>.json and .md, and latest.json / latest.md beside them."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    stem = report["run"]["id"]
    text_json = json.dumps(report, indent=1, sort_keys=False, default=str) + "\n"
    text_md = markdown(report, report_models.plots(report["records"], out, stem))
    paths = (out / f"{stem}.json", out / f"{stem}.md")
    for path, text in zip(paths + (out / "latest.json", out / "latest.md"), (text_json, text_md) * 2):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    return paths


def run_id(now: dt.datetime, versions_: dict[str, str | None], devices: Iterable[str]) -> str:
    stamp = now.strftime("%Y%m%d-%H%M%S")
    tv = (versions_.get("torch") or "none").split("+")[0]
    jv = versions_.get("jax") or "none"
    return f"{stamp}-torch{tv}-jax{jv}-{'-'.join(devices)}"


def _ratio(r: dict[str, Any]) -> str:
    x = r.get("worst_ratio")
    if x is None or isinstance(x, str):
        return "inf" if x else "-"
    return f"{x:.2g}"


def grid(records: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """One row per pair x dtype x device, one column per check: outcome and worst error/allowed."""
    rows: dict[tuple[str, str, str], dict[str, dict[str, Any]]] = defaultdict(dict)
    for r in records:
        rows[(r["pair"], r["dtype"], r["device"])][r["check"]] = r
    # Checks of other record kinds (optimizer steps, trajectories) get columns of their own,
    # in order of first appearance; the core's columns show only the ones present then.
    extra = [c for c in dict.fromkeys(r["check"] for r in records) if c not in CHECKS]
    present = {r["check"] for r in records}
    columns = [c for c in CHECKS if not extra or c in present] + extra
    header = ["pair", "dtype", "device", *columns]
    body = []
    for key in sorted(rows):
        cells = []
        for check in columns:
            r = rows[key].get(check)
            if r is None:
                cells.append("-")
            elif r["outcome"] in ("passed", "xpass"):
                cells.append(f"{_CELL[r['outcome']]} {_ratio(r)}")
            else:
                cells.append(_CELL[r["outcome"]])
        body.append([*key, *cells])
    return header, body


def text_table(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*row) for row in body])


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
        "",
        "## Summary",
        "",
        _md_table(["outcome", "checks"], [[k, str(summary[k])] for k in OUTCOMES] + [["total", str(summary["total"])]]),
    ]
    failed = [r for r in records if r["outcome"] == "failed"]
    if failed:
        out += ["", "## Failures", ""]
        for r in failed:
            out += [f"### `{r['id']}`", "", "```text", _failure_text(r), "```", ""]
    known = [r for r in records if r["outcome"] in ("known-divergence", "xpass")]
    if known:
        out += ["", "## Known divergences", "",
                _md_table(["check", "outcome", "reason", "observed"],
                          [[f"`{r['id']}`", r["outcome"], r["known_reason"], r["message"].split("\n")[0][:160]]
                           for r in known])]
    out += divergences.markdown_section(records)
    out += report_models.markdown_section(records, images)
    stale = run.get("unmatched_known", [])
    if stale:
        out += ["", "Known-divergence entries that matched nothing in this run:", ""]
        out += [f"- `{e['pattern']}` ({e['source']})" for e in stale]
    header, body = grid(records)
    out += ["", "## All checks", "", "Cells: outcome and worst error / allowed error over all examples (1 = at tolerance).",
            "", _md_table(header, body), "", "## Tolerance table", "",
            _md_table(["dtype", "device", "precision", "rtol", "atol", "relative to", "reason"],
                      [[str(v) for v in row.values()] for row in report["tolerances"]])]
    scale = ", ".join(f"{k} x{v:g}" for k, v in tolerance.CHECK_SCALE.items())
    out += ["", f"Derivative checks scale the row: {scale}. Per-pair overrides are in each record's `tolerance`.", ""]
    return "\n".join(out)


def _failure_text(r: dict[str, Any]) -> str:
    from equivcheck.runner import CheckRecord

    fields = {k: v for k, v in r.items() if k in CheckRecord.__dataclass_fields__}
    for k in ("worst_ratio", "max_abs_err", "max_rel_err", "max_ulp"):
        fields[k] = float(fields[k]) if fields[k] is not None else float("nan")
    return CheckRecord(**fields).failure_text()


def compare_runs(old: dict[str, Any], new: dict[str, Any], growth: float = 2.0) -> tuple[list[str], bool]:
    """Lines describing what changed between two runs; True if anything regressed."""
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
    return lines, regressed
