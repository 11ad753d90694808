"""Helpers of the plugin's hooks (equivcheck.plugin holds the hooks and options): the options a
replay line repeats, what a run collected, whether the command line narrowed it, and the refusal
of two pairs under one name (at collection) or of two records under one id (as tests report)."""
from __future__ import annotations

import dataclasses
from typing import Any

import pytest


def replay_args(config: pytest.Config, default_timeout: float) -> tuple[str, ...]:
    """The options besides equivcheck's run settings that change what runs or how it is
    judged, for the replay line: a replay without them can show a different outcome (a known
    divergence failing, a warning filter or ini override gone)."""
    opt = config.option
    args: list[str] = []
    for path in config.getoption("equiv_known_divergences"):
        args += ["--equiv-known-divergences", str(path)]
    # Saved failing examples run first, and a database even empty draws otherwise than none: a
    # replay without it passed where the run had failed.
    if (config.getoption("equiv_failures_db") or "none") != "none":
        args += ["--equiv-failures-db", str(config.getoption("equiv_failures_db"))]
    if config.getoption("equiv_timeout") != default_timeout:  # a check that timed out may pass with more
        args += ["--equiv-timeout", f"{config.getoption('equiv_timeout'):g}"]
    if getattr(opt, "inifilename", None):
        args += ["-c", str(opt.inifilename)]
    for value in getattr(opt, "override_ini", None) or ():
        args += ["-o", value]
    for value in getattr(opt, "pythonwarnings", None) or ():
        args += ["-W", value]
    for value in getattr(opt, "plugins", None) or ():
        args += ["-p", value]
    if getattr(opt, "runxfail", False):
        args.append("--runxfail")
    if config.getoption("equiv_known_lenient"):
        args.append("--equiv-known-lenient")
    if config.getoption("equiv_onnx", False):  # the layers' onnx records exist only with it
        args.append("--equiv-onnx")
    return tuple(args)


def narrowed(config: pytest.Config) -> bool:
    """Paths or node ids on the command line collect only part of the project: an entry for a
    pair or file outside it says nothing about whether the divergence still exists."""
    whole = {str(config.rootpath), "."}
    return config.args_source == pytest.Config.ArgsSource.ARGS and not all(
        str(a) in whole or str(config.invocation_params.dir / str(a)) == str(config.rootpath) for a in config.args)


def collected_ids(items: list[pytest.Item]) -> set[str]:
    """Node ids, and the check ids the items' pairs produce, of every check collected."""
    from equivcheck.engine import CheckKind

    ids = set()
    for item in items:
        ids.add(item.nodeid)
        params = getattr(getattr(item, "callspec", None), "params", {})
        dtype, device = params.get("equiv", ("*", "*"))
        for value in params.values():
            if isinstance(value, CheckKind):
                ids.update(f"{value.name}::{check}::{dtype}::{device}" for check in value.checks)
                if getattr(value, "family", "") == "layers" and item.config.getoption("equiv_onnx", False):
                    ids.add(f"{value.name}::onnx::{dtype}::{device}")  # --equiv-onnx adds it (ops.runner)
    return ids


def refuse_duplicate_names(items: list[pytest.Item]) -> None:
    from equivcheck.engine import CheckKind

    seen: dict[str, tuple[Any, str]] = {}
    for item in items:
        for value in getattr(getattr(item, "callspec", None), "params", {}).values():
            if isinstance(value, CheckKind):
                first = seen.setdefault(value.name, (value, item.nodeid))
                if first[0] is not value and not _same_record(first[0], value):
                    raise pytest.UsageError(
                        f"two different pairs are named {value.name!r} ({first[1]} and {item.nodeid}); "
                        "names key the report, so give each its own")


def _same_record(a: Any, b: Any) -> bool:
    """The same record, or a copy of it with other checks (`pair.replace(checks=...)`)."""
    if type(a) is not type(b) or not dataclasses.is_dataclass(a):
        return False
    return all(getattr(a, f.name) == getattr(b, f.name) for f in dataclasses.fields(a) if f.name != "checks")


def record_collisions(records: list[dict[str, Any]], nodeid: str,
                      owner: dict[str, str]) -> tuple[list[dict[str, Any]], list[str]]:
    """(the records whose id no earlier record has, a message per one that collides). `owner`
    maps each record id filed so far to its test and is updated. Record ids key the report,
    the terminal grid and `compare`: two checks under one id showed as one row, a failure hidden
    behind an `ok`. Collection refuses two different pairs of one name, but not the same name
    checked in two tests, a pair built inside a test, or one test checking a pair twice."""
    fresh: list[dict[str, Any]] = []
    clashes: list[str] = []
    here: set[str] = set()
    for r in records:
        first = owner.setdefault(r["id"], nodeid)
        if first == nodeid and r["id"] not in here:  # new, or this test's rerun (pytest-rerunfailures)
            here.add(r["id"])
            fresh.append(r)
            continue
        where = "this test too" if first == nodeid else first
        clashes.append(f"record {r['id']} was already made by {where}: every check's id (pair::check::dtype::device) "
                       "must be unique in a run, since it keys the report and compare; give each pair its own name")
    return fresh, clashes
