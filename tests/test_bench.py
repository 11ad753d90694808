"""Benchmarks of both sides (`--equiv-bench`, equivcheck.bench): the timer waits for asynchronous work,
the records pytest-benchmark keeps, the claims report, and its answers to bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tests import preload  # noqa: F401 - frameworks loaded before pytester (tests/preload.py)


@pytest.fixture(autouse=True)
def _not_an_xdist_worker(monkeypatch):
    """This file's in-process pytest runs time benchmarks; under `-n 2` each runs inside an xdist
    worker, whose PYTEST_XDIST_WORKER turns pytest-benchmark off (and --equiv-bench refuses)."""
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)


def _heavy_pair():
    import jax
    import jax.numpy as jnp
    import torch

    import equivcheck as ec

    # ~0.1 s of matmuls: a call dispatched asynchronously returns long before they are done.
    def t_heavy(x):
        for _ in range(40):
            x = torch.tanh(x @ x)
        return x

    def j_heavy(x):
        return jax.lax.fori_loop(0, 40, lambda i, a: jnp.tanh(a @ a), x)

    shapes = ec.Fixed((((384, 384),),))
    return ec.Pair("heavy", t_heavy, j_heavy, ec.Inputs(shapes, (ec.Floats(-0.01, 0.01),)), checks=("forward",))


def _leaves_ready(out) -> list[bool]:
    import jax

    return [leaf.is_ready() for leaf in jax.tree_util.tree_leaves(out)]


def test_the_timed_jax_call_returns_only_when_its_asynchronous_work_is_done(monkeypatch):
    import jax

    from equivcheck.bench import build

    pair = _heavy_pair()
    args = (np.full((384, 384), 0.001, np.float32),)
    # The function is asynchronous: its plain jitted call returns with the work still running.
    raw = jax.jit(pair.jax_fn)(*args)
    assert _leaves_ready(raw) == [False]
    raw.block_until_ready()
    wl = build(pair, "forward", "jax", args, "float32", "cpu")
    assert all(_leaves_ready(wl.call()))
    assert "synchronised: jax.block_until_ready on every output leaf" in wl.rules
    assert wl.compile_seconds > 0 and wl.first_seconds > 0
    # A timer without the synchronisation would stop at dispatch, with the work undone: the check
    # above is what catches it.
    monkeypatch.setattr(jax, "block_until_ready", lambda tree: tree)
    unsynced = build(pair, "forward", "jax", args, "float32", "cpu").call()
    assert not all(_leaves_ready(unsynced))


def test_both_sides_time_the_same_arrays_and_state_how():
    import equivcheck as ec
    from equivcheck.bench import build, draw_inputs, shapes_of

    pair = ec.Pair("mm", lambda a, b: a @ b, lambda a, b: a @ b, ec.Inputs(ec.MatMul(), (ec.Floats(), ec.Floats())))
    args = draw_inputs(pair, "float32")
    assert args is not draw_inputs(pair, "float32") and all(
        np.array_equal(a, b) for a, b in zip(args, draw_inputs(pair, "float32")))  # a fixed seed: the same draw
    assert len({tuple(np.unique(a)) for a in args}) > 1  # drawn values, not Hypothesis's zeros
    for check in ("forward", "vjp"):
        t, j = (build(pair, check, side, args, "float32", "cpu") for side in ("torch", "jax"))
        assert t.compile_seconds is None and j.compile_seconds > 0
        assert t.memory_bytes > 0 and j.memory_bytes > 0
        assert "profiler" in t.memory_measure and "memory_analysis" in j.memory_measure
        assert "inputs on the device before timing; the same arrays on both sides" in t.rules and j.rules
    assert shapes_of(args)[0][1] == "float32"


def _bench(pair, check, side, median, *, q=0.05, device="cpu", precision="highest", family="other",
           memory=1000, settings=None):
    settings = settings or {"jax_default_matmul_precision": "highest", "matmul_allow_tf32": False,
                            "cudnn_allow_tf32": False}
    return {"group": f"{pair}::{check}::float32::{device}", "name": side, "fullname": f"t::{pair}-{check}-{side}",
            "stats": {"median": median, "q1": median * (1 - q), "q3": median * (1 + q), "rounds": 20},
            "extra_info": {"equivcheck": 1, "pair": pair, "check": check, "dtype": "float32", "device": device,
                           "device_name": "H100" if device == "gpu" else "cpu", "side": side, "precision": precision,
                           "precision_settings": settings, "family": family, "memory_bytes": memory,
                           "compile_seconds": 0.2 if side == "jax" else None, "first_call_seconds": median}}


def _write(tmp_path, name, benches):
    path = tmp_path / name
    path.write_text(json.dumps({"machine_info": {}, "benchmarks": benches}))
    return path


def test_claims_weigh_each_claim_with_the_groups_for_and_against(tmp_path):
    from equivcheck.bench import claim_rows, load
    from equivcheck.bench.claims import _sections

    benches = [
        # JAX 2x faster on matmul forward, 4x on its VJP: its advantage grows with autodiff.
        _bench("mm", "forward", "torch", 2e-3), _bench("mm", "forward", "jax", 1e-3),
        _bench("mm", "vjp", "torch", 8e-3, memory=3000), _bench("mm", "vjp", "jax", 2e-3),
        # torch 3x faster on a convolution, an image op: PyTorch faster there.
        _bench("conv", "forward", "torch", 1e-3, family="image"), _bench("conv", "forward", "jax", 3e-3, family="image"),
        # A tie: the spread over rounds straddles 1, so it counts for neither side.
        _bench("tanh", "forward", "torch", 1.0e-3, q=0.3), _bench("tanh", "forward", "jax", 1.02e-3, q=0.3),
        # Two more image ops torch does faster, two more pairs whose VJP favours JAX more than their forward.
        *(_bench(op, "forward", side, t, family="image") for op in ("pool", "resize")
          for side, t in (("torch", 1e-3), ("jax", 2e-3))),
        *(_bench(p, c, side, t) for p in ("sm", "lg") for c, side, t in
          (("forward", "torch", 1e-3), ("forward", "jax", 1e-3), ("vjp", "torch", 3e-3), ("vjp", "jax", 1e-3))),
    ]
    (groups,) = _sections(load([_write(tmp_path, "b.json", benches)])).values()
    rows = {claim: (verdict, pro, con) for claim, verdict, pro, con in claim_rows(groups)}
    verdict, pro, con = rows["JAX is faster"]
    assert verdict.startswith("mixed; geomean torch/JAX ") and "first call with compile time" in verdict
    assert pro.startswith("4/10 groups JAX faster") and con.startswith("3/10 torch faster")
    assert "conv::forward::float32::cpu 0.333x" in con
    assert rows["PyTorch is faster on image models"][0].startswith("supported; ")
    assert rows["JAX's advantage is larger for autodiff-heavy work"][0].startswith("supported; ")
    verdict, pro, _ = rows["JAX uses less memory"]
    # the overall figure stands with the verdict, not under "for": there it read as evidence for JAX
    # when it favoured torch
    assert verdict == "too little evidence (1 of at least 3 groups needed); geomean torch/JAX 1.12x" and "geomean" not in pro, verdict
    assert pro.startswith("1/10 groups JAX allocates less")


def test_claims_write_a_tiny_ratio_as_a_fraction_and_head_each_section_with_its_threads(tmp_path):
    from equivcheck.bench import load, render
    from equivcheck.bench.claims import _x

    assert [_x(v) for v in (0.00187, 1e-4, 0.05, 0.5, 3.0, float("nan"), float("inf"))] == [
        "1/535x", "1/10000x", "1/20x", "0.5x", "3x", "-", "inf"]
    benches = [{**b, "extra_info": {**b["extra_info"], "threads": n}} for b, n in
               ((_bench("mm", "forward", "torch", 2e-3), 2), (_bench("mm", "forward", "jax", 1e-3), 2))]
    assert "== cpu (cpu), --equiv-precision highest, threads: torch 2, XLA 2 ==" in render(
        load([_write(tmp_path, "b.json", benches)]))


def test_a_claim_on_fewer_than_three_groups_says_too_little_evidence(tmp_path):
    # One pair whose VJP favours JAX more than its forward is no "supported" claim about autodiff.
    from equivcheck.bench import claim_rows, load
    from equivcheck.bench.claims import _sections

    benches = [_bench("mm", "forward", "torch", 2e-3), _bench("mm", "forward", "jax", 1e-3),
               _bench("mm", "vjp", "torch", 8e-3), _bench("mm", "vjp", "jax", 2e-3)]
    (groups,) = _sections(load([_write(tmp_path, "b.json", benches)])).values()
    rows = {claim: verdict for claim, verdict, _, _ in claim_rows(groups)}
    assert rows["JAX's advantage is larger for autodiff-heavy work"].startswith("too little evidence (1 of at least 3")
    assert rows["JAX is faster"].startswith("too little evidence (2 of at least 3")


def test_a_gpu_run_at_default_precision_gets_the_tf32_banner(tmp_path):
    from equivcheck.bench import load, render

    default = {"jax_default_matmul_precision": None, "matmul_allow_tf32": False, "cudnn_allow_tf32": True}
    benches = [_bench("matmul", "forward", "torch", 2.76e-3, device="gpu", precision="default", settings=default),
               _bench("matmul", "forward", "jax", 0.54e-3, device="gpu", precision="default", settings=default)]
    text = render(load([_write(tmp_path, "gpu.json", benches)]))
    assert "PRECISION MISMATCH (gpu, --equiv-precision default): float32 matmul: JAX TF32, torch full float32" in text
    assert "matmul::forward::float32::gpu" in text and "5.11x" in text
    matched = [_bench("matmul", "forward", s, m, device="gpu") for s, m in (("torch", 2.70e-3), ("jax", 2.95e-3))]
    assert "PRECISION MISMATCH" not in render(load([_write(tmp_path, "hi.json", matched)]))


@pytest.mark.parametrize(("content", "cause"), [
    ('{"benchmarks": [{"group": "x", "na', "not JSON"),
    ("[1, 2]", "not a pytest-benchmark file"),
    ('{"version": "4.0", "results": []}', "not a pytest-benchmark file"),
    ('{"benchmarks": [{"name": "test_x", "extra_info": {}, "stats": {}}]}', "was made by `pytest --equiv --equiv-bench`"),
    (('{"benchmarks": [{"fullname": "f", "extra_info": {"equivcheck": 1}, '
      '"stats": {"median": 0, "q1": 0, "q3": 0, "rounds": 5}}]}'), "has stats no timer gives (median 0"),
])
def test_claims_refuses_bad_input_in_one_line_naming_the_file(tmp_path, capsys, content, cause):
    from equivcheck.__main__ import main

    path = tmp_path / "bad.json"
    path.write_text(content)
    assert main(["claims", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"equivcheck claims: {path}: ") and cause in err and "\n" not in err


def test_claims_say_a_file_cut_inside_a_string_once_at_and_truncated(tmp_path, capsys):
    from equivcheck.__main__ import main

    path = _write(tmp_path, "cut.json", [_bench("mm", "forward", "torch", 1e-3)])
    path.write_text(path.read_text()[:60])  # inside the first benchmark's fullname
    assert main(["claims", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "not JSON: Unterminated string starting at line 1 column " in err and "at at" not in err
    assert err.endswith("; the file ends inside that string: truncated?"), err


def test_claims_sort_by_domain_and_read_an_older_files_family_as_it(tmp_path):
    # `family` is the report section (layers, operations); the image claim sorts by `domain`.
    from equivcheck.bench import claim_rows, load
    from equivcheck.bench.claims import _sections

    benches = []
    for k, op in enumerate(("conv", "pool", "resize")):
        for side, t in (("torch", 1e-3), ("jax", 2e-3)):
            b = _bench(op, "forward", side, t, family="layers")
            if k < 2:
                b["extra_info"]["domain"] = "image"
            else:  # written before `domain`: its family said image
                b["extra_info"]["family"] = "image"
            benches.append(b)
    benches += [_bench("mm", "forward", side, t, family="operations") for side, t in (("torch", 1e-3), ("jax", 2e-3))]
    (groups,) = _sections(load([_write(tmp_path, "b.json", benches)])).values()
    rows = {claim: (verdict, pro) for claim, verdict, pro, _ in claim_rows(groups)}
    verdict, pro = rows["PyTorch is faster on image models"]
    assert verdict.startswith("supported; ") and pro.startswith("3/3 image groups torch faster"), pro
    assert "mm::" not in pro


@pytest.mark.parametrize("given, named", [
    (("--equiv-bench-threads", "1"), "--equiv-bench-threads without --equiv-bench: it sets"),
    (("--equiv-bench-threads", "0"), "--equiv-bench-threads without --equiv-bench"),
    (("--equiv-bench-compile",), "--equiv-bench-compile without --equiv-bench: it sets"),
    (("--equiv-bench-compile", "--equiv-bench-threads", "1"),
     "--equiv-bench-threads and --equiv-bench-compile without --equiv-bench: they set"),
])
def test_a_benchmark_setting_without_equiv_bench_is_a_usage_error_naming_both(pytester, given, named):
    pytester.makepyfile(test_pairs=PAIRS)
    result = pytester.runpytest(*FAST, *given, "--collect-only", "-q")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert named in result.stderr.str() and "add --equiv-bench" in result.stderr.str()


def test_claims_names_a_missing_file(tmp_path, capsys):
    from equivcheck.__main__ import main

    assert main(["claims", str(tmp_path / "nope.json")]) == 2
    assert "nope.json: cannot read it" in capsys.readouterr().err


PAIRS = """
import pytest, torch, jax.numpy as jnp
import equivcheck as ec

