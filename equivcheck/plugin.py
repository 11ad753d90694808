"""The pytest plugin: options, hooks and the `equiv` fixture - nothing else.

Inert without --equiv: equivalence checks (tests that use `equiv` or carry the `equiv` marker) are
deselected and nothing heavy is imported. torch, jax and Hypothesis load in pytest_configure, with --equiv.
"""
from __future__ import annotations

import dataclasses
import math
import os
import random
import sys
import textwrap
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
    g.addoption("--equiv-onnx", action="store_true",
                help="every layer pair (family='layers'; other pairs: checks=(..., 'onnx')) also runs the onnx check: "
                     "exported to ONNX (dynamo, once per layer and dtype), run in ONNX Runtime, compared three ways "
                     "with torch and JAX (pip install equivcheck[onnx])")
    g.addoption("--equiv-known-lenient", action="store_true",
                help="a known divergence whose witness now agrees is a warning (default: a failure, 'fixed')")
    g.addoption("--equiv-timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                help=f"seconds one side's call may take before its check fails with its stack, extended by the "
                     f"load average per core when above 1 (at most 8x; the failure states it); 0: no limit "
                     f"(default: {DEFAULT_TIMEOUT:g})")
    g.addoption("--equiv-jax-cache", default="auto", metavar="DIR",
                help="JAX persistent compilation cache ('auto': in pytest's cache dir; 'none': off)")
    g.addoption("--equiv-failures-db", default="none", metavar="DIR",
                help="keep failing examples in this Hypothesis example database and try them first next run ('auto': "
                     "in pytest's cache dir; default 'none': off, so a seed alone replays a run)")
    g.addoption("--equiv-shard", default=None, metavar="I/N",
                help="run share I of N of the selected checks (deterministic, balanced); merge the N reports "
                     "with python -m equivcheck merge")
    g.addoption("--equiv-shard-durations", default=None, metavar="REPORT",
                help="a previous run's report JSON: balance the shards by its tests' durations (default: by count)")
    g.addoption("--equiv-bench", action="store_true",
                help="also time both sides of each passing check with pytest-benchmark (its options apply; no xdist)")
    g.addoption("--equiv-bench-threads", type=int, default=None, metavar="N", help="with --equiv-bench: 0 (default) "
                "torch as many threads as XLA's CPU pool; 1: both single-threaded (a shared, loaded machine)")
    g.addoption("--equiv-bench-compile", action="store_true",
                help="with --equiv-bench: time torch.compile too (compiles each pair: seconds each)")
    parser.addini("equiv_known_divergences", type="paths", default=[],
                  help="known-divergence files always loaded with --equiv")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "equiv: an equivalence check; runs only under --equiv")
    if (config.getoption("equiv_bench") or config.getoption("equiv_bench_compile")
            or config.getoption("equiv_bench_threads") is not None):  # default None: a 0 given is told apart
        from equivcheck.benchmarking import refuse_unfit

        refuse_unfit(config)
    if not config.getoption("equiv"):
        config.stash[STATE] = _Off()
        return
    config.stash[STATE] = _build_state(config)
    config.pluginmanager.register(_Collector(config.stash[STATE], hasattr(config, "workerinput")),
                                  "equivcheck-collector")


