"""The benchmark items of `pytest --equiv --equiv-bench`, which the plugin adds and nothing else does.

Per collected equivalence test over an operation pair or layer (a test parametrized with a `Pair`), one
item per timed check (forward, forward+VJP) and side; over an `OptimizerPair`, one per side for its `step`
check (one optimizer step); over a `ModelPair`, one per side for each of its `forward`, `grad` and `train`
checks (equivcheck.bench.models), forward and grad also at x4 and x16 the batch; run after every check of
the session: pytest-benchmark
allows one benchmark per test. Each item looks up its check's outcome first and skips, saying why, unless
the check passed in this session, so only agreeing sides are timed. Times and records are
pytest-benchmark's own: its tables, --benchmark-json, --benchmark-save, --benchmark-compare and
--benchmark-histogram see ordinary benchmarks, grouped `pair::check::dtype::device` and named by side.
"""
from __future__ import annotations

import os
from typing import Any

import pytest

from equivcheck.bench import BENCH_CHECKS, WORK, build, draw_inputs, extra_info, group, matched_threads, shapes_of
from equivcheck.bench.models import MODEL_CHECKS, SWEPT, NotTimed, build_model, scaled_batch
from equivcheck.bench.models import WORK as MODEL_WORK
from equivcheck.bench.optim import SHAPES, build_step, unfit
from equivcheck.bench.record import precision_banner
from equivcheck.bench.sweep import FACTORS, SWEEP, scaled, scaled_name
from equivcheck.bench.workload import single_threaded_xla
from equivcheck.engine.kind import family_of
from equivcheck.fixture import RECORDS_KEY, SessionState
from equivcheck.models import ModelPair
from equivcheck.ops.pairs import Pair
from equivcheck.optim import OptimizerPair

_INPUTS: dict[tuple[int, str], tuple[Any, ...]] = {}  # (id(pair), dtype) -> args: both sides time one draw


def refuse_unfit(config: pytest.Config) -> None:
    """A UsageError, at start-up, for a run where pytest-benchmark would not time anything: rather
    than benchmark items that pass without a figure, or a benchmark option taken without effect.
    The plugin calls it when any --equiv-bench* option is given."""
    threads = config.getoption("equiv_bench_threads")
    if not config.getoption("equiv_bench"):
        given = [name for name, on in (("--equiv-bench-threads", threads is not None),
                                        ("--equiv-bench-compile", config.getoption("equiv_bench_compile"))) if on]
        they, them = ("they set", "them") if len(given) > 1 else ("it sets", "it")
        raise pytest.UsageError(f"{' and '.join(given)} without --equiv-bench: {they} how benchmarks are timed, "
                                f"and none is; add --equiv-bench (or drop {them})")
    if not config.getoption("equiv"):
        raise pytest.UsageError("--equiv-bench times the sides of equivalence checks that passed: add --equiv")
    if not config.pluginmanager.has_plugin("benchmark"):
        raise pytest.UsageError("--equiv-bench needs pytest-benchmark (pip install pytest-benchmark), "
                                "not loaded here (missing, or -p no:benchmark)")
    # pytest-benchmark reads PYTEST_XDIST_WORKER too: a pytest run inside an xdist worker times nothing
    if config.getoption("dist", "no") != "no" or hasattr(config, "workerinput") or os.environ.get("PYTEST_XDIST_WORKER"):
        raise pytest.UsageError("--equiv-bench with xdist (-n/--dist): pytest-benchmark turns itself off under "
                                "xdist, since processes sharing cores time each other's work; run the benchmarks "
                                "without -n (the checks alone can still use -n)")
    if config.getoption("benchmark_disable") and not config.getoption("benchmark_enable"):
        raise pytest.UsageError("--equiv-bench with --benchmark-disable: nothing would be timed; drop one of them")
    if threads not in (None, 0, 1):  # None: not given, which is 0
        raise pytest.UsageError(f"--equiv-bench-threads {threads}: give 0 (torch as many threads as XLA's pool) "
                                "or 1 (both single-threaded)")
    if threads == 1 and not single_threaded_xla():
        raise pytest.UsageError("--equiv-bench-threads 1: JAX's CPU client started before equivcheck could make it "
                                "single-threaded (a conftest ran JAX code at import?); set XLA_FLAGS="
                                "'--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1' yourself")


def bench_items(items: list[pytest.Item], state: SessionState, compiled: bool) -> list[pytest.Item]:
    """The benchmark items of `items`' equivalence tests, in their order, to run after all of them."""
    sides = ("torch", "jax", *(("torch.compile",) if compiled else ()))
    out = []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        pairs = [v for v in params.values() if isinstance(v, (Pair, OptimizerPair, ModelPair))]
        if "equiv" not in params or len(pairs) != 1:
            continue  # a test not parametrized over one pair: which pair it checks is known only as it runs
        dtype, device = params["equiv"]
        if isinstance(pairs[0], OptimizerPair):
            if "step" in pairs[0].checks:
                out += [_item(item, state, pairs[0], "step", side, dtype, device) for side in ("torch", "jax")]
            continue
        if isinstance(pairs[0], ModelPair):
            for check in (c for c in MODEL_CHECKS if c in pairs[0].checks):
                factors = (1, *FACTORS) if check in SWEPT else (1,)
                # torch.compile of a whole optimizer step is not timed: no item rather than a skipped one
                out += [_item(item, state, pairs[0], check, side, dtype, device, k) for k in factors
                        for side in sides if not (check == "train" and side == "torch.compile")]
            continue
        factors = (1, *FACTORS) if pairs[0].name in SWEEP else (1,)
        for check in (c for c in BENCH_CHECKS if c in pairs[0].checks):
            out += [_item(item, state, pairs[0], check, side, dtype, device, k) for k in factors for side in sides]
    return out


