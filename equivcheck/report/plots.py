"""The report's plots, drawn with matplotlib (Agg, no display): worst error / allowed error of
every check, per-layer errors of model checks, loss curves. Each comes back as SVG text for the
HTML page, or is saved as a PNG beside the Markdown report (`save_png`).

matplotlib is imported on first use, not with the package: `pytest --help` and runs that write
no report never pay for it.
"""
from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# The worst ratio of a check with no error at all is 0, which a log axis cannot show: such
# checks sit on this floor, and the axis label says so.
FLOOR = 1e-12
# Outcome colours: the same in the plots and the page's CSS (report/templates/report.css).
COLOURS = {"passed": "#2e7d32", "failed": "#c62828", "known-divergence": "#ef6c00", "xpass": "#6a1b9a",
           "skipped": "#9e9e9e"}
WORST_SHOWN = 30  # bars in the "worst checks" plot; the strip plot shows every check


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend with the report's settings. Raises ImportError
    without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Text stays text (smaller files, selectable); a fixed salt keeps the SVG ids stable run to run.
    plt.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "equivcheck", "font.size": 9})
    return plt


def ratio(record: dict[str, Any]) -> float | None:
    """The record's worst error / allowed error as a float (JSON keeps inf as a string), or None
    where it has none (skipped checks, records of older reports)."""
    x = record.get("worst_ratio")
    if x is None:
        return None
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def _margins(fig: Any, *, left: float, bottom: float, top: float = 0.15, right: float = 0.2) -> None:
    """Fixed margins in inches. Cheaper than bbox_inches="tight" or a layout engine, each of which
    draws the figure an extra time: on a busy CPU that doubled the page's time to render."""
    w, h = fig.get_size_inches()
    fig.subplots_adjust(left=left / w, right=1 - right / w, bottom=bottom / h, top=1 - top / h)


def _label_inches(labels: Sequence[str], points: float) -> float:
    """The width a column of tick labels takes: about 0.6 em a character, plus the ticks' room."""
    return max((len(s) for s in labels), default=0) * points * 0.6 / 72 + 0.15


def _svg(fig: Any) -> str:
    plt = pyplot()
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None})
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]  # the XML prolog and doctype are not allowed inside HTML


def ratio_strip(groups: Mapping[str, Sequence[dict[str, Any]]]) -> str:
    """SVG: one row per family (`groups`: family -> its records), a dot per check at its worst
    error / allowed error (log scale), coloured by outcome; the line at 1 is the tolerance. ''
    when no check has a ratio."""
    scored = {f: [(r, ratio(r)) for r in rs if r["outcome"] != "skipped"] for f, rs in groups.items()}
    rows = {f: sorted(((r, x) for r, x in pts if x is not None), key=lambda p: p[1]) for f, pts in scored.items()}
    rows = {f: pts for f, pts in rows.items() if pts}
    if not rows:
        return ""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 0.55 * len(rows) + 1.2))
    _margins(fig, left=_label_inches(list(rows), 9), bottom=0.5, top=0.4)
    finite = [x for pts in rows.values() for _, x in pts if math.isfinite(x) and x > 0]
    ceiling = max([10.0, *finite]) * 10
    for y, pts in enumerate(rows.values()):
        xs = [ceiling if not math.isfinite(x) else max(x, FLOOR) for _, x in pts]
        # spread a row's dots over a band so that equal ratios do not hide each other
        ys = [y + ((k * 0.618) % 1.0 - 0.5) * 0.5 for k in range(len(pts))]
        ax.scatter(xs, ys, s=14, alpha=0.7, c=[COLOURS.get(r["outcome"], "#000") for r, _ in pts], linewidths=0)
    ax.axvline(1.0, color="#000", lw=1, ls="--")
    ax.set_xscale("log")
    ax.set_xlim(FLOOR / 3, ceiling * 3)
    ax.set_yticks(range(len(rows)), list(rows))
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlabel(f"worst error / allowed error (1 = at tolerance; no error at {FLOOR:g}, infinite at the right edge)")
    handles = [plt.Line2D([], [], ls="", marker="o", color=c, label=o) for o, c in COLOURS.items() if o != "skipped"]
    ax.legend(handles=handles, loc="lower center", ncol=4, frameon=False, bbox_to_anchor=(0.5, 1.0))
    ax.grid(axis="x", alpha=0.3)
    return _svg(fig)


