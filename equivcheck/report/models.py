"""The model checks' part of the report: per-layer tables and loss curves (JSON always, a PNG
plot of the curves where matplotlib imports)."""
from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

CURVE_ROWS = 12  # loss-curve rows shown in Markdown (the JSON has every step)


def _num(x: Any) -> str:
    return x if isinstance(x, str) else "-" if x is None else f"{x:.3g}"


def _three_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The onnx check's rows (equivcheck.onnx.intermediates): per pair of sides, max abs err and error / tolerance."""
    cols = ("torch-onnx", "torch-jax", "onnx-jax")
    out = ["| layer | module | torch vs onnx | torch vs jax | onnx vs jax | first where onnx leaves torch |",
           "|---|---|---|---|---|---|"]
    for row in rows:
        cells = [f"{_num(row[c].get('max_abs'))} ({_num(row[c].get('ratio'))} x)" if row[c].get("ok") is not None
                 else "-" for c in cols]
        out.append(f"| {row.get('layer', '-')} | {row.get('module', '-')} | {' | '.join(cells)} | "
                   f"{'**first**' if row.get('first') else ''} {row.get('note', '')} |")
    return out


def plot_name(stem: str, record: dict[str, Any]) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", f"{stem}-{record['id'].replace('::', '-')}") + ".png"


def plots(records: Sequence[dict[str, Any]], directory: Path, stem: str) -> dict[str, str]:
    """One PNG per record with loss curves: both frameworks' losses and their difference."""
    with_curves = [r for r in records if (r.get("extra") or {}).get("curves")]
    if not with_curves:
        return {}
    try:
        from equivcheck.report import plots as report_plots

        report_plots.pyplot()
    except Exception:  # no matplotlib: the numbers stay in the JSON
        return {}
    out = {}
    for r in with_curves:
        name = plot_name(stem, r)
        report_plots.save_png(r, directory / name)
        out[r["id"]] = name
    return out


def markdown_section(records: Sequence[dict[str, Any]], images: dict[str, str] | None = None) -> list[str]:
    images = images or {}
    rows = [r for r in records if (r.get("extra") or {}).get("layers") or (r.get("extra") or {}).get("curves")]
    if not rows:
        return []
    out = ["", "## Models", "",
           "Per-layer errors of each model check (the failing example, or one batch of a passing check), and the "
           "loss curves of training checks. `first` marks the first diverging layer."]
    for r in rows:
        extra = r["extra"]
        out += ["", f"### `{r['id']}` ({r['outcome']})", ""]
        tol = r.get("tolerance") or {}
        if extra.get("layers") and "torch-onnx" in extra["layers"][0]:
            out += _three_columns(extra["layers"])
        elif extra.get("layers"):
            out += ["| layer | module | max abs err | max rel err | error / tolerance | first divergence |",
                    "|---|---|---|---|---|---|"]
            for row in extra["layers"]:
                out.append(f"| {row.get('layer', '-')} | {row.get('module', '-')} | {_num(row.get('max_abs'))} | "
                           f"{_num(row.get('max_rel'))} | {_num(row.get('ratio'))} | "
                           f"{'**first**' if row.get('first') else ''} {row.get('note', '')} |")
            if tol:
                out += ["", f"Tolerance: rtol={tol['rtol']:.3g} atol={tol['atol']:.3g} ({tol['reason']})."]
        if extra.get("accuracy"):
            acc = extra["accuracy"]
            out += ["", f"Test accuracy: torch {100 * acc['torch']:.2f}%, jax {100 * acc['jax']:.2f}%."]
        curves = extra.get("curves")
        if curves:
            n = len(curves["torch"])
            every = max(1, n // CURVE_ROWS)
            shown = sorted(set(range(0, n, every)) | {n - 1})
            out += ["", "| step | torch loss | jax loss | difference |", "|---|---|---|---|"]
            out += [f"| {k + 1} | {curves['torch'][k]:.8g} | {curves['jax'][k]:.8g} | "
                    f"{abs(curves['torch'][k] - curves['jax'][k]):.3g} |" for k in shown]
            if r["id"] in images:
                out += ["", f"![loss curves of {r['id']}]({images[r['id']]})"]
    return out
