"""The pytest plugin: options, hooks and the `equiv` fixture - nothing else.

Inert without --equiv: equivalence checks (tests that use `equiv` or carry the `equiv`
marker) are deselected and nothing is imported. With --equiv only they run. torch, jax and
Hypothesis load in pytest_configure, and only when --equiv is given.
"""
from __future__ import annotations

import dataclasses
import math
import os
import random
import sys
from typing import Any

import pytest

STATE: pytest.StashKey[Any] = pytest.StashKey()
DEVICE_CHOICES = ("cpu", "gpu", "all")
PRECISIONS = ("highest", "default")
DEFAULT_TIMEOUT = 60.0


class _Off:
    """The state of a run without --equiv: nothing of equivcheck's is loaded."""

    enabled = False


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("equivcheck", "PyTorch/JAX equivalence checks (equivcheck)")
    g.addoption("--equiv", action="store_true", help="run the equivalence checks (and only them)")
    g.addoption("--device", "--equiv-device", dest="equiv_device", default="cpu", choices=DEVICE_CHOICES,
                help="where both frameworks run: cpu, gpu (CUDA torch + JAX GPU backend) or all (default: cpu)")
    g.addoption("--equiv-profile", choices=("dev", "ci", "nightly"), default=None,
                help="example budget: dev 30, ci 30, nightly 300 per check (default: ci when $CI is set, else dev)")
    g.addoption("--equiv-examples", type=int, default=None, metavar="N", help="examples per check (overrides the profile)")
    g.addoption("--equiv-seed", type=int, default=None, metavar="S", help="seed of the run; the same seed replays it exactly")
    g.addoption("--equiv-precision", choices=PRECISIONS, default="highest",
                help="highest: TF32 off in torch, JAX matmul precision 'highest'; default: each framework's own")
    g.addoption("--equiv-dtypes", default="float32,float64", metavar="LIST",
                help="comma-separated dtypes to check (float32, float64, bfloat16, float16)")
    g.addoption("--equiv-shapes", type=int, default=4, metavar="K",
                help="distinct input shapes per check, so JAX compiles K times; 0 draws a new shape every example")
    g.addoption("--equiv-report", default="reports", metavar="DIR", help="where the JSON and Markdown reports go ('none': no report)")
    g.addoption("--equiv-known-divergences", action="append", default=[], metavar="FILE",
                help="file of known divergences (PATTERN REASON per line): matches become xfail; repeatable")
    g.addoption("--equiv-known-lenient", action="store_true",
                help="a known divergence whose witness now agrees is a warning (default: a failure, 'fixed')")
    g.addoption("--equiv-timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                help=f"seconds one side's call may take before its check fails with its stack; 0: no limit "
                     f"(default: {DEFAULT_TIMEOUT:g})")
    g.addoption("--equiv-jax-cache", default="auto", metavar="DIR",
                help="JAX persistent compilation cache ('auto': in pytest's cache dir; 'none': off)")
    g.addoption("--equiv-bench", action="store_true",
                help="also time both sides of every pair and layer whose checks pass, with pytest-benchmark "
                     "(its --benchmark-* options apply); not under xdist")
    g.addoption("--equiv-bench-threads", type=int, default=0, metavar="N",
                help="with --equiv-bench: torch threads and XLA's CPU pool while timing; 0 (default): torch gets as "
                     "many as XLA's pool has cores; 1: both single-threaded (a shared, loaded machine)")
    g.addoption("--equiv-bench-compile", action="store_true",
                help="with --equiv-bench: time torch.compile too (compiles each pair: seconds each)")
    parser.addini("equiv_known_divergences", type="paths", default=[],
                  help="known-divergence files always loaded with --equiv")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "equiv: an equivalence check; runs only under --equiv")
    if config.getoption("equiv_bench"):
        from equivcheck.benchmarking import refuse_unfit

        refuse_unfit(config)
    if not config.getoption("equiv"):
        config.stash[STATE] = _Off()
        return
    config.stash[STATE] = _build_state(config)
    config.pluginmanager.register(_Collector(config.stash[STATE]), "equivcheck-collector")


