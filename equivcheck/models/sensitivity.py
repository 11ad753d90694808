"""Is a float32 gap in a model's training trajectory rounding, however the training amplifies it?

Two ways float32 training parts from float64 with no side wrong, both seen in the default profile:
- Adam's step is lr * m / (sqrt(v) + eps): a gradient element near eps turns a rounding difference
  of the gradient into a difference of the step, and XLA's float32 tanh and sigmoid are a few ulps
  off where torch's are within one (seed 7: `lstm::train::float32`, step 1, the port 2.8e-5 from
  float64 and torch 1.4e-6);
- the loss has kinks (ReLU, max pool): weights a few ulps apart can sit on either side of one
  (seed 1, 30 examples, `cnn::train::float32`: after step 5 the port's weights are 1.7e-7 from
  float64's, and float64's own gradient of conv1's kernel differs by 0.06 between the two points;
  at step 6 the port's kernel moves 3.5e-4 away, torch's stays within 5e-8).
No bound on the sides' distances from float64, and no bound on how a float64 trajectory amplifies
small perturbations, tells these from a bug. What does is the shadowing (local error) argument of
numerical ODE analysis: whether each side, at every step, did what float64 arithmetic does from
where that side stood. For each side and each step k <= n:
1. its float32 gradient (the one the step took) is within the table's one-step vjp bound of the
   float64 gradient at that side's own weights before step k, on which torch and the port agree
   to float64's bound (their mean is the reference: neither side's float64 is the truth alone);
   and, leaf by leaf, the further side's largest error is within ROUNDING_FACTOR times the other
   side's plus GRADIENT_ULPS ulps of the leaf's largest gradient. The table's row alone (atol
   2e-5) let a port through whose head bias was fake-quantized to float16 in float32 only: its
   gradient errors were 250-600 times torch's and 100-300 ulps of the leaf, where rounding gives
   at most 2.3 times and 3 ulps (lstm, seed 22; cnn, seed 1);
2. torch's float64 optimizer, fed that side's float32 gradients step by step, lands within each
   step's bound of the side's weights and statistics after that step (the side's optimizer
   arithmetic is float64's, rounded), and, leaf by leaf, the further side within ROUNDING_FACTOR
   times the other's distance plus OPTIMIZER_ULPS ulps of the leaf's moves so far:
   an Adam keeping its second moment in bfloat16 moves each step by ~1e-5, half the table's
   one-step bound, and Adam's amplification carried the drift past the trajectory's bound.
With the two float64 runs agreeing (equivcheck.models.evaluate._rounding), both sides are float32
renderings of one float64 training and the gap is its sensitivity to rounding. A port whose float32
gradient is wrong fails 1 at some step, one whose float32 optimizer is wrong fails 2, and one
computing another function fails in float64. The weights must load back into torch
(equivcheck.models.mapping.to_torch; a pair's own `to_jax` through its map read backwards): where
they cannot, the gap stands.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from equivcheck.engine.compare import flatten
from equivcheck.engine.tolerance import Tolerance
from equivcheck.models import mapping as mm
from equivcheck.models import sides as ms

__all__ = ["GRADIENT_ULPS", "NotRounding", "trajectories_faithful"]

# XLA's float32 transcendental functions are a few ulps off where torch's are within one (tanh 4.2
# vs 0.56 ulp, equivcheck.optim.sides): one side's float32 run may sit that much further from float64
# than the other's (which side is not assumed: a torch side wrong in float32 must not excuse the port).
ROUNDING_FACTOR = 4.0
# float32 ulps of a leaf's largest gradient that one side's gradient error may exceed the other's
# by (times ROUNDING_FACTOR): rounding measured at most 3 (module docstring), bugs 100 and more.
GRADIENT_ULPS = 16.0
# float32 ulps of the moves a leaf has made so far that one side's optimizer arithmetic may be off by
# beyond ROUNDING_FACTOR times the other's: optax's Adam was 57 from float64 where torch's was 1
# (cnn, seed 1, step 1, bn1's bias); an Adam keeping its second moment in bfloat16, ~8000.
OPTIMIZER_ULPS = 256.0


class NotRounding(Exception):
    """A step of one side's trajectory is further from float64's than rounding allows."""


def _allowed(tol: Tolerance, ref: np.ndarray) -> np.ndarray:
    scale = np.abs(ref) if tol.per == "element" else np.max(np.abs(ref), initial=0.0)
    return tol.atol + tol.rtol * scale


def _model_at(pair: Any, ents: Sequence[mm.Entry], seed: int, device: str, params: Any, stats: Any) -> Any:
    """torch's float64 model holding the port-layout weights `params` and statistics `stats`."""
    import torch

    model = ms.build_torch(pair, seed, "float64", device)
    own = model.state_dict()
    new = mm.to_torch(ents, params, stats)
    if set(new) - set(own) or any(k not in new for k, v in own.items() if v.is_floating_point()):
        raise NotRounding("the port's weights do not load back into torch")
    with torch.no_grad():
        model.load_state_dict({k: torch.from_numpy(np.array(new[k], np.float64)).to(v) if k in new else v
                               for k, v in own.items()})
    return model


