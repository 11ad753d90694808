"""torch.optim hyperparameters -> the optax transformation that computes the same step.

Every mapping starts from torch's full signature (`torch_hparams`: what the user gave plus
torch's own defaults, read from the class), and passes every optax argument explicitly:
nothing is left to optax's defaults, which differ (AdamW weight decay 1e-2 vs 1e-4,
RMSprop decay 0.99 vs 0.9, Adagrad accumulator 0 vs 0.1...). Where optax has a setting
that matches torch's formula it is used; where none does, a small transformation from
`equivcheck.optim.transforms` is, and `Mapped.parts` says which.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import optax

from equivcheck.optim import transforms as ot
from equivcheck.optim.groups import PerGroup
from equivcheck.optim.state import StateField, StateMap

# Implementation choices of torch.optim that do not change the formula (single-tensor,
# foreach and fused kernels compute the same update) - or, for `differentiable`, only
# what autograd records. `capturable` only moves the step count onto the device.
IMPLEMENTATION_FLAGS = ("foreach", "fused", "capturable", "differentiable")


class Unmatched(ValueError):
    """A torch setting that no optax transformation reproduces; the message says which and
    what to do instead."""


@dataclasses.dataclass(frozen=True)
class Mapped:
    transform: optax.GradientTransformation
    state_map: StateMap
    parts: tuple[str, ...]  # the pieces, e.g. ("optax.add_decayed_weights", "optax.scale_by_adam", ...)


def torch_hparams(cls: Any, given: Mapping[str, Any]) -> dict[str, Any]:
    """`given` completed with the defaults of `cls.__init__` (torch's own), every key explicit."""
    params = {k: v for k, v in inspect.signature(cls.__init__).parameters.items() if k not in ("self", "params")}
    unknown = sorted(set(given) - set(params))
    if unknown:
        raise ValueError(f"torch.optim.{cls.__name__} has no hyperparameter {', '.join(unknown)}; "
                         f"it takes {', '.join(params)}")
    out = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    out.update(given)
    missing = [k for k, p in params.items() if k not in out]
    if missing:
        raise ValueError(f"torch.optim.{cls.__name__} needs {', '.join(missing)}")
    return out


def _common(name: str, hp: Mapping[str, Any]) -> None:
    if hp.get("maximize"):
        raise Unmatched(f"{name}(maximize=True): optax minimises; negate the loss (or chain optax.scale(-1.0) "
                        "first) instead")
    if hp.get("differentiable"):
        raise Unmatched(f"{name}(differentiable=True) records the step for autograd; optax updates are "
                        "differentiable by construction, so compare with differentiable=False")


def _lr(hp: Mapping[str, Any], lr: Any) -> Any:
    return hp["lr"] if lr is None else lr


def _per_group(value: Any, piece: Callable[[Any], optax.GradientTransformation], what: str,
               skip_zero: bool = True) -> list[tuple[str, optax.GradientTransformation]]:
    """`piece(value)`, or with param groups (a PerGroup) one masked piece per distinct value."""
    if not isinstance(value, PerGroup):
        return [(what, piece(value))] if value or not skip_zero else []
    return [(f"optax.masked({what.split(' ')[0]}({v!r}), param groups {{{', '.join(map(str, _groups(value, v)))}}})",
             optax.masked(piece(v), mask)) for v, mask in value.masks() if v or not skip_zero]


def _groups(value: PerGroup, v: Any) -> list[int]:
    return [i for i, w in enumerate(value.values) if w == v]


def _coupled(wd: Any) -> list[tuple[str, optax.GradientTransformation]]:
    """torch's weight_decay on Adam, SGD, RMSprop...: L2 added to the gradient first."""
    return _per_group(wd, optax.add_decayed_weights, "optax.add_decayed_weights (coupled L2, first)")


def _decoupled(wd: Any) -> list[tuple[str, optax.GradientTransformation]]:
    # param *= 1 - lr*wd before the step == add wd*param to the update before the lr scaling
    return _per_group(wd, optax.add_decayed_weights, "optax.add_decayed_weights (decoupled, after the moments)")


def _scale_lr(lr: Any, what: str = "optax.scale_by_learning_rate") -> list[tuple[str, optax.GradientTransformation]]:
    return _per_group(lr, optax.scale_by_learning_rate, what, skip_zero=False)


# The hyperparameters each mapping can take per param group (equivcheck.optim.groups): those
# it applies as a piece of its own (a weight decay, the lr scaling), masked per group.
GROUP_HPARAMS = {
    "SGD": ("weight_decay", "lr"), "Adam": ("weight_decay", "lr"), "AdamW": ("weight_decay", "lr"),
    "NAdam": ("weight_decay", "lr"), "RAdam": ("weight_decay", "lr"), "Adamax": ("weight_decay", "lr"),
    "Adagrad": ("weight_decay", "lr"), "Adadelta": ("weight_decay", "lr"), "RMSprop": ("weight_decay",),
    "Rprop": ("lr",),
}


def _chain(pieces: list[tuple[str, optax.GradientTransformation]], smap: StateMap) -> Mapped:
    return Mapped(optax.chain(*[t for _, t in pieces]), smap, tuple(n for n, _ in pieces))


ADAM_STATE = StateMap((StateField("exp_avg", "mu"), StateField("exp_avg_sq", "nu")))


def map_sgd(hp: Mapping[str, Any], lr: Any = None) -> Mapped:
    _common("SGD", hp)
    m, d = hp["momentum"], hp["dampening"]
    pieces = _coupled(hp["weight_decay"])
    if m and d:
        # torch refuses nesterov with dampening, so only plain momentum reaches here
        pieces.append(("equivcheck trace_dampened (optax.trace has no dampening)", ot.trace_dampened(m, d)))
        smap = StateMap((StateField("momentum_buffer", "trace"),), torch_step=False)
    elif m:
        pieces.append(("optax.trace", optax.trace(decay=m, nesterov=hp["nesterov"])))
        smap = StateMap((StateField("momentum_buffer", "trace"),), torch_step=False)
    else:
        smap = StateMap(torch_step=False)
    pieces += _scale_lr(_lr(hp, lr))
    return _chain(pieces, smap)


def _adam_like(name: str, hp: Mapping[str, Any], lr: Any, decoupled: bool, core: tuple[str, Any],
               smap: StateMap) -> Mapped:
    wd = hp["weight_decay"]
    pieces = [] if decoupled else _coupled(wd)
    pieces.append(core)
    if decoupled:
        pieces += _decoupled(wd)
    pieces += _scale_lr(_lr(hp, lr))
    return _chain(pieces, smap)


def map_adam(hp: Mapping[str, Any], lr: Any = None, *, decoupled: bool | None = None) -> Mapped:
    _common("Adam", hp)
    (b1, b2), eps = hp["betas"], hp["eps"]
    decoupled = hp.get("decoupled_weight_decay", False) if decoupled is None else decoupled
    if hp["amsgrad"]:
        core = ("equivcheck scale_by_amsgrad_torch (optax's max is over the corrected moment)",
                ot.scale_by_amsgrad_torch(b1, b2, eps))
        smap = StateMap(ADAM_STATE.fields + (StateField("max_exp_avg_sq", "nu_max"),))
    else:
        core = ("optax.scale_by_adam", optax.scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=0.0, nesterov=False))
        smap = ADAM_STATE
    return _adam_like("Adam", hp, lr, decoupled, core, smap)


