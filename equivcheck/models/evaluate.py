"""One drawn example of a model check on both sides: weights mapped, forward / grad / modes /
train run, compared under the check's tolerance; a float32 trajectory gap explained by rounding.

Tolerance. forward/modes use the table's forward row, grad the vjp row (x2). A trajectory
step n is held to n times the grad row (equivcheck.optim.trajectory.trajectory_tolerance:
each step adds at most one step's rounding difference and a stable step does not amplify
it); the record states it, and notes the worst error over the one-step bound by step.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from equivcheck.backends import SideError
from equivcheck.engine import tolerance
from equivcheck.engine.compare import Verdict, compare, flatten, format_args
from equivcheck.engine.records import RunSettings
from equivcheck.engine.tolerance import Tolerance
from equivcheck.models import mapping as mm
from equivcheck.models import sides as ms
from equivcheck.optim.trajectory import compare_steps

__all__ = ["SCALE_OF", "Example", "Result", "evaluate", "mapping", "stack"]

SCALE_OF = {"forward": "forward", "modes": "forward", "grad": "vjp", "train": "vjp", "fit": "vjp", "onnx": "forward"}


@dataclasses.dataclass
class Example:
    args: tuple[Any, ...] = ()
    seed: int = 0  # torch.manual_seed of the model
    shapes: tuple[Any, ...] = ()
    batch_seed: int = 0
    steps: int = 0

    def describe(self) -> str:
        if self.steps:
            return f"{self.steps} steps on batches of shapes {list(self.shapes)} (batch seed {self.batch_seed}), " \
                   f"weights from torch.manual_seed({self.seed})"
        return f"{format_args(self.args)}; weights from torch.manual_seed({self.seed})"


@dataclasses.dataclass
class Result:
    verdict: Verdict
    ratios: list[tuple[int, float]] = dataclasses.field(default_factory=list)
    curves: dict[str, list[float]] | None = None
    step: int = 0
    masks: dict[str, Any] = dataclasses.field(default_factory=dict)
    accepted: bool = False  # past the bound, but float32 rounding amplified (see _rounding)


def _error(side: str, check: str, exc: BaseException, context: str = "") -> Result:
    err = SideError.from_exc(side, check, exc)
    return Result(Verdict(False, "error", err.describe() + context, side=side))


def mapping(pair: Any, dtype: str, device: str) -> list[mm.Entry]:
    """The weight mapping, checked against the port's own tree when it declares one."""
    model = ms.build_torch(pair, 0, dtype, device)
    if pair.to_jax is not None:
        from equivcheck.models.converter import UserMapping

        ents = UserMapping(pair.to_jax, model)
    else:
        ents = mm.entries(model, pair.rules)
    params, stats = mm.to_jax(ents, ms.torch_state(model))
    if pair.jax_params is not None:
        mm.check_against(mm.merge(params, stats), pair.jax_params(), "the tree converted from torch's state_dict")
    return ents


def evaluate(pair: Any, check: str, ex: Example, ents: list[mm.Entry], dtype: str, run: RunSettings,
             tol: Tolerance) -> Result:
    """One example of one check, both sides, compared."""
    dev = run.device
    try:
        model = ms.build_torch(pair, ex.seed, dtype, dev)
        state = ms.torch_state(model)
        params, stats = mm.to_jax(ents, state)
    except Exception as exc:
        return _error("torch", check, exc, " (building the model and converting its weights)")
    if check == "train":
        return _train(pair, model, ents, params, stats, ex, dtype, run, tol)
    x, y = list(ex.args[:-1]), ex.args[-1]
    try:
        if check == "forward":
            t_out, masks = ms.torch_forward(model, x, train=False, seed=ex.seed, device=dev)
        elif check == "grad":
            t_info, t_grads = ms.torch_grad(pair, model, x, y, train=False, seed=ex.seed, device=dev)
            masks = {}
        else:  # modes: a train-mode forward, the statistics it leaves, then eval mode
            t_train, masks = ms.torch_forward(model, x, train=True, seed=ex.seed, device=dev)
            t_stats = mm.to_jax(ents, ms.torch_state(model))[1]
            t_eval, _ = ms.torch_forward(model, x, train=False, seed=ex.seed, device=dev, masks=dict(masks))
    except Exception as exc:
        return _error("torch", check, exc)
    try:
        if check == "forward":
            j_out, _ = ms.run_jax(pair, "forward_eval", dtype, dev, params, stats, x, masks)
            verdict = compare(t_out, j_out, tol)
        elif check == "grad":
            (j_loss, (j_out, _)), j_g = ms.run_jax(pair, "grad_eval", dtype, dev, params, stats, x, y, masks)
            j_grads = mm.grads_to_torch(ents, j_g, state)
            verdict = compare({"loss": t_info["loss"], "grad": t_grads},
                              {"loss": j_loss, "grad": {k: j_grads[k] for k in t_grads if k in j_grads}}, tol)
            if verdict.ok and set(t_grads) - set(j_grads):
                lost = sorted(set(t_grads) - set(j_grads))
                verdict = Verdict(False, "structure", f"the port has no parameter for {lost}")
        else:
            j_train, j_stats = ms.run_jax(pair, "forward_train", dtype, dev, params, stats, x, masks)
            j_eval, _ = ms.run_jax(pair, "forward_eval", dtype, dev, params, j_stats, x, masks)
            verdict = compare({"train": t_train, "stats": t_stats, "eval_after": t_eval},
                              {"train": j_train, "stats": j_stats, "eval_after": j_eval}, tol)
    except Exception as exc:
        return _error("jax", check, exc)
    return Result(verdict, masks=masks)


