"""Ctrl-C while the JAX side hangs at trace time ends the run promptly, with the report
written and marked interrupted."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

HANGS = """
import time
from pathlib import Path
import pytest, torch, jax.numpy as jnp
import equivcheck as ec

def slow_tanh(x):
    Path("tracing").touch()  # Python runs only while JAX traces: once per shape
    time.sleep(300)  # a hang: far longer than any prompt exit, even on a loaded machine
    return jnp.tanh(x)

PAIRS = [
    ec.Pair("quick", torch.tanh, jnp.tanh, ec.unary(), checks=("forward",)),
    ec.Pair("hangs", torch.tanh, slow_tanh, ec.unary(), checks=("forward",)),
]

@pytest.mark.parametrize("pair", PAIRS, ids=str)
def test_pair(pair, equiv):
    equiv.check(pair)
"""


# The run as a terminal starts it. A background job of a non-interactive shell (`cmd &`, as a CI
# script may start this suite) inherits SIGINT ignored, and Python then never raises
# KeyboardInterrupt: the Ctrl-C below would be lost. The child restores the default handler
# itself (a preexec_fn would fork a multithreaded JAX process and run Python in the child).
PYTEST_WITH_SIGINT = ("import signal, sys, pytest; signal.signal(signal.SIGINT, signal.default_int_handler); "
                      "sys.exit(pytest.main(sys.argv[1:]))")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_one_ctrl_c_or_sigterm_ends_a_run_hanging_in_jax_tracing(tmp_path, signum):
    """SIGTERM (kill, a CI job's timeout) used to end the process at once: no summary, no report."""
    (tmp_path / "test_hangs.py").write_text(HANGS)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", PYTEST_WITH_SIGINT, "test_hangs.py", "--equiv",
                             "--equiv-examples", "3", "--equiv-dtypes", "float32", "--equiv-seed", "1",
                             "-p", "no:cacheprovider", "--equiv-jax-cache", "none"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while not (tmp_path / "tracing").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate(timeout=10)[0]
            time.sleep(0.2)
        time.sleep(1.0)  # the checking thread now waits on the hanging trace, or traces itself
        proc.send_signal(signum)
        sent = time.monotonic()
        out, _ = proc.communicate(timeout=60)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 2, out  # pytest's "interrupted"
    # "Promptly" against a hang of 300 s: a 2-core box under 4 extra busy loops took ~11 s to write
    # the report and exit.
    assert took < 30, (took, out)
    assert "KeyboardInterrupt" in out
    if signum == signal.SIGTERM:
        assert "SIGTERM: the run was asked to stop" in out, out
    # the interrupt may come while "quick" still runs (under load "hangs" is traced ahead, on
    # the compile thread): the report is written and marked whether or not a record was filed
    run = json.loads((tmp_path / "reports" / "latest.json").read_text())["run"]
    assert run["interrupted"] is True
    assert run["partial"]["collected"] == 2 and run["partial"]["ran"] < 2  # "hangs" never finished
