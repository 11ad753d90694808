"""--equiv-timeout: a side that does not return fails its check naming the side, with its stack,
and the run goes on; a side stuck in C code that ignores signals ends the run with the report
written; the option's bad values are usage errors."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests import preload  # noqa: F401 - frameworks loaded before pytester (tests/preload.py)

ROOT = Path(__file__).resolve().parents[1]
FAST = ("--equiv-examples", "3", "--equiv-seed", "1", "--equiv-dtypes", "float32", "-p", "no:cacheprovider",
        "--equiv-jax-cache", "none")

HANGS = """
import time
import pytest, torch, jax.numpy as jnp
import equivcheck as ec

def {name}(x):
    time.sleep(10**6)
    return {framework}.tanh(x)

PAIRS = [
    ec.Pair("hangs", {torch_fn}, {jax_fn}, ec.unary(), checks=("forward",)),
    ec.Pair("quick", torch.tanh, jnp.tanh, ec.unary(), checks=("forward",)),
]

@pytest.mark.parametrize("pair", PAIRS, ids=str)
def test_pair(pair, equiv):
    equiv.check(pair)
"""

# --equiv-timeout 2, as the failure states it: alone, or after the limit a load extension gave
# (a loaded machine, as the test suite under -n 2 makes it)
WITHIN_2S = r"(?:2 s \(--equiv-timeout\)|[\d.]+ s \(--equiv-timeout 2 s, extended [\d.]+x because [^\n]*? cores?\)\))"


def _project(pytester: pytest.Pytester, side: str) -> pytest.Pytester:
    if side == "torch":
        code = HANGS.format(name="sleepy_tanh", framework="torch", torch_fn="sleepy_tanh", jax_fn="jnp.tanh")
    else:  # a Python-level sleep in the jax function runs while JAX traces it
        code = HANGS.format(name="sleepy_tanh", framework="jnp", torch_fn="torch.tanh", jax_fn="sleepy_tanh")
    pytester.makepyfile(test_hangs=code)
    return pytester


def _failure(out: str) -> str:
    return out[out.index("hangs::forward::float32::cpu [precision highest] failed"):]


@pytest.mark.parametrize("side, shapes", [("torch", "4"), ("jax", "4"), ("jax", "0")],
                         ids=["torch", "jax-compile-thread", "jax-checking-thread"])
def test_a_hanging_side_fails_its_check_with_its_stack_and_the_run_goes_on(pytester, side, shapes):
    """With shapes drawn from a palette JAX traces on the background compile thread (the checking
    thread waits for it); with --equiv-shapes 0 it traces on the checking thread."""
    _project(pytester, side)
    start = time.monotonic()
    result = pytester.runpytest("--equiv", *FAST, "--equiv-timeout", "2", "--equiv-shapes", shapes)
    took = time.monotonic() - start
    result.assert_outcomes(passed=1, failed=1)
    out = result.stdout.str()
    failure = _failure(out)
    assert re.search(rf"the {side} side did not return within {WITHIN_2S}", failure), failure
    assert "sleepy_tanh" in failure and "time.sleep(10**6)" in failure  # the stuck side's stack
    assert "--equiv-timeout 2" in re.search(r"replay: (pytest .*)", failure).group(1)
    rec = {r["id"]: r for r in json.loads((pytester.path / "reports" / "latest.json").read_text())["records"]}
    assert rec["hangs::forward::float32::cpu"]["kind"] == "timeout"
    assert rec["hangs::forward::float32::cpu"]["side"] == side
    assert rec["quick::forward::float32::cpu"]["outcome"] == "passed"
    assert took < 60, took  # one limit per hanging call, no shrinking over it


def test_the_limit_is_off_with_zero_and_a_bad_value_is_a_usage_error(pytester):
    pytester.makepyfile(test_quick="""
import pytest, torch, jax.numpy as jnp
import equivcheck as ec

@pytest.mark.parametrize("pair", [ec.Pair("quick", torch.tanh, jnp.tanh, ec.unary(), checks=("forward",))], ids=str)
def test_pair(pair, equiv):
    equiv.check(pair)