def _build_state(config: pytest.Config) -> Any:
    from equivcheck.backends import jax_side, torch_side
    from equivcheck.engine import DTYPES, PROFILES, KnownDivergences, RunSettings
    from equivcheck.fixture import SessionState

    opt = config.getoption
    dtypes = tuple(d.strip() for d in opt("equiv_dtypes").split(",") if d.strip())
    bad = [d for d in dtypes if d not in DTYPES]
    if bad or not dtypes:
        raise pytest.UsageError(f"--equiv-dtypes: unknown {bad or 'empty list'}; choose from {', '.join(DTYPES)}")
    profile = opt("equiv_profile") or ("ci" if os.environ.get("CI") else "dev")
    examples = PROFILES[profile] if opt("equiv_examples") is None else opt("equiv_examples")
    if examples < 1 or opt("equiv_shapes") < 0:
        raise pytest.UsageError("--equiv-examples must be >= 1 and --equiv-shapes >= 0")
    timeout = opt("equiv_timeout")
    if not math.isfinite(timeout) or timeout < 0:
        raise pytest.UsageError(f"--equiv-timeout {timeout:g}: give seconds >= 0 (0: no limit)")
    worker = getattr(config, "workerinput", None)
    report_dir = None if opt("equiv_report") == "none" else opt("equiv_report")
    if report_dir and not worker:  # only the controller writes; found now, not after every check ran
        from equivcheck.report.files import check_writable

        problem = check_writable(report_dir)
        if problem:
            raise pytest.UsageError(f"--equiv-report {report_dir}: {problem}")
    seed = opt("equiv_seed")
    if seed is None:
        seed = worker["equivcheck_seed"] if worker else random.SystemRandom().randrange(2**31)
    try:
        known = KnownDivergences.load([str(p) for p in config.getini("equiv_known_divergences")]
                                      + list(opt("equiv_known_divergences")))
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None
    device_opt = opt("equiv_device")
    devices = ("cpu", "gpu") if device_opt == "all" else (device_opt,)
    precision = opt("equiv_precision")
    tb, jb = torch_side(), jax_side()  # imports torch, then jax (after the GPU memory setting)
    cache = opt("equiv_jax_cache")
    if cache == "auto" and getattr(config, "cache", None) is not None:
        cache = str(config.cache.mkdir("equivcheck-jax"))
    if cache not in ("auto", "none"):
        jb.enable_persistent_cache(cache)
    state = SessionState(
        enabled=True,
        run=RunSettings(examples=examples, profile=profile, seed=seed, precision=precision, palette=opt("equiv_shapes"),
                        timeout=timeout),
        dtypes=dtypes, devices=devices, known=known,
        report_dir=report_dir,
        precision_settings={**tb.set_precision(precision), **jb.set_precision(precision)},
        extra_args=_replay_args(config), known_lenient=opt("equiv_known_lenient"),
    )
    for device in devices:
        missing = [name for name, side in (("torch", tb), ("jax", jb)) if not side.available(device)]
        if missing:
            state.unavailable[device] = f"no {device.upper()} here: {' and '.join(missing)} cannot see one"
        else:
            state.device_names[device] = tb.device_name(device)
    from equivcheck.session import abort

    state.abort = lambda records, exc: abort(config, state, records, exc)
    return state


def _replay_args(config: pytest.Config) -> tuple[str, ...]:
    """The options besides equivcheck's run settings that change what runs or how it is
    judged, for the replay line: a replay without them can show a different outcome (a known
    divergence failing, a warning filter or ini override gone)."""
    opt = config.option
    args: list[str] = []
    for path in config.getoption("equiv_known_divergences"):
        args += ["--equiv-known-divergences", str(path)]
    if config.getoption("equiv_timeout") != DEFAULT_TIMEOUT:  # a check that timed out may pass with more
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
    return tuple(args)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """xdist: every worker draws from the controller's seed."""
    state = node.config.stash[STATE]
    if state.enabled:
        node.workerinput["equivcheck_seed"] = state.run.seed