def _build_state(config: pytest.Config) -> Any:
    from equivcheck import collection
    from equivcheck.backends import jax_side, torch_side
    from equivcheck.engine import DTYPES, PROFILES, KnownDivergences, RunSettings
    from equivcheck.fixture import SessionState

    opt = config.getoption
    # Once each, in the order given: "float32,float32" would parametrize every test twice under one id.
    dtypes = tuple(dict.fromkeys(d.strip() for d in opt("equiv_dtypes").split(",") if d.strip()))
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
    if why := collection.path_taken_for_a_test_path(config):
        raise pytest.UsageError(why)
    worker = getattr(config, "workerinput", None)
    report_dir = None if opt("equiv_report") == "none" else opt("equiv_report")
    if report_dir and not worker:  # only the controller writes; found now, not after every check ran
        collection.usable_dir("--equiv-report", report_dir)
    from equivcheck.report.shards import shard_options

    try:
        shard = shard_options(opt("equiv_shard"), opt("equiv_shard_durations"))
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None
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
    failures_db = opt("equiv_failures_db") or "none"
    if failures_db == "auto" and getattr(config, "cache", None) is None:
        raise pytest.UsageError("--equiv-failures-db auto keeps the database in pytest's cache dir, which "
                                "-p no:cacheprovider turned off: give a directory")
    if failures_db == "auto":
        failures_db = str(config.cache.mkdir("equivcheck-failures"))
    elif failures_db != "none" and not worker:
        collection.usable_dir("--equiv-failures-db", failures_db)
    state = SessionState(
        enabled=True,
        run=RunSettings(examples=examples, profile=profile, seed=seed, precision=precision, palette=opt("equiv_shapes"),
                        timeout=timeout, failures_db=None if failures_db == "none" else failures_db,
                        onnx=opt("equiv_onnx")),
        dtypes=dtypes, devices=devices, known=known,
        report_dir=report_dir,
        precision_settings={**tb.set_precision(precision), **jb.set_precision(precision)},
        extra_args=collection.replay_args(config, DEFAULT_TIMEOUT), known_lenient=opt("equiv_known_lenient"),
        shard=shard,
    )
    for device in devices:
        missing = [name for name, side in (("torch", tb), ("jax", jb)) if not side.available(device)]
        if missing:
            state.unavailable[device] = f"no {device.upper()} here: {' and '.join(missing)} cannot see one"
        else:
            state.device_names[device] = tb.device_name(device)
    from equivcheck.session import abort, journal_for, sigterm_as_interrupt

    state.abort = lambda records, exc: abort(config, state, records, exc)
    state.journal = None if worker else journal_for(config, state)
    if not worker:
        sigterm_as_interrupt(config)
    return state


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
    from equivcheck import collection
    from equivcheck.fixture import KNOWN_KEY

    state.collected = collection.collected_ids(items)
    state.narrowed = collection.narrowed(config)
    out = getattr(config, "workeroutput", None)
    if out is not None:  # an xdist worker: its controller collects nothing and hears this at pytest_testnodedown
        out["equivcheck_collected"] = sorted(state.collected)
    if out is None:  # a worker's UsageError would be xdist's INTERNALERROR: the controller refuses the records
        collection.refuse_duplicate_names(items)
    for item in items:
        hit = state.known.match_node(item.nodeid)
        if hit:
            item.user_properties.append((KNOWN_KEY, hit[0]))
            # A test with the fixture: its records carry the entry (Equiv.known), and it is failed
            # (fixed, a side raised), xfailed or xpassed from them; a blanket mark would hide a failure.
            if "equiv" not in getattr(item, "fixturenames", ()):
                item.add_marker(pytest.mark.xfail(reason=f"known divergence: {hit[1]}", strict=False))