def map_adamw(hp: Mapping[str, Any], lr: Any = None) -> Mapped:
    return map_adam(hp, lr, decoupled=True)


def map_nadam(hp: Mapping[str, Any], lr: Any = None) -> Mapped:
    _common("NAdam", hp)
    (b1, b2), eps, md = hp["betas"], hp["eps"], hp["momentum_decay"]
    if math.isinf(md):
        core = ("optax.scale_by_adam(nesterov=True)",
                optax.scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=0.0, nesterov=True))
        # torch still keeps mu_product = b1**t (by float32 multiplications); optax needs none
        smap = StateMap(ADAM_STATE.fields + (StateField("mu_product", "", scalar=True, derive=_float32_power(b1)),))
    else:
        core = ("equivcheck scale_by_nadam_torch (optax.nadam has no momentum_decay schedule)",
                ot.scale_by_nadam_torch(b1, b2, eps, md))
        smap = StateMap(ADAM_STATE.fields + (StateField("mu_product", "mu_product", scalar=True),))
    return _adam_like("NAdam", hp, lr, hp["decoupled_weight_decay"], core, smap)


def _float32_power(base: float) -> Callable[[int], float]:
    def power(t: int) -> float:
        import numpy as np

        prod, b = np.float32(1.0), np.float32(base)
        for _ in range(t):
            prod = np.float32(prod * b)
        return float(prod)

    return power


