"""Is a float32 gap at a model's first training step the optimizer amplifying gradient rounding?

Adam's first step is lr * g / (|g| + eps): a gradient element near eps turns a float32 rounding
difference of the gradient into a difference of the step, and XLA's float32 tanh and sigmoid are a
few ulps off where torch's are within one, so the port's float32 gradient may sit far further from
float64 than torch's (seed 7 of the default profile: `lstm::train::float32`, step 1, the port 2.8e-5
from float64 and torch 1.4e-6). Comparing the two sides' distances cannot tell that from a bug; the
step's own sensitivity can: each side's float32 gradient at the initial weights is measured against
float64's, and the float64 step is taken again with every gradient element moved by exactly minus
and plus twice the larger of the two errors (the corners of the rounding box, as
equivcheck.optim.diagnose does for optimizer trajectories). If both sides' float32 gradients are
within the table's bound of float64's, and both float32 steps lie within SAFETY times that spread
(plus the step's bound) of the float64 step, the gap is rounding, whichever side is further. A wrong
port differs in float64 too, or its float32 gradient is off by more than the table allows.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from equivcheck.engine.compare import flatten
from equivcheck.engine.tolerance import Tolerance
from equivcheck.models import mapping as mm
from equivcheck.models import sides as ms

__all__ = ["first_step_within_gradient_rounding"]


def _grads32(pair: Any, ents: Sequence[mm.Entry], batch: tuple[Any, ...], seed: int, device: str
             ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(torch's, the port's) float32 gradients at the initial weights, in train mode, by torch name."""
    model = ms.build_torch(pair, seed, "float32", device)
    state = ms.torch_state(model)
    params, stats = mm.to_jax(ents, state)
    x, y = list(batch[:-1]), batch[-1]
    info, t = ms.torch_grad(pair, model, x, y, train=True, seed=seed, device=device)
    (_, _), g = ms.run_jax(pair, "grad_train", "float32", device, params, stats, x, y, info["masks"])
    return t, mm.grads_to_torch(ents, g, state)


def _step64(pair: Any, ents: Sequence[mm.Entry], batch: tuple[Any, ...], seed: int, device: str,
            moved: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The float64 parameters after one training step, each gradient plus `moved[name]`."""
    import torch

    model = ms.build_torch(pair, seed, "float64", device)
    optimizer = pair.optimizer.torch_optimizer(list(model.parameters()))
    model.train(True)
    named = dict(model.named_parameters())

    def move() -> None:
        with torch.no_grad():
            for name, delta in moved.items():
                if named[name].grad is not None:
                    named[name].grad.add_(torch.from_numpy(delta).to(named[name].grad))

    handles = ms._dropout_hooks(model, {}, seed, 0)
    try:
        ms.torch_step(pair, model, optimizer, None, ms.to_torch_args(batch, device), after_backward=move)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        params, _ = mm.to_jax(ents, ms.torch_state(model))
    return [np.asarray(v, np.float64) for _, v in flatten(params)]


def first_step_within_gradient_rounding(pair: Any, ents: Sequence[mm.Entry], batch32: tuple[Any, ...],
                                        batch64: tuple[Any, ...], seed: int, device: str, t32: list[np.ndarray],
                                        j32: list[np.ndarray], ref: list[np.ndarray], exact: list[np.ndarray],
                                        bound: Tolerance, safety: float) -> bool:
    """Whether both float32 sides' parameters after step 1 (`t32`, `j32`, leaves in the port's layout)
    lie within `safety` x the float64 step's spread under gradient rounding (plus `bound`) of `ref`, the
    float64 answer. `exact` is torch's float64 step, from which the moved steps' spread is measured.
    Any failure to re-run leaves the gap standing (False)."""
    try:
        t, j = _grads32(pair, ents, batch32, seed, device)
        model = ms.build_torch(pair, seed, "float64", device)
        _, g64 = ms.torch_grad(pair, model, list(batch64[:-1]), batch64[-1], train=True, seed=seed, device=device)
        err = {n: np.maximum(np.abs(t[n] - g64[n]), np.abs(j[n] - g64[n])) for n in g64 if n in t and n in j}
        # only gradients within the table's own bound are rounding: a float32-only gradient bug is not excused
        grad_bound = {n: bound.atol + bound.rtol * np.abs(g64[n]) for n in err}
        if set(err) != set(g64) or any(not np.all(err[n] <= grad_bound[n]) for n in err):
            return False
        corners = [_step64(pair, ents, batch64, seed, device, {n: c * e for n, e in err.items()}) for c in (-2.0, 2.0)]
    except Exception:  # noqa: BLE001 - a re-run that fails says nothing: the failure stands
        return False
    if not len(exact) == len(ref) == len(corners[0]):
        return False
    for k, r in enumerate(ref):
        spread = np.maximum(np.abs(corners[0][k] - exact[k]), np.abs(corners[1][k] - exact[k]))
        allowed = safety * spread + bound.atol + bound.rtol * np.abs(r)
        for side in (t32[k], j32[k]):
            with np.errstate(invalid="ignore"):
                if not np.all(np.isfinite(side) & (np.abs(side - r) <= allowed)):
                    return False
    return True
