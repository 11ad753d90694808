"""A run that ends while the next test's JAX program compiles in the background leaves with
pytest's own status. It used to abort: the compile thread, a daemon inside XLA, came back
during the interpreter's shutdown and took the process down with SIGABRT (exit 134,
"terminate called after throwing an instance of ''")."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# "first" ends the run (-x, or Ctrl-C) as soon as the compile thread is inside XLA's compiler,
# compiling "heavy" (about 2 s on the 2-core CI box); the marker file says it got there.
ENDS_WHILE_COMPILING = """
import os, sys, threading, time
from pathlib import Path
import pytest, torch, jax.numpy as jnp
import equivcheck as ec

def heavy_torch(x):
    for i in range(30):
        x = torch.sin(x) * torch.cos(x) + torch.tanh(x * (i + 1))
    return x

def heavy_jax(x):
    for i in range(30):
        x = jnp.sin(x) * jnp.cos(x) + jnp.tanh(x * (i + 1))
    return x

PAIRS = [ec.Pair("first", torch.tanh, jnp.tanh, ec.unary(), checks=("forward",)),
         ec.Pair("heavy", heavy_torch, heavy_jax, ec.unary())]

def compiling():
    compiler = os.path.join("jax", "_src", "compiler.py")
    for t in threading.enumerate():
        frame = sys._current_frames().get(t.ident)
        if t.name.startswith("equivcheck-precompile") and frame is not None:
            return frame.f_code.co_filename.endswith(compiler)
    return False

@pytest.mark.parametrize("pair", PAIRS, ids=str)
def test_pair(pair, equiv):
    if pair.name == "first":
        end = time.monotonic() + 60
        while not compiling() and time.monotonic() < end:
            time.sleep(0.002)
        if compiling():
            Path("compiling").touch()
        if os.environ.get("EQUIV_TEST_CTRL_C"):
            raise KeyboardInterrupt
        pytest.fail("stops the run")
    equiv.check(pair)
"""


@pytest.mark.parametrize("how, status", [("-x", pytest.ExitCode.TESTS_FAILED),
                                         ("ctrl-c", pytest.ExitCode.INTERRUPTED)])
def test_a_run_ending_while_jax_compiles_in_the_background_exits_with_pytests_status(tmp_path, how, status):
    (tmp_path / "test_ends.py").write_text(ENDS_WHILE_COMPILING)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if how == "ctrl-c":
        env["EQUIV_TEST_CTRL_C"] = "1"
    proc = subprocess.run([sys.executable, "-m", "pytest", "test_ends.py", "--equiv", "-x", "--equiv-dtypes", "float32",
                           "--equiv-seed", "1", "-p", "no:cacheprovider", "--equiv-jax-cache", "none"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240, check=False)
    out = proc.stdout + proc.stderr
    assert (tmp_path / "compiling").exists(), out  # the run did end during the compile
    assert "terminate called" not in out
    assert proc.returncode == status, out


def test_a_sessions_end_drops_its_queued_compilations_and_leaves_a_busy_thread_behind(monkeypatch):
    from equivcheck.backends import jax as jax_side
    from equivcheck.backends import worker

    monkeypatch.setattr(worker, "_STATUS", [])  # this process's own exit status stays pytest's
    release, started = threading.Event(), threading.Event()

    def busy() -> str:
        started.set()
        release.wait(30)
        return threading.current_thread().name

    try:
        running = jax_side.background(busy)
        queued = jax_side.background(threading.current_thread)
        assert started.wait(30)
        jax_side.session_ended(pytest.ExitCode.TESTS_FAILED)
        assert queued.cancelled() and worker._STATUS == [pytest.ExitCode.TESTS_FAILED]
        # the next session's work does not wait behind the call still running
        assert jax_side.background(threading.current_thread).result(timeout=30) is not running.worker.thread
    finally:
        release.set()
    assert running.result(timeout=30).startswith("equivcheck-precompile")