def map_radam(hp: Mapping[str, Any], lr: Any = None) -> Mapped:
    _common("RAdam", hp)
    (b1, b2), eps = hp["betas"], hp["eps"]
    core = ("equivcheck scale_by_radam_torch (optax puts eps on the corrected sqrt(v))",
            ot.scale_by_radam_torch(b1, b2, eps))
    return _adam_like("RAdam", hp, lr, hp["decoupled_weight_decay"], core, ADAM_STATE)


def map_adamax(hp: Mapping[str, Any], lr: Any = None) -> Mapped:
    _common("Adamax", hp)
    (b1, b2), eps = hp["betas"], hp["eps"]
    core = ("optax.scale_by_adamax", optax.scale_by_adamax(b1=b1, b2=b2, eps=eps))
    smap = StateMap((StateField("exp_avg", "mu"), StateField("exp_inf", "nu")))
    return _adam_like("Adamax", hp, lr, False, core, smap)


def map_rmsprop(hp: Mapping[str, Any], lr: Any = None) -> Mapped:
    _common("RMSprop", hp)
    momentum = hp["momentum"]
    if momentum and lr is not None and callable(lr):
        raise Unmatched("RMSprop(momentum>0) with a schedule: torch scales the momentum buffer by the current lr, "
                        "optax.rmsprop traces lr-scaled updates, so past steps keep their old lr; no optax chain "
                        "matches")
    fields = [StateField("square_avg", "nu")]
    if hp["centered"]:
        fields.append(StateField("grad_avg", "mu"))
    if momentum:
        # optax traces the lr-scaled update: trace = -lr * torch's buffer
        fields.append(StateField("momentum_buffer", "trace", scale=-float(_lr(hp, lr))))
    pieces = _coupled(hp["weight_decay"])
    pieces.append(("optax.rmsprop(eps_in_sqrt=False, decay=alpha)",
                   optax.rmsprop(_lr(hp, lr), decay=hp["alpha"], eps=hp["eps"], initial_scale=0.0, eps_in_sqrt=False,
                                 centered=hp["centered"], momentum=momentum or None, nesterov=False,
                                 bias_correction=False)))
    return _chain(pieces, StateMap(tuple(fields)))


def map_adagrad(hp: Mapping[str, Any], lr: Any = None) -> Mapped:
    _common("Adagrad", hp)
    init, eps, decay = hp["initial_accumulator_value"], hp["eps"], hp["lr_decay"]
    if decay and lr is not None and callable(lr):
        raise Unmatched("Adagrad(lr_decay>0) with a schedule: torch divides the scheduled lr by 1 + (t-1)*lr_decay; "
                        "compose the two schedules into one before mapping")
    base = _lr(hp, lr)
    # a float count: JAX would divide an int32 count in float32 even in a float64 run
    decayed = lambda b: b if not decay else (lambda count: b / (1 + jnp.asarray(count, jnp.result_type(float)) * decay))
    rate = PerGroup(tuple(map(decayed, base.values)), base.labels) if isinstance(base, PerGroup) else decayed(base)
    pieces = _coupled(hp["weight_decay"])
    if eps == 0:
        pieces.append(("optax.scale_by_rss(eps=0)", optax.scale_by_rss(initial_accumulator_value=init, eps=0.0)))
    else:
        pieces.append(("equivcheck scale_by_adagrad_torch (optax puts eps inside the sqrt)",
                       ot.scale_by_adagrad_torch(init, eps)))
    pieces += _scale_lr(rate, "optax.scale_by_learning_rate" + (" (lr / (1 + count*lr_decay))" if decay else ""))
    return _chain(pieces, StateMap((StateField("sum", "sum_of_squares"),)))


