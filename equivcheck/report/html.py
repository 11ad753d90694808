"""The run's report as one self-contained HTML page (reports/<run id>.html): no server, no
network, no script; CSS inline, plots embedded as SVG data URIs.

Rendered with Jinja2 (autoescaping: ids, messages and inputs are user text) from the run's
report dict, the same one written as JSON, so a page can be made again from any JSON report
(`python -m equivcheck html <report.json>`).
"""
from __future__ import annotations

import base64
from typing import Any

from equivcheck.engine import tolerance
from equivcheck.report import plots
from equivcheck.report.runs import OUTCOMES, by_family, family, partial_text
from equivcheck.report.tables import cells, failure_text, observed

TITLES = {"operations": "Operations", "layers": "Layers and losses", "optimizers": "Optimizers", "data": "Data",
          "models": "Models", "checkpoints": "Checkpoints", "distributed": "Distributed",
          "speed": "Speed", "other": "Other checks"}


def _image(svg: str) -> str:
    """A data URI for `svg` ('' for no plot). An <img> rather than inline SVG: matplotlib's ids
    (clip paths, markers) would clash between figures on one page, and an image either loads
    or visibly does not."""
    return "data:image/svg+xml;base64," + base64.b64encode(svg.encode()).decode() if svg else ""


def _failure(r: dict[str, Any]) -> dict[str, Any]:
    tol = r.get("tolerance") or {}
    return {
        "id": r["id"], "family": TITLES[family(r)], "side": r.get("side") or "undecided",
        "diagnosis": r.get("diagnosis", ""), "message": r.get("message", ""), "inputs": r.get("inputs", ""),
        "tolerance": (f"rtol={tol['rtol']:.3g} atol={tol['atol']:.3g}" if "rtol" in tol and "atol" in tol else ""),
        "tolerance_reason": tol.get("reason", ""), "notes": r.get("notes") or [], "replay": r.get("replay", ""),
        "text": failure_text(r),
    }


def _model(r: dict[str, Any]) -> dict[str, Any]:
    extra = r.get("extra") or {}
    # A passing model's layers look alike check after check: its forward check's plot stands for
    # them (a page of 70 near-identical plots would bury the one that matters).
    layers = r["outcome"] != "passed" or r["check"] == "forward"
    return {
        "id": r["id"], "outcome": r["outcome"], "accuracy": extra.get("accuracy"),
        "layer_plot": _image(plots.layer_errors(r)) if layers else "",
        "curve_plot": _image(plots.loss_curves(r)),
    }


def context(report: dict[str, Any]) -> dict[str, Any]:
    """What the template shows, computed: counts, per-family tables, failures, plots."""
    run, records = report["run"], report["records"]
    groups = by_family(records)
    counts = [{"family": TITLES[f], "counts": [sum(r["outcome"] == o for r in rs) for o in OUTCOMES], "total": len(rs)}
              for f, rs in groups.items()]
    tables = []
    for f, rs in groups.items():
        header, body = cells(rs)
        tables.append({"key": f, "title": TITLES[f], "header": header, "rows": body, "checks": len(rs)})
    models = [_model(r) for r in records if (r.get("extra") or {}).get("layers") or (r.get("extra") or {}).get("curves")]
    gpu = (run.get("device_names") or {}).get("gpu")
    return {
        "run": run, "summary": report["summary"], "outcomes": OUTCOMES, "counts": counts, "tables": tables,
        "partial": partial_text(run), "gpu": gpu,
        "versions": " · ".join(f"{k} {v}" for k, v in (run.get("versions") or {}).items() if v),
        "failures": [_failure(r) for r in records if r["outcome"] == "failed"],
        "known": [{"id": r["id"], "outcome": r["outcome"], "reason": r.get("known_reason", ""), "observed": observed(r)}
                  for r in records if r["outcome"] in ("known-divergence", "xpass")],
        "models": models,
        "ratio_plot": _image(plots.ratio_strip(groups)),
        "worst_plot": _image(plots.worst_bars(records)),
        "tolerances": report.get("tolerances") or [],
        "scale": ", ".join(f"{k} x{v:g}" for k, v in tolerance.CHECK_SCALE.items()),
        "unmatched": run.get("unmatched_known") or [], "unchecked": run.get("unchecked_known") or [],
        **_speed(report.get("benchmarks") or []),
    }


def _speed(benchmarks: list[dict[str, Any]]) -> dict[str, Any]:
    """The speed section: the claims report as `python -m equivcheck claims` prints it, and the
    torch/JAX ratio of every group as bars. Empty without --equiv-bench."""
    if not benchmarks:
        return {"speed_text": "", "speed_plot": ""}
    from equivcheck.bench.claims import from_report, render, speed_ratios

    records = from_report(benchmarks)
    return {"speed_text": render(records) if records else "",
            "speed_plot": _image(plots.speed_bars(speed_ratios(records)))}


class MissingField(KeyError):
    """A field the page shows that the report lacks; `field` is its place in the report, as
    `run.machine.cpus` or `records[3] (tanh::vjp::float32::cpu).pair`."""

    def __init__(self, field: str) -> None:
        super().__init__(field)
        self.field = field

    def __str__(self) -> str:
        return self.field


class _Placed(dict):  # type: ignore[type-arg]
    """A report object that knows its place in the report: a key the page's code or template asks
    for and it lacks is named by that place (Jinja alone says "'dict object' has no attribute
    'started'", a bare KeyError just "'started'", neither which object)."""

    __slots__ = ("_place",)
    _place: str

    def __missing__(self, key: Any) -> Any:
        raise MissingField(f"{self._place}.{key}" if self._place else str(key))


def _placed(value: Any, place: str) -> Any:
    """`value` with every object in it a _Placed, lists and objects walked; a record's place
    carries its id, which says more to a reader than its index."""
    if isinstance(value, list):
        return [_placed(v, f"{place}[{i}]" + (f" ({v['id']})" if place == "records" and isinstance(v, dict)
                                               and isinstance(v.get("id"), str) else ""))
                for i, v in enumerate(value)]
    if not isinstance(value, dict):
        return value
    out = _Placed((k, _placed(v, f"{place}.{k}" if place else str(k))) for k, v in value.items())
    out._place = place
    return out


def render(report: dict[str, Any]) -> str:
    """The page for `report` (a run's report dict, as written to JSON). Raises MissingField (a
    KeyError) naming the place of a field the page shows and the report lacks, ImportError
    without Jinja2 or matplotlib."""
    import jinja2

    class Missing(jinja2.StrictUndefined):
        """StrictUndefined whose error names the field's place in the report (see _Placed)."""

        @property
        def _undefined_message(self) -> str:
            place = getattr(self._undefined_obj, "_place", "")
            return f"{place}.{self._undefined_name}" if place else str(self._undefined_name)

    env = jinja2.Environment(loader=jinja2.PackageLoader("equivcheck.report", "templates"),
                             autoescape=True, undefined=Missing, trim_blocks=True, lstrip_blocks=True)
    try:
        return env.get_template("report.html.j2").render(**context(_placed(report, "")))
    except jinja2.UndefinedError as exc:  # Missing's message: the field's place
        raise MissingField(exc.message or "a field") from None

