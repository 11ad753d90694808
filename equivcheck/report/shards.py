"""Shards for CI fleets: a deterministic, balanced share of a run's tests per machine
(`--equiv-shard i/n`), and the merge of the shards' reports into the report of the whole run.

Every shard collects the same tests and assigns them by the same rule, so no coordination is
needed: the tests, sorted by node id, go longest first to the shard with the least time so far
(the LPT rule: Graham, "Bounds on multiprocessing timing anomalies", SIAM J. Appl. Math. 17,
1969: within 4/3 of the best split). Durations come from a previous run's report when given
(a test absent from it counts as the median), else every test counts 1 and shards differ by at
most one test. Each shard's report records its own tests and a digest of the whole selection,
so `merge` can refuse shards of different runs, overlapping shards and missing ones.
"""
from __future__ import annotations

import dataclasses
import hashlib
import heapq
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from equivcheck.report.runs import build

# Settings that must agree between shards: their records are only one run's if these match.
_SAME = ("seed", "profile", "examples", "palette", "precision", "dtypes", "devices", "timeout", "versions",
         "failures_db")


def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' -> (i, n), 1 <= i <= n. Raises ValueError naming the problem."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m:
        raise ValueError(f"{text!r}: give i/n, e.g. 1/3 (this machine runs share 1 of 3)")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 1 <= i <= n:
        raise ValueError(f"{text!r}: the share i must be between 1 and n, and n at least 1")
    return i, n


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    """--equiv-shard I/N read: this machine's share `index` of `count`, the seconds per node id to
    balance by ({}: balance by count), and what they come from (for the report and the summary)."""

    index: int
    count: int
    seconds: Mapping[str, float] = dataclasses.field(default_factory=dict)
    source: str = "count"


def shard_options(shard: str | None, durations_from: str | None) -> ShardPlan | None:
    """--equiv-shard and --equiv-shard-durations read: the plan, or None without --equiv-shard.
    Raises ValueError naming the option and the problem."""
    from equivcheck.report.compare import read_report

    if shard is None:
        if durations_from:
            raise ValueError("--equiv-shard-durations balances shards: give --equiv-shard I/N too")
        return None
    try:
        index, count = parse_shard(shard)
    except ValueError as exc:
        raise ValueError(f"--equiv-shard {exc}") from None
    if not durations_from:
        return ShardPlan(index, count)
    try:
        seconds = durations(read_report(durations_from))
    except ValueError as exc:
        raise ValueError(f"--equiv-shard-durations: {exc}") from None
    return ShardPlan(index, count, seconds, f"durations from {durations_from}")


def durations(report: Mapping[str, Any]) -> dict[str, float]:
    """Seconds per test node id, summed over its records, from a report (runs.build's form)."""
    out: dict[str, float] = {}
    for r in report.get("records", ()):
        if r.get("nodeid"):
            out[r["nodeid"]] = out.get(r["nodeid"], 0.0) + float(r.get("seconds") or 0.0)
    return out


def assign(nodeids: Iterable[str], n: int, seconds: Mapping[str, float] | None = None) -> dict[str, int]:
    """Shard (1..n) of every node id. The same ids and durations give the same answer on every
    machine, whatever order the ids come in."""
    ids = sorted(set(nodeids))
    known = [seconds[i] for i in ids if seconds and i in seconds]
    fill = statistics.median(known) if known else 1.0
    cost = {i: (seconds[i] if seconds and i in seconds else fill) for i in ids}
    heap = [(0.0, k) for k in range(1, n + 1)]  # (time so far, shard): ties go to the lower shard
    out: dict[str, int] = {}
    for nodeid in sorted(ids, key=lambda i: (-cost[i], i)):
        load, k = heapq.heappop(heap)
        out[nodeid] = k
        heapq.heappush(heap, (load + cost[nodeid], k))
    return out


def digest(nodeids: Iterable[str]) -> str:
    """sha256 of the sorted, distinct node ids: one value names one selection."""
    return hashlib.sha256("\n".join(sorted(set(nodeids))).encode()).hexdigest()


def describe(index: int, count: int, mine: Sequence[str], selected: Iterable[str], balanced_by: str) -> dict[str, Any]:
    """The report's `run.shard`: which share, its tests, and the whole selection's size and digest."""
    everything = set(selected)
    return {"index": index, "count": count, "tests": sorted(mine), "selected": len(everything),
            "selected_digest": digest(everything), "balanced_by": balanced_by}


