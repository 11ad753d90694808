"""What localisation compares and the known slips it tries: a table row, the first array of a
module's output, and the hint that re-runs a torch module with each known migration slip
(gelu approximation, LayerNorm eps, untransposed square Linear, one-border conv padding,
dropout in eval, mask polarity, LSTM gate order, BatchNorm momentum and running variance)
to name the one that reproduces the port. Used by equivcheck.models.localise (ports with
taps) and equivcheck.models.untapped (ports without)."""
from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping
from typing import Any

import numpy as np

from equivcheck.engine.compare import compare
from equivcheck.engine.tolerance import Tolerance
from equivcheck.layers import traps as divergences
from equivcheck.models.tap import first_array


@dataclasses.dataclass
class Row:
    layer: str
    module: str
    max_abs: float
    max_rel: float
    ratio: float
    ok: bool
    first: bool = False
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return {k: (v if not isinstance(v, float) or np.isfinite(v) else str(v)) for k, v in
                dataclasses.asdict(self).items()}


def _first_tensor(x: Any) -> Any:
    import torch

    x = first_array(x)  # the port's taps are unwrapped by the same rule
    return x if isinstance(x, torch.Tensor) else None


def _known(div_id: str) -> str:
    for d in divergences.TABLE:
        if d.id == div_id:
            return f"{d.cause}; reconcile: {d.reconcile} (known divergence {d.id})"
    return div_id


def _close(a: Any, b: Any, tol: Tolerance) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and compare(a, b, tol).ok


def hint(module: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any], t_out: Any, j_out: np.ndarray,
         tol: Tolerance, same: Any = None) -> str:
    """Which known slip reproduces the port's output of this torch module, if any; `same(y)`
    says whether the port computes y (default: y is `j_out` within `tol`)."""
    from equivcheck.backends.torch import to_numpy

    t = to_numpy(t_out)
    found = _slip(module, args, kwargs, t, j_out, tol, same)
    if found or np.shape(t) == np.shape(j_out):
        return found
    turned = np.shape(j_out) == np.shape(t)[::-1]
    return (f"shape: torch gives {list(np.shape(t))}, the port {list(np.shape(j_out))}"
            + ("; the port's is transposed: a layout slip (a weight used untransposed, or NHWC vs NCHW)"
               if turned else ""))


def _slip(module: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any], t: np.ndarray, j_out: np.ndarray,
          tol: Tolerance, same: Any = None) -> str:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    from equivcheck.backends.torch import to_numpy

    same = same or (lambda y: _close(to_numpy(y), j_out, tol))
    x = args[0] if args else None
    with torch.no_grad():
        if isinstance(module, nn.GELU) and module.approximate == "none" and same(F.gelu(x, approximate="tanh")):
            return _known("nn.trap.gelu_approximate")
        if isinstance(module, nn.LayerNorm):
            found = _layer_norm_eps(module, x, same)
            if found:
                return found
        if isinstance(module, nn.Linear) and module.in_features == module.out_features:
            if same(x @ module.weight + (module.bias if module.bias is not None else 0)):
                return ("layout: the port multiplies by torch's (out, in) weight untransposed (x @ W where torch "
                        "computes x @ W.T); Flax kernels are (in, out): convert with equivcheck.weights.convert "
                        "('linear'), and weights.probe names such a layer")
        if isinstance(module, nn.Conv2d) and isinstance(module.padding, tuple):
            found = _conv_padding(module, x, same)
            if found:
                return found
        if isinstance(module, nn.Dropout) and not module.training:
            dropped = (j_out == 0) & (t != 0)
            if dropped.any() and _close(np.where(dropped, 0, t / (1 - module.p)), j_out, tol):
                return ("dropout active in eval mode: the port drops and rescales by 1/(1-p) where torch's eval "
                        "mode is the identity (Flax: deterministic=True / model.eval(); equivcheck.models.dropout "
                        "with train=False)")
        if isinstance(module, nn.MultiheadAttention) and kwargs.get("key_padding_mask") is not None:
            flipped = dict(kwargs, key_padding_mask=~kwargs["key_padding_mask"].bool())
            try:
                if same(module(*args, **flipped)[0]):
                    return _known("nn.trap.mha_key_padding_polarity")
            except Exception:  # a fully masked row: not this slip
                pass
        if isinstance(module, nn.LSTM):
            found = _lstm_gates(module, args, same)
            if found:
                return found
    return ""