def _float64_gradient(pair: Any, ents: Sequence[mm.Entry], seed: int, device: str, params: Any, stats: Any,
                      batch: tuple[Any, ...], step: int, one64: Tolerance) -> dict[str, np.ndarray]:
    """The float64 gradient of step `step` at the given weights, by torch name: the mean of torch's
    and the port's, which must agree to `one64`."""
    model = _model_at(pair, ents, seed, device, params, stats)
    x, y = list(batch[:-1]), batch[-1]
    info, t = ms.torch_grad(pair, model, x, y, train=True, seed=seed, device=device, step=step)
    state = ms.torch_state(model)
    p64, s64 = mm.to_jax(ents, state)
    (_, _), g = ms.run_jax(pair, "grad_train", "float64", device, p64, s64, x, y, info["masks"])
    j = mm.grads_to_torch(ents, g, state)
    for n in t:
        if n not in j or not np.all(np.abs(t[n] - j[n]) <= _allowed(one64, t[n])):
            raise NotRounding(f"the float64 gradients of {n!r} differ at step {step + 1}")
    return {n: (t[n] + j[n]) / 2 for n in t}


def _leaves(tree: Any) -> list[np.ndarray]:
    return [np.asarray(v, np.float64) for _, v in flatten(tree)]


def _gradient_errors(pair: Any, ents: Sequence[mm.Entry], seed: int, device: str, start: dict[str, Any],
                     steps: Sequence[dict[str, Any]], batches64: Sequence[tuple[Any, ...]], one: Tolerance,
                     one64: Tolerance) -> list[dict[str, tuple[float, float]]]:
    """Per step of one side's trajectory `steps` (each with the "grads" it took, by torch name, and
    the "params"/"stats" after it), per torch parameter: (the largest error of the float32 gradient
    against float64's at the side's own weights, the largest float64 gradient). Raises NotRounding
    where an error is past the table's one-step bound `one`."""
    out = []
    for k, batch in enumerate(batches64):
        here = start if k == 0 else steps[k - 1]
        ref = _float64_gradient(pair, ents, seed, device, here["params"], here["stats"], batch, k, one64)
        errors = {}
        for n, r in ref.items():
            took = np.asarray(steps[k]["grads"].get(n, np.full_like(r, np.nan)), np.float64)
            with np.errstate(invalid="ignore"):
                if not np.all(np.abs(took - r) <= _allowed(one, r)):
                    raise NotRounding(f"the float32 gradient of {n!r} at step {k + 1} is off by more than the table")
            errors[n] = (float(np.max(np.abs(took - r), initial=0.0)), float(np.max(np.abs(r), initial=0.0)))
        out.append(errors)
    return out


def _optimizer_errors(pair: Any, ents: Sequence[mm.Entry], seed: int, device: str, start: dict[str, Any],
                      steps: Sequence[dict[str, Any]], batches64: Sequence[tuple[Any, ...]],
                      one: Tolerance) -> list[dict[str, tuple[float, float]]]:
    """Per step, per leaf of the weights and statistics: (the largest distance of one side's value
    after that step from torch's float64 optimizer fed the same gradients, the sum of the leaf's
    largest moves so far, from `start`). Raises NotRounding where the distance is past step k's
    bound (k times `one`)."""
    model = ms.build_torch(pair, seed, "float64", device)
    replayed, _ = ms.torch_train(pair, model, ents, batches64, seed=seed, device=device,
                                 given=[s["grads"] for s in steps])
    before = {f"{part}{path}": np.asarray(v, np.float64) for part in ("params", "stats")
              for path, v in flatten(start[part])}
    moved: dict[str, float] = {}
    out: list[dict[str, tuple[float, float]]] = []
    for k, (again, side) in enumerate(zip(replayed, steps)):
        bound, errors = one.scaled(k + 1, ""), {}
        for part in ("params", "stats"):
            for (path, r), (_, v) in zip(flatten(again[part]), flatten(side[part]), strict=True):
                r, v, key = np.asarray(r, np.float64), np.asarray(v, np.float64), f"{part}{path}"
                with np.errstate(invalid="ignore"):
                    if not np.all(np.abs(v - r) <= _allowed(bound, r)):
                        raise NotRounding(f"the float32 optimizer's {part} part from float64's fed the same "
                                          f"gradients at step {k + 1}")
                # the scale of rounding in the steps taken so far: their largest moves, summed
                moved[key] = moved.get(key, 0.0) + float(np.max(np.abs(r - before.get(key, r)), initial=0.0))
                before[key] = r
                errors[key] = (float(np.max(np.abs(v - r), initial=0.0)), moved[key])
        out.append(errors)
    return out


