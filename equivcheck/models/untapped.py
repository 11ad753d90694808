"""The first diverging torch module of a port that has no taps.

Every torch module's output (forward hooks, in the order the modules finish) is looked up
among the values the port computes (equivcheck.models.trace). The first module whose output
the port never computes, while its inputs are among the port's values, is where the port
leaves torch: everything it was given agrees, what it gives does not.

Two refinements keep a correct computation from being named:
- a port need not materialise every module's output in torch's form (a fused bias, a
  folded scale): when a module that consumes an unmatched output is itself matched, the
  unmatched output did not carry a divergence, and is passed over;
- an unmatched module whose inputs are unmatched too, with no module before it to blame,
  means the divergence sits in code outside any torch module (the forward method's own
  arithmetic: a residual sum, a reshape): it is named "at or before" that module.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from equivcheck.engine.tolerance import Tolerance
from equivcheck.models.slips import Row, _first_tensor, hint
from equivcheck.models.trace import Found, Matcher

HOW = "located without taps: each torch module's output looked up among the {n} values the port computes"


def _tensors(args: Any, kwargs: Any) -> Iterator[Any]:
    import torch

    stack = [*args, *kwargs.values()]
    while stack:
        a = stack.pop(0)
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (tuple, list)):
            stack[:0] = list(a)


@dataclasses.dataclass
class _Module:
    name: str
    module: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    out: Any
    found: Found
    inputs: list[Any]
    inputs_ok: bool
    row: Any


def locate(seen: Sequence[tuple[str, Any, tuple[Any, ...], dict[str, Any], Any]], values: Sequence[Any],
           tol: Tolerance, stats_row: Callable[[str, Any], tuple[Any, str]],
           output_ok: bool) -> tuple[list[Any], Any, str, str, str]:
    """(rows, first row or None, hint, where, text) for `localise`; `seen` as its hooks record
    it, `stats_row(name, module)` the running-statistics row of a BatchNorm module (or None).
    With the model's output within tolerance (`output_ok`) an output the port never computes
    is one it computes in another form, not a divergence: no module is named then (only
    running statistics can be)."""
    from equivcheck.backends.torch import to_numpy

    match = Matcher(values, tol)
    cache: dict[int, Found] = {}

    def look(t: Any) -> Found:
        if id(t) not in cache:
            cache[id(t)] = match.find(to_numpy(t))
        return cache[id(t)]

    _loops(seen, match, cache)
    producer: dict[int, _Module] = {}
    mods: dict[str, _Module] = {}
    calls: list[_Module] = []
    healed: set[str] = set()
    rows: list[Any] = []
    extra: dict[str, str] = {}
    for name, module, args, kwargs, out in seen:
        t = _first_tensor(out)
        if t is None or not t.is_floating_point():
            continue
        ins = [a for a in _tensors(args, kwargs) if a.is_floating_point()]
        f = look(t)
        note = ("" if f.ok and not f.layout else f.layout) if f.value is not None else "no port value of this size"
        if not f.ok and _final_state_found(module, out, look):
            f, note = dataclasses.replace(f, index=-1), "its final state is among the port's values (a carry-only scan)"
        row = Row(name, type(module).__name__, f.max_abs, f.max_rel, f.ratio, f.ok, note=note)
        m = _Module(name, module, args, kwargs, out, f, ins, all(look(a).ok for a in ins), row)
        calls.append(m)
        mods.setdefault(name, m)  # a module called in a loop: its first call
        if f.ok:
            healed.update(producer[id(a)].name for a in ins if id(a) in producer and not producer[id(a)].found.ok)
        producer.setdefault(id(t), m)
        rows.append(row)
        srow, shint = stats_row(name, module)
        if srow is not None:
            rows.append(srow)
            extra[srow.layer] = shint
    off = [m for m in calls if not m.row.ok and m.name not in healed]
    if output_ok:
        for m in off:
            m.row.note = f"{m.row.note}; not among the port's values in torch's form, but the model's output agrees"
        off = []
    how = HOW.format(n=len(match))
    if not off:
        stats_first = next((r for r in rows if r.layer in extra and not r.ok), None)
        if stats_first is None:
            return rows, None, "", "", ""
        stats_first.first = True
        h = extra[stats_first.layer]
        text = (f"first diverging layer: {stats_first.layer} ({stats_first.module}): every module's output agrees, "
                f"its running statistics do not (max abs err {stats_first.max_abs:.3g}); {how}")
        return rows, stats_first, h, f"at layer {stats_first.layer.split(' ')[0]}", text + (f"; hint: {h}" if h else "")
    where, text, first = _explain(off[0], mods, rows, healed, match, look, tol)
    first.row.first = True
    h = _hint(first, match, tol)
    return rows, first.row, h, where, text + f"; {how}" + (f"; hint: {h}" if h else "")


def _explain(m: Any, mods: dict[str, Any], rows: list[Any], healed: set[str], match: Matcher, look: Any,
             tol: Tolerance) -> tuple[str, str, Any]:
    """(where, text, the module named) for the first unmatched module `m`."""
    f = m.found
    closest = (f"closest: {f.layout}, max abs err {f.max_abs:.3g}, {f.ratio:.3g} x the tolerance"
               if f.value is not None else "the port computes no value of its size")
    before = [r.layer for r in rows[:rows.index(m.row)] if r.ok and r.layer in mods]
    if not m.inputs_ok:
        owner = _owner(m, mods)
        if owner is not None:
            inside = [n for n in before if n.startswith(owner.name + ".")]
            within = (f"; inside it {', '.join(inside[-3:])} agree and the input of {m.name} is nowhere" if inside
                      else f"; the input of its submodule {m.name} is nowhere")
            span = f", between {inside[-1]} and {m.name}" if inside else f", before {m.name}"
            text = (f"first diverging layer: {owner.name} ({owner.row.module}): its inputs are among the port's "
                    f"values, its output is not{within}: the divergence is in {owner.name}'s own forward code{span}")
            return f"at layer {owner.name}", text, owner
        text = (f"first diverging layer: at or before {m.name} ({m.row.module}): neither its output nor its input is "
                f"among the port's values ({closest}); the divergence is in code outside the torch modules that feeds "
                "it (the forward method's own arithmetic: a residual sum, a reshape, a scaling)"
                + (f", after {before[-1]}" if before else ""))
        return f"at or before layer {m.name}", text, m
    for a in m.inputs if _opens_with_a_contraction(m.module) else ():
        i = look(a).index
        changed = match.changed_after(i, look(a).value) if i is not None and i >= 0 else None
        # the last module giving that value: a Dropout (identity in eval) after a pool, say
        src = next((p for p in reversed(list(mods.values())) if p.found.index == i and p is not m
                    and rows.index(p.row) < rows.index(m.row)), None)
        if changed is not None:
            c, cf = changed
            what = f"{src.name}'s output" if src is not None else "its input"
            target = src or m
            target.row.ok, target.row.max_abs, target.row.ratio = False, cf.max_abs, cf.ratio
            target.row.note = f"the port changes it ({match.values[c].label}) before {m.name}"
            target.found = cf  # the value the port passes on, for the slip hint
            text = (f"first diverging layer: {target.name} ({target.row.module}): the port computes {what} "
                    f"({match.values[i].label}) and then changes it ({match.values[c].label}: max abs change "
                    f"{cf.max_abs:.3g}, {cf.ratio:.3g} x the tolerance) before {m.name}, whose output it never "
                    f"computes: the divergence is in that change or in {m.name}")
            where = f"after layer {src.name}, before layer {m.name}" if src else f"at or before layer {m.name}"
            return where, text, target
    fused = _fused_into(m, mods, healed)
    if fused is not None:
        alike = sorted(n for n in healed if type(mods[n].module) is type(m.module))[:3]
        text = (f"first diverging layer: {fused.name} ({fused.row.module}), or {m.name} ({m.row.module}) before it: "
                f"the port never computes {m.name}'s output on its own (nor that of {', '.join(alike)}: it fuses them "
                f"into the module after), and {fused.name}'s output is not among its values either")
        return f"at layer {fused.name}", text, fused
    text = (f"first diverging layer: {m.name} ({m.row.module}): its inputs are among the port's values, its output "
            f"is not ({closest})")
    return f"at layer {m.name}", text, m


def _loops(seen: Sequence[tuple[str, Any, tuple[Any, ...], dict[str, Any], Any]], match: Matcher,
           cache: dict[int, Found]) -> None:
    """A module torch calls once per step of a loop (a decoder's cell) has its outputs, and each
    of its inputs, looked up stacked over its calls too: a port running the loop as a scan keeps
    the step's values stacked (equivcheck.models.trace). Found ones enter `cache` per call."""
    from equivcheck.backends.torch import to_numpy

    calls: dict[str, list[tuple[Any, list[Any]]]] = {}
    for name, _module, args, kwargs, out in seen:
        t = _first_tensor(out)
        if t is not None and t.is_floating_point():
            calls.setdefault(name, []).append((t, [a for a in _tensors(args, kwargs) if a.is_floating_point()]))
    for name, each in calls.items():
        if len(each) < 2:
            continue
        columns = [[t for t, _ in each]] + ([list(c) for c in zip(*(ins for _, ins in each))]
                                            if len({len(ins) for _, ins in each}) == 1 else [])
        for column in columns:
            if len({tuple(x.shape) for x in column}) != 1 or all(id(x) in cache and cache[id(x)].ok for x in column):
                continue
            f = match.find(np.stack([to_numpy(x) for x in column]))
            if f.ok:
                for x in column:
                    cache[id(x)] = dataclasses.replace(f, index=-1, layout=f"stacked over its {len(column)} calls")
                continue
            for k, x in enumerate(column):  # the loop parts from torch at some step: the steps before agree
                step = _step_values(match, k, x.numel())
                g = Matcher(step, match.tol).find(to_numpy(x)) if step else None
                if g is not None and g.ok:
                    cache[id(x)] = dataclasses.replace(g, index=-1, layout=step[g.index].label)


def _step_values(match: Matcher, k: int, size: int) -> list[Any]:
    """Step k of every value a scan stacked over its steps, of `size` elements per step."""
    from equivcheck.models.trace import Value

    out = []
    for i, a in match.arrays.items():
        if match.values[i].primitive == "scan" and a.ndim >= 1 and a.shape[0] > k and a[0].size == size:
            out.append(Value(f"step {k} of {match.values[i].label}", a[k]))
    return out


def _opens_with_a_contraction(module: Any) -> bool:
    """A module whose port starts with a matmul or conv of its input: an elementwise change of the
    input before it is outside the module (an activation or a norm starts with elementwise ops)."""
    from torch import nn

    return isinstance(module, (nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd, nn.MultiheadAttention, nn.RNNBase))


def _owner(m: Any, mods: dict[str, Any]) -> Any:
    """The innermost module holding `m` whose inputs the port computes and whose output it does
    not: code in its own forward, between its submodules, is where the port leaves torch."""
    parts = m.name.split(".")
    for k in range(len(parts) - 1, 0, -1):
        owner = mods.get(".".join(parts[:k]))
        if owner is not None and not owner.found.ok and owner.inputs_ok:
            return owner
    return None


def _fused_into(m: Any, mods: dict[str, Any], healed: set[str]) -> Any:
    """The module consuming `m`'s output when the port computes no module of m's type on its
    own (others of its type were passed over as fused) and that consumer is off too."""
    if not any(type(mods[n].module) is type(m.module) for n in healed):
        return None
    out = _first_tensor(m.out)
    return next((c for c in mods.values() if not c.found.ok and any(a is out for a in c.inputs)), None)


def _final_state_found(module: Any, out: Any, look: Any) -> bool:
    """A recurrent module whose final state (h_n, and c_n) the port computes: a port that scans
    with a carry only never forms the output sequence, which the final state ends."""
    import torch

    if not isinstance(module, torch.nn.RNNBase) or not isinstance(out, tuple) or len(out) < 2:
        return False
    state = [a for a in _tensors(out[1:], {}) if a.is_floating_point()]
    return bool(state) and all(look(a).ok for a in state)


def _hint(m: Any, match: Matcher, tol: Tolerance) -> str:
    from equivcheck.backends.torch import to_numpy

    t = _first_tensor(m.out)
    f = m.found
    if f.value is not None and np.shape(f.value) != tuple(t.shape):
        return ""  # the closest value has another shape (the module's input): it says nothing of the slip
    return hint(m.module, m.args, m.kwargs, t, f.value if f.value is not None else to_numpy(t), tol,
                same=lambda y: match.find(to_numpy(y)).ok)