def _layer_norm_eps(module: Any, x: Any, same: Any) -> str:
    """The port's LayerNorm eps, among the common defaults (torch 1e-5, Flax 1e-6, BERT 1e-12),
    whichever way round: a torch model built with Flax's eps is as common as the reverse."""
    import torch.nn.functional as F

    for eps in (1e-6, 1e-5, 1e-12):
        if eps != module.eps and same(F.layer_norm(x, module.normalized_shape, module.weight, module.bias, eps=eps)):
            if (module.eps, eps) == (1e-5, 1e-6):
                return _known("nn.trap.layer_norm_eps")
            return (f"LayerNorm eps: the port normalises with eps={eps:g} where torch's module has eps="
                    f"{module.eps:g}: give the port the torch module's eps (nnx.LayerNorm(epsilon={module.eps:g}))")
    return ""


def _conv_padding(module: Any, x: Any, same: Any) -> str:
    import torch.nn.functional as F

    ph, pw = module.padding
    base = [pw, pw, ph, ph]  # F.pad order: left, right, top, bottom
    names = ("left", "right", "top", "bottom")
    found = []
    for side, delta in itertools.product(range(4), (-1, 1)):
        pads = list(base)
        pads[side] += delta
        if min(pads) < 0:
            continue
        y = F.conv2d(F.pad(x, pads), module.weight, module.bias, module.stride, 0, module.dilation, module.groups)
        if same(y):
            found.append((names[side], pads[side]))
    if found:  # a flat input cannot tell the borders apart: name every one that fits
        where = " or ".join(f"{side} by {n}" for side, n in found)
        return (f"conv padding differs on one border: the port pads {where} where torch pads {base[0]} on every side"
                f" ({_known('nn.trap.conv_same_stride2')})")
    return ""


def _lstm_gates(module: Any, args: tuple[Any, ...], same: Any) -> str:
    import copy

    import torch

    gates = "ifgo"
    for perm in itertools.permutations(range(4)):
        if perm == (0, 1, 2, 3):
            continue
        twin = copy.deepcopy(module)
        with torch.no_grad():
            for name, p in twin.named_parameters():
                h = p.shape[0] // 4
                p.copy_(torch.cat([getattr(module, name)[k * h:(k + 1) * h] for k in perm]))
        if same(twin(*args)[0]):
            return (f"LSTM gate order: the port reads torch's gate rows (i, f, g, o) as "
                    f"({', '.join(gates[k] for k in perm)}); equivcheck.weights.convert ('lstm') maps them by name")
    return ""


def _stats_hint(old: Mapping[str, np.ndarray], t_new: Mapping[str, np.ndarray], j_new: Mapping[str, np.ndarray],
                momentum: float, tol: Tolerance, count: int | None = None) -> str:
    """The known slip behind a BatchNorm's running statistics that differ after one update:
    Flax's momentum convention (the weight of the old value, torch's of the new), else the
    variance torch averages in (unbiased, Flax's biased; `count` values per channel in the
    batch); "" when neither reproduces the port's."""
    batch = (t_new["mean"] - (1 - momentum) * old["mean"]) / momentum  # torch's batch mean, recovered
    if _close(momentum * old["mean"] + (1 - momentum) * batch, j_new["mean"], tol):
        return _known("nn.trap.batch_norm_momentum")
    if count and count > 1 and "var" in t_new and "var" in j_new and _close(t_new["mean"], j_new["mean"], tol):
        # torch's update is momentum x the unbiased batch variance, the port's (n-1)/n of it
        t_var, j_var, o_var = (np.asarray(a, np.float64) for a in (t_new["var"], j_new["var"], old["var"]))
        biased = (1 - momentum) * o_var + (t_var - (1 - momentum) * o_var) * (count - 1) / count
        if _close(biased, j_var, tol):
            return (f"the port's running_var update is torch's x (n-1)/n, n = {count} values per channel: "
                    f"{_known('nn.trap.batch_norm_running_var')}")
    return ""