def pytest_collection_finish(session: pytest.Session) -> None:
    """How many tests run (after -k/-m): fewer reaching an outcome tells a run cut short (Ctrl-C, -x)."""
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
        from equivcheck import collection

        state.narrowed = collection.narrowed(node.config)
    shard = (getattr(node, "workeroutput", None) or {}).get("equivcheck_shard")
    if state.enabled and shard is not None:
        state.shard_info = shard


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
    from equivcheck.session import quiet_torch_trace

    quiet_torch_trace()
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

    def __init__(self, state: Any, worker: bool) -> None:
        self.state, self.worker = state, worker  # an xdist worker's records are its controller's to gather

    @pytest.hookimpl(trylast=True)  # after -k/-m: the shards split what was selected, benchmarks follow checks
    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]) -> None:
        if self.state.shard is not None:
            self._shard(config, items)
        if config.getoption("equiv_bench"):  # appended: timed after every check, when no compile thread competes
            from equivcheck.benchmarking import bench_items

            items.extend(bench_items(items, self.state, config.getoption("equiv_bench_compile")))

    def _shard(self, config: pytest.Config, items: list[pytest.Item]) -> None:
        from equivcheck.report.shards import assign, describe

        plan = self.state.shard
        share = assign((i.nodeid for i in items), plan.count, plan.seconds)
        keep = [i for i in items if share[i.nodeid] == plan.index]
        drop = [i for i in items if share[i.nodeid] != plan.index]
        self.state.shard_info = describe(plan.index, plan.count, [i.nodeid for i in keep], share, plan.source)
        if drop:
            config.hook.pytest_deselected(items=drop)
            items[:] = keep
        out = getattr(config, "workeroutput", None)
        if out is not None:  # an xdist worker: its controller collects nothing and hears this at testnodedown
            out["equivcheck_shard"] = self.state.shard_info

    @pytest.hookimpl(tryfirst=True)  # a collision fails the report before the terminal and exit status count it
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        from equivcheck.collection import record_collisions
        from equivcheck.fixture import KNOWN_KEY, RECORDS_KEY

        if report.when in ("teardown", "???"):  # "???": xdist's report of a test whose worker crashed
            self.state.finished.add(report.nodeid)
        records = [r for name, value in report.user_properties if name == RECORDS_KEY for r in value]
        if records and report.when == "call" and not self.worker:
            fresh, clashes = record_collisions(records, report.nodeid, self.state.record_owner)
            self.state.records.extend(fresh)
            if self.state.journal is not None:
                self.state.journal.append(fresh)
            if clashes:  # the report keys records by id: a second one would hide or replace the first
                report.outcome, report.longrepr = "failed", "\n".join(clashes)
                if hasattr(report, "wasxfail"):
                    del report.wasxfail
        self.state.matched_known.update(value for name, value in report.user_properties if name == KNOWN_KEY)


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
    from equivcheck.session import leftover_lines

    lines += leftover_lines(state.report_dir)
    if config.getoption("equiv_bench"):
        from equivcheck.benchmarking import header_lines

        lines += header_lines(state, config.getoption("equiv_bench_compile"))
    return lines


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    jax_side = sys.modules.get("equivcheck.backends.jax")
    if jax_side is not None:  # JAX may compile on a thread here: its work for tests that will not run ends
        jax_side.session_ended(exitstatus)
    pools = sys.modules.get("equivcheck.distributed.pool")
    if pools is not None:  # the distributed checks' worker processes: killed and reaped (atexit does too)
        pools.close_all()
    state = session.config.stash[STATE]
    # A usage error (a bad option, two pairs of one name) ran nothing: no report says otherwise.
    if state.enabled and not hasattr(session.config, "workerinput") and exitstatus != pytest.ExitCode.USAGE_ERROR:
        from equivcheck.session import empty_share, write_report

        if empty_share(state, exitstatus):  # more shards than tests: this machine's share is empty, not failed
            session.exitstatus = exitstatus = pytest.ExitCode.OK

        write_report(session.config, state, interrupted=exitstatus == pytest.ExitCode.INTERRUPTED)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    state = config.stash[STATE]
    if (not state.enabled or hasattr(config, "workerinput") or config.option.collectonly
            or exitstatus == pytest.ExitCode.USAGE_ERROR):
        return
    from equivcheck import report
    from equivcheck.engine.knowns import unchecked
    from equivcheck.session import onnx_left_out, report_lines

    tr = terminalreporter
    tr.section("equivcheck")
    if state.records:
        for text in report.summary_tables(state.records):
            tr.write_line(text)
        counts = {k: sum(r["outcome"] == k for r in state.records) for k in report.OUTCOMES}
        tr.write_line(", ".join(f"{v} {k}" for k, v in counts.items() if v) + " checks")
        for line in report.xpass_lines(state.records):
            tr.write_line(_wrap(line), yellow=True)
        if config.getoption("equiv_onnx", False) and (left := onnx_left_out(state.records)):
            tr.write_line(_wrap(left), yellow=True)
    else:
        tr.write_line("no equivalence checks ran")
    warnings, counts = unchecked(state.known.unmatched(state.matched_known), dtypes=state.dtypes,
                                 devices=state.devices, collected=state.collected, narrowed=state.narrowed)
    for line in warnings:
        tr.write_line(_wrap(f"WARNING {line}"), yellow=True)
    for line in counts:
        tr.write_line(_wrap(line))
    for colour, line in report_lines(state, interrupted=exitstatus == pytest.ExitCode.INTERRUPTED):
        tr.write_line(line, **({colour: True} if colour else {}))


def _wrap(line: str) -> str:
    """A summary line within the tables' width (report.tables.WIDTH), continued indented; words
    (patterns, node ids) are not split, so one longer than the width stays whole on its line."""
    from equivcheck.report.tables import WIDTH  # here: the plugin imports no report code until the summary

    return textwrap.fill(line, WIDTH, subsequent_indent="  ", break_long_words=False, break_on_hyphens=False)
