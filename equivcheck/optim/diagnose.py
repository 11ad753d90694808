"""Why an optimizer check failed: re-run the failing example under controlled changes.

In order: a step NaN or infinite on one side only; a learning-rate sequence shifted by one step;
updates applied one step late, weight decay on other parameters than torch's param groups, and
a leaf one side keeps in (or rounds through) float16 or bfloat16 (equivcheck.optim.causes); a
state map that reads the wrong field or scale (the state parts within two steps, the
parameters do not); float64 (the gap was rounding, and the float32 side further from float64
torch is off);
then one hyperparameter at a time, changed on both sides (weight_decay=0, eps=0, Nesterov
off, momentum or beta1 = 0) and a start at step 10**6, where every bias correction
1 - beta**t is 1. The first change under which the two sides agree names the cause. A pair
built by hand (no `rebuild`) gets all but the hyperparameter probes.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from equivcheck.engine.compare import flatten, leaves, within
from equivcheck.engine.tolerance import Tolerance, lookup
from equivcheck.optim.causes import coarse_grid, decay_elsewhere, lagged, nonfinite
from equivcheck.optim.shadow import float64_runs_agree, steps_faithful
from equivcheck.optim.sides import MAX_STEPS, run_torch, scan_length, torch_optimizer_for, treedef_of
from equivcheck.optim.state import torch_to_neutral, widen, widen_state
from equivcheck.optim.trajectory import PROBLEM_OF, Example, Outcome, evaluate, lr_sequences, trajectory_tolerance

LARGE_STEP = 10**6
FLOAT32_LEVEL = 64 * 2.0**-23  # relative error per step that float32 arithmetic can leave

MEANING = {
    "weight_decay": "weight decay is applied differently: coupled L2 added to the gradient (torch's Adam, SGD, "
                    "RMSprop weight_decay) vs decoupled param *= 1 - lr*wd (AdamW, optax.adamw), or with another value",
    "eps": "eps enters differently: inside vs outside the square root (or on the raw vs bias-corrected second "
           "moment), or with another value",
    "nesterov": "the Nesterov formula differs (plain momentum agrees)",
    "momentum": "the momentum update differs (dampening, or where the lr enters the buffer)",
    "dampening": "dampening differs: torch's momentum buffer takes (1 - dampening) * g, optax.trace takes g",
    "beta1": "the first-moment (momentum / Nesterov) formula differs: its bias correction 1 - beta1**t, or e.g. "
             "NAdam's momentum schedule mu_t vs a constant beta1",
    "bias": "the bias correction differs: missing, or applied at another point (from step 10**6 on, where "
            "1 - beta**t = 1, the sides agree)",
}


def _state_only(out: Outcome) -> str:
    """Where the parameters agree and only the optimizer state read through the state map does
    not: the map (a StateField's optax field or scale) is the first suspect, not either side."""
    v = out.verdict
    if v is None or v.kind != "values" or out.step > 2:
        # A wrong field or scale shows at once (step 1, or 2 where a state starts as its first gradient);
        # state parting later follows parameters parting within their larger, accumulated bound
        # (mu ~ a * (p - c) amplifies a drift of p: a port slipping after step 50 read "check the StateField").
        return ""
    off = [leaf for leaf in v.leaves if leaf.ratio > 1]
    params = [leaf for leaf in v.leaves if leaf.path.startswith("out['params']")]
    mapped = "out['state']"
    if not off or not params or not all(leaf.path.startswith(mapped) and not leaf.path.startswith(mapped + "['sched']")
                                        for leaf in off):
        return ""  # a schedule's own state (ReduceLROnPlateau's) is the schedule's business
    if all(0 < leaf.max_rel <= FLOAT32_LEVEL * max(out.step, 1) for leaf in off):
        # A wrong field or scale is off by far more than float32 rounding: centered RMSprop's
        # momentum 90 ulps apart at step 2 on a GPU read "check the StateField".
        return ""
    fields = sorted({leaf.path.split("][")[1].strip("'[]") for leaf in off if "][" in leaf.path})
    return (f"the parameters agree at step {out.step}; only the optimizer state read through the pair's state_map "
            f"differs ({', '.join(repr(f) for f in fields)}, first {max(off, key=lambda x: x.ratio).path}): check "
            "the StateField for it (which optax field holds torch's value, and its scale) before either side")


def diagnose(pair: Any, ex: Example, out: Outcome, dtype: str, run: Any, base: Tolerance) -> tuple[str | None, str]:
    if out.side_error == "the pair's state_map":
        return None, "the pair's state_map is wrong, not either side: see the message"
    if out.side_error:
        return out.side_error, "a side raised: see the message"
    blamed = nonfinite(pair, ex, out, dtype, run)
    if blamed:
        return blamed
    worst = out.verdict.worst if out.verdict is not None else None
    path = worst.path if worst is not None else ""
    if ex.check == "schedule" or path.startswith("out['lr']"):
        shifted = _shift(pair, dtype, base)
        if shifted or ex.check == "schedule":
            return None, shifted or "the learning-rate schedules differ"
    moved_lr = _schedule_state(out, base)
    if moved_lr:
        return None, moved_lr
    late = lagged(pair, ex, dtype, run, base)
    if late:
        return late
    elsewhere = decay_elsewhere(pair, ex, dtype, run, base)
    if elsewhere:
        return "jax", elsewhere
    narrow = coarse_grid(out)  # after the lag: a side that has not moved holds the drawn, often short, values
    if narrow:
        return narrow
    mapped = _state_only(out)  # after the narrow dtype: a state kept in float16 parts from the first step too
    if mapped:
        return None, mapped
    at_float32 = dtype == "float64" and worst is not None and 0 < worst.max_rel <= FLOAT32_LEVEL * out.step
    if at_float32 and _agrees_with_float64_scalars(pair, ex, dtype, run, base):
        return "torch", ("the gap is at float32's level, and with torch.set_default_dtype(torch.float64) the sides "
                         "agree: torch keeps part of the optimizer's scalar state in its default dtype (float32) "
                         "for float64 parameters (e.g. NAdam's mu_product, a capturable step), so its float64 "
                         "step carries float32 roundings that the trajectory amplified")
    # Said only when no probe names a formula: a port dropping a bias correction after step 50 is 1e-4
    # apart at step 62, within this level, and read "computes part of the step in float32".
    level = "" if not at_float32 else (
        f"the gap is at float32's level (max relative error {worst.max_rel:.2g} after {out.step} steps) and no "
        "single change explains it: one side may compute part of the step in float32 in this float64 run (an "
        "accumulator, a schedule at an int32 count, a constant)")
    if dtype != "float64":
        verdict = _rounding(pair, ex, out, run)
        if verdict:
            return verdict
    if pair.rebuild is None or not pair.hparams:
        return _ported(pair, level or "the two sides compute different steps (a pair built by hand: no hyperparameter "
                                      "probes)", level)
    for label, changes in _probes(pair.hparams):
        try:
            probe = pair.rebuild(**changes)
        except Exception:  # a change the mapping cannot express says nothing
            continue
        if evaluate(probe, ex, dtype, run, base).ok:
            said = ", ".join(f"{k}={v!r}" for k, v in changes.items())
            return _ported(pair, f"with {said} on both sides the two agree on this example: {MEANING[label]}")
    if pair.state_map.torch_step and pair.torch_scheduler is None:
        start = _fresh_state(pair, ex, dtype)
        if start is not None and evaluate(pair, ex, dtype, run, base, start=start).ok:
            return _ported(pair, MEANING["bias"])
    return _ported(pair, level or ("the formulas differ; no single change (weight_decay, eps, nesterov, momentum, "
                                   "beta1 set to 0, or a start at step 10**6) makes the sides agree"), level)


def _ported(pair: Any, text: str, level: str = "") -> tuple[str | None, str]:
    """A formula difference is the port's where the pair names its specification (OptimizerPair.spec:
    a port of one's own of a torch.optim class); between two libraries, or where the gap is at
    float32's level (which side computes in float32 is not known), no side."""
    if pair.spec not in ("torch", "jax") or (level and text == level):
        return None, text
    port = "jax" if pair.spec == "torch" else "torch"
    return port, f"{text} ({pair.spec} is the specification this pair's {port} side ports)"


def _agrees_with_float64_scalars(pair: Any, ex: Example, dtype: str, run: Any, base: Tolerance) -> bool:
    """torch creates an optimizer's scalar state (step, NAdam's mu_product) in its default dtype,
    not the parameters' (torch.optim.optimizer._get_scalar_dtype): rerun with that default at
    float64."""
    import torch

    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return evaluate(pair, ex, dtype, run, base).ok
    except Exception:  # noqa: BLE001 (a rerun that raises says nothing about the scalar dtype)
        return False
    finally:
        torch.set_default_dtype(before)


def _schedule_state(out: Outcome, base: Tolerance) -> str:
    """A schedule with state of its own (ReduceLROnPlateau) whose decisions differ at the first
    failing step has moved the lr apart: the parameters then differ because of the schedule,
    whatever the optimizer's formula (probing hyperparameters would only move the plateau).
    Its decisions, not its `best` loss: losses differ once parameters do, whatever the cause.
    The scale is a product of a few factors; 1e-4 relative is far above its rounding."""
    t = ((out.torch_at or {}).get("state") or {}).get("sched")
    j = ((out.jax_at or {}).get("state") or {}).get("sched")
    if not t or not j:
        return ""
    differ = [k for k in sorted(t) if k in j and k != "best" and
              abs(float(t[k]) - float(j[k])) > (1e-4 * max(abs(float(t[k])), abs(float(j[k]))) if k == "scale" else 0)]
    if not differ:
        return ""
    values = ", ".join(f"{k} torch {float(t[k]):.6g} vs optax {float(j[k]):.6g}" for k in differ)
    why = ("the two sides reduce the learning rate differently (factor, min_lr, or the floor where torch skips a "
           "reduction smaller than its eps)" if differ == ["scale"] else
           "the plateau decisions differ (patience, threshold and its mode, cooldown)")
    return f"the schedule's own state differs at step {out.global_step} ({values}): {why}"


def _probes(hp: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    if hp.get("weight_decay"):
        out.append(("weight_decay", {"weight_decay": 0.0}))
    if hp.get("eps"):
        out.append(("eps", {"eps": 0.0}))
    if hp.get("nesterov"):
        out.append(("nesterov", {"nesterov": False}))
    if hp.get("momentum") and hp.get("dampening"):
        out.append(("dampening", {"dampening": 0.0}))
    if hp.get("momentum"):
        out.append(("momentum", {"momentum": 0.0, **({"nesterov": False} if "nesterov" in hp else {}),
                                 **({"dampening": 0.0} if "dampening" in hp else {})}))
    betas = hp.get("betas")
    if betas and betas[0]:
        out.append(("beta1", {"betas": (0.0, betas[1])}))
    return out


def _fresh_state(pair: Any, ex: Example, dtype: str) -> dict[str, Any] | None:
    import torch

    try:
        treedef = treedef_of(ex.params)
        leaves = [torch.tensor(np.array(x)) for x in treedef.flatten_up_to(ex.params)]
        state = torch_to_neutral(torch_optimizer_for(pair, leaves, ex.params), pair.state_map, treedef, 0,
                                 params=leaves)
    except Exception:
        return None
    state["step"] = np.asarray(float(LARGE_STEP))
    return state


def _shift(pair: Any, dtype: str, base: Tolerance) -> str:
    try:
        t, j = lr_sequences(pair, MAX_STEPS, dtype)
    except Exception:
        return ""
    t_arr, j_arr = np.asarray(t), np.asarray(j)
    if not len(t_arr):
        return ""
    same = lambda a, b: bool(np.all(within(base, a, b, dtype)))
    if same(t_arr, j_arr):
        return ""
    if same(t_arr[1:], j_arr[:-1]):
        return ("schedule shifted by one step: torch's lr at update t+1 is optax's at update t - optax evaluates "
                "its schedule one count ahead (schedule(count + 1)), or torch steps its scheduler one call late")
    if same(t_arr[:-1], j_arr[1:]):
        return ("schedule shifted by one step: torch's lr at update t is optax's at update t+1 - torch calls "
                "scheduler.step() before optimizer.step() (update t must use the lr after t-1 scheduler steps, "
                "optax's schedule(t - 1))")
    return "the learning-rate schedules differ, and not by a shift of one step"


def _rounding(pair: Any, ex: Example, out: Outcome, run: Any) -> tuple[str | None, str] | None:
    """If the example agrees in float64, the float32 gap was rounding: blame the float32 side
    further from torch's float64 value at the failing leaf and step."""
    wide = dataclasses.replace(ex, params=widen(ex.params), data=widen(ex.data))
    tol64 = lookup("float64", device=run.device, precision=run.precision)
    out64 = evaluate(pair, wide, "float64", run, tol64)
    if not out64.ok:
        return _scalars_in_float32(pair, wide, out64, run, tol64)
    text = (f"rounding: the sides agree in float64, so the float32 gap after {out.step} steps outgrew the "
            f"{'linear' if ex.check != 'step' else 'one-step'} bound")
    worst = out.verdict.worst if out.verdict is not None else None
    if worst is None or ex.check == "schedule" or "moved" in out.where:
        return None, text
    try:

        steps = run_torch(pair, PROBLEM_OF[ex.check], wide.params, wide.data, out.step, dtype="float64",
                          device=run.device)
        ref = float(np.asarray(dict(flatten(steps[out.step - 1]))[worst.path])[tuple(worst.worst_index)])
    except Exception:
        return None, text
    side = "torch" if abs(worst.torch_value - ref) > abs(worst.jax_value - ref) else "jax"
    return side, f"{text}; {side} is off: torch float64 gives {ref:.9g} at {worst.path}{list(worst.worst_index)}"


def _scalars_in_float32(pair: Any, wide: Example, out64: Outcome, run: Any, tol64: Tolerance
                        ) -> tuple[str | None, str] | None:
    """The float32 failure of an example whose float64 run fails at float32's level and agrees once
    torch's default dtype is float64: no float64 run can arbitrate the float32 gap, and probing
    hyperparameters would name whichever change damps the trajectory's amplification (eps=0 read
    as "eps enters differently" on NAdam, whose mu_product torch keeps in float32)."""
    worst = out64.verdict.worst if out64.verdict is not None else None
    if worst is None or not 0 < worst.max_rel <= FLOAT32_LEVEL * out64.step:
        return None
    if not _agrees_with_float64_scalars(pair, wide, "float64", run, tol64):
        return None
    return None, (f"not decidable by rounding: in float64 too the sides part at float32's level (step {out64.step}), "
                  "and agree with torch.set_default_dtype(torch.float64): torch keeps part of the optimizer's "
                  "scalar state in its default dtype (e.g. NAdam's mu_product, a capturable step) where the port "
                  "computes it otherwise, and this trajectory amplifies the difference")


def explained_by_rounding(pair: Any, ex: Example, out: Outcome, dtype: str, run: Any, base: Tolerance,
                          seed: int) -> bool:
    """The trajectory version of equivcheck.ops.conditioning: accept a float32 gap that the
    dtype's rounding alone explains.

    Some trajectories amplify rounding: an MLP gradient that cancels to noise (a true 1e-18
    computed as +-1e-9, or 1 - tanh**2 near saturation) becomes an O(1) step once RMSprop or
    Adam divides it by its own root mean square; NAdam near the optimum of the quadratic,
    once v has decayed, oscillates with a gain lr*a/sqrt(v) > 2 and grows every ulp it is
    given. Rounding acts at every step, so we run torch in float64 from the start of the
    compared stretch (the initial point, or the state that moved) on SAMPLES copies that
    round like the tested dtype (equivcheck.optim.sides.run_torch's jitter: each gradient
    moved by up to twice its own rounding error at that dtype, in two copies by exactly minus and
    plus twice it, parameters and state by ULPS
    ulps after every step). If, at every step from the failing one to the last, both float32
    sides, and both float64 runs, lie within SAFETY x that step's spread (plus the bound for its
    step count) of the float64 answer (the two float64 runs' mean; where either is non-finite,
    only the identical value), no side is wrong. A wrong formula shows at the first steps,
    where the spread is a few ulps, and still fails.
    """
    from equivcheck.ops.conditioning import SAMPLES, ULPS, _eps
    from equivcheck.optim.sides import run_jax

    if out.verdict is None or out.verdict.kind != "values" or ex.check not in PROBLEM_OF:
        return False
    problem, n, k = PROBLEM_OF[ex.check], out.step, out.offset
    # Every step from the failing one to the last is judged: a gap accepted where it first showed
    # may outgrow rounding later (equivcheck.models.evaluate._rounding: Adam's first moment in bfloat16).
    sides = list(zip(*out.after)) or [(out.torch_at, out.jax_at)]
    last = n + len(sides) - 1
    # a float64 run is its own reference: its spread is float64 rounding alone (NAdam's
    # unstable oscillation grows even float64's ulps past the bound after ~80 steps)
    low = dtype if dtype != "float64" else None
    params = widen(out.start["params"] if out.start else ex.params)
    state = widen_state(out.start["state"], pair.state_map) if out.start else None
    data = widen(ex.data)
    rng, rel = np.random.default_rng(seed), ULPS * _eps(dtype)
    nudge = lambda t: _map(t, lambda a: a * (1 + rel * rng.uniform(-1, 1, a.shape)) if a.dtype.kind == "f" else a)

    def run64(p: Any, d: Any, s: Any, jitter: Any = None) -> list[list[np.ndarray]]:
        return [_leaves(x) for x in run_torch(pair, problem, p, d, last, dtype="float64", start=s, start_step=k,
                                              jitter=jitter)]

    def from_n(p: Any, d: Any, s: Any, jitter: Any = None) -> list[list[np.ndarray]]:
        return run64(p, d, s, jitter)[n - 1:last]

    try:
        torch_all = run64(params, data, state)
        exact = torch_all[n - 1:last]
        spread = [[np.zeros_like(x) for x in at] for at in exact]
        for i in range(SAMPLES):  # the first two at the corners of the gradients' rounding box
            s = None if state is None else {**state, **{f.torch: nudge(state[f.torch]) for f in pair.state_map.fields}}
            moved = from_n(nudge(params), nudge(data), s, (rng, rel, low, (-2.0, 2.0)[i] if i < 2 else None))
            spread = [[np.maximum(a, np.abs(m - e)) for a, m, e in zip(sp, mv, ex_)]
                      for sp, mv, ex_ in zip(spread, moved, exact)]
        length = scan_length(ex.check)
        jax_all = [_leaves(x) for x in run_jax(pair, problem, length, params, data, last, dtype="float64",
                                               start=state, start_step=k)]
        jax64 = jax_all[n - 1:last]
    except Exception:  # the float64 re-run failing leaves the failure standing
        return False
    if not len(exact) == len(jax64) == len(sides):
        return False
    tol64_base = lookup("float64", check=ex.check, override=pair.tolerance_for("float64", ex.check))
    chaotic: bool | None = None  # the float64 runs apart by float64's own amplified rounding (optim.shadow)
    for m, (t_at, j_at), e64, j64, sp in zip(range(n, last + 1), sides, exact, jax64, spread):
        tol64 = None if low is None else trajectory_tolerance(tol64_base, m)
        args = (_leaves(t_at), _leaves(j_at), e64, j64, sp, trajectory_tolerance(base, m), tol64, low, dtype)
        if not _within(*args):
            if chaotic is None and low is not None:
                try:
                    chaotic = float64_runs_agree(pair, problem, params, data, state, k, torch_all, jax_all,
                                                 tol64_base, seed)
                except Exception:  # noqa: BLE001 - a re-run that raises leaves the failure standing
                    chaotic = False
            if chaotic and _within(*args, gap64=False):
                continue
            # a side outside the sampled envelope may still be float64's step by step (optim.shadow),
            # where both float64 runs agree over the whole stretch
            agree = low is not None and (bool(chaotic) or all(
                np.all(within(trajectory_tolerance(tol64_base, i), a, b, "float64"))
                for i, e, j in zip(range(n, last + 1), exact, jax64) for a, b in zip(e, j)))
            return agree and steps_faithful(pair, ex, out, dtype, run, base)
    return True


def _within(t32: list[np.ndarray], j32: list[np.ndarray], exact: list[np.ndarray], jax64: list[np.ndarray],
            spread: list[np.ndarray], tol: Tolerance, tol64: Tolerance | None, low: str | None, dtype: str,
            gap64: bool = True) -> bool:
    """One step of explained_by_rounding: both sides and both float64 runs within SAFETY x the spread
    (plus the bound for the step) of the float64 answer, and each pair's gap within it (the float64
    runs' gap, scaled to float64, only with `gap64`)."""
    from equivcheck.ops.conditioning import SAFETY, _eps

    # The answer is where both float64 runs agree: their mean (torch's run alone would let a torch
    # side that is wrong in float64 pass). Where either is non-finite only an identical value
    # matches, and an infinite spread (a nudged run that stayed finite) bounds nothing.
    if len(exact) != len(jax64) or any(np.shape(t) != np.shape(j) for t, j in zip(exact, jax64)):
        return False
    with np.errstate(invalid="ignore"):
        ref = [np.where(t == j, t, (t + j) / 2) for t, j in zip(exact, jax64)]
    for x in (t32, j32, exact, jax64):
        for v, e, sp in zip(x, ref, spread):
            bound = SAFETY * sp + tol.atol + tol.rtol * np.abs(e)
            with np.errstate(invalid="ignore"):
                if not np.all((np.isfinite(bound) & (np.abs(v - e) <= bound)) | (v == e)):
                    return False
    # The sides' gap itself within the bound, and the float64 runs agreeing to float64's own
    # rounding (the spread scaled to float64's epsilon, float64's table): two sides a constant
    # apart would otherwise both sit within the bound of their mean (optax.adamw's default
    # weight decay against torch's passed as "ill-conditioned" in float32).
    tol64 = tol if tol64 is None else tol64
    scale64 = 1.0 if low is None else _eps("float64") / _eps(dtype)
    for a, b, t, scale in ((t32, j32, tol, 1.0), (exact, jax64, tol64, scale64))[:2 if gap64 else 1]:
        for va, vb, ve, vs in zip(a, b, ref, spread):
            bound = SAFETY * vs * scale + t.atol + t.rtol * np.abs(ve)
            with np.errstate(invalid="ignore"):
                if not np.all((np.isfinite(bound) & (np.abs(va - vb) <= bound)) | (va == vb)):
                    return False
    return True


def _leaves(step: Any) -> list[np.ndarray]:
    return [np.asarray(x, np.float64) for x in leaves(step)]


def _map(tree: Any, fn: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _map(v, fn) for k, v in tree.items()}
    return fn(np.asarray(tree))


__all__ = ["diagnose", "explained_by_rounding"]