PAIRS = ec.Registry([
    ec.Pair("tanh", torch.tanh, jnp.tanh, ec.unary(), checks=("forward", "vjp")),
    ec.Pair("tanh_bug", lambda x: torch.tanh(x) * 1.01, jnp.tanh, ec.unary(), checks=("forward",)),
])

@pytest.mark.parametrize("pair", PAIRS, ids=str)
def test_pair(pair, equiv):
    equiv.check(pair)
"""
FAST = ("--equiv", "--equiv-examples", "5", "--equiv-seed", "1", "--equiv-dtypes", "float32", "-p", "no:cacheprovider",
        "--equiv-report", "none")


def test_the_plugin_adds_one_benchmark_per_side_of_each_passing_check(pytester):
    pytester.makepyfile(test_pairs=PAIRS)
    result = pytester.runpytest(*FAST, "--equiv-bench", "--benchmark-json", "b.json", "--benchmark-max-time", "0.01",
                                "--benchmark-min-rounds", "3", "-rs")
    result.assert_outcomes(passed=5, failed=1, skipped=2)
    out = result.stdout.str()
    assert "tanh_bug::forward::float32::cpu: not timed: its equivalence check is failed" in out
    assert "benchmark 'tanh::vjp::float32::cpu': 2 tests" in out  # pytest-benchmark's own table
    data = json.loads((pytester.path / "b.json").read_text())
    by = {(b["group"], b["name"]): b for b in data["benchmarks"]}
    assert set(by) == {(f"tanh::{c}::float32::cpu", s) for c in ("forward", "vjp") for s in ("torch", "jax")}
    info = by[("tanh::vjp::float32::cpu", "jax")]["extra_info"]
    assert info["work"] == "forward+VJP" and info["precision"] == "highest" and info["compile_seconds"] > 0
    # named as its check's records name it (the report's section), not by the claims' image/sequence sort
    assert info["family"] == "operations" and info["domain"] == "other"
    assert info["shapes"] == by[("tanh::vjp::float32::cpu", "torch")]["extra_info"]["shapes"]
    assert by[("tanh::vjp::float32::cpu", "torch")]["extra_info"]["compile_seconds"] is None


def test_without_the_option_no_benchmark_item_exists(pytester):
    pytester.makepyfile(test_pairs=PAIRS)
    result = pytester.runpytest(*FAST, "--collect-only", "-q")
    assert "bench-" not in result.stdout.str()
    result = pytester.runpytest(*FAST, "--equiv-bench", "--collect-only", "-q")
    ids = [ln for ln in result.stdout.lines if "-bench-" in ln]
    assert ids[0] == "test_pairs.py::test_pair[tanh-float32-cpu-bench-forward-torch]" and len(set(ids)) == 6


def test_benchmark_items_follow_their_check_into_its_shard_and_selection(pytester):
    # Made after -k and the shard split, from the tests kept: never a benchmark whose check ran
    # on another machine ("did not run in this session"), nor a negative collection count.
    pytester.makepyfile(test_pairs=PAIRS)
    for shard in ("1/2", "2/2"):
        result = pytester.runpytest(*FAST, "--equiv-bench", "--equiv-shard", shard, "--collect-only", "-q")
        checks = [ln for ln in result.stdout.lines if "::test_pair[" in ln and "-bench-" not in ln]
        benches = [ln for ln in result.stdout.lines if "-bench-" in ln]
        assert len(checks) == 1
        assert len(benches) == (2 if "tanh_bug" in checks[0] else 4)  # forward (and VJP) x torch, jax
        assert all(b.startswith(checks[0][:-1]) for b in benches)
    result = pytester.runpytest(*FAST, "--equiv-bench", "--collect-only", "-k", "tanh_bug")
    result.stdout.fnmatch_lines(["collected 2 items / 1 deselected / 1 selected*"])


def test_benchmarks_under_xdist_are_refused_with_the_reason(pytester):
    pytester.makepyfile(test_pairs=PAIRS)
    result = pytester.runpytest(*FAST, "--equiv-bench", "-n", "2")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "pytest-benchmark turns itself off under xdist" in result.stderr.str()


def test_an_optimizer_step_is_timed_in_place_on_torch_and_carried_on_in_jax():
    import jax

    from equivcheck.bench.optim import build_step, unfit
    from equivcheck.optim import optimizer_pair

    pair = optimizer_pair("sgd_momentum", "SGD", lr=0.1, momentum=0.9)
    assert unfit(pair) == ""
    torch_wl, jax_wl = (build_step(pair, side, "float32", "cpu") for side in ("torch", "jax"))
    before = [np.asarray(x).copy() for x in jax.tree_util.tree_leaves(jax_wl.call()[0])]
    after = jax_wl.call()[0]  # the next call starts from the last one's parameters and state
    assert all(_leaves_ready(after)) and not all(
        np.array_equal(a, b) for a, b in zip(before, jax.tree_util.tree_leaves(after)))
    assert torch_wl.compile_seconds is None and jax_wl.compile_seconds > 0
    assert any("updated in place" in r for r in torch_wl.rules) and any("donated" in r for r in jax_wl.rules)
    assert unfit(pair.replace(accumulate=2)).startswith("accumulates 2 micro-batches")


def test_without_the_option_no_benchmark_code_is_even_imported(pytester):
    pytester.makepyfile(test_pairs=PAIRS)
    pytester.makeconftest("""
