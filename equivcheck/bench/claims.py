"""The claims report: pytest-benchmark JSON files of `pytest --equiv --equiv-bench` in, per device and
precision mode the torch/JAX ratios of every check and the evidence for and against the claims people
make about the two frameworks out.

Ratios are torch / JAX: above 1 JAX took less time (or memory). A ratio's spread is the range the
rounds allow, torch's first quartile over JAX's third to torch's third over JAX's first; a group counts
for a side only when its whole spread is on that side of 1, so noise between rounds counts as a tie.
"""
from __future__ import annotations

import functools
import json
import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from equivcheck.bench.record import FORMAT, precision_banner
from equivcheck.bench.sweep import growth
from equivcheck.report.compare import json_problem

CLAIMS = ("JAX is faster", "JAX uses less memory", "PyTorch is faster on image models",
          "JAX's advantage is larger for autodiff-heavy work")
SHOWN = 4  # groups named as evidence per side of a claim


class ClaimsError(ValueError):
    """A file the report cannot read, with the path and the cause in its message."""


def load(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Every equivcheck benchmark of `paths` (pytest-benchmark JSON: --benchmark-json, --benchmark-save).

    Raises ClaimsError naming the file: unreadable, not JSON (or cut short), not pytest-benchmark's
    format, or holding no benchmark made by `--equiv-bench`."""
    out: list[dict[str, Any]] = []
    for path in paths:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ClaimsError(f"{path}: cannot read it: {exc.strerror or exc}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ClaimsError(f"{path}: not JSON: {json_problem(exc, text)}") from None
        if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
            raise ClaimsError(f"{path}: not a pytest-benchmark file (no 'benchmarks' list); give the file of "
                              "--benchmark-json or --benchmark-save")
        mine = [b for b in data["benchmarks"] if isinstance(b, dict)
                and isinstance(b.get("extra_info"), dict) and b["extra_info"].get("equivcheck") == FORMAT]
        if not mine:
            raise ClaimsError(f"{path}: none of its {len(data['benchmarks'])} benchmarks was made by "
                              "`pytest --equiv --equiv-bench`")
        for b in mine:
            stats = b.get("stats")
            if not isinstance(stats, dict) or not all(isinstance(stats.get(k), (int, float))
                                                      for k in ("median", "q1", "q3", "rounds")):
                raise ClaimsError(f"{path}: benchmark {b.get('fullname', '?')} has no median/q1/q3/rounds stats")
            if not (stats["median"] > 0 and 0 <= stats["q1"] <= stats["median"] <= stats["q3"]):
                raise ClaimsError(f"{path}: benchmark {b.get('fullname', '?')} has stats no timer gives (median "
                                  f"{stats['median']!r}, q1 {stats['q1']!r}, q3 {stats['q3']!r}): edited by hand?")
            out.append({**b["extra_info"], "stats": stats, "source": str(path)})
    return out


def from_report(benchmarks: Sequence[dict[str, Any]], source: str = "report") -> list[dict[str, Any]]:
    """The records `render` takes, from a run report's `benchmarks` (pytest-benchmark's dicts, as
    `--equiv-bench` puts them in the report): equivcheck's only, each with its stats."""
    return [{**b["extra_info"], "stats": b["stats"], "source": source} for b in benchmarks
            if isinstance(b.get("extra_info"), dict) and b["extra_info"].get("equivcheck") == FORMAT
            and isinstance(b.get("stats"), dict)]