def stack(trees: list[Any]) -> Any:
    import jax

    return jax.tree.map(lambda *xs: np.stack(xs), *trees) if trees else {}


def _train(pair: Any, model: Any, ents: list[mm.Entry], params: Any, stats: Any, ex: Example, dtype: str,
           run: RunSettings, tol: Tolerance) -> Result:
    rng = np.random.default_rng(ex.batch_seed)
    try:
        batches = [ms.numpy_batch(pair.inputs, ex.shapes, dtype, rng) for _ in range(pair.steps)]
    except Exception as exc:  # noqa: BLE001 - the pair's inputs, neither side: a failed record, not a crash
        return Result(Verdict(False, "error", f"drawing the train batches failed: {type(exc).__name__}: {exc}"))
    try:
        t_steps, t_masks = ms.torch_train(pair, model, ents, batches[:ex.steps], seed=ex.seed, device=run.device)
    except Exception as exc:
        return _error("torch", "train", exc)
    # steps the torch run did not reach still need masks of the right shapes for the scan
    masks = t_masks + [{k: np.ones_like(v) for k, v in t_masks[0].items()}] * (pair.steps - len(t_masks))
    try:
        inputs = [np.stack([b[i] for b in batches]) for i in range(len(batches[0]) - 1)]
        targets = np.stack([b[-1] for b in batches])
        j = ms.run_jax(pair, "train", dtype, run.device, params, stats, inputs, targets, stack(masks))
    except Exception as exc:
        return _error("jax", "train", exc)
    j_steps = [{"loss": j["loss"][k], "params": ms.jax_index(j["params"], k), "stats": ms.jax_index(j["stats"], k)}
               for k in range(ex.steps)]
    out = compare_steps(t_steps, j_steps, tol)
    curves = {"torch": [float(s["loss"]) for s in t_steps], "jax": [float(s["loss"]) for s in j_steps]}
    verdict = out.verdict if not out.ok else Verdict(True, "match", ratio=out.model_ratio)
    res = Result(verdict, ratios=out.ratios, curves=curves, step=out.step, masks=t_masks[0] if t_masks else {})
    if not out.ok and out.verdict.kind == "values" and dtype != "float64":
        res.accepted = _rounding(pair, ents, ex, batches, t_steps, j_steps, run)
    return res


def _rounding(pair: Any, ents: list[mm.Entry], ex: Example, batches: list[Any], t_steps: list[Any],
              j_steps: list[Any], run: RunSettings) -> bool:
    """A float32 trajectory gap past the bound is rounding, amplified (Adam's first
    steps are lr * g / (|g| + eps): a gradient element near eps turns a rounding difference into a
    step difference; a kink of the loss between weights a few ulps apart), when both sides agree
    in float64 on the same (float32-rounded) inputs over all the example's steps, and each side's
    every step, to the last, was float64's from where that side stood
    (equivcheck.models.sensitivity). Every step to the last is judged: a gap accepted where it
    first showed may grow past anything rounding explains later. A port computing another
    function differs in float64 too; a side wrong in float32 alone fails the step-by-step test.
    An earlier rule accepted the further side within 4 times the nearer one's distance from
    float64: Adam amplifies torch's own rounding too, so 4 times it let an Adam
    keeping its moments in bfloat16 through (an adversarial trial, 2026-12-02)."""
    one = tolerance.lookup("float32", device=run.device, precision=run.precision, check="vjp")
    last = len(t_steps)
    wide = [tuple(np.asarray(a, np.float64) if np.asarray(a).dtype.kind == "f" else a for a in b) for b in batches]
    base64 = tolerance.lookup("float64", device=run.device, precision=run.precision, check="vjp")
    try:
        model = ms.build_torch(pair, ex.seed, "float64", run.device)
        params, stats = mm.to_jax(ents, ms.torch_state(model))
        t64, t_masks = ms.torch_train(pair, model, ents, wide[:last], seed=ex.seed, device=run.device)
        masks = t_masks + [{k: np.ones_like(v) for k, v in t_masks[0].items()}] * (pair.steps - len(t_masks))
        inputs = [np.stack([b[i] for b in wide]) for i in range(len(wide[0]) - 1)]
        j = ms.run_jax(pair, "train", "float64", run.device, params, stats, inputs, np.stack([b[-1] for b in wide]),
                       stack(masks))
    except Exception:  # a failing re-run leaves the failure standing
        return False
    j64 = [{"loss": j["loss"][k], "params": ms.jax_index(j["params"], k), "stats": ms.jax_index(j["stats"], k)}
           for k in range(last)]
    if len(j_steps) != last or not compare_steps(t64, j64, base64).ok:
        return False
    leaves = lambda tree: [np.asarray(x, np.float64) for _, x in flatten(tree)]  # noqa: E731
    # Whether each side's every step was float64's from where it stood decides.
    from equivcheck.models.sensitivity import trajectories_faithful

    failing = (leaves(t_steps[last - 1]["params"]), leaves(j_steps[last - 1]["params"]))
    return trajectories_faithful(pair, ents, ex.seed, run.device, batches, wide[:last], failing, one, base64)