def map_adadelta(hp: Mapping[str, Any], lr: Any = None) -> Mapped:
    _common("Adadelta", hp)
    # optax.adadelta's own chain, written out so that weight decay and lr can differ per group
    pieces = _coupled(hp["weight_decay"])
    pieces.append(("optax.scale_by_adadelta", optax.scale_by_adadelta(rho=hp["rho"], eps=hp["eps"])))
    pieces += _scale_lr(_lr(hp, lr))
    return _chain(pieces, StateMap((StateField("square_avg", "e_g"), StateField("acc_delta", "e_x"))))


def map_rprop(hp: Mapping[str, Any], lr: Any = None) -> Mapped:
    _common("Rprop", hp)
    if lr is not None and callable(lr):
        raise Unmatched("Rprop with a schedule: torch reads the lr once, as every step size's initial value when its "
                        "state is created, and a scheduler changes nothing after that; drop the schedule (or start "
                        "from the lr it gives at step 0)")
    (eta_minus, eta_plus), (lo, hi) = hp["etas"], hp["step_sizes"]
    tx = ot.scale_by_rprop_torch(hp["lr"], eta_minus, eta_plus, lo, hi)
    smap = StateMap((StateField("prev", "prev"), StateField("step_size", "step_size")))
    each = "; step sizes start at each param group's lr" if isinstance(hp["lr"], PerGroup) else ""
    return _chain([(f"equivcheck scale_by_rprop_torch (optax.rprop applies each update one step late{each})", tx),
                   ("optax.scale(-1)", optax.scale(-1.0))], smap)


def map_asgd(hp: Mapping[str, Any], lr: Any = None) -> Mapped:
    _common("ASGD", hp)
    if lr is not None and callable(lr):
        raise Unmatched("ASGD with a schedule: torch recomputes eta from the group's current lr after each step "
                        "(eta = lr / (1 + lambd*lr*t)**alpha); equivcheck's asgd_torch takes a constant lr")
    tx = ot.asgd_torch(hp["lr"], hp["lambd"], hp["alpha"], hp["t0"], hp["weight_decay"])
    smap = StateMap((StateField("eta", "eta", scalar=True), StateField("mu", "mu", scalar=True), StateField("ax", "ax")))
    return Mapped(tx, smap, ("equivcheck asgd_torch (optax has no ASGD)",))


def map_lion(hp: Mapping[str, Any], lr: Any = None) -> Mapped:
    """For a torch that has torch.optim.Lion (2.13 does not): decoupled decay, like optax.lion."""
    _common("Lion", hp)
    b1, b2 = hp["betas"]
    tx = optax.lion(_lr(hp, lr), b1=b1, b2=b2, weight_decay=hp["weight_decay"])
    return Mapped(tx, StateMap((StateField("exp_avg", "mu"),), torch_step=False), ("optax.lion",))


def map_lbfgs(hp: Mapping[str, Any], lr: Any = None) -> Mapped:
    raise Unmatched(
        "LBFGS: torch.optim.LBFGS runs up to max_iter inner iterations per step() through a closure and scales its "
        "first direction by min(1, 1/|g|_1) * lr; optax.lbfgs takes one iteration per update and scales the first "
        "direction by lr (or a zoom line search); with line_search_fn='strong_wolfe' the two line searches also "
        "differ. No setting of either makes every step agree, so equivcheck does not pair them")


MAPPINGS: dict[str, Callable[..., Mapped]] = {
    "SGD": map_sgd, "Adam": map_adam, "AdamW": map_adamw, "NAdam": map_nadam, "RAdam": map_radam,
    "Adamax": map_adamax, "RMSprop": map_rmsprop, "Adagrad": map_adagrad, "Adadelta": map_adadelta,
    "Rprop": map_rprop, "ASGD": map_asgd, "Lion": map_lion, "LBFGS": map_lbfgs,
}


def map_optimizer(cls: Any, hp: Mapping[str, Any], lr: Any = None) -> Mapped:
    """The optax counterpart of `cls(params, **hp)`; `lr` replaces hp['lr'] by a schedule."""
    try:
        fn = MAPPINGS[cls.__name__]
    except KeyError:
        raise Unmatched(f"no mapping for torch.optim.{cls.__name__}; mapped: {', '.join(MAPPINGS)}") from None
    return fn(hp, lr)
