"""The `fit` check: a whole training run on a data set, in both frameworks.

Both sides start from the same weights (torch's init, converted) and see the same batches in
the same order (no shuffle; the last partial batch dropped, so JAX compiles one shape) and
the same dropout masks. The loss of every step and the final parameters are compared under
the trajectory bound (n times the one-step bound at step n); the test accuracy of both is
reported and must agree within `Fit.max_accuracy_gap`.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from equivcheck.engine.compare import Verdict, compare
from equivcheck.engine.tolerance import Tolerance
from equivcheck.models import mapping as mm
from equivcheck.models import sides as ms
from equivcheck.models.diagnose import diagnose
from equivcheck.models.evaluate import Example, Result, stack
from equivcheck.optim.trajectory import compare_steps

SEED = 0


def batches(fit: Any, x: np.ndarray, y: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    n = (len(x) // fit.batch_size) * fit.batch_size
    one = [(x[i:i + fit.batch_size], y[i:i + fit.batch_size]) for i in range(0, n, fit.batch_size)]
    return one * fit.epochs


def run_fit(pair: Any, rec: Any, ents: list[mm.Entry], dtype: str, run: Any, base: Tolerance) -> None:

    fit = pair.fit
    x_tr, y_tr, x_te, y_te = fit.data()
    dt = np.float64 if dtype == "float64" else np.float32
    x_tr, x_te = x_tr.astype(dt), x_te.astype(dt)
    plan = batches(fit, x_tr, y_tr)
    rec.examples = 1
    model = ms.build_torch(pair, SEED, dtype, run.device)
    params, stats = mm.to_jax(ents, ms.torch_state(model))
    try:
        t_steps, t_masks = ms.torch_train(pair, model, ents, plan, seed=SEED, device=run.device)
        t_logits, _ = ms.torch_forward(model, [x_te], train=False, seed=SEED, device=run.device)
    except Exception as exc:
        rec.outcome, rec.kind, rec.message = "failed", "error", f"the torch side raised {type(exc).__name__}: {exc}"
        return
    try:
        j = ms.run_jax(pair, "train", dtype, run.device, params, stats, [np.stack([b[0] for b in plan])],
                       np.stack([b[1] for b in plan]), stack(t_masks))
        last = lambda tree: ms.jax_index(tree, -1)  # noqa: E731
        j_logits, _ = ms.run_jax(pair, "forward_eval", dtype, run.device, last(j["params"]), last(j["stats"]),
                                 [x_te], {})
    except Exception as exc:
        rec.outcome, rec.kind, rec.message = "failed", "error", f"the jax side raised {type(exc).__name__}: {exc}"
        return
    losses = compare_steps([{"loss": s["loss"]} for s in t_steps], [{"loss": v} for v in j["loss"]], base)
    n = len(plan)
    final = compare({"params": t_steps[-1]["params"], "stats": t_steps[-1]["stats"]},
                    {"params": last(j["params"]), "stats": last(j["stats"])}, base.scaled(n, f"after {n} steps"))
    acc_t = float(np.mean(np.argmax(t_logits, -1) == y_te))
    acc_j = float(np.mean(np.argmax(j_logits, -1) == y_te))
    rec.extra["curves"] = {"torch": [float(s["loss"]) for s in t_steps], "jax": [float(v) for v in j["loss"]]}
    rec.extra["accuracy"] = {"torch": acc_t, "jax": acc_j}
    rec.notes.append(f"{fit.epochs} epochs, {n} steps of {fit.batch_size}; test accuracy torch {100 * acc_t:.2f}%, "
                     f"jax {100 * acc_j:.2f}% ({len(y_te)} test examples)")
    rec.worst_ratio = max([r / k for k, r in losses.ratios] + [final.ratio / n if final.ok else float("inf")])
    bad: Verdict | None = None
    if not losses.ok:
        bad = losses.verdict
    elif not final.ok:
        bad = final
        bad.message = f"final parameters after {n} steps: {bad.message}"
    elif abs(acc_t - acc_j) > fit.max_accuracy_gap:
        bad = Verdict(False, "values", f"test accuracy torch {100 * acc_t:.2f}% vs jax {100 * acc_j:.2f}%: "
                                       f"more than {100 * fit.max_accuracy_gap:g} percentage points apart")
    if bad is None:
        return
    rec.outcome, rec.kind, rec.message = "failed", bad.kind, bad.message
    ex = Example(shapes=tuple(np.shape(a) for a in plan[0]), seed=SEED, steps=n)
    res = Result(bad, masks=t_masks[0] if t_masks else {})
    x0 = list(plan[0][:1])
    rec.side, rec.diagnosis, rows = diagnose(pair, "fit", Example(args=(*x0, plan[0][1]), seed=SEED), res, ents,
                                             dtype, run, base)
    rec.extra["layers"] = rows
    rec.inputs = ex.describe()
