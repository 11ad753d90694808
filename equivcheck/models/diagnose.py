"""Why a model check failed: the first diverging layer, else the gradient, else the optimizer.

The torch model is what is being migrated, so it is the specification: a divergence is blamed
on the port (side "jax") by construction, with no float64 arbitration (a slip in the torch
model shows as the port differing from it), and the text says so rather than claiming the
port is wrong. The place is the first layer out of tolerance, or, when every tapped layer
agrees but the model's output does not, the untapped code after the last tap. For `grad` with
every compared layer's output and the model's output in tolerance, the first parameter whose
gradient differs is named, or the loss when it alone differs on agreeing outputs, or a parameter
trained on one side only (frozen in torch, moved by the port's first update; or the reverse).
Two causes come before the port: outputs of different shapes (or ones the loss refuses), named
on the side whose output the loss does not take (equivcheck.models.calls.shape_cause), and a
torch run that raised. For `train`, the first step is localised in train mode (with the
step's dropout masks and BatchNorm statistics); if every layer and every gradient agree there,
the optimizer pair runs its own checks (equivcheck.optim.runner) and its diagnosis (eps
placement, weight decay, a schedule shifted by one step, ...) is the cause.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from equivcheck.engine.compare import compare
from equivcheck.engine.tolerance import Tolerance
from equivcheck.models import mapping as mm
from equivcheck.models import sides as ms
from equivcheck.models.calls import shape_cause
from equivcheck.models.localise import localise

OPTIMIZER_EXAMPLES = 20  # the optimizer pair's own checks, on a failure only
SPEC = "torch is the specification of a model check: not arbitrated in float64"


def _inputs(pair: Any, ex: Any, res: Any, dtype: str) -> tuple[list[Any], Any]:
    if not ex.args:
        batch = ms.numpy_batch(pair.inputs, ex.shapes, dtype, np.random.default_rng(ex.batch_seed))
        return list(batch[:-1]), batch[-1]
    if res.verdict.kind == "error":
        # an error shrinks to flat (often all-zero) inputs, on which a wrong layer may still agree:
        # localise on a batch of the same shapes drawn across the inputs' ranges
        shapes = tuple(np.shape(a) for a in ex.args)
        batch = ms.numpy_batch(pair.inputs, shapes, dtype, np.random.default_rng(ex.seed))
        return list(batch[:-1]), batch[-1]
    return list(ex.args[:-1]), ex.args[-1]


def diagnose(pair: Any, check: str, ex: Any, res: Any, ents: list[mm.Entry], dtype: str, run: Any,
             base: Tolerance) -> tuple[str | None, str, list[dict[str, Any]]]:
    """(side, diagnosis text, the per-layer table as JSON rows)."""
    fwd = _forward_tol(base, check)
    train = check in ("modes", "train", "fit")
    try:
        x, y = _inputs(pair, ex, res, dtype)
        model = ms.build_torch(pair, ex.seed, dtype, run.device)
        loc = localise(pair, model, ents, x, res.masks, train=train, seed=ex.seed, dtype=dtype, device=run.device,
                       tol=fwd)
    except Exception as exc:
        return res.verdict.side, f"localisation failed: {type(exc).__name__}: {exc}", []
    rows = [r.to_json() for r in loc.rows]
    if loc.first is None:  # every layer agrees: outputs of another shape, or one the loss refuses, are the cause
        shaped = shape_cause(pair, *loc.outputs, y, dtype)
        if shaped is not None:
            return (*shaped, rows)
    if check in ("modes", "train") and res.verdict.kind != "error":
        masks = _dropout_cause(pair, ents, ex, x, res.masks, dtype, run, fwd)
        if masks:  # before any layer: a port's own masks move every layer after the first dropout
            return "jax", f"{masks}; {loc.text}", rows
    if res.verdict.side == "torch" and res.verdict.kind == "error":  # torch's own run failed: that is the cause
        return "torch", (f"torch's own run failed, so nothing was compared: {res.verdict.message.splitlines()[0]}; "
                         f"apart from that, the port against torch on the same inputs (without the loss): {loc.text}"), rows
    if loc.first is not None or loc.output_off or "raised" in loc.text:
        lead = f"the port differs from torch {loc.where} ({SPEC}): " if loc.where else ""
        return "jax", lead + loc.text, rows
    if res.verdict.kind == "error":
        return res.verdict.side, loc.text, rows
    if check in ("grad", "train", "fit"):
        g = _gradients(pair, ents, ex, x, y, dtype, run, base, train)
        if g:
            return "jax", f"{loc.text}; {g}", rows
    if check in ("train", "fit"):
        side, why = optimizer_cause(pair, dtype, run)
        return side, f"{loc.text}; the gradients at step 1 agree too; {why}", rows
    return res.verdict.side, loc.text, rows


def _dropout_cause(pair: Any, ents: list[mm.Entry], ex: Any, x: list[Any], masks: Any, dtype: str, run: Any,
                   tol: Tolerance) -> str:
    """"dropout masks differ" when the torch model has nn.Dropout modules, the port's train-mode
    output does not move when torch's masks are flipped (it draws its own, or applies none),
    and eval mode agrees; else "". Any error here leaves the diagnosis to the localisation."""
    import jax
    import torch

    try:
        model = ms.build_torch(pair, ex.seed, dtype, run.device)
        names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
        if not names or not masks:
            return ""
        params, stats = mm.to_jax(ents, ms.torch_state(model))
        t_eval, _ = ms.torch_forward(model, x, train=False, seed=ex.seed, device=run.device)
        j_eval, _ = ms.run_jax(pair, "forward_eval", dtype, run.device, params, stats, x, masks)
        if not compare(t_eval, j_eval, tol).ok:
            return ""
        flipped = {k: ~np.asarray(v, bool) for k, v in masks.items()}
        outs = [ms.run_jax(pair, "forward_train", dtype, run.device, params, stats, x, m)[0] for m in (masks, flipped)]
    except Exception:  # noqa: BLE001 - a hint, never a new failure
        return ""
    same = all(np.array_equal(a, b, equal_nan=True) for a, b in zip(*(jax.tree.leaves(o) for o in outs)))
    if not same:
        return ""
    return (f"dropout masks differ: eval mode agrees, but the port's train-mode output ignores the masks torch's "
            f"Dropout modules ({', '.join(names)}) drew (flipping them changes nothing): the port draws its own "
            "masks (or applies none); apply torch's with equivcheck.models.dropout(name, x, rate, train)")


def _forward_tol(base: Tolerance, check: str) -> Tolerance:
    from equivcheck.engine.tolerance import CHECK_SCALE

    return base if check in ("forward", "modes") else dataclasses.replace(
        base, rtol=base.rtol / CHECK_SCALE["vjp"], atol=base.atol / CHECK_SCALE["vjp"])


def _gradients(pair: Any, ents: list[mm.Entry], ex: Any, x: list[Any], y: Any, dtype: str, run: Any,
               base: Tolerance, train: bool) -> str:
    model = ms.build_torch(pair, ex.seed, dtype, run.device)
    state = ms.torch_state(model)
    params, stats = mm.to_jax(ents, state)
    t_vals, t_grads = ms.torch_grad(pair, model, x, y, train=train, seed=ex.seed, device=run.device)
    masks = t_vals["masks"]  # the ones torch's first step drew, if it trains
    (j_loss, (j_out, _)), j_g = ms.run_jax(pair, "grad_train" if train else "grad_eval", dtype, run.device, params,
                                           stats, x, y, masks)
    if compare(t_vals["out"], j_out, _forward_tol(base, "grad")).ok and not compare(t_vals["loss"], j_loss, base).ok:
        return (f"the model's output agrees but the loss does not (torch {float(t_vals['loss']):.8g}, port "
                f"{float(np.asarray(j_loss)):.8g}): the two loss functions ({pair.loss.name}) differ on the same "
                "output (label_smoothing, class weights, ignore_index, the reduction: mean or sum)")
    j_grads = mm.grads_to_torch(ents, j_g, state)
    frozen = _frozen(pair, model, ents, state, params, t_grads, j_g, j_grads, dtype, train)
    if frozen:
        return frozen
    for name in t_grads:
        v = compare(t_grads[name], j_grads.get(name), base)
        if not v.ok:
            w = v.worst
            return (f"every compared layer's output and the model's output agree, but the gradient of {name!r} "
                    "differs first (in module order)"
                    + (f": max abs err {w.max_abs:.3g}" if w else f": {v.message}")
                    + _padding_row(model, name, t_grads[name], j_grads.get(name), base))
    return ""


def _frozen(pair: Any, model: Any, ents: list[mm.Entry], state: Any, params: Any, t_grads: dict[str, Any],
            j_g: Any, j_grads: dict[str, Any], dtype: str, train: bool) -> str:
    """A parameter trained on one side only: frozen in torch (requires_grad=False, so torch's
    optimizer never moves it) while the port's first update moves it, or trainable in torch
    (a nonzero gradient) while the port's update of it is zero everywhere (a stop_gradient, an
    optax mask). The port's update is its optax transformation's first step on its gradients,
    taken back to torch's names by the mapping's adjoint, which keeps zero and nonzero apart.
    The grad check has no update: there, a port gradient zero where torch's is not. "" else."""
    moved = j_grads
    if train:
        try:
            import jax

            from equivcheck.backends.jax import x64

            with x64(dtype == "float64"):
                tx = pair.optimizer.optax_transform()
                updates, _ = tx.update(j_g, tx.init(params), params)
                moved = mm.grads_to_torch(ents, jax.tree.map(np.asarray, updates), state)
        except Exception:  # noqa: BLE001 - a hint, never a new failure
            return ""
    size = {n: float(np.max(np.abs(moved[n]), initial=0.0)) for n in moved}
    how = "update" if train else "gradient"
    moves = any(v > 0 for v in size.values())  # a step of zero everywhere (a warmup from lr 0) says nothing
    for name, p in model.named_parameters():
        if not p.requires_grad and train and size.get(name, 0.0) > 0:
            return (f"parameter {name!r} is frozen on the torch side (requires_grad=False: torch's optimizer never "
                    f"moves it) but the port updates it (by up to {size[name]:.3g} at step 1): freeze it in the port "
                    "too (optax.masked / optax.multi_transform with optax.set_to_zero(), or jax.lax.stop_gradient)")
        if moves and p.requires_grad and name in t_grads and np.any(t_grads[name] != 0) and size.get(name, 1.0) == 0:
            return (f"parameter {name!r} is trainable on the torch side (requires_grad=True, gradient up to "
                    f"{float(np.max(np.abs(t_grads[name]))):.3g}) but the port does not update it: its {how} in the "
                    "port is zero everywhere (frozen there: a jax.lax.stop_gradient or an optax mask); freeze it in "
                    "torch (requires_grad_(False)) or train it in the port")
    return ""