def tally(records: Iterable[Mapping[str, Any]]) -> dict[str, list[str]]:
    """A shard's `run.shard.records`: the ids of the records each test made, by node id, written
    beside the records so that `merge` finds one deleted or added by hand (a test may make no
    record at all, so the tests alone cannot tell a lost record from none)."""
    out: dict[str, list[str]] = {}
    for r in records:
        out.setdefault(r.get("nodeid") or "", []).append(r["id"])
    return {nodeid: sorted(ids) for nodeid, ids in sorted(out.items())}


def merge(reports: Sequence[tuple[str, Mapping[str, Any]]]) -> dict[str, Any]:
    """One report of the whole run from its shards' reports, given as (path, report). Raises
    ValueError naming the file and the problem: a report that is not a shard, shards of
    different runs (selection, settings, shard count), a share given twice or missing, a test
    or record in two shards, a record missing from a shard's records or added to them (against
    its `records` tally, or a test it did not run). A partial shard makes the merged run partial."""
    if not reports:
        raise ValueError("no reports to merge")
    shards = [(path, rep, _shard_of(path, rep)) for path, rep in reports]
    path0, rep0, first = shards[0]
    for path, rep, shard in shards[1:]:
        for key in ("count", "selected", "selected_digest"):
            if shard[key] != first[key]:
                raise ValueError(f"{path}: shard {key} {shard[key]!r} differs from {path0}'s {first[key]!r}: "
                                 "shards of different runs (another selection or shard count)")
        for key in _SAME:
            if rep["run"].get(key) != rep0["run"].get(key):
                raise ValueError(f"{path}: run setting {key} {rep['run'].get(key)!r} differs from {path0}'s "
                                 f"{rep0['run'].get(key)!r}: shards of different runs")
    by_index: dict[int, str] = {}
    for path, _, shard in shards:
        if shard["index"] in by_index:
            raise ValueError(f"{path}: shard {shard['index']}/{shard['count']} is also {by_index[shard['index']]}")
        by_index[shard["index"]] = path
    n = first["count"]
    missing = sorted(set(range(1, n + 1)) - set(by_index))
    if missing:
        raise ValueError(f"shards {', '.join(f'{i}/{n}' for i in missing)} missing: the merge would not be the "
                         "whole run")
    owner: dict[str, str] = {}
    for path, _, shard in shards:
        for test in shard["tests"]:
            if test in owner:
                raise ValueError(f"{path}: test {test} is also in {owner[test]}'s share: overlapping shards")
            owner[test] = path
    if len(owner) != first["selected"] or digest(owner) != first["selected_digest"]:
        raise ValueError(f"the shards' tests ({len(owner)}) are not the selection they were cut from "
                         f"({first['selected']} tests): shards of different collections")
    tallied = [path for path, _, shard in shards if "records" in shard]
    if tallied and len(tallied) < len(shards):  # one equivcheck wrote all (versions agree): one was edited
        bare = next(path for path, _, shard in shards if "records" not in shard)
        raise ValueError(f"{bare}: run.shard.records missing, which {tallied[0]} has: edited by hand?")
    for path, rep, shard in shards:
        _check_records(path, rep["records"], shard)
    records: dict[str, tuple[str, Any]] = {}
    for path, rep, _ in shards:
        for r in rep["records"]:
            if r["id"] in records:
                first_path, first = records[r["id"]]
                if first.get("nodeid") != r.get("nodeid"):  # each shard saw one: the run as a whole has two
                    raise ValueError(f"record {r['id']} is made by two tests, {first.get('nodeid')} ({first_path}) "
                                     f"and {r.get('nodeid')} ({path}): every check's id must be unique in a run; "
                                     "give each pair its own name")
                raise ValueError(f"{path}: record {r['id']} is also in {first_path}: overlapping shards")
            records[r["id"]] = (path, r)
    return build([r for _, r in records.values()], _merged_run([(p, rep) for p, rep, _ in shards]))


