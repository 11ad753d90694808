"""reports/: one JSON file per run (schema-versioned, one record per check), with the run's
machine, framework versions and settings.

Records are plain dicts (CheckRecord.to_json) so that they cross xdist workers unchanged.
"""
from __future__ import annotations

import datetime as dt
import os
import platform
import secrets
from collections import Counter
from collections.abc import Iterable, Sequence
from importlib import metadata
from typing import Any

from equivcheck.engine import tolerance
from equivcheck.engine.kind import FAMILIES

SCHEMA = "equivcheck.report/1"
OUTCOMES = ("passed", "failed", "known-divergence", "xpass", "skipped")
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


def family(record: dict[str, Any]) -> str:
    """The report section of a record (engine.kind.FAMILIES); "other" for a record that names
    none (a user's own kind, or a report written before records carried one)."""
    f = record.get("family")
    return f if f in FAMILIES else "other"


def by_family(records: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Records grouped by family, the families in FAMILIES order, only those with records."""
    groups: dict[str, list[dict[str, Any]]] = {f: [] for f in FAMILIES}
    for r in records:
        groups[family(r)].append(r)
    return {f: rs for f, rs in groups.items() if rs}


def run_id(now: dt.datetime, versions_: dict[str, str | None], devices: Iterable[str], token: str | None = None) -> str:
    """`<UTC time>-torch<v>-jax<v>-<devices>-<token>`: the time first, so names sort by start; the
    token (6 random hex digits unless given) because two runs started in the same second, by a
    matrix on one machine or shards sharing a directory, would otherwise write one file."""
    stamp = now.strftime("%Y%m%d-%H%M%S")
    tv = (versions_.get("torch") or "none").split("+")[0]
    jv = versions_.get("jax") or "none"
    return f"{stamp}-torch{tv}-jax{jv}-{'-'.join(devices)}-{token or secrets.token_hex(3)}"


def partial_text(run: dict[str, Any]) -> str:
    """Why a run's records are not the whole run ('' when they are), for every rendering: a run
    cut short (Ctrl-C, a stuck side, -x) leaves a valid report whose missing checks look absent,
    not unrun. `run["partial"]` is `{"ran": N, "collected": M}`; a report of an older version may
    say only `interrupted`."""
    partial = run.get("partial")
    if not partial and not run.get("interrupted"):
        return ""
    why = "interrupted (a side was stuck)" if run.get("stuck") else "interrupted" if run.get("interrupted") else "stopped early"
    if not partial:
        return why
    collected = partial.get("collected")
    if collected is None:
        return f"{why}; partial: {partial.get('ran')} tests ran, collection did not finish"
    return f"{why}; partial: {partial.get('ran')} of {collected} collected tests ran"