def _padding_row(model: Any, name: str, t: Any, j: Any, tol: Tolerance) -> str:
    """The known cause when an nn.Embedding(padding_idx=p)'s gradient differs in row p only."""
    import torch

    owner, _, leaf = name.rpartition(".")
    try:
        module = model.get_submodule(owner)
        off = np.abs(np.asarray(t, np.float64) - np.asarray(j, np.float64)) > tol.atol + tol.rtol * np.abs(t)
    except Exception:  # noqa: BLE001 (a hint, never a new failure)
        return ""
    if not (isinstance(module, torch.nn.Embedding) and module.padding_idx is not None and leaf == "weight"):
        return ""
    rows = sorted(set(np.nonzero(off)[0].tolist()))
    if rows != [module.padding_idx % module.num_embeddings]:
        return ""
    return (f"; only row {rows[0]}, the padding_idx: torch gives the padding row no gradient, the port does; "
            "reconcile: weight = jnp.where(rows == padding_idx, jax.lax.stop_gradient(weight), weight) before the "
            "lookup (as equivcheck.layers.flax_bridge.embedding does; known divergence nn.embedding_padding_naive)")


def optimizer_cause(pair: Any, dtype: str, run: Any) -> tuple[str | None, str]:
    """Run the optimizer pair's own checks; its first failure and diagnosis name the cause."""
    from equivcheck.optim.runner import run_optimizer_pair

    opt = pair.optimizer
    checks = tuple(c for c in ("schedule", "step", "quadratic")
                   if c != "schedule" or (opt.optax_schedule is not None and opt.torch_scheduler is not None))
    small = dataclasses.replace(run, examples=OPTIMIZER_EXAMPLES, shrink_seconds=5.0)
    failed = []
    # One check at a time, stopping at the first that fails: its record names the cause, and the
    # checks after it would each search and shrink for nothing (8 s of a 27 s failing train check).
    for check in checks:
        try:
            records = run_optimizer_pair(opt.replace(checks=(check,)), dtype=dtype, run=small)
        except Exception as exc:
            return None, f"the optimizer pair's own checks raised {type(exc).__name__}: {exc}"
        failed = [rec for rec in records if rec.outcome == "failed"]
        if failed:
            break
    if failed and _clipping_alone(opt, tuple(r.check for r in failed), dtype, small):
        return "jax", (f"clipping differs: {opt.name!r} fails its {failed[0].check} check and passes it with the "
                       "clipping taken out of both sides; compare the two clippings (max norm or value; torch's "
                       "clip_grad_norm_ divides by norm + 1e-6, optax.clip_by_global_norm by the norm and only above "
                       "it: equivcheck.optim.transforms.clip_by_global_norm_torch is torch's)")
    for rec in failed:
        cause = rec.diagnosis or rec.message.split("\n")[0]
        return rec.side or "jax", (f"the optimizer differs: {opt.name!r} alone fails its {rec.check} check: "
                                   f"{rec.message.splitlines()[0]}; cause: {cause}")
    return None, (f"the optimizer pair {opt.name!r} passes its own checks ({', '.join(checks)}): the trajectories "
                  "part by accumulated rounding or by how the model and optimizer combine")