""")
    pytester.runpytest("--equiv", *FAST, "--equiv-timeout", "0").assert_outcomes(passed=1)
    for bad in ("-1", "abc", "nan"):
        result = pytester.runpytest("--equiv", *FAST, "--equiv-timeout", bad)
        assert result.ret == pytest.ExitCode.USAGE_ERROR, (bad, result.stdout.str(), result.stderr.str())
        assert "--equiv-timeout" in result.stdout.str() + result.stderr.str()


STUCK_IN_C = """
import signal, time
import pytest, torch, jax.numpy as jnp
import equivcheck as ec

def deaf_tanh(x):
    # a C call that ignores signals: with SIGALRM blocked, nothing reaches this sleep
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    time.sleep(10**6)
    return torch.tanh(x)

PAIRS = [
    ec.Pair("quick", torch.tanh, jnp.tanh, ec.unary(), checks=("forward",)),
    ec.Pair("deaf", deaf_tanh, jnp.tanh, ec.unary(), checks=("forward",)),
]

@pytest.mark.parametrize("pair", PAIRS, ids=str)
def test_pair(pair, equiv):
    equiv.check(pair)
"""


def test_a_side_stuck_in_c_ends_the_run_with_the_report_written(tmp_path):
    (tmp_path / "test_deaf.py").write_text(STUCK_IN_C)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "pytest", "test_deaf.py", "--equiv", *FAST, "--equiv-timeout", "2"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == pytest.ExitCode.INTERRUPTED, out
    assert re.search(rf"the torch side did not return within {WITHIN_2S}, nor 5 s later", out), out
    assert "time.sleep(10**6)" in out
    rep = json.loads((tmp_path / "reports" / "latest.json").read_text())
    assert rep["run"]["interrupted"] is True and "deaf_tanh" in rep["run"]["stuck"]
    assert rep["run"]["partial"] == {"ran": 1, "collected": 2}  # the stuck test never reached an outcome
    assert "PARTIAL RUN: interrupted; partial: 1 of 2 collected tests ran" in out
    outcomes = {r["id"]: r["outcome"] for r in rep["records"]}
    assert outcomes == {"quick::forward::float32::cpu": "passed", "deaf::forward::float32::cpu": "failed"}


def test_off_the_main_thread_a_python_loop_is_interrupted():
    from equivcheck.backends import deadline

    caught: list[BaseException] = []

    def spin() -> None:
        with deadline.limit(1):
            try:
                with deadline.side("jax"):
                    while True:
                        sum(range(10))
            except deadline.SideTimeout as exc:
                caught.append(exc)

    thread = threading.Thread(target=spin)
    thread.start()
    thread.join(30)
    assert not thread.is_alive() and caught
    assert caught[0].side == "jax" and "sum(range(10))" in caught[0].describe()


def test_calls_ending_at_the_limit_leave_the_watchdog_working():
    """Calls that end just before or just after the limit, on the main thread (signal) and on
    another (an exception raised into it): each either returns or raises SideTimeout naming its
    side, nothing is raised outside a call, and no call is taken for stuck afterwards."""
    from equivcheck.backends import deadline

    seconds = 0.01
    stuck: list[BaseException] = []
    counts = {}

    def calls(side: str) -> None:
        counts[side] = [0, 0]
        with deadline.limit(seconds, stuck.append):
            for i in range(200):
                try:
                    with deadline.side(side):
                        end = time.perf_counter() + seconds * (1 + (i % 5 - 2) / 10)
                        while time.perf_counter() < end:
                            pass
                    counts[side][0] += 1
                except deadline.SideTimeout as exc:
                    assert exc.side == side
                    counts[side][1] += 1

    calls("torch")
    thread = threading.Thread(target=calls, args=("jax",))
    thread.start()
    thread.join(60)
    assert not thread.is_alive()
    time.sleep(deadline.grace(seconds) + 1)  # a guard left armed would be reported stuck by now
    assert not stuck, stuck
    assert sum(counts["torch"]) == sum(counts["jax"]) == 200


def _loaded(monkeypatch: pytest.MonkeyPatch, load: float, cores: int = 2) -> None:
    from equivcheck.backends import deadline

    monkeypatch.setattr(deadline.os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(deadline.os, "sched_getaffinity", lambda pid: set(range(cores)))


@pytest.mark.parametrize("load, factor", [(0.5, 1.0), (2.0, 1.0), (8.0, 4.0), (100.0, 8.0)])
def test_the_limit_stretches_by_the_load_per_core_and_no_further_than_its_cap(monkeypatch, load, factor):
    from equivcheck.backends import deadline

    _loaded(monkeypatch, load)
    got, why = deadline.load_stretch()
    assert got == factor == min(deadline.MAX_STRETCH, max(1.0, load / 2))
    assert (why == "") == (factor == 1.0)
    if why:
        assert f"load average {load:.1f} on 2 cores" in why


@pytest.mark.parametrize("on_main_thread", [True, False], ids=["signal", "raised-into-thread"])
def test_a_slow_call_on_an_oversubscribed_machine_is_not_taken_for_a_hang(monkeypatch, on_main_thread):
    """The kind behind a seed sweep whose every lstm/encoder check read 'did not return within
    60 s' at load average 10 on 2 cores, and passed when replayed alone: the same call, 3x its
    limit, fails on an idle machine and returns on one loaded 4x per core."""
    from equivcheck.backends import deadline

    def call(load: float) -> BaseException | None:
        _loaded(monkeypatch, load)
        outcome: list[BaseException | None] = []

        def run() -> None:
            with deadline.limit(0.2):
                try:
                    with deadline.side("torch"):
                        end = time.perf_counter() + 0.6
                        while time.perf_counter() < end:
                            sum(range(10))
                    outcome.append(None)
                except deadline.SideTimeout as exc:
                    outcome.append(exc)

        if on_main_thread:
            run()
        else:
            thread = threading.Thread(target=run)
            thread.start()
            thread.join(30)
        return outcome[0]

    assert call(load=8.0) is None
    idle = call(load=0.1)
    assert isinstance(idle, deadline.SideTimeout) and "extended" not in idle.describe()


def test_a_hang_on_a_loaded_machine_still_fails_and_says_the_limit_was_extended(monkeypatch):
    from equivcheck.backends import deadline

    _loaded(monkeypatch, 4.0)
    start = time.monotonic()
    with deadline.limit(0.2), pytest.raises(deadline.SideTimeout) as caught, deadline.side("jax"):
        time.sleep(30)
    assert 0.35 < time.monotonic() - start < 10
    text = caught.value.describe()
    # the limit the call really had first (a user read "within 0.2 s" of a call cut off after 0.4 s)
    assert text.startswith("the jax side did not return within 0.4 s (--equiv-timeout 0.2 s, extended 2.0x because "
                           "the machine was oversubscribed (load average 4.0 on 2 cores))"), text


def test_waiting_on_the_compile_thread_stretches_the_same_way(monkeypatch):
    from concurrent import futures

    from equivcheck.backends import deadline

    with futures.ThreadPoolExecutor(1) as pool:
        _loaded(monkeypatch, 8.0)
        with deadline.limit(0.2):
            assert deadline.wait(pool.submit(lambda: time.sleep(0.5) or 7), "jax", None) == 7
        _loaded(monkeypatch, 0.1)
        with deadline.limit(0.2), pytest.raises(deadline.SideTimeout) as caught:
            deadline.wait(pool.submit(time.sleep, 0.5), "jax", None)
        assert caught.value.side == "jax"


def test_the_extended_limit_is_stated_as_the_factor_shown_gives_it(monkeypatch):
    """The factor was printed rounded (1.4x) while the limit used it unrounded (82.2 s of 60 s), and
    a limit of 1000 s or more read 1.2e+03."""
    from equivcheck.backends import deadline

    _loaded(monkeypatch, 2.74)
    factor, why = deadline.load_stretch()
    assert factor == 1.4 and "extended 1.4x" in why
    text = deadline.SideTimeout("torch", 60.0, stretch=why, factor=factor).describe()
    assert text.startswith("the torch side did not return within 84 s (--equiv-timeout 60 s, extended 1.4x"), text
    assert "within 1200 s (--equiv-timeout 300 s" in deadline.SideTimeout("jax", 300.0, stretch=why, factor=4.0).describe()
