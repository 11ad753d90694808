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
    assert "| tanh | float32 | cpu | - | - | ok 0.1 |" in md  # columns: the checks some record has
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
    header, body = report.grid([rec("exp", "forward"), rec("exp", "vjp", "failed"), rec("exp", "jvp", "xpass"),
                                rec("tanh", "forward")])
    assert header == ["pair", "dtype", "device", "forward", "vjp", "jvp"]  # no record has hvp: no column
    assert body == [["exp", "float32", "cpu", "ok 0.1", "FAIL", "XPASS 0.1"], ["tanh", "float32", "cpu", "ok 0.1", "-", "-"]]


def test_write_puts_run_files_and_latest_side_by_side(tmp_path):
    (json_path, md_path, html_path), problems = report.write(build(rec("exp", "forward")), tmp_path)
    assert problems == ()
    assert (json_path.name, md_path.name, html_path.name) == ("r1.json", "r1.md", "r1.html")
    assert json.loads((tmp_path / "latest.json").read_text())["run"]["id"] == "r1"
    assert (tmp_path / "latest.html").read_text() == html_path.read_text()
    assert "<code>r1</code>" in html_path.read_text()


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


def test_runs_started_in_the_same_second_get_different_ids():
    import datetime as dt

    now = dt.datetime(2026, 11, 30, 12, 0, 0, tzinfo=dt.timezone.utc)
    vers = {"torch": "2.14.1+cpu", "jax": "0.10.2"}
    a, b = (report.run_id(now, vers, ["cpu"]) for _ in range(2))
    assert a != b
    assert a.startswith("20261130-120000-torch2.14.1-jax0.10.2-cpu-") and len(a.rsplit("-", 1)[1]) == 6
    assert report.run_id(now, vers, ["cpu", "gpu"], token="abc123") == "20261130-120000-torch2.14.1-jax0.10.2-cpu-gpu-abc123"


def test_a_failing_page_or_plot_costs_that_part_only(tmp_path, monkeypatch):
    """The writer rendered the page (matplotlib, Jinja2) before writing any file, so a failure there
    lost the JSON and Markdown too; latest.html of an older run must not sit beside this run's JSON."""
    (tmp_path / "latest.html").write_text("an older run's page")

    def broken(*args, **kwargs):
        raise RuntimeError("template broke")

    monkeypatch.setattr(report.files.report_html, "render", broken)
    monkeypatch.setattr(report.files.report_models, "plots", broken)
    paths, problems = report.write(build(rec("exp", "forward")), tmp_path)
    assert [p.name for p in paths] == ["r1.json", "r1.md"]
    assert json.loads((tmp_path / "r1.json").read_text())["summary"]["passed"] == 1
    assert "exp" in (tmp_path / "latest.md").read_text()
    assert problems[0] == "plots left out of r1.md: RuntimeError: template broke"
    assert problems[1].startswith("no HTML page for r1: RuntimeError: template broke (the JSON is written; "
                                  f"python -m equivcheck html {tmp_path / 'r1.json'} retries it")
    assert not (tmp_path / "r1.html").exists() and not (tmp_path / "latest.html").exists()
    monkeypatch.setattr(report.files, "markdown", broken)  # the summary too: the JSON still stands
    paths, problems = report.write(build(rec("exp", "forward")), tmp_path / "md")
    assert [p.name for p in paths] == ["r1.json"] and problems[1].startswith("no Markdown summary for r1")
    assert sorted(p.name for p in (tmp_path / "md").iterdir()) == ["latest.json", "r1.json"]


def test_latest_never_moves_back_to_an_earlier_run(tmp_path):
    """Recovering an old run's journal wrote its report as latest.*, over a newer complete run's."""
    newer = build(rec("exp", "forward"))
    newer["run"] = {**RUN, "id": "r2", "started": "2026-11-27T00:00:00+00:00"}
    report.write(newer, tmp_path)
    paths, problems = report.write(build(rec("tanh", "forward")), tmp_path)
    assert paths[0].name == "r1.json" and paths[0].exists()
    assert problems == (("latest.* left on the run started 2026-11-27T00:00:00+00:00: this run started earlier "
                         "(2026-11-26T00:00:00+00:00)"),)
    assert json.loads((tmp_path / "latest.json").read_text())["run"]["id"] == "r2"