import sys
def pytest_sessionfinish(session):
    loaded = sorted(m for m in sys.modules if m.startswith(("equivcheck.bench", "equivcheck.benchmarking")))
    benchmarks = getattr(session.config, "_benchmarksession").benchmarks
    open("seen.txt", "w").write(repr((loaded, len(benchmarks))))
""")
    result = pytester.runpytest_subprocess(*FAST)
    result.assert_outcomes(passed=1, failed=1)
    assert (pytester.path / "seen.txt").read_text() == "([], 0)"


def test_the_sweep_repeats_the_batch_consistently_and_the_report_shows_the_growth(tmp_path):
    from equivcheck.bench import build, draw_inputs, load, render
    from equivcheck.bench.sweep import scaled
    from suites.test_layers import PAIRS

    lstm = PAIRS["nn.lstm"]
    args = draw_inputs(lstm, "float32")
    big = scaled("nn.lstm", args, 4)
    assert big[0].shape[0] == 4 * args[0].shape[0] and big[5].shape[1] == 4 * args[5].shape[1] == big[6].shape[1]
    for side in ("torch", "jax"):  # both sides run the repeated batch: the input's gradient has its shape
        grads = build(lstm, "vjp", side, big, "float32", "cpu").call()
        assert np.shape((grads["vjp"] if side == "jax" else grads)[0]) == big[0].shape
    benches = [_bench(name, "forward", side, m) for name, side, m in (
        ("matmul", "torch", 1e-3), ("matmul", "jax", 2e-3), ("matmul@x4", "torch", 3e-3), ("matmul@x4", "jax", 3e-3),
        ("matmul@x16", "torch", 9e-3), ("matmul@x16", "jax", 4.5e-3))]
    for b in benches[2:]:
        b["extra_info"]["scale"] = 4 if "x4" in b["extra_info"]["pair"] else 16
    text = render(load([_write(tmp_path, "s.json", benches)]))
    assert ("matmul::forward::float32::cpu: x1: torch 1.000 ms, jax 2.000 ms (0.50x); x4: torch 3.000 ms, "
            "jax 3.000 ms (1.00x);\n    x16: torch 9.000 ms, jax 4.500 ms (2.00x)") in text  # broken at 120 columns
    assert max(len(line) for line in text.splitlines()) <= 120
    assert "1/1 torch faster" in text  # the claims count the pair once, at its own size


SLOWED = """
import os, time
import pytest, torch, jax.numpy as jnp
import equivcheck as ec

