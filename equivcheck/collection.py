"""Helpers of the plugin's hooks (equivcheck.plugin holds the hooks and options): the options a
replay line repeats, what a run collected, whether the command line narrowed it, and the refusal
of two pairs under one name (at collection) or of two records under one id (as tests report), and
of a path option pytest took for a test path."""
from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Any

import pytest

PATH_OPTIONS = ("--equiv-report", "--equiv-known-divergences", "--equiv-shard-durations", "--equiv-failures-db",
                "--equiv-jax-cache")


def path_taken_for_a_test_path(config: pytest.Config) -> str:
    """Why the run's ini file is not the project's, or "": pytest chooses its rootdir and ini file before
    it loads plugins, so a path given to one of our options as a separate word (`--equiv-report
    /tmp/r`) counts as a test path then, and with no test path beside it, a path outside the project
    moves the rootdir above it, where no ini file is found: the project's known divergences and
    testpaths are silently not read (a run of the suites with `-n 2 --equiv-report /abs/dir` failed 100
    known-divergence checks) and node ids change. The `--option=PATH` form is one word, which pytest
    leaves alone. Flagged when the ini file differs from the one found upward from here, and, so that
    the same command is not accepted once and refused the next time, when such a path does not exist
    yet and no test path stands beside it."""
    args = [str(a) for a in config.invocation_params.args]
    here = config.invocation_params.dir
    expected = _ini_upward(here)
    if expected is None:
        return ""
    moved = config.inipath is None or Path(config.inipath).resolve() != expected
    two_word = [(option, value) for option, value in itertools.pairwise(args) if option in PATH_OPTIONS
                and not (here / value).resolve().is_relative_to(expected.parent)]
    for option, value in two_word:
        if moved and (here / value).exists():
            return (f"{option} {value}: pytest took {value} for a test path when it chose its rootdir "
                    f"({config.rootpath}, "
                    f"{f'ini file {config.inipath}' if config.inipath else 'no ini file'}, not {expected}), before "
                    f"equivcheck's options were known, so the project's ini settings (known divergences, testpaths) "
                    f"are not read; write {option}={value}")
    # With a test path or node id beside it pytest still finds the project's ini file; config.args are the
    # positional arguments as parsed with every plugin's options known (an option's value is not one).
    if two_word and config.args_source != pytest.Config.ArgsSource.ARGS:
        # Not yet harmful: pytest skips a path that does not exist. The run creates it, and the same
        # command run again would be refused above: refuse it now, the same way.
        option, value = two_word[0]
        return (f"{option} {value}: given as two words, pytest takes {value} for a test path when it chooses "
                f"its rootdir once {value} exists (this run would create it), and the project's ini settings "
                f"(known divergences, testpaths) are then not read; write {option}={value}")
    return ""


def usable_dir(option: str, path: str) -> None:
    """A usage error, before any check runs, when `path` cannot hold `option`'s files."""
    from equivcheck.report.files import check_writable

    if problem := check_writable(path):
        raise pytest.UsageError(f"{option} {path}: {problem}")


# pytest's ini files, and the section that makes each one count (None: the file alone)
_INI = (("pytest.ini", None), (".pytest.ini", None), ("pyproject.toml", "[tool.pytest"), ("tox.ini", "[pytest]"),
        ("setup.cfg", "[tool:pytest]"))


def _ini_upward(start: Path) -> Path | None:
    """The first ini file pytest would take searching from `start` upward, by its names and sections."""
    for directory in (start.resolve(), *start.resolve().parents):
        for name, section in _INI:
            candidate = directory / name
            try:
                if candidate.is_file() and (section is None or section in candidate.read_text(errors="replace")):
                    return candidate
            except OSError:
                continue
    return None


def replay_args(config: pytest.Config, default_timeout: float) -> tuple[str, ...]:
    """The options besides equivcheck's run settings that change what runs or how it is
    judged, for the replay line: a replay without them can show a different outcome (a known
    divergence failing, a warning filter or ini override gone)."""
    opt = config.option
    args: list[str] = []
    for path in config.getoption("equiv_known_divergences"):
        args.append(f"--equiv-known-divergences={path}")  # one token: see path_taken_for_a_test_path
    # Saved failing examples run first, and a database even empty draws otherwise than none: a
    # replay without it passed where the run had failed.
    if (config.getoption("equiv_failures_db") or "none") != "none":
        args.append(f"--equiv-failures-db={config.getoption('equiv_failures_db')}")
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