@pytest.hookimpl(trylast=True)  # after @parametrize, so ids read pair-dtype-device
def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    state = metafunc.config.stash[STATE]
    if "equiv" not in metafunc.fixturenames or not state.enabled:
        return
    combos = [(dtype, device) for device in state.devices for dtype in state.dtypes]
    metafunc.parametrize("equiv", combos, indirect=True, ids=[f"{d}-{v}" for d, v in combos])


def _is_equiv(item: pytest.Item) -> bool:
    return "equiv" in getattr(item, "fixturenames", ()) or item.get_closest_marker("equiv") is not None


@pytest.hookimpl(tryfirst=True)  # before -k/-m deselect: what was collected tells a stale entry from a left-out one
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    state = config.stash[STATE]
    keep, drop = [], []
    for item in items:
        (keep if _is_equiv(item) == state.enabled else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
    if not state.enabled:
        return
    from equivcheck.fixture import KNOWN_KEY

    state.collected = _collected_ids(items)
    state.narrowed = _narrowed(config)
    out = getattr(config, "workeroutput", None)
    if out is not None:  # an xdist worker: its controller collects nothing and hears this at pytest_testnodedown
        out["equivcheck_collected"] = sorted(state.collected)
    _refuse_duplicate_names(items)
    if config.getoption("equiv_bench"):  # appended: timed after every check, when no compile thread competes
        from equivcheck.benchmarking import bench_items

        items.extend(bench_items(items, state, config.getoption("equiv_bench_compile")))
    for item in items:
        hit = state.known.match_node(item.nodeid)
        if hit:
            item.user_properties.append((KNOWN_KEY, hit[0]))
            # A test with the fixture: its records carry the entry (Equiv.known), and it is failed
            # (fixed, a side raised), xfailed or xpassed from them; a blanket mark would hide a failure.
            if "equiv" not in getattr(item, "fixturenames", ()):
                item.add_marker(pytest.mark.xfail(reason=f"known divergence: {hit[1]}", strict=False))


def _narrowed(config: pytest.Config) -> bool:
    """Paths or node ids on the command line collect only part of the project: an entry for a
    pair or file outside it says nothing about whether the divergence still exists."""
    whole = {str(config.rootpath), "."}
    return config.args_source == pytest.Config.ArgsSource.ARGS and not all(
        str(a) in whole or str(config.invocation_params.dir / str(a)) == str(config.rootpath) for a in config.args)


def pytest_collection_finish(session: pytest.Session) -> None:
    """How many tests are selected to run (after -k/-m): the report tells a run cut short by
    Ctrl-C, a stuck side or -x by fewer of them reaching an outcome."""
    state = session.config.stash[STATE]
    if state.enabled:
        state.selected = len(session.items)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node: Any, ids: list[str]) -> None:
    """xdist's controller collects nothing itself: each worker's selection is the whole run's."""
    state = node.config.stash[STATE]
    if state.enabled:
        state.selected = len(ids)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """xdist's controller: what each worker collected before -k/-m deselection, so that the
    end-of-run summary tells a stale known-divergence entry from one whose checks were left out
    (a crashed worker sends nothing; its replacement does)."""
    state = node.config.stash[STATE]
    ids = (getattr(node, "workeroutput", None) or {}).get("equivcheck_collected")
    if state.enabled and ids is not None:
        state.collected = (state.collected or set()) | set(ids)
        state.narrowed = _narrowed(node.config)


def _collected_ids(items: list[pytest.Item]) -> set[str]:
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
    return ids


def _refuse_duplicate_names(items: list[pytest.Item]) -> None:
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


