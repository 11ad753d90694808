"""The HTML report page: a table per kind of check, failures with their diagnosis, plots, the
partial-run banner, nothing fetched from a network; rendered in headless Chromium where it is
installed (.ci/run installs Debian's `chromium`); and the terminal summary split by kind."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from equivcheck import report
from equivcheck.engine.kind import FAMILIES
from equivcheck.engine.records import CheckRecord
from equivcheck.report import html as report_html
from tests import preload  # noqa: F401 - frameworks loaded before pytester (tests/preload.py)

RUN = {"id": "r-html", "started": "2026-11-30T00:00:00+00:00", "finished": "2026-11-30T00:02:00+00:00",
       "seconds": 120, "seed": 7, "profile": "dev", "examples": 10, "palette": 4, "precision": "highest",
       "devices": ["cpu"], "versions": {"torch": "2.14.1", "jax": "0.10.2"}, "machine": report.machine(),
       "replay": "pytest --equiv '<node id>' --equiv-seed 7", "unmatched_known": [], "unchecked_known": []}
LAYERS = [{"layer": "fc1", "module": "Linear", "max_abs": 1e-7, "max_rel": 1e-6, "ratio": 0.02},
          {"layer": "act", "module": "ReLU", "max_abs": 1e-3, "max_rel": 1e-2, "ratio": 40.0, "first": True},
          {"layer": "fc2", "module": "Linear", "max_abs": 1e-3, "max_rel": 1e-2, "ratio": 35.0}]
CURVES = {"torch": [2.3, 1.5, 1.1, 0.9], "jax": [2.3, 1.5, 1.1000001, 0.9000002]}
# A kind's checks, as each kind's records name them.
CHECKS = {"operations": ("forward", "vjp", "jvp", "hvp"), "layers": ("forward", "vjp"),
          "optimizers": ("step", "quadratic", "mlp", "schedule"), "data": ("forward",),
          "models": ("forward", "grad", "train"), "checkpoints": ("forward", "vjp"), "other": ("count",)}


def rec(pair, check, family, outcome="passed", ratio=0.1, **kw):
    return CheckRecord(pair, check, "float32", "cpu", "highest", outcome, examples=10, worst_ratio=ratio,
                       tolerance={"rtol": 1.3e-6, "atol": 1e-5, "reason": "float32 default (torch.testing)"},
                       family=family, **kw).to_json()


def every_kind() -> list[dict]:
    """Records of every kind and outcome: a failure with diagnosis, inputs and replay; a known
    divergence; an xpass; a skip; a model with per-layer errors and loss curves."""
    out = []
    for family, checks in CHECKS.items():
        for k, check in enumerate(checks):
            out.append(rec(f"{family}_ok", check, family, ratio=10.0 ** -(k + 2)))
    out += [
        rec("softplus_off", "forward", "operations", "failed", ratio=float("inf"), side="jax",
            message="out: values differ beyond rtol=1.3e-06 atol=1e-05", diagnosis="jax is off: float64 says torch",
            inputs="arg0: float32[] 0.", replay="pytest --equiv 'test_fail.py::test_pair[softplus_off-float32-cpu]'",
            notes=["the float64 reference agrees with torch"]),
        rec("gelu_tail", "hvp", "operations", "known-divergence", known_reason="tanh approximation's tail",
            message="hvp differs past x=10"),
        rec("abs", "vjp", "operations", "xpass", known_reason="abs'(0)", known_pattern="abs", notes=[]),
        rec("bf16_only", "forward", "layers", "skipped", ratio=0.0, message="declares bfloat16 only"),
        rec("mlp", "fit", "models", "failed", ratio=40.0, side="torch", message="layer act differs",
            diagnosis="torch is off from act on", extra={"layers": LAYERS, "curves": CURVES},
            replay="pytest --equiv 'suites/test_models.py::test_model[mlp-float32-cpu]'"),
    ]
    return out


def page(records=None, **run) -> str:
    return report_html.render(report.build(every_kind() if records is None else records, RUN | run))


class _Page(HTMLParser):
    """What a test asserts about: the tables by kind, images, links, scripts, text by element id."""

    def __init__(self) -> None:
        super().__init__()
        self.kinds: list[str] = []
        self.images: list[dict[str, str]] = []
        self.urls: list[str] = []
        self.scripts = 0
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table" and "data-kind" in a:
            self.kinds.append(a["data-kind"])
        if tag == "img":
            self.images.append(a)
        if tag == "script":
            self.scripts += 1
        self.urls += [v for k, v in attrs if k in ("src", "href") and v]
        if "id" in a:
            self.ids.add(a["id"])


def parsed(text: str) -> _Page:
    p = _Page()
    p.feed(text)
    return p


def test_the_page_has_a_table_per_kind_in_order_and_counts_by_outcome():
    text = page()
    p = parsed(text)
    assert p.kinds == [f for f in FAMILIES if f in CHECKS]
    assert 'data-kind="speed"' not in text  # no benchmark records: no speed table
    counts = re.search(r'<table id="counts">(.*?)</table>', text, re.DOTALL).group(1)
    # the operations row: 4 passed, 1 failed, 1 known divergence, 1 xpass, 0 skipped, 7 in all
    assert re.search(r"<td>Operations</td>" + r"".join(rf'<td class="num[^"]*">{n}</td>' for n in (4, 1, 1, 1, 0, 7)),
                     counts), counts
    # an optimizer table has the optimizer's checks as columns, not the operations' vjp/jvp/hvp
    optim = re.search(r'data-kind="optimizers">\s*<tr>(.*?)</tr>', text, re.DOTALL).group(1)
    header = re.findall(r"<th>(.*?)</th>", optim)
    assert header[:3] == ["pair", "dtype", "device"] and sorted(header[3:]) == sorted(CHECKS["optimizers"])


def test_each_failure_shows_diagnosis_inputs_tolerance_and_replay():
    text = page()
    block = re.search(r'<div class="failure">(.*?)</div>', text, re.DOTALL).group(1)
    assert "mlp::fit::float32::cpu" in block and "torch: torch is off from act on" in block
    block = text[text.index("softplus_off::forward"):]
    block = block[:block.index("</div>")]
    for shown in ("jax: jax is off: float64 says torch", "arg0: float32[] 0.", "rtol=1.3e-06 atol=1e-05",
                  "float32 default (torch.testing)", "the float64 reference agrees with torch",
                  "pytest --equiv &#39;test_fail.py::test_pair[softplus_off-float32-cpu]&#39;"):
        assert shown in block, shown


def test_plots_are_embedded_svg_and_the_page_needs_no_network_and_no_script():
    text = page()
    p = parsed(text)
    assert p.scripts == 0
    assert "ratio-plot" in p.ids and "worst-plot" in p.ids
    # the ratio plot, the worst checks, the model's per-layer errors and its loss curves
    assert len(p.images) == 4 and all(i["src"].startswith("data:image/svg+xml;base64,") for i in p.images)
    assert all(i.get("alt") for i in p.images)
    assert [u for u in p.urls if not u.startswith(("data:", "#"))] == []
    assert "<link" not in text and "@import" not in text and "url(" not in text


def test_user_text_is_escaped():
    text = page([rec("evil", "forward", "operations", "failed", message="<script>alert(1)</script>", side="jax")])
    assert "<script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text


def test_a_partial_run_says_so_before_its_counts():
    text = page(partial={"ran": 3, "collected": 10}, interrupted=True)
    assert "partial" in parsed(text).ids
    assert text.index("Partial run (interrupted; partial: 3 of 10 collected tests ran)") < text.index('id="summary"')
    assert 'id="partial"' not in page()


def test_a_report_of_an_older_version_without_kinds_renders_under_other():
    records = [{k: v for k, v in r.items() if k != "family"} for r in every_kind()[:3]]
    assert parsed(page(records)).kinds == ["other"]


def test_write_makes_the_page_from_the_json(tmp_path):
    rep = report.build(every_kind(), RUN)
    (_, _, html_path), _ = report.write(rep, tmp_path)
    assert html_path.read_text() == report_html.render(json.loads((tmp_path / "latest.json").read_text()))
    assert (tmp_path / "latest.html").read_text() == html_path.read_text()


def test_the_html_command_writes_a_page_from_a_report(tmp_path, capsys):
    from equivcheck.__main__ import main

    src = tmp_path / "run.json"
    src.write_text(json.dumps(report.build(every_kind(), RUN)))
    assert main(["html", str(src), "-o", str(tmp_path / "page.html")]) == 0
    assert parsed((tmp_path / "page.html").read_text()).kinds[0] == "operations"
    (tmp_path / "bad.json").write_text('{"schema": "equivcheck.report/1", "records": [')
    assert main(["html", str(tmp_path / "bad.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"equivcheck html: {tmp_path / 'bad.json'}: ") and "\n" not in err


@pytest.mark.parametrize("edit, field", [
    (lambda rep: rep["run"].pop("started"), "run.started"),
    (lambda rep: rep["run"]["machine"].pop("cpus"), "run.machine.cpus"),
    (lambda rep: rep["summary"].pop("failed"), "summary.failed"),
    (lambda rep: rep.pop("summary"), "summary"),
    (lambda rep: rep["records"][0].pop("pair"), "records[0] (abs::vjp::float32::cpu).pair"),
    (lambda rep: rep["run"]["unchecked_known"].append({"pattern": "x::*", "source": "k.txt:1"}),
     "run.unchecked_known[0].why"),
])
def test_a_report_lacking_a_field_the_page_shows_is_named_by_the_fields_place(tmp_path, capsys, edit, field):
    # Jinja alone says "'dict object' has no attribute 'started'": neither the file nor which object.
    from equivcheck.__main__ import main

    rep = json.loads(json.dumps(report.build(every_kind(), RUN)))
    edit(rep)
    src = tmp_path / "edited.json"
    src.write_text(json.dumps(rep))
    assert main(["html", str(src)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"equivcheck html: {src}: the report lacks {field}, a field the page shows (edited by hand, or "
                   "written by another version?)"), err
    assert not (tmp_path / "edited.html").exists()


def test_the_terminal_summary_splits_by_kind_within_120_columns():
    long_name = "a_user_pair_with_a_name_far_longer_than_any_terminal_column_should_hold_" * 2
    records = every_kind() + [rec(long_name, c, "operations") for c in CHECKS["operations"]]
    records += [rec("many_checks", f"check_number_{k}", "other") for k in range(12)]
    lines = report.summary_tables(records)
    assert max(len(line) for text in lines for line in text.split("\n")) <= 120
    titles = [line for line in lines if re.fullmatch(r"\w+ \(\d+ checks\)", line)]
    assert [t.split()[0] for t in titles] == [f for f in FAMILIES if f in CHECKS]
    table = "\n".join(lines)
    # Cut in the middle (the failure text names it whole): names sharing a long prefix differ at the end.
    assert long_name[:20] in table and long_name[-20:] + " " in table and "..." in table
    twins = [rec(long_name + suffix, "forward", "operations") for suffix in ("_eps", "_bias")]
    cut = "\n".join(report.summary_tables(twins))
    assert "hold__eps " in cut and "hold__bias " in cut
    assert "check_number_0" in table and "check_number_11" in table  # columns carried over, none lost


# A script in the test's copy only: the page itself has none. It waits for every image to
# settle, then writes what loaded and what did not into the DOM that --dump-dom prints.
_PROBE = """<script>
window.addEventListener("load", () => {
  const imgs = [...document.images];
  const broken = imgs.filter(i => !i.complete || i.naturalWidth === 0).map(i => i.alt);
  const m = document.createElement("div");
  m.id = "equiv-probe";
  m.dataset.images = imgs.length;
  m.dataset.broken = JSON.stringify(broken);
  m.dataset.tables = document.querySelectorAll("table.grid").length;
  m.dataset.height = document.body.scrollHeight;
  document.body.appendChild(m);
});
</script>"""


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def browse(page_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([chromium(), "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run",
                           "--virtual-time-budget=10000", *args, page_path.as_uri()],
                          capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.skipif(chromium() is None, reason="chromium is not installed (.ci/run installs it: "
                                               "apt-get install chromium); the page is not rendered in a browser")
def test_the_page_renders_in_headless_chromium_with_every_table_and_image(tmp_path):
    text = page()
    probe = tmp_path / "probe.html"
    probe.write_text(text.replace("</body>", _PROBE + "</body>"))
    done = browse(probe, "--dump-dom")
    assert done.returncode == 0, done.stderr[-2000:]
    marker = re.search(r'<div id="equiv-probe"([^>]*)>', done.stdout)
    assert marker, f"the probe did not run: {done.stderr[-2000:]}"
    data = dict(re.findall(r'data-(\w+)="([^"]*)"', marker.group(1)))
    assert int(data["images"]) == 4 and json.loads(data["broken"].replace("&quot;", '"')) == []
    assert int(data["tables"]) == len(CHECKS)
    assert int(data["height"]) > 2000  # laid out: tables and plots take room
    shot = tmp_path / "page.png"
    done = browse(tmp_path / "probe.html", f"--screenshot={shot}", "--window-size=1280,1600")
    assert done.returncode == 0 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", done.stderr[-2000:]
    assert int.from_bytes(shot.read_bytes()[16:20], "big") == 1280  # the PNG's width, from its IHDR


def test_a_run_prints_a_table_per_kind_within_120_columns_and_writes_the_page(pytester):
    pytester.makepyfile(test_kinds="""
import pytest, torch, jax.numpy as jnp
import equivcheck as ec

LONG = "a_pair_whose_name_is_much_longer_than_the_table_has_room_for_" * 3
PAIRS = [ec.Pair("tanh", torch.tanh, jnp.tanh, ec.unary(), checks=("forward",)),
         ec.Pair(LONG[:-1], torch.tanh, jnp.tanh, ec.unary(), checks=("forward",)),
         ec.Pair("exp_as_layer", torch.exp, jnp.exp, ec.unary(), checks=("forward", "vjp"), family="layers")]

@pytest.mark.parametrize("pair", PAIRS, ids=str)
def test_pair(pair, equiv):
    equiv.check(pair)
""")
    result = pytester.runpytest("--equiv", "--equiv-examples", "3", "--equiv-seed", "1", "--equiv-dtypes", "float32",
                                "-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)
    out = result.stdout.str()
    section = out[out.index("equivcheck ="):out.index("report: ")]
    assert max(len(line) for line in section.splitlines()) <= 120, section
    assert "operations (2 checks)" in section and "layers (2 checks)" in section
    assert section.index("operations (") < section.index("layers (")
    page = parsed((pytester.path / "reports" / "latest.html").read_text())
    assert page.kinds == ["operations", "layers"]
