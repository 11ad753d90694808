"""The command line on bad input: exit 2 and one line naming the path and the reason; exit 1
stays reserved for "the two checkpoints differ" / "a run regressed"."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("safetensors", reason="pip install 'equivcheck[checkpoints]'")
pytest.importorskip("orbax.checkpoint", reason="pip install 'equivcheck[checkpoints]'")

from equivcheck.__main__ import main  # noqa: E402
from equivcheck.checkpoints import formats as ck  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def one_line(capsys, code, *names):
    out = capsys.readouterr()
    err = out.err.strip()
    assert code == 2, (code, out.err)
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for name in names:
        assert str(name) in err, err
    return err


@pytest.fixture
def src(tmp_path):
    return ck.save({"a.w": np.arange(3, dtype=np.float32)}, tmp_path / "a.safetensors")


def test_convert_under_a_regular_file(tmp_path, capsys, src):
    (tmp_path / "plain").write_text("x")
    dst = tmp_path / "plain" / "x.safetensors"
    err = one_line(capsys, main(["convert", str(src), str(dst)]), dst)
    assert "plain is a file, not a directory" in err


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc, where nobody can create files")
def test_convert_into_proc(capsys, src):
    err = one_line(capsys, main(["convert", str(src), "/proc/x.safetensors"]), "/proc/x.safetensors")
    assert "cannot write in /proc" in err


def test_convert_to_orbax_over_a_regular_file(tmp_path, capsys, src):
    (tmp_path / "plain").write_text("keep me")
    err = one_line(capsys, main(["convert", str(src), str(tmp_path / "plain"), "--to", "orbax", "--overwrite"]),
                   tmp_path / "plain")
    assert "is a file" in err and "orbax checkpoints are directories" in err
    assert (tmp_path / "plain").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "plain"]


@pytest.mark.parametrize("dst, fmt", [("notes", "orbax"), ("notes.safetensors", "safetensors")])
def test_overwrite_replaces_only_a_checkpoint(tmp_path, capsys, src, dst, fmt):
    # a directory of the user's notes (or a file that only shares the suffix) is never deleted
    target = tmp_path / dst
    if fmt == "orbax":
        target.mkdir()
        (target / "notes.txt").write_text("precious")
    else:
        target.write_text("precious")
    err = one_line(capsys, main(["convert", str(src), str(target), "--to", fmt, "--overwrite"]), target)
    assert f"is not a checkpoint in the {fmt} format" in err and "remove it first" in err
    kept = target / "notes.txt" if fmt == "orbax" else target
    assert kept.read_text() == "precious"
    assert main(["convert", str(src), str(tmp_path / "again.safetensors")]) == 0  # a real one
    assert main(["convert", str(src), str(tmp_path / "again.safetensors"), "--overwrite"]) == 0
    capsys.readouterr()


def report(**kw):
    return {"schema": "equivcheck.report/1", "records": [], "run": {"versions": {}}, **kw}


@pytest.mark.parametrize("content, reason", [
    (None, "Is a directory"),
    ("missing", "No such file"),
    (b"\xff\xfe{}", "not UTF-8"),
    ("{not json", "not JSON"),
    ('{"schema": "equivcheck.report/1", "records": [', "the file ends there: truncated?"),
    ("[1, 2]", "not a report"),
    (json.dumps({"a": 1}), "schema"),
    (json.dumps(report(records=5)), "records"),
    (json.dumps(report(records=[{"id": "x"}])), "records"),
    (json.dumps(report(run=[])), "run"),
])
def test_compare_refuses_a_bad_report_in_one_line(tmp_path, capsys, content, reason):
    good = tmp_path / "good.json"
    good.write_text(json.dumps(report()))
    bad = tmp_path / "bad.json"
    if content is None:
        bad.mkdir()
    elif isinstance(content, bytes):
        bad.write_bytes(content)
    elif content != "missing":
        bad.write_text(content)
    for args in ([bad, good], [good, bad]):
        err = one_line(capsys, main(["compare", *map(str, args)]), bad)
        assert reason in err, err
    assert main(["compare", str(good), str(good)]) == 0


def test_a_report_cut_inside_a_string_says_where_the_string_starts_and_that_it_was_cut(tmp_path, capsys):
    # json says "Unterminated string starting at" with the place following: once "at", and the
    # file ends inside that string even though the parser's position is where it started.
    cut = tmp_path / "cut.json"
    cut.write_text('{"schema": "equivcheck.report/1", "records": [{"id": "tanh::forw')  # the id opens at column 54
    for command in (["compare", str(cut), str(cut)], ["html", str(cut)], ["merge", str(cut), "-o", "x.json"]):
        err = one_line(capsys, main(command), cut)
        assert "not JSON (Unterminated string starting at line 1 column 54; the file ends inside that string: " \
               "truncated?)" in err, err
        assert "at at" not in err


RECORD = {"id": "tanh::vjp::float32::cpu", "outcome": "passed", "worst_ratio": 0.1, "seconds": 0.5, "examples": 3,
          "pair": "tanh", "check": "vjp", "dtype": "float32", "device": "cpu", "notes": []}


@pytest.mark.parametrize("edit, says", [
    ({"worst_ratio": "abc"}, ("records[1] (tanh::vjp::float32::cpu): field 'worst_ratio' is 'abc', not a number, "
                              'null or "inf"')),
    ({"worst_ratio": True}, "field 'worst_ratio' is True, not a number"),
    ({"max_abs_err": [1.0]}, "field 'max_abs_err' is [1.0], not a number"),
    ({"seconds": "fast"}, "records[1] (tanh::vjp::float32::cpu): field 'seconds' is 'fast', not a finite number of seconds"),
    ({"seconds": -1}, "field 'seconds' is -1, not a finite number of seconds >= 0"),
    ({"examples": 2.5}, "field 'examples' is 2.5, not a whole number >= 0"),
    ({"outcome": "pased"}, "field 'outcome' is 'pased', not one of passed, failed, known-divergence, xpass, skipped"),
    ({"pair": 3}, "field 'pair' is 3, not a string"),
    ({"notes": "one"}, "field 'notes' is 'one', not a list of strings"),
    ({"id": "exp::vjp::float32::cpu"}, ("records[1] (exp::vjp::float32::cpu): id exp::vjp::float32::cpu is also "
                                        "records[0]'s: one record per check")),
])
def test_compare_refuses_a_record_edited_by_hand_naming_the_record_and_the_field(tmp_path, capsys, edit, says):
    good = tmp_path / "good.json"
    good.write_text(json.dumps(report(records=[dict(RECORD, id="exp::vjp::float32::cpu", pair="exp"), RECORD])))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(report(records=[dict(RECORD, id="exp::vjp::float32::cpu", pair="exp"),
                                              dict(RECORD, **edit)])))
    assert main(["compare", str(good), str(good)]) == 0
    capsys.readouterr()
    err = one_line(capsys, main(["compare", str(good), str(bad)]), bad)
    assert f"{bad}: " in err and says in err, err
    # what an infinite or NaN ratio is written as (CheckRecord.to_json) is no edit
    fine = tmp_path / "fine.json"
    fine.write_text(json.dumps(report(records=[dict(RECORD, worst_ratio="inf", max_abs_err=None)])))
    assert main(["compare", str(good), str(fine)]) == 0


@pytest.mark.parametrize("stats, says", [
    ({"median": "1.0", "q1": 0.9, "q3": 1.1}, ("benchmarks[0] (g::forward::float32::cpu torch): field 'stats.median' "
                                               "is '1.0', not a finite number")),
    ({"median": 1.0, "q1": True, "q3": 1.1}, "field 'stats.q1' is True, not a finite number"),
    ({"median": 1.0, "q1": 0.9}, "field 'stats.q3' missing"),
])
def test_compare_refuses_a_benchmark_edited_by_hand_naming_it_and_the_field(tmp_path, capsys, stats, says):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(report(benchmarks=[{"group": "g::forward::float32::cpu", "name": "torch",
                                                  "stats": stats}])))
    err = one_line(capsys, main(["compare", str(bad), str(bad)]), bad)
    assert says in err, err


@pytest.mark.parametrize("growth", ["-1", "nan", "0.5", "inf", "abc"])
def test_compare_refuses_a_bad_growth_factor_in_one_line(tmp_path, capsys, growth):
    good = tmp_path / "good.json"
    good.write_text(json.dumps(report()))
    err = one_line(capsys, main(["compare", str(good), str(good), "--growth", growth]), "--growth", growth)
    assert "growth factor >= 1" in err, err
    for fine in ("1", "2.5"):
        assert main(["compare", str(good), str(good), "--growth", fine]) == 0


def corrupt_orbax(tmp_path):
    path = ck.save({"a.w": np.arange(3, dtype=np.float32)}, tmp_path / "ckpt_orbax")
    victim = path / "manifest.ocdbt"
    victim.write_bytes(victim.read_bytes()[:20])
    return path


def test_a_corrupt_orbax_checkpoint_is_one_short_line(tmp_path, capsys):
    path = corrupt_orbax(tmp_path)
    err = one_line(capsys, main(["convert", str(path), str(tmp_path / "o.safetensors")]), path)
    assert "manifest.ocdbt" in err and "(ValueError)" in err and "tensorstore_spec" not in err
    assert len(err) < 300, err
    assert main(["convert", str(path), str(tmp_path / "o.safetensors"), "-v"]) == 2
    assert "tensorstore_spec" in capsys.readouterr().err  # the whole story, when asked for


def test_a_corrupt_orbax_checkpoint_in_a_fresh_process(tmp_path):
    """Nothing after the line either: Orbax's event loop must not print on the way out."""
    path = corrupt_orbax(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "equivcheck", "convert", str(path), str(tmp_path / "o.safetensors")],
                          capture_output=True, text=True, env=env, timeout=120)
    lines = [ln for ln in done.stderr.splitlines() if ln.strip() and "WARNING" not in ln]
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith("equivcheck convert: ") and str(path) in lines[0]


