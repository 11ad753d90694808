"""Run a ModelPair's checks under Hypothesis; localise failures; file CheckRecords.

Examples. `forward`, `grad` and `modes` draw the model's inputs from the pair's `Inputs`
(shapes from a palette of two, so JAX compiles twice) and a weight seed: the torch model is
built under torch.manual_seed(seed) and its weights converted. `train` draws a batch seed,
a weight seed and a number of steps n <= K: K batches of one shape come from a generator
seeded by it within the inputs' ranges, JAX runs all K steps as one compiled scan, and the
first n steps are compared.

Tolerance. forward/modes use the table's forward row, grad the vjp row (x2). A trajectory
step n is held to n times the grad row (equivcheck.optim_runner.trajectory_tolerance:
each step adds at most one step's rounding difference and a stable step does not amplify
it); the record states it, and notes the worst error over the one-step bound by step.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from hypothesis import strategies as st

from equivcheck import models_map as mm
from equivcheck import models_sides as ms
from equivcheck import tolerance
from equivcheck.backends import SideError
from equivcheck.compare import Verdict, compare, flatten, format_args
from equivcheck.optim_runner import BUCKETS, compare_steps
from equivcheck.runner import CheckRecord, RunSettings
from equivcheck.search import Search
from equivcheck.tolerance import Tolerance

_SCALE_OF = {"forward": "forward", "modes": "forward", "grad": "vjp", "train": "vjp", "fit": "vjp"}
# XLA's float32 transcendental functions are a few ulps off where torch's are within one (tanh 4.2
# vs 0.56 ulp, equivcheck.optim_sides): one side's float32 run may sit that much further from float64
# than the other's (which side is not assumed: a torch side wrong in float32 must not excuse the port).
ROUNDING_FACTOR = 4.0
PALETTE = 2  # input shapes per check: each costs a compilation of every program


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


class _Failed(Exception):
    def __init__(self, result: Result, ex: Example) -> None:
        super().__init__(result.verdict.message)
        self.result, self.ex = result, ex


def _error(side: str, check: str, exc: BaseException, context: str = "") -> Result:
    err = SideError.from_exc(side, check, exc)
    return Result(Verdict(False, "error", err.describe() + context, side=side))


def mapping(pair: Any, dtype: str, device: str) -> list[mm.Entry]:
    """The weight mapping, checked against the port's own tree when it declares one."""
    model = ms.build_torch(pair, 0, dtype, device)
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
        params, stats = mm.to_jax(ents, ms.torch_state(model))
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
            j_grads = mm.to_torch(ents, j_g, grads=True)
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


def _stack(trees: list[Any]) -> Any:
    import jax

    return jax.tree.map(lambda *xs: np.stack(xs), *trees) if trees else {}


def _train(pair: Any, model: Any, ents: list[mm.Entry], params: Any, stats: Any, ex: Example, dtype: str,
           run: RunSettings, tol: Tolerance) -> Result:
    rng = np.random.default_rng(ex.batch_seed)
    batches = [ms.numpy_batch(pair.inputs, ex.shapes, dtype, rng) for _ in range(pair.steps)]
    try:
        t_steps, t_masks = ms.torch_train(pair, model, ents, batches[:ex.steps], seed=ex.seed, device=run.device)
    except Exception as exc:
        return _error("torch", "train", exc)
    # steps the torch run did not reach still need masks of the right shapes for the scan
    masks = t_masks + [{k: np.ones_like(v) for k, v in t_masks[0].items()}] * (pair.steps - len(t_masks))
    try:
        inputs = [np.stack([b[i] for b in batches]) for i in range(len(batches[0]) - 1)]
        targets = np.stack([b[-1] for b in batches])
        j = ms.run_jax(pair, "train", dtype, run.device, params, stats, inputs, targets, _stack(masks))
    except Exception as exc:
        return _error("jax", "train", exc)
    j_steps = [{"loss": j["loss"][k], "params": ms.jax_index(j["params"], k), "stats": ms.jax_index(j["stats"], k)}
               for k in range(ex.steps)]
    out = compare_steps(t_steps, j_steps, tol)
    curves = {"torch": [float(s["loss"]) for s in t_steps], "jax": [float(s["loss"]) for s in j_steps]}
    verdict = out.verdict if not out.ok else Verdict(True, "match", ratio=out.model_ratio)
    res = Result(verdict, ratios=out.ratios, curves=curves, step=out.step, masks=t_masks[0] if t_masks else {})
    if not out.ok and out.verdict.kind == "values" and dtype != "float64":
        res.accepted = _rounding(pair, ents, ex, batches, t_steps, j_steps, out.step, run)
    return res


