"""A torch state_dict <-> a JAX (Flax) parameter tree, layer by layer, by explicit rules.

Each `Rule` maps one torch layer (a state_dict prefix) to one Flax layer (a path in the
parameter tree) through a `Layout`: how each parameter is renamed and re-laid out both ways,
and a probe that runs the layer on both sides. Layouts are plain records in `LAYOUTS`; a layout
of your own goes in by `register_layout(name, Layout(...))`. Every conversion is a transpose or reshape: bit-exact in
any dtype, bfloat16 included.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from equivcheck.checkpoints import CheckpointError, State, nest, unnest

Fn = Callable[[np.ndarray, tuple], np.ndarray]
Probe = Callable[[Mapping[str, np.ndarray], Mapping[str, np.ndarray], tuple, np.random.Generator],
                 tuple[np.ndarray, np.ndarray]]
# Both probe sides contract the same float64 numbers in another order: they differ by rounding
# alone (~1e-16 of the outputs' size); a wrong layout moves outputs by their own size.
PROBE_RTOL = 1e-9


@dataclasses.dataclass(frozen=True)
class Layout:
    """names: torch parameter -> Flax parameter; to_jax/to_torch: per torch name, array -> array."""

    names: Mapping[str, str]
    to_jax: Mapping[str, Fn]
    to_torch: Mapping[str, Fn]
    probe: Probe | None = None  # (torch params, jax params, meta, rng) -> both sides' outputs on one input


@dataclasses.dataclass(frozen=True)
class Rule:
    torch: str  # state_dict prefix, e.g. "features.0"
    jax: str  # parameter-tree path, "/"-separated, e.g. "params/Conv_0"
    layout: str  # a key of LAYOUTS
    meta: tuple = ()  # what the layout needs beyond the arrays, e.g. (C, H, W) before a flatten


def _same(a, meta):
    return a


def _linear_w(a, meta):
    return a.T  # (out, in) <-> (in, out)


def _conv_to_jax(a, meta):
    return a.transpose(2, 3, 1, 0)  # OIHW -> HWIO


def _conv_to_torch(a, meta):
    return a.transpose(3, 2, 0, 1)


def _flat_to_jax(a, meta):
    """A Linear after a flatten: torch flattens C,H,W; a NHWC model flattens H,W,C."""
    c, h, w = meta
    return a.reshape(a.shape[0], c, h, w).transpose(2, 3, 1, 0).reshape(h * w * c, a.shape[0])


def _flat_to_torch(a, meta):
    c, h, w = meta
    return a.reshape(h, w, c, a.shape[1]).transpose(3, 2, 0, 1).reshape(a.shape[1], c * h * w)


def _probe_linear(t, j, meta, rng):
    x = rng.standard_normal((3, t["weight"].shape[1]))
    if meta:  # the probe enters as torch's flattened CHW; the JAX side sees the same image as HWC
        c, h, w = meta
        xj = x.reshape(3, c, h, w).transpose(0, 2, 3, 1).reshape(3, -1)
    else:
        xj = x
    return x @ t["weight"].T + t["bias"], xj @ j["kernel"] + j["bias"]


def _probe_conv(t, j, meta, rng):
    """A 1x1-output probe: a kernel-sized patch, so the conv is one contraction either way."""
    o, i, kh, kw = t["weight"].shape
    x = rng.standard_normal((i, kh, kw))
    return (np.einsum("oihw,ihw->o", t["weight"], x) + t["bias"],
            np.einsum("hwio,hwi->o", j["kernel"], x.transpose(1, 2, 0)) + j["bias"])


LAYOUTS: dict[str, Layout] = {
    "linear": Layout({"weight": "kernel", "bias": "bias"}, {"weight": _linear_w, "bias": _same},
                     {"weight": _linear_w, "bias": _same}, _probe_linear),
    "linear_after_flatten": Layout({"weight": "kernel", "bias": "bias"}, {"weight": _flat_to_jax, "bias": _same},
                                   {"weight": _flat_to_torch, "bias": _same}, _probe_linear),
    "conv2d": Layout({"weight": "kernel", "bias": "bias"}, {"weight": _conv_to_jax, "bias": _same},
                     {"weight": _conv_to_torch, "bias": _same}, _probe_conv),
}


def register_layout(name: str, layout: Layout, *, replace: bool = False) -> None:
    """Make `layout` usable as `Rule(torch_prefix, jax_path, name)`.

    Every torch name of `layout.names` needs a function both ways in `to_jax` and `to_torch`
    (array, meta) -> array; `probe` is optional. Raises CheckpointError for a name already
    taken (unless replace=True) or a layout missing a direction for one of its names, TypeError
    for something that is not a Layout.
    """
    if not isinstance(layout, Layout):
        raise TypeError(f"register_layout({name!r}): expected an equivcheck.weights.Layout, got {type(layout).__name__}")
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"register_layout: the name must be a non-empty string, got {name!r}")
    if name in LAYOUTS and not replace:
        raise CheckpointError(f"register_layout: {name!r} is taken (pass replace=True to replace it)")
    if not isinstance(layout.names, Mapping) or not all(isinstance(k, str) and isinstance(v, str)
                                                         for k, v in layout.names.items()):
        raise TypeError(f"register_layout({name!r}): names must map each torch parameter name to a Flax one "
                        f"({{'weight': 'kernel'}}), got {layout.names!r:.80}")
    for direction in ("to_jax", "to_torch"):
        fns = getattr(layout, direction)
        if not isinstance(fns, Mapping):
            raise TypeError(f"register_layout({name!r}): {direction} must map each torch name to a function")
        lacking = sorted(set(layout.names) - set(fns))
        if lacking:
            raise CheckpointError(f"register_layout({name!r}): {direction} has no function for {lacking}")
        for key, fn in fns.items():
            if not callable(fn):
                raise TypeError(f"register_layout({name!r}): {direction}[{key!r}] must be callable "
                                f"(array, meta) -> array, got {type(fn).__name__}")
    LAYOUTS[name] = layout


def _layout(rule: Rule) -> Layout:
    try:
        return LAYOUTS[rule.layout]
    except KeyError:
        raise CheckpointError(f"rule {rule.torch!r} -> {rule.jax!r}: unknown layout {rule.layout!r}; "
                              f"known: {', '.join(LAYOUTS)}") from None


def _jax_name(rule: Rule, flax_param: str) -> str:
    return ".".join(rule.jax.split("/") + [flax_param])


def torch_to_jax(state: Mapping[str, np.ndarray], rules: list[Rule]) -> dict[str, Any]:
    """A Flax parameter tree from a torch state_dict; every key must be claimed by a rule."""
    flat: State = {}
    used: set[str] = set()
    for rule in rules:
        layout = _layout(rule)
        for tname, jname in layout.names.items():
            key = f"{rule.torch}.{tname}"
            if key not in state:
                raise CheckpointError(f"missing key {key!r} (rule {rule.torch!r} -> {rule.jax!r} needs it)", key=key)
            flat[_jax_name(rule, jname)] = np.ascontiguousarray(layout.to_jax[tname](np.asarray(state[key]), rule.meta))
            used.add(key)
    extra = sorted(set(state) - used)
    if extra:
        raise CheckpointError(f"unexpected keys {extra}: no rule converts them", key=extra[0])
    return nest(flat)


def jax_to_torch(params: Mapping[str, Any], rules: list[Rule]) -> State:
    """A torch state_dict from a Flax parameter tree; every parameter must be claimed by a rule."""
    flat = unnest(params)
    out: State = {}
    used: set[str] = set()
    for rule in rules:
        layout = _layout(rule)
        for tname, jname in layout.names.items():
            key = _jax_name(rule, jname)
            if key not in flat:
                raise CheckpointError(f"missing parameter {key!r} (rule {rule.jax!r} -> {rule.torch!r} needs it)",
                                      key=key)
            out[f"{rule.torch}.{tname}"] = np.ascontiguousarray(layout.to_torch[tname](flat[key], rule.meta))
            used.add(key)
    extra = sorted(set(flat) - used)
    if extra:
        raise CheckpointError(f"unexpected parameters {extra}: no rule converts them", key=extra[0])
    return out


def probe(state: Mapping[str, np.ndarray], params: Mapping[str, Any], rules: list[Rule], *, seed: int = 0) -> list[str]:
    """Run every converted layer on a random input on both sides (float64, NumPy) and name each
    layer whose two versions compute different functions: a weight transposed, permuted or
    taken from the wrong layer shows here even where the shapes happen to fit."""
    flat, rng, bad = unnest(params), np.random.default_rng(seed), []
    for rule in rules:
        layout = _layout(rule)
        if layout.probe is None:
            continue
        t = {n: np.asarray(state[f"{rule.torch}.{n}"], np.float64) for n in layout.names}
        j = {jn: np.asarray(flat[_jax_name(rule, jn)], np.float64) for jn in layout.names.values()}
        try:
            yt, yj = layout.probe(t, j, rule.meta, rng)
            gap, why = float(np.max(np.abs(yt - yj), initial=0.0)), ""
            size = float(np.max(np.abs(yt), initial=0.0))
        except ValueError as exc:  # shapes that do not contract: the layout is wrong
            gap, size, why = float("inf"), 0.0, f" ({exc})"
        if not gap <= PROBE_RTOL * size:
            bad.append(f"{rule.torch}.weight -> {_jax_name(rule, layout.names['weight'])}: the converted "
                       f"{rule.layout} layer computes another function (max difference {gap:.3g} on a probe input)"
                       f"{why}: a transposed or permuted weight?")
    return bad
