"""The nightly workflow (.github/workflows/nightly.yml) is checked here, since no CI of ours runs it:
it parses, its matrix is tox's `nightly` label, every tox env it names exists, and what it
caches is where the plugin keeps its caches."""
from __future__ import annotations

import configparser
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
NIGHTLY = ROOT / ".github" / "workflows" / "nightly.yml"


def _tox() -> configparser.ConfigParser:
    ini = configparser.ConfigParser(interpolation=None)
    ini.read(ROOT / "tox.ini")
    return ini


def _labels(ini: configparser.ConfigParser) -> dict[str, list[str]]:
    out = {}
    for line in ini["tox"]["labels"].strip().splitlines():
        name, _, envs = line.partition("=")
        out[name.strip()] = [e.strip() for e in envs.split(",") if e.strip()]
    return out


def _factors(ini: configparser.ConfigParser) -> set[str]:
    """Every factor tox.ini's conditional lines name (`torch213: ...`, `torch214,!torch213: ...`):
    tox 4 refuses `-e NAME` when a factor of NAME is named nowhere ("provided environments not
    found"), even when a label lists NAME."""
    text = "\n".join(ini["testenv"].values())
    conditions = re.findall(r"^\s*([!a-z0-9,\-]+):\s", text, flags=re.MULTILINE)
    return {f.lstrip("!") for c in conditions for f in re.split(r"[,\-]", c)} | {"py"}


def test_the_workflow_parses_and_runs_tox_s_nightly_label():
    flow = yaml.safe_load(NIGHTLY.read_text())
    job = flow["jobs"]["equiv"]
    matrix = job["strategy"]["matrix"]["env"]
    ini = _tox()
    assert sorted(matrix) == sorted(_labels(ini)["nightly"])
    for env in matrix:  # tox builds an env from its factors: each must be one tox.ini knows
        unknown = set(env.split("-")) - _factors(ini)
        assert not unknown, f"{env}: factors {unknown} are not in tox.ini"
    runs = " ".join(step.get("run", "") for step in job["steps"])
    assert "tox -e ${{ matrix.env }}" in runs and "-m equivcheck compare" in runs


def test_the_workflow_caches_where_the_plugin_keeps_its_caches():
    plugin = (ROOT / "equivcheck" / "plugin.py").read_text()
    caches = set(re.findall(r'config\.cache\.mkdir\("([^"]+)"\)', plugin))
    assert caches == {"equivcheck-jax", "equivcheck-failures"}
    flow = yaml.safe_load(NIGHTLY.read_text())
    cached = next(s for s in flow["jobs"]["equiv"]["steps"] if s.get("uses", "").startswith("actions/cache"))
    assert {f".pytest_cache/d/{c}" for c in caches} == set(cached["with"]["path"].split())
    # The failures database is off unless asked for: the cached directory must be the one in use.
    runs = " ".join(s.get("run", "") for s in flow["jobs"]["equiv"]["steps"])
    assert "--equiv-failures-db auto" in runs


def test_the_previous_night_s_report_is_the_artifact_this_night_uploads():
    steps = yaml.safe_load(NIGHTLY.read_text())["jobs"]["equiv"]["steps"]
    upload = next(s for s in steps if s.get("uses", "").startswith("actions/upload-artifact"))
    download = next(s for s in steps if s.get("uses", "").startswith("actions/download-artifact"))
    assert upload["with"]["name"] == download["with"]["name"] == "reports-${{ matrix.env }}"
    assert upload["with"]["path"].rstrip("/") == "reports"