def _item(source: pytest.Item, state: SessionState, pair: Any, check: str, side: str, dtype: str,
          device: str, factor: int = 1) -> pytest.Item:
    def bench(benchmark: Any) -> None:
        _run(benchmark, source, state, pair, check, side, dtype, device, factor)

    tail = f"bench-{check}-{side}" + (f"-x{factor}" if factor > 1 else "")
    name = f"{source.name[:-1]}-{tail}]" if source.name.endswith("]") else f"{source.name}[{tail}]"
    # No originalname: pytest builds a node id from it and a callspec, which would give every side one id.
    return pytest.Function.from_parent(source.parent, name=name, callobj=bench)


def _outcome(source: pytest.Item, pair: str, check: str) -> str | None:
    for key, records in source.user_properties:
        if key == RECORDS_KEY:
            for r in records:
                if r["pair"] == pair and r["check"] == check:
                    return r["outcome"]
    return None


def _run(benchmark: Any, source: pytest.Item, state: SessionState, pair: Any, check: str, side: str, dtype: str,
         device: str, factor: int = 1) -> None:
    name = scaled_name(pair.name, factor)  # the sweep's larger sizes are groups of their own
    gid = group(name, check, dtype, device)
    outcome = _outcome(source, pair.name, check)
    if outcome is None:
        pytest.skip(f"{gid}: its equivalence check did not run in this session ({source.nodeid})")
    if outcome != "passed":
        pytest.skip(f"{gid}: not timed: its equivalence check is {outcome}; only sides that agree are benchmarked")
    with matched_threads(single=source.config.getoption("equiv_bench_threads") == 1):
        if isinstance(pair, OptimizerPair):
            if unfit(pair):
                pytest.skip(f"{gid}: not timed: {unfit(pair)}")
            wl = build_step(pair, side, dtype, device)
            shapes, work = [[list(s), dtype] for s in SHAPES.values()], "one optimizer step"
        elif isinstance(pair, ModelPair):
            key = (id(pair), dtype)
            try:
                if key not in _INPUTS:
                    _INPUTS[key] = draw_inputs(pair, dtype)
                args = scaled_batch(_INPUTS[key], factor)
                wl = build_model(pair, check, side, args, dtype, device)
            except NotTimed as exc:
                pytest.skip(f"{gid}: not timed: {exc}")
            except Exception as exc:  # noqa: BLE001 - its inputs cannot be drawn: this item is skipped, the run goes on
                pytest.skip(f"{gid}: not timed: drawing its batch failed: {type(exc).__name__}: {str(exc)[:300]}")
            shapes, work = shapes_of(args), MODEL_WORK[check]
        else:
            key = (id(pair), dtype)
            if key not in _INPUTS:
                _INPUTS[key] = draw_inputs(pair, dtype)
            args = scaled(pair.name, _INPUTS[key], factor) if factor > 1 else _INPUTS[key]
            try:
                wl = build(pair, check, side, args, dtype, device)
            except Exception as exc:
                if side != "torch.compile":
                    raise
                pytest.skip(f"{gid}: torch.compile does not compile it here: {type(exc).__name__}: {str(exc)[:300]}")
            shapes, work = shapes_of(args), WORK[check]
        benchmark.group, benchmark.name = gid, side
        benchmark.extra_info.update(extra_info(
            pair=name, check=check, dtype=dtype, device=device,
            device_name=state.device_names.get(device, device), precision=state.run.precision,
            settings=state.precision_settings, shapes=shapes, tags=pair.tags, wl=wl, work=work, family=family_of(pair)))
        benchmark.extra_info["scale"] = factor
        benchmark(wl.call)


def header_lines(state: SessionState, compiled: bool) -> list[str]:
    """What the run header says of the benchmarks: that they run, how, and any precision mismatch."""
    sides = "torch eager, torch.compile and JAX jit" if compiled else "torch eager and JAX jit"
    lines = [(f"equivcheck: --equiv-bench: {sides}, forward and forward+VJP of every pair, optimizer step, model "
              "forward/grad/train step that passes, timed after all checks by pytest-benchmark")]
    for device in state.devices:
        banner = precision_banner(device, state.run.precision, state.precision_settings)
        if banner:
            lines.append(f"equivcheck: {banner}")
    return lines


def session_benchmarks(config: pytest.Config) -> list[dict[str, Any]]:
    """This run's `--equiv-bench` benchmarks, each as pytest-benchmark writes it to --benchmark-json
    (its `as_dict`, without the raw rounds), for the run's report: `compare` then sees speed
    beside outcomes, and the HTML page a speed section. [] without --equiv-bench."""
    from equivcheck.bench.record import FORMAT

    session = getattr(config, "_benchmarksession", None)  # pytest-benchmark's; no public accessor
    if not config.getoption("equiv_bench", False) or session is None:
        return []
    return [b.as_dict(include_data=False) for b in session.benchmarks
            if b and (b.extra_info or {}).get("equivcheck") == FORMAT]