def speed_ratios(records: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(group, ratios) of every group timed on both sides, fastest torch first."""
    rows = [(g, r) for groups in _sections(records).values() for g, sides in groups.items()
            if (r := ratios(sides)) is not None]
    return sorted(rows, key=lambda gr: -gr[1]["speed"])


def _sections(records: list[dict[str, Any]]) -> dict[tuple[str, str, str], dict[str, dict[str, Any]]]:
    """(device, device name, precision) -> group -> side -> record; a later file's record replaces an earlier one."""
    out: dict[tuple[str, str, str], dict[str, dict[str, Any]]] = {}
    for r in records:
        key = (r["device"], r.get("device_name", r["device"]), r["precision"])
        group = f"{r['pair']}::{r['check']}::{r['dtype']}::{r['device']}"
        out.setdefault(key, {}).setdefault(group, {})[r["side"]] = r
    return out


def ratios(sides: dict[str, Any], torch: str = "torch") -> dict[str, Any] | None:
    """torch/JAX of one group: median, spread over rounds, first call with compile time, memory; None
    without both sides. `torch` names the torch side: "torch" (eager) or "torch.compile"."""
    t, j = sides.get(torch), sides.get("jax")
    if t is None or j is None or j["stats"]["median"] <= 0 or t["stats"]["median"] <= 0:
        return None
    ts, js = t["stats"], j["stats"]
    first_t = (t.get("compile_seconds") or 0.0) + (t.get("first_call_seconds") or ts["median"])
    first_j = (j.get("compile_seconds") or 0.0) + (j.get("first_call_seconds") or js["median"])
    mt, mj = t.get("memory_bytes"), j.get("memory_bytes")
    return {
        "speed": ts["median"] / js["median"],
        "low": ts["q1"] / js["q3"] if js["q3"] > 0 else math.inf,
        "high": ts["q3"] / js["q1"] if js["q1"] > 0 else math.inf,
        "first": first_t / first_j if first_j > 0 else math.inf,
        "memory": mt / mj if isinstance(mt, int) and isinstance(mj, int) and mj > 0 else None,
        "torch": ts["median"], "jax": js["median"], "compile": j.get("compile_seconds"),
        "torch_compile": t.get("compile_seconds"),
        "scale": t.get("scale", 1), "domain": _domain(t), "check": t["check"], "pair": t["pair"], "dtype": t["dtype"],
    }


def _domain(record: dict[str, Any]) -> str:
    """image, sequence or other (record.domain); a file written before records carried `domain`
    said it as `family`."""
    if "domain" in record:
        return record["domain"]
    return record.get("family") if record.get("family") in ("image", "sequence") else "other"


def _geo(values: list[float]) -> float:
    vals = [v for v in values if v and math.isfinite(v) and v > 0]
    return math.exp(sum(map(math.log, vals)) / len(vals)) if vals else math.nan


def _x(v: float) -> str:
    """A ratio for the text: '-' where there was nothing to take it over; below 0.1 as 1/N
    ('0.00187x' had to be inverted in the head to read as torch 535 times smaller)."""
    if math.isnan(v):
        return "-"
    if 0 < v < 0.1:
        return f"1/{1 / v:.0f}x" if v <= 0.01 else f"1/{1 / v:.3g}x"
    return f"{v:.3g}x" if math.isfinite(v) else "inf"


def _side(r: dict[str, Any]) -> int:
    """+1: JAX faster over every round's spread; -1: torch faster; 0: the spread straddles 1."""
    return 1 if r["low"] > 1 else -1 if r["high"] < 1 else 0


def _named(rows: list[tuple[str, float]]) -> str:
    rows = sorted(rows, key=lambda gr: -abs(math.log(gr[1])) if gr[1] > 0 and math.isfinite(gr[1]) else 0)
    shown = ", ".join(f"{g} {_x(v)}" for g, v in rows[:SHOWN])
    return shown + (f" (+{len(rows) - SHOWN} more)" if len(rows) > SHOWN else "") if rows else "none"


MIN_GROUPS = 3  # below this many groups on either side a claim is "too little evidence", whatever they say


def _verdict(n_for: int, n_against: int, geo: float, favour: bool) -> str:
    if n_for + n_against == 0 or math.isnan(geo):
        return "no evidence (every spread straddles 1)" if not math.isnan(geo) else "no evidence"
    if n_for + n_against < MIN_GROUPS:
        return f"too little evidence ({n_for + n_against} of at least {MIN_GROUPS} groups needed)"
    if n_for > 2 * n_against and favour:
        return "supported"
    if n_against > 2 * n_for and not favour:
        return "contradicted"
    return "mixed"


def claim_rows(groups: dict[str, dict[str, Any]], torch: str = "torch") -> list[tuple[str, str, str, str]]:
    """(claim, verdict, evidence for, evidence against) of one device and precision mode, the torch
    side of the evidence being `torch`: "torch" (eager) or "torch.compile" (the groups it compiled)."""
    # The sweep's x4 and x16 groups repeat their pair: the claims count each pair at its own size once.
    rs = {g: r for g, s in groups.items() if (r := ratios(s, torch)) is not None and r["scale"] == 1}
    rows = []
    speed = lambda sel: (
        [(g, r["speed"]) for g, r in sel.items() if _side(r) > 0], [(g, r["speed"]) for g, r in sel.items() if _side(r) < 0],
        _geo([r["speed"] for r in sel.values()]), _geo([r["first"] for r in sel.values()]))
    # The geomeans go on the verdict's line: listed under "for" they read as evidence for the claim
    # when they favoured the other side.
    fast, slow, geo, first = speed(rs)
    rows.append((CLAIMS[0], _verdict(len(fast), len(slow), geo, geo > 1)
                 + f"; geomean torch/JAX {_x(geo)} steady state, {_x(first)} first call with compile time",
                 f"{len(fast)}/{len(rs)} groups JAX faster, steady state: {_named(fast)}",
                 f"{len(slow)}/{len(rs)} torch faster: {_named(slow)}"))
    mem = {g: r["memory"] for g, r in rs.items() if r["memory"] is not None}
    less = [(g, m) for g, m in mem.items() if m > 1]
    more = [(g, m) for g, m in mem.items() if m < 1]
    mgeo = _geo(list(mem.values()))
    rows.append((CLAIMS[1], _verdict(len(less), len(more), mgeo, mgeo > 1) + f"; geomean torch/JAX {_x(mgeo)}",
                 f"{len(less)}/{len(mem)} groups JAX allocates less: {_named(less)}",
                 (f"{len(more)}/{len(mem)} torch allocates less: {_named(more)} (measures differ per side: see "
                  "memory_measure)")))
    image = {g: r for g, r in rs.items() if r["domain"] == "image"}
    ifast, islow, igeo, ifirst = speed(image)
    rows.append((CLAIMS[2], _verdict(len(islow), len(ifast), igeo, igeo < 1)
                 + f"; geomean torch/JAX {_x(igeo)} steady state, {_x(ifirst)} first call with compile time",
                 f"{len(islow)}/{len(image)} image groups torch faster: {_named(islow)}",
                 f"{len(ifast)}/{len(image)} JAX faster: {_named(ifast)}"))
    pairs: dict[tuple[str, str], dict[str, float]] = {}
    for r in rs.values():
        pairs.setdefault((r["pair"], r["dtype"]), {})[r["check"]] = r["speed"]
    # autodiff-heavy: an operation's forward+VJP, a model's forward+backward (its grad check)
    both = {k: {"forward": v["forward"], "vjp": v.get("vjp", v.get("grad"))} for k, v in pairs.items()
            if "forward" in v and ("vjp" in v or "grad" in v)}
    grow = [(f"{p}::{d}", v["vjp"] / v["forward"]) for (p, d), v in both.items() if v["vjp"] > v["forward"]]
    shrink = [(f"{p}::{d}", v["vjp"] / v["forward"]) for (p, d), v in both.items() if v["vjp"] < v["forward"]]
    fgeo, vgeo = _geo([v["forward"] for v in both.values()]), _geo([v["vjp"] for v in both.values()])
    adv = vgeo / fgeo if fgeo > 0 else math.nan
    rows.append((CLAIMS[3], _verdict(len(grow), len(shrink), adv, adv > 1)
                 + f"; geomean torch/JAX {_x(fgeo)} forward, {_x(vgeo)} forward+VJP",
                 (f"{len(grow)}/{len(both)} pairs' torch/JAX ratio grows from forward to forward+VJP (a model's "
                  f"grad): {_named(grow)} (vjp/forward ratio)"),
                 f"{len(shrink)}/{len(both)} shrink: {_named(shrink)}"))
    if torch != "torch":  # the evidence names its torch side
        words = (("torch/JAX", f"{torch}/JAX"), ("torch faster", f"{torch} faster"),
                 ("torch allocates", f"{torch} allocates"))
        rows = [(claim, *(functools.reduce(lambda t, w: t.replace(*w), words, text) for text in texts))
                for claim, *texts in rows]
    return rows


EVIDENCE = {"torch": "torch eager", "torch.compile": "torch.compile"}  # the label of a claim row's torch side


def compiled_in(groups: dict[str, dict[str, Any]]) -> bool:
    """Whether any group of one section has a `torch.compile` benchmark beside its JAX one."""
    return any("torch.compile" in sides and "jax" in sides for sides in groups.values())


def render(records: list[dict[str, Any]]) -> str:
    """The report as text, no line over WIDTH columns: per device and precision mode, a banner where the
    sides' precisions differ, the table of groups (a `torch.compile` row under a group that has one),
    then the claims, on eager torch and, where it was timed, on torch.compile."""
    lines: list[str] = []
    sections = _sections(records)
    for (device, name, precision), groups in sorted(sections.items()):
        lines.append(f"== {device} ({name}), --equiv-precision {precision}{_threads(groups)} ==")
        settings = next(iter(next(iter(groups.values())).values())).get("precision_settings", {})
        banner = precision_banner(device, precision, settings)
        if banner:
            lines += [*textwrap.wrap(banner, WIDTH), ""]
        lines += _table(groups)
        lines.append("")
        lines += textwrap.wrap("torch/JAX above 1: JAX took less. Spread: over rounds (torch q1/JAX q3 to torch q3/JAX "
                               "q1); a group counts for a side only when its spread is. compile: JAX's trace+lower+"
                               "compile on a group's row, torch.compile's (its first call less its second) on its "
                               "torch.compile row, whose ratio is torch.compile/JAX.", WIDTH)
        # each claim on eager torch, then on torch.compile where it was timed: both kinds of evidence side by side
        sides = ("torch", "torch.compile") if compiled_in(groups) else ("torch",)
        for rows in zip(*(claim_rows(groups, torch) for torch in sides)):
            for torch, (claim, verdict, pro, con) in zip(sides, rows):
                lines += textwrap.wrap(f"* {claim} [evidence: {EVIDENCE[torch]} vs JAX]: {verdict}", WIDTH,
                                       subsequent_indent="    ")
                lines += textwrap.wrap(pro, WIDTH, initial_indent="    for:     ", subsequent_indent=" " * 13)
                lines += textwrap.wrap(con, WIDTH, initial_indent="    against: ", subsequent_indent=" " * 13)
        swept = growth(groups)
        if swept:
            lines += ["", "How each side's cost grows with the batch (x1, x4, x16):"]
            lines += [w for s in swept for w in _fill(s.split("; "), "  ", "    ")]
        lines.append("")
    precisions = {(d, p) for d, _, p in sections}
    devices = {d for d, _ in precisions}
    for d in sorted(devices):
        modes = sorted(p for dd, p in precisions if dd == d)
        if len(modes) > 1:
            lines.append(f"NOTE {d}: runs at precision modes {', '.join(modes)} are reported apart; compare within one")
    return "\n".join(lines).rstrip() + "\n"


WIDTH = 120  # the report's widest line


def _fill(parts: list[str], first: str, rest: str) -> list[str]:
    """`parts` joined by "; " into lines of at most WIDTH, broken only between parts (one x1/x4/x16
    figure of the growth section is never split)."""
    lines = [first + parts[0]]
    for part in parts[1:]:
        if len(lines[-1]) + 2 + len(part) <= WIDTH:
            lines[-1] += "; " + part
        else:
            lines[-1] += ";"
            lines.append(rest + part)
    return lines
_FIGURES = 68  # the table's columns after the group's


def _table(groups: dict[str, dict[str, Any]]) -> list[str]:
    """The groups' rows; a group name too long for WIDTH stands on its own line above its figures."""
    w = min(max(len(g) for g in groups), WIDTH - _FIGURES - 1) + 1
    head = f"{'torch':>10} {'jax':>10} {'torch/JAX':>9} {'spread':>13} {'compile':>11} {'memory t/J':>10}"
    lines = [f"{'group':<{w}} {head}"]

    def row(label: str, r: dict[str, Any], torch_ms: float, jax_ms: str, comp: float | None) -> None:
        mem = f"{r['memory']:.2f}x" if r["memory"] is not None else "-"
        figures = (f"{_ms(torch_ms):>10} {jax_ms:>10} {r['speed']:>8.2f}x {r['low']:>6.2f}-{r['high']:<6.2f} "
                   f"{(f'{comp * 1e3:.0f} ms' if comp is not None else '-'):>11} {mem:>10}")
        if len(label) >= w:
            lines.extend([label, f"{'':<{w}} {figures}"])
        else:
            lines.append(f"{label:<{w}} {figures}")

    for g in sorted(groups, key=_order):
        r = ratios(groups[g])
        if r is None:
            lines.append(f"{g:<{w}} (only {', '.join(sorted(groups[g]))} timed)")
        else:
            row(g, r, r["torch"], _ms(r["jax"]), r["compile"])
        c = ratios(groups[g], "torch.compile")
        if c is not None:
            row("  torch.compile", c, c["torch"], "", c["torch_compile"])
    return lines


def _threads(groups: dict[str, dict[str, Any]]) -> str:
    """', threads: torch N, XLA M' as the section's records give them (timings at other thread counts
    do not compare); '' where the files predate the field."""
    seen = {side: sorted({r["threads"] for sides in groups.values() for k, r in sides.items()
                          if k.startswith(side) and isinstance(r.get("threads"), int)}) for side in ("torch", "jax")}
    shown = [f"{'XLA' if side == 'jax' else side} {'/'.join(map(str, n))}" for side, n in seen.items() if n]
    return f", threads: {', '.join(shown)}" if shown else ""


def _order(group: str) -> tuple[str, str, int]:
    """A group's place in the table: by pair, then check, the sweep's sizes ascending (x1, x4, x16)."""
    pair, check, *_ = group.split("::")
    base, _, factor = pair.partition("@x")
    return base, check, int(factor) if factor.isdigit() else 1


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms" if seconds < 1 else f"{seconds:.2f} s"