def test_runs_writing_into_one_directory_at_once_lose_no_report(tmp_path):
    """A temporary name shared by all writers (latest.json.tmp) let one run rename another's file
    away, and the other then died on its own vanished one (FileNotFoundError)."""
    import threading

    errors, ids = [], [f"r{k}" for k in range(4)]

    def run(run_id):
        rep = build(rec("exp", "forward"))
        rep["run"] = {**RUN, "id": run_id}  # a copy: build() shares RUN itself
        try:
            for _ in range(30):
                report.write(rep, tmp_path)
        except OSError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert json.loads((tmp_path / "latest.json").read_text())["run"]["id"] in ids
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"{i}.{ext}" for i in ids for ext in ("json", "md", "html")] + ["latest.json", "latest.md", "latest.html"])  # no temporaries left


@pytest.mark.parametrize("where, cause", [
    ("afile/reports", "afile is a file, not a directory"),
    ("/dev/null", "/dev/null is not a directory"),
    ("/proc/equivcheck-reports", "cannot create /proc/equivcheck-reports (No such file or directory)"),
])
def test_an_unwritable_report_directory_is_named_with_its_cause(tmp_path, monkeypatch, where, cause):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("")
    assert report.files.check_writable(where) == cause
    with pytest.raises(OSError) as exc:
        report.write(build(rec("exp", "forward")), where)
    assert report.files.unwritable(where, exc.value) == cause


def test_checking_a_report_directory_creates_it_and_leaves_no_file_in_it(tmp_path):
    assert report.files.check_writable(tmp_path / "a" / "b") == ""
    assert [p.relative_to(tmp_path).as_posix() for p in sorted(tmp_path.rglob("*"))] == ["a", "a/b"]


PARTIAL = {"interrupted": True, "partial": {"ran": 1, "collected": 3}}


def test_a_partial_run_says_so_in_the_markdown():
    whole = build(rec("exp", "forward"))
    assert "Partial run" not in report.markdown(whole)
    whole["run"] = {**RUN, **PARTIAL}
    assert ("> **Partial run** (interrupted; partial: 1 of 3 collected tests ran): checks that did not run are absent"
            in report.markdown(whole))


@pytest.mark.parametrize("run, text", [
    ({}, ""),
    ({"interrupted": False, "partial": None}, ""),
    (PARTIAL, "interrupted; partial: 1 of 3 collected tests ran"),
    ({"interrupted": False, "partial": {"ran": 2, "collected": 3}}, "stopped early; partial: 2 of 3 collected tests ran"),
    ({**PARTIAL, "stuck": "the torch side ..."}, "interrupted (a side was stuck); partial: 1 of 3 collected tests ran"),
    ({"interrupted": True, "partial": {"ran": 0, "collected": None}},
     "interrupted; partial: 0 tests ran, collection did not finish"),
    ({"interrupted": True}, "interrupted"),  # a report of an older version
])
def test_partial_text(run, text):
    assert report.runs.partial_text(run) == text


def test_compare_refuses_a_partial_run_unless_allowed(tmp_path, capsys):
    full, part = tmp_path / "full.json", tmp_path / "partial.json"
    full.write_text(json.dumps(build(rec("exp", "forward"), rec("tanh", "forward"))))
    cut = build(rec("exp", "forward"))
    cut["run"] = {**RUN, **PARTIAL}
    part.write_text(json.dumps(cut))
    for args in ([str(full), str(part)], [str(part), str(full)]):
        assert main(["compare", *args]) == 3
        err = capsys.readouterr().err
        assert err == (f"equivcheck compare: {part}: a partial run (interrupted; partial: 1 of 3 collected tests ran); "
                       "compare complete runs, or pass --allow-partial\n")
    assert main(["compare", str(full), str(part), "--allow-partial"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == ("PARTIAL  new run r1: interrupted; partial: 1 of 3 collected tests ran; "
                      "checks it did not run show as gone or new")
    assert "gone     tanh::forward::float32::cpu (was passed)" in out
    cut["run"]["partial"] = "1 of 3"
    part.write_text(json.dumps(cut))
    assert main(["compare", str(full), str(part)]) == 2
    assert "'run.partial' must be null or an object with 'ran'" in capsys.readouterr().err