def _log_bars(ax: Any, labels: Sequence[str], xlabel: str) -> None:
    """The axes every bar plot here shares: one labelled bar per row, top to bottom, on a log
    scale with the dashed line at 1 (at tolerance; a tie)."""
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(1.0, color="#000", lw=1, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.grid(axis="x", alpha=0.3)


def worst_bars(records: Sequence[dict[str, Any]], n: int = WORST_SHOWN) -> str:
    """SVG: the failed checks, then those closest to (or past) their tolerance, `n` in all, as
    horizontal bars of worst error / allowed error on a log scale. '' when no check has a non-zero
    ratio."""
    scored = [(r, ratio(r)) for r in records if r["outcome"] != "skipped"]
    # failures first (a known divergence can be further past its tolerance than any failure), then by ratio
    scored = sorted(((r, x) for r, x in scored if x is not None and x > 0),
                    key=lambda p: (p[0]["outcome"] != "failed", -p[1]))[:n]
    if not scored:
        return ""
    plt = pyplot()
    finite = [x for _, x in scored if math.isfinite(x)]
    ceiling = max([10.0, *finite]) * 10
    fig, ax = plt.subplots(figsize=(8, 0.22 * len(scored) + 1.0))
    _margins(fig, left=min(_label_inches([r["id"] for r, _ in scored], 7), 4.5), bottom=0.5)
    values = [ceiling if not math.isfinite(x) else x for _, x in scored]
    ax.barh(range(len(scored)), values, left=FLOOR, color=[COLOURS.get(r["outcome"], "#000") for r, _ in scored])
    _log_bars(ax, [r["id"] for r, _ in scored], "worst error / allowed error (log; bars at the right edge: infinite)")
    ax.set_xlim(min([*finite, 1.0]) / 10 if finite else 1e-3, ceiling * 3)
    return _svg(fig)


def speed_bars(rows: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """SVG: torch time / JAX time per benchmark group (equivcheck.bench.claims.speed_ratios), a bar
    each on a log scale with its spread over rounds as an error bar; 1 is a tie. '' without rows."""
    if not rows:
        return ""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 0.22 * len(rows) + 1.0))
    _margins(fig, left=min(_label_inches([g for g, _ in rows], 7), 4.5), bottom=0.5)
    speed = [r["speed"] for _, r in rows]
    err = [[max(r["speed"] - r["low"], 0) for _, r in rows], [max(r["high"] - r["speed"], 0) for _, r in rows]]
    ax.barh(range(len(rows)), [x - 1 for x in speed], left=1, xerr=err, ecolor="#555", capsize=2,
            color=["#1f77b4" if x >= 1 else "#d62728" for x in speed])
    _log_bars(ax, [g for g, _ in rows], "torch time / JAX time (log; right of 1: JAX took less), steady state, "
                                        "spread over rounds")
    return _svg(fig)


def layer_errors(record: dict[str, Any]) -> str:
    """SVG: a model check's per-layer error / tolerance, in layer order, the first diverging layer
    marked. '' when the record has no per-layer rows with ratios."""
    rows = [row for row in (record.get("extra") or {}).get("layers") or [] if isinstance(row.get("ratio"), (int, float))]
    if not rows:
        return ""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 0.25 * len(rows) + 1.0))
    _margins(fig, left=min(_label_inches([str(row.get("layer", "?")) for row in rows], 7), 3.5), bottom=0.5)
    values = [max(float(row["ratio"]), FLOOR) for row in rows]
    colours = [COLOURS["failed"] if row.get("first") else "#1565c0" for row in rows]
    ax.barh(range(len(rows)), values, left=FLOOR, color=colours)
    _log_bars(ax, [str(row.get("layer", "?")) for row in rows], "error / tolerance per layer (red: first diverging layer)")
    return _svg(fig)


def _curves_figure(record: dict[str, Any]) -> Any:
    plt = pyplot()
    c = record["extra"]["curves"]
    steps = range(1, len(c["torch"]) + 1)
    fig, (a, b) = plt.subplots(2, 1, figsize=(6, 4.5), sharex=True)
    a.plot(steps, c["torch"], label="torch")
    a.plot(steps, c["jax"], "--", label="jax")
    a.set_ylabel("loss")
    a.legend()
    a.set_title(record["id"], fontsize=8)
    b.plot(steps, [abs(t - j) for t, j in zip(c["torch"], c["jax"], strict=True)])
    b.set_ylabel("|torch - jax|")
    b.set_xlabel("step")
    _margins(fig, left=0.75, bottom=0.5, top=0.3)
    return fig


def loss_curves(record: dict[str, Any]) -> str:
    """SVG: both frameworks' loss per step and their difference. '' when the record has no curves."""
    if not (record.get("extra") or {}).get("curves"):
        return ""
    return _svg(_curves_figure(record))


def save_png(record: dict[str, Any], path: Path) -> None:
    """The loss curves of `record` as a PNG at `path` (the Markdown report's image)."""
    plt = pyplot()
    fig = _curves_figure(record)
    fig.savefig(path, dpi=80)
    plt.close(fig)