def _rounding(pair: Any, ents: list[mm.Entry], ex: Example, batches: list[Any], t_steps: list[Any],
              j_steps: list[Any], step: int, run: RunSettings) -> bool:
    """A float32 trajectory gap is rounding, amplified (Adam's first steps are lr * g / (|g| + eps):
    a gradient element near eps turns a rounding difference into a step difference), when both
    sides agree in float64 on the same (float32-rounded) inputs and, at that step leaf by leaf,
    the float32 run further from the float64 answer (the mean of the two float64 runs) is within
    ROUNDING_FACTOR times the nearer one's distance (plus the step's bound), whichever side that
    is. A port computing another function differs in float64 too; a side wrong in float32 alone
    is far from both."""
    bound = tolerance.lookup("float32", device=run.device, precision=run.precision, check="vjp").scaled(step, "")
    wide = [tuple(np.asarray(a, np.float64) if np.asarray(a).dtype.kind == "f" else a for a in b) for b in batches]
    base64 = tolerance.lookup("float64", device=run.device, precision=run.precision, check="vjp")
    try:
        model = ms.build_torch(pair, ex.seed, "float64", run.device)
        params, stats = mm.to_jax(ents, ms.torch_state(model))
        t64, t_masks = ms.torch_train(pair, model, ents, wide[:step], seed=ex.seed, device=run.device)
        masks = t_masks + [{k: np.ones_like(v) for k, v in t_masks[0].items()}] * (pair.steps - len(t_masks))
        inputs = [np.stack([b[i] for b in wide]) for i in range(len(wide[0]) - 1)]
        j = ms.run_jax(pair, "train", "float64", run.device, params, stats, inputs, np.stack([b[-1] for b in wide]),
                       _stack(masks))
    except Exception:  # a failing re-run leaves the failure standing
        return False
    j64 = [{"loss": j["loss"][k], "params": ms.jax_index(j["params"], k), "stats": ms.jax_index(j["stats"], k)}
           for k in range(step)]
    if not compare_steps(t64, j64, base64).ok:
        return False
    leaves = lambda tree: [np.asarray(x, np.float64) for _, x in flatten(tree)]  # noqa: E731
    t32, j32, t_ref, j_ref = (leaves(s[step - 1]) for s in (t_steps, j_steps, t64, j64))
    gap = lambda a, b: float(np.max(np.abs(a - b), initial=0.0))  # noqa: E731  (NaN if either has one)
    size = lambda r: float(np.max(np.abs(r), initial=0.0))  # noqa: E731
    for t, j, rt, rj in zip(t32, j32, t_ref, j_ref, strict=True):
        r = (rt + rj) / 2  # the float64 answer is where both sides agree, not torch's run alone
        near, far = sorted((gap(t, r), gap(j, r)))
        # Either side may be the one further off: a float32-only bug in torch must not excuse the port.
        if not (np.isfinite(far) and far <= ROUNDING_FACTOR * near + bound.atol + bound.rtol * size(r)):
            return False
    return True


# ---- the Hypothesis loop ----------------------------------------------------------------

def _strategy(pair: Any, check: str, dtype: str, run: RunSettings) -> st.SearchStrategy:
    seeds = st.integers(0, 2**16 - 1)
    if check == "train":
        shapes = pair.inputs.palette(run.item_seed(pair.name, check, dtype, run.device), 1)
        return st.tuples(st.sampled_from(shapes), seeds, seeds, st.integers(1, pair.steps)).map(
            lambda t: Example(shapes=t[0], seed=t[1], batch_seed=t[2], steps=t[3]))
    palette = pair.inputs.palette(run.item_seed(pair.name, check, dtype, run.device), PALETTE)
    return st.tuples(pair.inputs.strategy(dtype, palette), seeds).map(lambda t: Example(args=t[0], seed=t[1]))


def _run_check(pair: Any, check: str, ents: list[mm.Entry], dtype: str, run: RunSettings, tol: Tolerance,
               expected: bool, accepted: list[Result]) -> tuple[list[Result], _Failed | None]:
    seen: list[Result] = []
    search = Search(run, _Failed)

    def test(ex: Example) -> None:
        res = evaluate(pair, check, ex, ents, dtype, run, tol)
        if res.verdict.ok:
            seen.append(res)
            return
        if res.accepted:
            if not search.shrinking:  # count drawn examples, not the shrinker's variants of a failure
                accepted.append(res)
            return
        raise _Failed(res, ex)

    failed = search(test, _strategy(pair, check, dtype, run), digest=f"model:{pair.name}:{check}:{dtype}",
                    seed=run.item_seed(pair.name, check, dtype, run.device), shrink=not expected)
    return seen, failed