def _clipping_alone(opt: Any, checks: tuple[str, ...], dtype: str, run: Any) -> bool:
    """Whether the pair without clipping on either side passes the checks it failed."""
    from equivcheck.optim.runner import run_optimizer_pair

    if opt.torch_clip is None or opt.unclipped is None:
        return False
    try:
        records = run_optimizer_pair(opt.unclipped().replace(checks=checks), dtype=dtype, run=run)
    except Exception:  # noqa: BLE001 (a hint, never a new failure)
        return False
    return bool(records) and all(r.outcome == "passed" for r in records)


def layer_table(pair: Any, check: str, ents: list[mm.Entry], dtype: str, run: Any,
                base: Tolerance) -> list[dict[str, Any]]:
    """The per-layer table of a passing check, on one batch of the pair's smallest shapes."""
    try:
        shapes = pair.inputs.shapes.minimal()
        x = list(ms.numpy_batch(pair.inputs, shapes, dtype, np.random.default_rng(0))[:-1])
        model = ms.build_torch(pair, 0, dtype, run.device)
        loc = localise(pair, model, ents, x, {}, train=check in ("modes", "train", "fit"), seed=0, dtype=dtype,
                       device=run.device, tol=_forward_tol(base, check))
    except Exception as exc:  # the table is a report, not a verdict
        return [{"layer": "-", "note": f"no layer table: {type(exc).__name__}: {exc}"}]
    return [r.to_json() for r in loc.rows]
