"""The table of layer/loss divergences stays in step with the suites and the known-divergence
file, and the report shows it."""
from __future__ import annotations

from pathlib import Path

from equivcheck import report
from equivcheck.engine.knowns import KnownDivergences, versioned
from equivcheck.layers import traps as divergences
from suites import loss_pairs, loss_traps, trap_pairs
from suites.test_layers import PAIRS as LAYERS
from suites.test_losses import PAIRS as LOSSES

SUITES = Path(__file__).parents[1] / "suites"
KNOWN = KnownDivergences.load([str(SUITES / "known_divergences.txt"),
                               versioned(str(SUITES / "known_divergences-torch{torch}.txt"))])
ALL = {p.name for p in [*LAYERS, *LOSSES]}


def _check_id(d):
    """The row's id as a full check id (a bare pair id means its float32 forward on the CPU)."""
    parts = d.id.split("::")
    return "::".join(parts + ["forward", "float32", "cpu"][len(parts) - 1:])


def test_every_row_names_a_pair_of_the_suites_and_its_twin():
    for d in divergences.TABLE:
        assert d.id.split("::")[0] in ALL, d.id
        if d.twin:
            assert d.twin in ALL, f"{d.id}: twin {d.twin} is no pair"
            assert KNOWN.match_check(f"{d.twin}::forward::float32::cpu") is None, f"twin {d.twin} must pass"
        assert d.cause and d.effect and d.reconcile


def test_every_row_is_a_known_divergence_whose_reason_names_the_reconciling_setting():
    for d in divergences.TABLE:
        hit = KNOWN.match_check(_check_id(d))
        assert hit is not None, f"{d.id} is not in suites/known_divergences.txt"
        assert d.reconcile in hit[1] and d.cause in hit[1], hit


def test_every_trap_pair_has_a_row():
    traps = {p.name for p in [*trap_pairs.PAIRS, *loss_traps.PAIRS] if ".trap." in p.name}
    assert traps == {d.id for d in divergences.TABLE if ".trap." in d.id}
    for p in [*trap_pairs.PAIRS, *loss_traps.PAIRS]:
        if ".trap." in p.name:
            assert p.checks == ("forward",) and p.reference is not None or "init" in p.name, p.name


def _record(pair, outcome, check="forward", err=0.5, message=""):
    return {"pair": pair, "check": check, "dtype": "float32", "device": "cpu", "outcome": outcome, "max_abs_err": err,
            "message": message, "id": f"{pair}::{check}::float32::cpu"}


def test_the_report_section_shows_outcome_observed_size_and_twin():
    records = [_record("nn.trap.layer_norm_eps", "known-divergence", err=0.42),
               _record("nn.layer_norm", "passed", err=1e-7),
               _record("loss.trap.cross_entropy_reduction", "known-divergence", err=0.0,
                       message="out: shape differs: torch [], jax [4]"),
               _record("loss.bce_saturated", "known-divergence", check="vjp")]
    lines = divergences.markdown_section(records)
    text = "\n".join(lines)
    assert "## Default-configuration traps" in text
    row = next(line for line in lines if "nn.trap.layer_norm_eps" in line)
    assert "known-divergence" in row and "0.42" in row and "epsilon=1e-5" in row and "`nn.layer_norm` passed" in row
    row = next(line for line in lines if "cross_entropy_reduction" in line)
    assert "torch [], jax [4]" in row and "`loss.cross_entropy` not run" in row
    assert any("loss.bce_saturated::vjp" in line for line in lines)
    assert divergences.markdown_section([_record("nn.linear", "passed")]) == []


def test_the_markdown_report_includes_the_section():
    run = {"id": "r", "started": "s", "finished": "f", "seconds": 1.0, "seed": 1, "profile": "dev", "examples": 30,
           "precision": "highest", "devices": ["cpu"], "palette": 4, "versions": {"torch": "2.13"},
           "machine": {"platform": "linux", "cpus": 2, "python": "3.11"}, "replay": "pytest --equiv"}
    recs = [dict(_record("nn.trap.gelu_approximate", "known-divergence", err=4.6e-4), known_reason="r",
                 worst_ratio=None)]
    text = report.markdown(report.build(recs, run))
    assert "## Default-configuration traps and known layer divergences" in text
    assert "approximate=False" in text


def test_loss_tables_are_distinct_from_trap_tables():
    assert not {p.name for p in loss_pairs.PAIRS} & {p.name for p in loss_traps.PAIRS}