@pytest.fixture
def equiv(request: pytest.FixtureRequest) -> Any:
    """Checks a Pair at this test's dtype and device: `equiv.check(pair)`."""
    from equivcheck.fixture import Equiv

    state = request.config.stash[STATE]
    if not state.enabled:
        pytest.skip("equivalence check: run with --equiv")
    dtype, device = request.param
    if device in state.unavailable:
        pytest.skip(state.unavailable[device])
    return Equiv(request.node, state, dtype, device)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """While this check runs, compile the next one's JAX programs in the background."""
    state = item.config.stash[STATE]
    params = getattr(getattr(nextitem, "callspec", None), "params", {})
    if not state.enabled or "equiv" not in params:
        return
    from equivcheck.engine import CheckKind

    dtype, device = params["equiv"]
    pairs = [v for v in params.values() if isinstance(v, CheckKind)]
    if len(pairs) == 1 and dtype in pairs[0].dtypes and device not in state.unavailable:
        try:
            pairs[0].prepare(dtype, dataclasses.replace(state.run, device=device))
        except Exception:  # a head start only: the test itself reports a broken pair
            pass


class _Collector:
    """Gathers check records from test reports: the same path with or without xdist."""

    def __init__(self, state: Any) -> None:
        self.state = state

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        from equivcheck.fixture import KNOWN_KEY, RECORDS_KEY

        if report.when in ("teardown", "???"):  # "???": xdist's report of a test whose worker crashed
            self.state.finished.add(report.nodeid)
        for name, value in report.user_properties:
            if name == RECORDS_KEY and report.when == "call":
                self.state.records.extend(value)
            elif name == KNOWN_KEY:
                self.state.matched_known.add(value)


def pytest_report_header(config: pytest.Config) -> list[str]:
    state = config.stash[STATE]
    if not state.enabled:
        return []
    r = state.run
    lines = [f"equivcheck: seed {r.seed} (replay with --equiv-seed {r.seed}), profile {r.profile}, "
             f"{r.examples} examples, {r.palette or 'fresh'} shapes per check, precision {r.precision}, "
             f"dtypes {','.join(state.dtypes)}, devices {','.join(state.devices)}"]
    lines += [f"equivcheck: {device} skipped: {why}" for device, why in state.unavailable.items()]
    if len(state.known):
        lines.append(f"equivcheck: {len(state.known)} known divergences loaded")
    if config.getoption("equiv_bench"):
        from equivcheck.benchmarking import header_lines

        lines += header_lines(state, config.getoption("equiv_bench_compile"))
    return lines


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    jax_side = sys.modules.get("equivcheck.backends.jax")
    if jax_side is not None:  # JAX may compile on a thread here: its work for tests that will not run ends
        jax_side.session_ended(exitstatus)
    state = session.config.stash[STATE]
    if state.enabled and not hasattr(session.config, "workerinput"):
        from equivcheck.session import write_report

        write_report(session.config, state, interrupted=exitstatus == pytest.ExitCode.INTERRUPTED)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    state = config.stash[STATE]
    if not state.enabled or hasattr(config, "workerinput") or config.option.collectonly:
        return
    from equivcheck import report
    from equivcheck.engine.knowns import unchecked
    from equivcheck.session import report_lines

    tr = terminalreporter
    tr.section("equivcheck")
    if state.records:
        tr.write_line(report.text_table(*report.grid(state.records)))
        counts = {k: sum(r["outcome"] == k for r in state.records) for k in report.OUTCOMES}
        tr.write_line(", ".join(f"{v} {k}" for k, v in counts.items() if v) + " checks")
        for line in report.xpass_lines(state.records):
            tr.write_line(line, yellow=True)
    else:
        tr.write_line("no equivalence checks ran")
    warnings, counts = unchecked(state.known.unmatched(state.matched_known), dtypes=state.dtypes,
                                 devices=state.devices, collected=state.collected, narrowed=state.narrowed)
    for line in warnings:
        tr.write_line(f"WARNING {line}", yellow=True)
    for line in counts:
        tr.write_line(line)
    for colour, line in report_lines(state, interrupted=exitstatus == pytest.ExitCode.INTERRUPTED):
        tr.write_line(line, **({colour: True} if colour else {}))
