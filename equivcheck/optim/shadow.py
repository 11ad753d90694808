"""Whether both float32 trajectories are float64's, step by step, from where each side stood.

The acceptance of equivcheck.optim.diagnose.explained_by_rounding compares the float32 runs with an
envelope: SAFETY times the spread of six float64 runs jittered like float32. Where a trajectory
amplifies rounding the envelope is a sample, and a side's own float32 run can lie outside it:
nadamw::mlp::float32 at seed 1403755993 failed 125 steps in, torch at 1.53 times the envelope, JAX
at 0.49, the two float64 runs 2e-6 of their bound apart. The shadowing argument that
equivcheck.models.sensitivity makes for models judges each step instead. For every step k and side,
torch's float64 optimizer is run one step from that side's own float32 parameters and state after
step k - 1 (its gradient taken in float64 there). The result must match the side's step k to one
step's bound (the table's one-step row). Per leaf and step, the side further from its float64 step
must lie within ROUNDING_FACTOR times the nearer side's distance plus OPTIMIZER_ULPS ulps of the
leaf's largest move so far. Without that second test, an Adam keeping its second moment in float16
(about 5e-6 per step, half the one-step bound) would pass as rounding (the adversarial trials of
models, 2026-12-02).

Both float64 runs must agree first (the caller's condition), so one function is being rounded. The
optimizer state must move between the frameworks (`trajectory.movable`): each step is loaded
into torch.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from equivcheck.engine.compare import flatten, within
from equivcheck.engine.tolerance import Tolerance
from equivcheck.optim.sides import run_jax, run_torch, scan_length
from equivcheck.optim.state import widen, widen_state
from equivcheck.optim.trajectory import PROBLEM_OF, Example, compare_steps, movable

__all__ = ["OPTIMIZER_ULPS", "ROUNDING_FACTOR", "float64_runs_agree", "steps_faithful"]

# As equivcheck.models.sensitivity: XLA's float32 transcendentals are a few ulps off where torch's
# are within one, so one side may sit that much further from float64 than the other.
ROUNDING_FACTOR = 4.0
# float32 ulps of a leaf's largest move so far by which one side's distance from its float64 step
# may exceed ROUNDING_FACTOR times the other's: optax's Adam measured 57, a bfloat16 moment ~8000.
OPTIMIZER_ULPS = 256.0
_EPS32 = float(np.finfo(np.float32).eps)


def steps_faithful(pair: Any, ex: Example, out: Any, dtype: str, run: Any, base: Tolerance) -> bool:
    """Whether every step of both sides' float32 run over the compared stretch is torch's float64
    step from where that side stood (the module docstring). False where it cannot be judged (a
    float64 run, a state that does not move between frameworks, a re-run that raises)."""
    if dtype == "float64" or ex.check not in PROBLEM_OF or not movable(pair) or out.verdict is None:
        return False
    problem, k0 = PROBLEM_OF[ex.check], out.offset
    params0 = out.start["params"] if out.start else ex.params
    state0 = out.start["state"] if out.start else None
    n = ex.steps - k0
    length = scan_length(ex.check)
    try:
        sides = (run_torch(pair, problem, params0, ex.data, n, dtype=dtype, device=run.device, start=state0,
                           start_step=k0),
                 run_jax(pair, problem, length, params0, ex.data, n, dtype=dtype, device=run.device, start=state0,
                         start_step=k0))
        if not _reproduces(sides, out, base):
            return False
        errors = [_local_errors(pair, problem, params0, state0, ex.data, steps, k0, run, base) for steps in sides]
    except Exception:  # noqa: BLE001 - a re-run that raises, or a step past its bound: the gap stands
        return False
    start = _values(params0)
    moved: dict[str, float] = {}
    for k, (t_err, j_err) in enumerate(zip(*errors)):
        for path in t_err:
            at = [_values(s[k]["params"]).get(path) for s in sides]
            if path in start:
                moved[path] = max(moved.get(path, 0.0), *(float(np.max(np.abs(a - start[path]), initial=0.0))
                                                          for a in at if a is not None))
            near, far = sorted((t_err[path], j_err.get(path, np.inf)))
            if not far <= ROUNDING_FACTOR * near + OPTIMIZER_ULPS * _EPS32 * moved.get(path, 0.0):
                return False
    return True


def float64_runs_agree(pair: Any, problem: Any, params: Any, data: Any, state: Any, k0: int,
                       torch64: list[list[np.ndarray]], jax64: list[list[np.ndarray]], tol64: Tolerance,
                       seed: int) -> bool:
    """Whether the two float64 runs (leaves per step, from the stretch's start, params and state in
    float64) agree at every step within SAFETY x the spread of torch's float64 run jittered by
    float64's own rounding (ULPS float64 ulps of the parameters and state after each step) plus
    float64's bound for the step count. Where a trajectory turns rounding into whole steps (RMSprop
    dividing a gradient that cancels to noise by its own root mean square: rmsprop::mlp at seed
    296031912, the float64 runs 1e-3 apart after 70 steps) float64 parts too, by what its own
    rounding does; a formula difference parts them at the first steps, where that spread is ulps."""
    from equivcheck.ops.conditioning import SAFETY, SAMPLES, ULPS, _eps
    from equivcheck.optim.trajectory import trajectory_tolerance

    # A formula difference parts the runs past float64's bound at once; rounding takes steps to
    # grow 1e9-fold (float64's ulps to its table's bound: the rmsprop runs above agree to 1e-16 at
    # step 10), so runs apart by step 2 are refused before the re-runs.
    for m, (t_at, j_at) in enumerate(zip(torch64[:2], jax64[:2]), start=1):
        if not all(np.all(within(trajectory_tolerance(tol64, m), a, b, "float64")) for a, b in zip(t_at, j_at)):
            return False
    rng, rel = np.random.default_rng(seed), ULPS * _eps("float64")
    last = len(torch64)
    spread = [[np.zeros_like(x) for x in at] for at in torch64]
    for _ in range(SAMPLES):
        runs = run_torch(pair, problem, params, data, last, dtype="float64", start=state, start_step=k0,
                         jitter=(rng, rel, None))
        for sp, run, ref in zip(spread, runs, torch64):
            for i, (x, r) in enumerate(zip(_flat(run), ref)):
                sp[i] = np.maximum(sp[i], np.abs(x - r))
    for m, (t_at, j_at, sp) in enumerate(zip(torch64, jax64, spread), start=1):
        t = trajectory_tolerance(tol64, m)
        for a, b, v in zip(t_at, j_at, sp):
            bound = SAFETY * v + t.atol + t.rtol * np.abs(a)
            with np.errstate(invalid="ignore"):
                if not np.all((np.isfinite(bound) & (np.abs(a - b) <= bound)) | (a == b)):
                    return False
    return True


def _flat(step: Any) -> list[np.ndarray]:
    from equivcheck.engine.compare import leaves

    return [np.asarray(x, np.float64) for x in leaves(step)]


def _reproduces(sides: tuple[list[Any], list[Any]], out: Any, base: Tolerance) -> bool:
    """The re-runs reach what the failed check saw, from its failing step to the last, to one step's
    bound: the rule judges the trajectories it re-ran, so they must be the ones that failed."""
    seen = list(zip(*out.after)) or [(out.torch_at, out.jax_at)]
    for i, pair_seen in enumerate(seen):
        for steps, step in zip(sides, pair_seen):
            k = out.step - 1 + i
            if k >= len(steps) or step is None:
                return False
            a, b = _values(steps[k]["params"]), _values(step["params"])
            if set(a) != set(b) or not all(np.all(within(base, a[p], b[p])) for p in a):
                return False
    return True


def _local_errors(pair: Any, problem: Any, params0: Any, state0: Any, data: Any, steps: list[Any], k0: int,
                  run: Any, base: Tolerance) -> list[dict[str, float]]:
    """Per step, per params leaf: the largest distance of the side's step from torch's float64 step
    from where the side stood. Raises ValueError where a step is past the one-step bound."""
    data64 = widen(data)
    prev_params, prev_state = params0, state0
    out = []
    for k, cur in enumerate(steps):
        one = run_torch(pair, problem, widen(prev_params), data64, 1, dtype="float64", device=run.device,
                        start=None if prev_state is None else widen_state(prev_state, pair.state_map), start_step=k0 + k)[0]
        mine = {"params": cur["params"], **({"state": cur["state"]} if "state" in cur else {})}
        theirs = {"params": one["params"], **({"state": one["state"]} if "state" in one else {})}
        if not compare_steps([widen(mine)], [widen(theirs)], base).ok:  # the float32 step held to float32's bound
            raise ValueError(f"step {k0 + k + 1} is past one step's bound from float64's")
        a, b = _values(cur["params"]), _values(one["params"])
        out.append({p: float(np.max(np.abs(a[p] - b[p]), initial=0.0)) for p in a})
        prev_params, prev_state = cur["params"], cur.get("state")
    return out


def _values(params: Any) -> dict[str, np.ndarray]:
    return {p: np.asarray(v, np.float64) for p, v in flatten({"params": params})}
