"""The report: JSON schema, Markdown, the terminal grid, run-to-run comparison and its CLI."""
from __future__ import annotations

import copy
import json

import pytest

from equivcheck import report
from equivcheck.__main__ import main
from equivcheck.engine.records import CheckRecord


def rec(pair, check, outcome="passed", ratio=0.1, **kw):
    return CheckRecord(pair, check, "float32", "cpu", "highest", outcome, examples=30, worst_ratio=ratio,
                       tolerance={"rtol": 1.3e-6, "atol": 1e-5, "reason": "table"}, **kw).to_json()


RUN = {"id": "r1", "started": "2026-11-26T00:00:00+00:00", "finished": "2026-11-26T00:01:00+00:00", "seconds": 60,
       "seed": 1, "profile": "dev", "examples": 30, "palette": 4, "precision": "highest", "devices": ["cpu"],
       "versions": {"torch": "2.13.0", "jax": "0.10.2"}, "machine": report.machine(), "replay": "pytest --equiv ...",
       "unmatched_known": [{"pattern": "old::*", "reason": "r", "source": "k.txt:1"}],
       "unchecked_known": [{"pattern": "tanh::hvp", "reason": "r", "source": "k.txt:2",
                            "why": "checks this selection (-k, -m) left out"}]}


def build(*records):
    return report.build(list(records), RUN)


def test_report_json_counts_outcomes_and_sorts_records():
    r = build(rec("tanh", "vjp"), rec("exp", "forward", "failed", message="boom"), rec("abs", "vjp", "known-divergence"))
    assert r["schema"] == report.SCHEMA
    assert r["summary"] == {"passed": 1, "failed": 1, "known-divergence": 1, "xpass": 0, "skipped": 0, "total": 3}
    assert [x["id"] for x in r["records"]] == sorted(x["id"] for x in r["records"])
    json.dumps(r)  # serialisable as is


def test_infinite_ratios_survive_json():
    r = rec("exp", "forward", "failed", ratio=float("inf"))
    assert json.loads(json.dumps(r))["worst_ratio"] == "inf"


def test_markdown_has_failures_known_divergences_grid_and_stale_entries():
    md = report.markdown(build(rec("exp", "forward", "failed", message="values differ", side="jax", diagnosis="jax is off"),
                               rec("abs", "vjp", "known-divergence", known_reason="abs'(0)"), rec("tanh", "hvp")))
    assert "### `exp::forward::float32::cpu`" in md and "jax is off" in md
    assert "| `abs::vjp::float32::cpu` | known-divergence | abs'(0) |" in md
    assert "| tanh | float32 | cpu | - | - | - | ok 0.1 |" in md
    assert "matched nothing in this run:\n\n- `old::*` (k.txt:1)\n" in md
    assert "left out (not checked):\n\n- `tanh::hvp` (k.txt:2): for checks this selection (-k, -m) left out" in md


def test_an_xpass_says_why_in_the_terminal_and_the_markdown():
    from equivcheck.engine.knowns import NO_WITNESS

    xpass = [rec("abs", c, "xpass", known_pattern="abs", known_reason="abs'(0)", notes=[NO_WITNESS])
             for c in ("vjp", "jvp")]
    assert report.xpass_lines(xpass) == [
        f"XPASS abs::vjp::float32::cpu, abs::jvp::float32::cpu: known divergence 'abs' did not show: {NO_WITNESS}"]
    assert "| xpass | abs'(0) | known divergence 'abs' did not show: no witness ran" in report.markdown(build(*xpass))


def test_grid_marks_each_check():
    header, body = report.grid([rec("exp", "forward"), rec("exp", "vjp", "failed"), rec("exp", "jvp", "xpass")])
    assert header == ["pair", "dtype", "device", "forward", "vjp", "jvp", "hvp"]
    assert body == [["exp", "float32", "cpu", "ok 0.1", "FAIL", "XPASS 0.1", "-"]]


def test_write_puts_run_files_and_latest_side_by_side(tmp_path):
    json_path, md_path = report.write(build(rec("exp", "forward")), tmp_path)
    assert json_path.name == "r1.json" and md_path.name == "r1.md"
    assert json.loads((tmp_path / "latest.json").read_text())["run"]["id"] == "r1"


def test_compare_runs_flags_regressions_fixes_and_drift():
    old = build(rec("exp", "forward"), rec("tanh", "vjp", ratio=0.05), rec("gone", "forward"), rec("abs", "vjp", "failed"))
    new = copy.deepcopy(old)
    new["run"]["versions"] = {"torch": "2.14.1", "jax": "0.10.2"}
    by_id = {r["id"]: r for r in new["records"]}
    by_id["exp::forward::float32::cpu"]["outcome"] = "failed"
    by_id["tanh::vjp::float32::cpu"]["worst_ratio"] = 0.5
    by_id["abs::vjp::float32::cpu"]["outcome"] = "passed"
    new["records"] = [r for r in new["records"] if r["pair"] != "gone"] + [rec("new", "forward")]
    lines, regressed = report.compare_runs(old, new)
    text = "\n".join(lines)
    assert regressed
    assert "versions: torch 2.13.0 -> 2.14.1" in text
    assert "REGRESS  exp::forward::float32::cpu: passed -> failed" in text
    assert "changed  abs::vjp::float32::cpu: failed -> passed" in text
    assert "drift    tanh::vjp::float32::cpu: worst error/allowed 0.05 -> 0.5" in text
    assert "gone     gone::forward::float32::cpu" in text and "new      new::forward::float32::cpu" in text


def test_compare_cli_exit_codes(tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(build(rec("exp", "forward"))))
    b.write_text(json.dumps(build(rec("exp", "forward", "failed"))))
    assert main(["compare", str(a), str(a)]) == 0 and "no change" in capsys.readouterr().out
    assert main(["compare", str(a), str(b)]) == 1
    b.write_text("{}")
    assert main(["compare", str(a), str(b)]) == 2 and "schema" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["compare"])