def run_model_pair(pair: Any, *, dtype: str, run: RunSettings,
                   known: Callable[[str], tuple[str, str] | None] = lambda _id: None, nodeid: str = "",
                   replay: str = "") -> list[CheckRecord]:
    from equivcheck.models_diagnose import diagnose, layer_table
    from equivcheck.models_fit import run_fit

    records = []
    try:
        ents = mapping(pair, dtype, run.device)
        broken = ""
    except Exception as exc:
        ents, broken = [], f"the weight mapping failed: {type(exc).__name__}: {exc}"
    for check in pair.checks:
        start = time.perf_counter()
        base = tolerance.lookup(dtype, device=run.device, precision=run.precision, check=_SCALE_OF[check],
                                tags=pair.tags, override=pair.tolerance_for(dtype, check))
        hit = known(f"{pair.name}::{check}::{dtype}::{run.device}")
        growth = f"; x n at step n (linear accumulation over {pair.steps} steps)" if check in ("train", "fit") else ""
        rec = CheckRecord(pair.name, check, dtype, run.device, run.precision, "passed",
                          tolerance={"rtol": base.rtol, "atol": base.atol, "per": base.per,
                                     "reason": base.reason + growth},
                          tags=sorted(pair.tags), nodeid=nodeid, replay=replay)
        if broken:
            rec.outcome, rec.kind, rec.message, rec.worst_ratio = "failed", "error", broken, float("inf")
        elif check == "fit":
            run_fit(pair, rec, ents, dtype, run, base)
        else:
            accepted: list[Result] = []
            seen, failed = _run_check(pair, check, ents, dtype, run, base, hit is not None, accepted)
            rec.examples = len(seen) + len(accepted) + bool(failed)
            rec.ill_conditioned = len(accepted)
            if accepted:
                rec.notes.append(f"{len(accepted)} examples past the trajectory bound agreed in float64, the two "
                                 f"{dtype} runs "
                                 f"within {ROUNDING_FACTOR:g}x of each other's distance from float64: accepted as "
                                 "rounding amplified by the optimizer (equivcheck.models_runner._rounding)")
            rec.worst_ratio = max((r.verdict.ratio for r in seen), default=0.0)
            worst_leaf = max((r.verdict.worst for r in seen if r.verdict.worst), key=lambda w: w.ratio, default=None)
            if worst_leaf is not None:
                w = worst_leaf
                rec.max_abs_err, rec.max_rel_err, rec.max_ulp = w.max_abs, w.max_rel, w.max_ulp
            if check == "train":
                rec.notes.append(_margins(seen))
                full = max(seen, key=lambda r: len(r.curves["torch"]), default=None) if seen else None
                if full is not None:
                    rec.extra["curves"] = full.curves
            if failed is not None:
                res, ex = failed.result, failed.ex
                v = res.verdict
                worst = v.worst if v.kind == "values" else None
                rec.kind = v.kind
                rec.message = v.message + (f"\n  worst: {worst.summary()}" if worst else "")
                rec.worst_ratio = worst.ratio if worst else float("inf")
                if worst is not None:
                    rec.max_abs_err, rec.max_rel_err, rec.max_ulp = worst.max_abs, worst.max_rel, worst.max_ulp
                rec.inputs = ex.describe()
                if res.curves:
                    rec.extra["curves"] = res.curves
                rec.side, rec.diagnosis, rows = diagnose(pair, check, ex, res, ents, dtype, run, base)
                rec.extra["layers"] = rows
                rec.outcome = "known-divergence" if hit else "failed"
            elif hit:
                rec.outcome = "xpass"
            if failed is None and seen:
                rec.extra["layers"] = layer_table(pair, check, ents, dtype, run, base)
        if hit:
            rec.known_pattern, rec.known_reason = hit
        rec.seconds = time.perf_counter() - start
        records.append(rec)
    return records


def _margins(seen: list[Result]) -> str:
    cells = []
    for lo, hi in BUCKETS:
        rs = [r for res in seen for n, r in res.ratios if lo <= n <= hi]
        if rs:
            cells.append(f"{lo}-{hi}: {max(rs):.2g}" if lo != hi else f"{lo}: {max(rs):.2g}")
    return "worst error / one-step bound by step: " + (", ".join(cells) or "-")