def _same_rounding(errors: Sequence[list[dict[str, tuple[float, float]]]], what: str, ulps: float) -> None:
    """Raises NotRounding where one side's error (gradient, or optimizer arithmetic) is past
    ROUNDING_FACTOR times the other's plus `ulps` float32 ulps of the leaf's scale (module docstring)."""
    eps = float(np.finfo(np.float32).eps)
    for k, (t, j) in enumerate(zip(*errors, strict=True)):
        for n in t.keys() & j.keys():
            near, far = sorted((t[n][0], j[n][0]))
            if far > ROUNDING_FACTOR * near + ulps * eps * max(t[n][1], j[n][1]):
                raise NotRounding(f"at step {k + 1} one side's float32 {what} of {n!r} is {far:.3g} from "
                                  f"float64's, the other's {near:.3g}: not rounding")


def trajectories_faithful(pair: Any, ents: Sequence[mm.Entry], seed: int, device: str,
                          batches32: Sequence[tuple[Any, ...]], batches64: Sequence[tuple[Any, ...]],
                          failing: tuple[list[np.ndarray], list[np.ndarray]], one: Tolerance,
                          one64: Tolerance) -> bool:
    """Whether both sides' float32 training over n = len(batches64) steps (`batches32`; `batches64`
    the same values in float64) is float64's training from every point it stood at (the module
    docstring). Both sides are re-run keeping the gradients each step took; `failing` (torch's and
    the port's parameters after step n, as the failed check saw them, leaves in the port's layout)
    must be what the re-runs reach to one step's bound `one` (the table's float32 vjp row; step k
    is held to k times it). `one64` is float64's one-step vjp row. Any failure to re-run leaves the
    gap standing (False)."""
    n = len(batches64)
    if n < 1 or len(batches32) < n:
        return False
    try:
        model = ms.build_torch(pair, seed, "float32", device)
        params, stats = mm.to_jax(ents, ms.torch_state(model))
        t_steps, t_masks = ms.torch_train(pair, model, ents, batches32[:n], seed=seed, device=device, grads=True)
        masks = t_masks + [{k: np.ones_like(v) for k, v in t_masks[0].items()}] * (len(batches32) - n)
        inputs = [np.stack([b[i] for b in batches32]) for i in range(len(batches32[0]) - 1)]
        targets = np.stack([b[-1] for b in batches32])
        j = ms.run_jax(pair, "train_grads", "float32", device, params, stats, inputs, targets,
                       {k: np.stack([m[k] for m in masks]) for k in masks[0]})
        state = ms.torch_state(model)
        j_steps = [{"params": ms.jax_index(j["params"], k), "stats": ms.jax_index(j["stats"], k),
                    "grads": mm.grads_to_torch(ents, ms.jax_index(j["grads"], k), state)} for k in range(n)]
        for steps, seen in zip((t_steps, j_steps), failing, strict=True):
            again = _leaves(steps[n - 1]["params"])
            if len(again) != len(seen) or not all(np.all(np.abs(a - s) <= _allowed(one, s)) for a, s in zip(again, seen)):
                return False
        start = {"params": params, "stats": stats}
        _same_rounding([_gradient_errors(pair, ents, seed, device, start, steps, batches64[:n], one, one64)
                        for steps in (t_steps, j_steps)], "gradient", GRADIENT_ULPS)
        _same_rounding([_optimizer_errors(pair, ents, seed, device, start, steps, batches64[:n], one)
                        for steps in (t_steps, j_steps)], "optimizer step", OPTIMIZER_ULPS)
    except Exception:  # noqa: BLE001 - NotRounding, or a re-run that fails: the failure stands
        return False
    return True