def _check_records(path: str, records: Sequence[Mapping[str, Any]], shard: Mapping[str, Any]) -> None:
    """Raise ValueError naming the shard's file, the test and the record when its records are not
    the ones its run wrote: a record of a test outside its share, and, against the `records`
    tally (written by equivcheck since it had one), a record missing or one added."""
    tests = set(shard["tests"])
    for r in records:
        if r.get("nodeid") and r["nodeid"] not in tests:
            raise ValueError(f"{path}: record {r['id']} is of test {r['nodeid']}, which is not in this shard's "
                             "share: added by hand, or a record of another run?")
    if "records" not in shard:  # an older equivcheck's shard: a lost record cannot be told from none
        return
    wrote = {(nodeid, rid) for nodeid, ids in shard["records"].items() for rid in ids}
    has = {(r.get("nodeid") or "", r["id"]) for r in records}
    for odd, says in ((sorted(wrote - has), ("is missing: the shard wrote it (run.shard.records) and its records "
                                             "lack it; the merge would not be the whole run")),
                      (sorted(has - wrote), "is not one the shard wrote (run.shard.records): added by hand?")):
        if odd:
            (nodeid, rid), more = odd[0], f" ({len(odd) - 1} more like it)" if len(odd) > 1 else ""
            raise ValueError(f"{path}: record {rid} of test {nodeid or '(no node id)'} {says}{more}")


def _shard_of(path: str, report: Mapping[str, Any]) -> dict[str, Any]:
    shard = report["run"].get("shard")
    if not shard:
        raise ValueError(f"{path}: not a shard's report (its run had no --equiv-shard)")
    if not isinstance(shard, dict):
        raise ValueError(f"{path}: run.shard is a {type(shard).__name__}, not an object: not a report equivcheck wrote")
    fields = {"index": int, "count": int, "tests": list, "selected": int, "selected_digest": str}
    bad = [k for k, t in fields.items() if not isinstance(shard.get(k), t)]
    if bad or not all(isinstance(t, str) for t in shard["tests"]):
        raise ValueError(f"{path}: run.shard is malformed ({', '.join(bad) or 'tests'}): not a report equivcheck wrote")
    tally_ = shard.get("records", {})
    if not (isinstance(tally_, dict) and all(isinstance(ids, list) and all(isinstance(i, str) for i in ids)
                                             for ids in tally_.values())):
        raise ValueError(f"{path}: run.shard.records is malformed (node id -> list of record ids): not a report "
                         "equivcheck wrote")
    for key in ("started", "finished", "seconds"):
        if key not in report["run"]:
            raise ValueError(f"{path}: run.{key} missing: not a report equivcheck wrote")
    return shard


def _merged_run(shards: Sequence[tuple[str, Mapping[str, Any]]]) -> dict[str, Any]:
    runs = [rep["run"] for _, rep in sorted(shards, key=lambda s: s[1]["run"]["shard"]["index"])]
    run = {k: v for k, v in runs[0].items() if k != "shard"}
    run["started"] = min(r["started"] for r in runs)
    run["finished"] = max(r["finished"] for r in runs)
    run["seconds"] = max(r["seconds"] for r in runs)  # shards run side by side: the slowest is the run's
    run["id"] = runs[0]["id"] + f"-merged{len(runs)}"
    run["merged_from"] = [{"path": p, "id": rep["run"]["id"], "shard": rep["run"]["shard"]["index"],
                           "seconds": rep["run"]["seconds"], "tests": len(rep["run"]["shard"]["tests"])}
                          for p, rep in shards]
    run["interrupted"] = any(r.get("interrupted") for r in runs)
    # Each shard counts its own process's compilations: the run's are their sum. A shard without
    # a count (run under xdist, whose controller compiles nothing) leaves the run's unknown.
    counts = [r.get("jax_compilations") or {} for r in runs]
    known = all(isinstance(c.get(k), (int, float)) for c in counts for k in ("count", "seconds"))
    run["jax_compilations"] = {"count": sum(c["count"] for c in counts),
                               "seconds": round(sum(c["seconds"] for c in counts), 3)} if known else None
    parts = [r.get("partial") for r in runs]
    if any(parts):
        ran = sum((p or {}).get("ran", len(r["shard"]["tests"])) for p, r in zip(parts, runs))
        run["partial"] = {"ran": ran, "collected": runs[0]["shard"]["selected"]}
    # Every shard collects the whole selection, so an entry stale in one (matching nothing
    # collected) is stale in all; one whose checks ran in another shard is "left out" here. An
    # entry any shard's records matched is neither.
    matched = {r.get("known_pattern") for _, rep in shards for r in rep["records"]}
    stale = {e["pattern"]: e for r in runs for e in r.get("unmatched_known", []) if e["pattern"] not in matched}
    run["unmatched_known"] = list(stale.values())
    run["unchecked_known"] = list({e["pattern"]: e for r in runs for e in r.get("unchecked_known", [])
                                   if e["pattern"] not in matched and e["pattern"] not in stale}.values())
    return run
