"""Two runs' reports compared: what changed, and whether anything regressed (for nightly CI)."""
from __future__ import annotations

from typing import Any

from equivcheck.report.runs import SCHEMA


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