def torch_tanh(x):
    if os.environ.get("EQUIV_TEST_SLOW"):
        time.sleep(0.003)
    return torch.tanh(x)

PAIR = ec.Pair("tanh", torch_tanh, jnp.tanh, ec.unary(), checks=("forward",))

@pytest.mark.parametrize("pair", [PAIR], ids=str)
def test_pair(pair, equiv):
    equiv.check(pair)
"""


def test_the_report_carries_the_benchmarks_and_compare_flags_a_slower_side(pytester, monkeypatch, capsys):
    from equivcheck.__main__ import main

    pytester.makepyfile(test_slowed=SLOWED)
    timing = ("--equiv-bench", "--benchmark-max-time", "0.02", "--benchmark-min-rounds", "5")
    runs = []
    for slow in ("", "1"):
        monkeypatch.setenv("EQUIV_TEST_SLOW", slow)
        pytester.runpytest(*FAST[:-2], *timing).assert_outcomes(passed=3)
        runs.append(pytester.path / f"run{len(runs)}.json")
        runs[-1].write_text((pytester.path / "reports" / "latest.json").read_text())
    new = json.loads(runs[1].read_text())
    assert {(b["group"], b["name"]) for b in new["benchmarks"]} == {("tanh::forward::float32::cpu", s)
                                                                    for s in ("torch", "jax")}
    # x10: the slowed torch side (3 ms on ~5 us) is; JAX's own wobble on a loaded machine (x2 seen) is not.
    assert main(["compare", str(runs[0]), str(runs[1]), "--speed-growth", "10"]) == 1
    out = capsys.readouterr().out
    assert "SLOWER   tanh::forward::float32::cpu torch: median" in out and " jax:" not in out
    assert main(["compare", str(runs[1]), str(runs[0]), "--speed-growth", "10"]) == 0  # faster is no regression
    assert "faster   tanh::forward::float32::cpu torch" in capsys.readouterr().out
    # The page of the run shows the claims report and the ratio bars.
    page = (pytester.path / "reports" / "latest.html").read_text()
    assert 'id="speed"' in page and "torch/JAX" in page and 'alt="torch time over JAX time per benchmark group"' in page


def test_compare_refuses_malformed_benchmarks_and_a_bad_speed_growth(tmp_path, capsys):
    from equivcheck.__main__ import main
    from equivcheck.report.runs import SCHEMA

    good = {"schema": SCHEMA, "run": {"versions": {}}, "records": []}
    bad = dict(good, benchmarks=[{"group": "g", "name": "torch", "stats": {"median": 1.0}}])
    (tmp_path / "a.json").write_text(json.dumps(good))
    (tmp_path / "b.json").write_text(json.dumps(bad))
    assert main(["compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 2
    assert "b.json: 'benchmarks' must be a list of pytest-benchmark entries" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "a.json"), str(tmp_path / "a.json"), "--speed-growth", "0.5"]) == 2
    assert "--speed-growth: '0.5' is not a finite growth factor >= 1" in capsys.readouterr().err