SLOW_CONVERT = """
import sys, time
from pathlib import Path
from equivcheck.__main__ import main
from equivcheck.checkpoints import formats

write = formats._SAVE["safetensors"]

def slow(state, path):  # the real writer, then a wait with the partial on disk
    write(state, path)
    Path(sys.argv[3]).touch()
    time.sleep(120)

formats._SAVE["safetensors"] = slow
sys.exit(main(["convert", sys.argv[1], sys.argv[2]]))
"""


def _partials(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".partial"))


def test_sigterm_during_convert_leaves_no_partial(tmp_path, src):
    dst, writing = tmp_path / "out.safetensors", tmp_path / "writing"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CONVERT, str(src), str(dst), str(writing)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(1200):
            if writing.exists() or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert writing.exists(), proc.communicate(timeout=30)
        (partial,) = _partials(tmp_path)
        assert partial.startswith(f".out.safetensors.{proc.pid}.")  # the writer's PID, for a later run
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "terminated (SIGTERM); no partial output left behind" in err and "Traceback" not in err
    assert _partials(tmp_path) == [] and not dst.exists()


def test_a_stale_partial_of_a_dead_process_is_removed_by_the_next_convert(tmp_path, capsys, src):
    dead_pid = _pid_of_ended_process()
    stale = tmp_path / f".out.safetensors.{dead_pid}.abcd1234.partial"
    (stale / "out.safetensors").mkdir(parents=True)
    live = tmp_path / f".out.safetensors.{os.getpid()}.efgh5678.partial"  # this process: still at work
    live.mkdir()
    other = tmp_path / f".other.safetensors.{dead_pid}.ijkl9012.partial"  # another destination's
    other.mkdir()
    assert main(["convert", str(src), str(tmp_path / "out.safetensors")]) == 0
    err = capsys.readouterr().err
    assert f"removed a stale partial conversion {stale} left by process {dead_pid}, which is no longer running" in err
    assert len(err.strip().splitlines()) == 1, err
    assert _partials(tmp_path) == sorted([live.name, other.name])


def _pid_of_ended_process() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid
