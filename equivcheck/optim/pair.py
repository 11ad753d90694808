"""torch.optim against optax: the `OptimizerPair` record, the factory that maps torch's
hyperparameters to optax, and moving optimizer state between the two.

A suite is a table of pairs and one generic test, with the same `equiv` fixture as for
operations:

    PAIRS = [optimizer_pair("adam", "Adam", lr=1e-2, amsgrad=True),
             optimizer_pair("sgd_step", "SGD", lr=0.1, momentum=0.9, schedule=Schedule("StepLR", step_size=7))]

    @pytest.mark.parametrize("pair", PAIRS, ids=str)
    def test_optimizer(pair, equiv):
        equiv.check(pair)

Checks (equivcheck.optim.runner): `step` (one step on drawn parameter pytrees and
gradients), `quadratic` and `mlp` (trajectories of up to 100 steps, parameters and state
compared at every step; `mlp` also moves the optimizer state torch -> optax and optax ->
torch after a drawn step and continues training on the other side) and `schedule` (the
learning-rate sequence).
"""
from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Mapping
from typing import Any

from equivcheck.engine.kind import check_name
from equivcheck.engine.tolerance import Tolerance, require_reasons
from equivcheck.ops.pairs import Pair
from equivcheck.optim.groups import Groups, group_index, leaf_paths, per_group
from equivcheck.optim.mapping import GROUP_HPARAMS, Mapped, Unmatched, map_optimizer, torch_hparams
from equivcheck.optim.schedules import Schedule, map_schedule
from equivcheck.optim.state import StateMap, load_torch, neutral_to_optax, optax_to_neutral, torch_to_neutral

OPTIM_CHECKS = ("step", "quadratic", "mlp", "schedule")

__all__ = ["OPTIM_CHECKS", "OptimizerPair", "Schedule", "Unmatched", "load_torch_state", "optax_state_from_torch",
           "optimizer_pair"]


@dataclasses.dataclass(frozen=True, eq=False)
class OptimizerPair:
    """One optimizer (with its schedule, clipping and accumulation) in torch and in optax.

    torch_optimizer  list of parameter tensors (tree order) -> torch.optim.Optimizer
    optax_transform  () -> the optax transformation computing the same steps
    state_map        how torch's per-parameter state reads in the optax state
    torch_scheduler  optimizer -> scheduler, stepped after every optimizer.step()
    optax_schedule   count -> lr, the schedule inside optax_transform (compared as `lr`)
    schedule_takes_loss  the scheduler steps on the loss (ReduceLROnPlateau)
    torch_clip       list of tensors -> gradient norm or None, applied before the step
    clip_reports_norm    torch_clip returns the norm, compared as `grad_norm`
    unclipped        () -> this pair with clipping taken out of both sides: a model's train check
                     that fails reruns it, and names clipping (not the optimizer) when it then
                     passes. optimizer_pair sets it; a pair of your own with torch_clip may too
    accumulate       micro-batches per step (torch sums loss/k gradients; optax.MultiSteps)
    param_groups     torch param groups, [(predicate(path, leaf) -> bool, overrides)]
                     (equivcheck.optim.groups): torch_optimizer then receives torch's list of
                     group dicts instead of the leaves; the optax side must apply the same
                     per-group hyperparameters (optax.masked, multi_transform). A factory may
                     also build groups from the leaves itself: any grouping that holds each
                     leaf once runs
    hparams, rebuild torch's full hyperparameters and a way to rebuild the pair with some
                     changed: the diagnosis varies them to isolate a difference
    unavailable      why the pair cannot run here (torch without torch.optim.Lion); its
                     checks are skipped with this reason
    spec             "torch" or "jax": the side the other ports, named as right when the
                     diagnosis finds the formulas differ (optimizer_pair sets "torch" for a port
                     of one's own, optax_map, of a torch.optim class); "" (the default): two
                     libraries, neither is the specification, and no side is named
    witnesses        `equivcheck.optim.trajectory.Example`s run first, on every seed, by the check
                     each names (params and data trees of arrays, cast to each dtype): the
                     trajectory where a known divergence shows
    """

    name: str
    torch_optimizer: Callable[[list[Any]], Any]
    optax_transform: Callable[[], Any]
    state_map: StateMap = dataclasses.field(default_factory=StateMap)
    torch_scheduler: Callable[[Any], Any] | None = None
    optax_schedule: Callable[[Any], Any] | None = None
    schedule_takes_loss: bool = False
    torch_clip: Callable[[list[Any]], Any] | None = None
    clip_reports_norm: bool = False
    unclipped: Callable[[], OptimizerPair] | None = None
    accumulate: int = 1
    param_groups: tuple[tuple[Callable[[str, Any], bool], Mapping[str, Any]], ...] = ()
    checks: tuple[str, ...] = ("step", "quadratic", "mlp")
    dtypes: tuple[str, ...] = ("float32", "float64")
    tolerance: Tolerance | Mapping[str, Tolerance] | None = None
    hparams: Mapping[str, Any] | None = None
    rebuild: Callable[..., OptimizerPair] | None = None
    parts: tuple[str, ...] = ()
    unavailable: str = ""
    doc: str = ""
    tags: frozenset[str] = frozenset()
    witnesses: tuple[Any, ...] = ()
    spec: str = ""

    family = "optimizers"  # the report section (engine.kind.FAMILIES)
    all_checks = OPTIM_CHECKS  # what `equiv.check(pair, checks=...)` may select

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)
        set_("checks", tuple(self.checks))
        set_("dtypes", tuple(self.dtypes))
        set_("tags", frozenset(self.tags))
        set_("param_groups", tuple((p, dict(o)) for p, o in self.param_groups))
        set_("witnesses", tuple(self.witnesses))
        bad = [w for w in self.witnesses if getattr(w, "check", None) not in OPTIM_CHECKS]
        if bad:
            raise ValueError(f"OptimizerPair {self.name!r}: a witness must be an Example naming one of {OPTIM_CHECKS}")
        check_name("OptimizerPair", self.name)
        for label in ("torch_optimizer", "optax_transform"):
            if not callable(getattr(self, label)):
                raise TypeError(f"OptimizerPair {self.name!r}: {label} must be callable")
        bad = [c for c in self.checks if c not in OPTIM_CHECKS]
        if bad or not self.checks:
            raise ValueError(f"OptimizerPair {self.name!r}: checks {bad or '()'} not among {OPTIM_CHECKS}")
        if "schedule" in self.checks and (self.optax_schedule is None or self.torch_scheduler is None):
            raise ValueError(f"OptimizerPair {self.name!r}: the schedule check needs torch_scheduler and optax_schedule")
        if self.unclipped is not None and not callable(self.unclipped):
            raise TypeError(f"OptimizerPair {self.name!r}: unclipped must be callable (() -> the pair without clipping)")
        if not isinstance(self.accumulate, int) or self.accumulate < 1:
            raise ValueError(f"OptimizerPair {self.name!r}: accumulate must be a positive int")
        require_reasons(f"OptimizerPair {self.name!r}", self.tolerance)
        if self.spec not in ("", "torch", "jax"):
            raise ValueError(f"OptimizerPair {self.name!r}: spec is 'torch', 'jax' or '', not {self.spec!r}")

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"OptimizerPair({self.name!r})"

    def replace(self, **changes: Any) -> OptimizerPair:
        """A copy with `changes`; a change to either side drops `unclipped` and `rebuild` unless
        given anew (they rebuild the sides as they were, which would hide the change)."""
        if {"torch_optimizer", "optax_transform", "torch_clip", "state_map"} & set(changes):
            changes.setdefault("unclipped", None)
            changes.setdefault("rebuild", None)
        return dataclasses.replace(self, **changes)

    # the override for a dtype and check, most specific key first: the same lookup as Pair's
    tolerance_for = Pair.tolerance_for

    def run_checks(self, *, dtype: str, run: Any, known: Any, nodeid: str = "", replay: str = "") -> list[Any]:
        """The `equiv` fixture's entry point (equivcheck.fixture.Equiv.check)."""
        from equivcheck.optim.runner import run_optimizer_pair

        return run_optimizer_pair(self, dtype=dtype, run=run, known=known, nodeid=nodeid, replay=replay)

    def prepare(self, dtype: str, run: Any) -> None:
        """Compile this pair's JAX programs on a background thread (the plugin calls it for
        the next test while the current one runs)."""
        from equivcheck.optim.runner import prepare

        prepare(self, dtype, run)


def _torch_class(name: str | type) -> tuple[Any, str]:
    import torch

    if not isinstance(name, str):
        return name, ""
    cls = getattr(torch.optim, name, None)
    if cls is None:
        from equivcheck.optim.mapping import MAPPINGS

        if name not in MAPPINGS:  # a typo, not an optimizer this torch lacks: never a silent skip
            close = difflib.get_close_matches(name, [*MAPPINGS, *dir(torch.optim)], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"torch.optim has no optimizer named {name!r}{hint}; mapped: {', '.join(MAPPINGS)}")
        return None, f"torch {torch.__version__} has no torch.optim.{name}"
    return cls, ""


def optimizer_pair(name: str, torch_optimizer: str | type, *, schedule: Schedule | None = None,
                   clip_norm: float | None = None, clip_value: float | None = None, accumulate: int = 1,
                   optax_map: Callable[..., Mapped] | None = None, checks: tuple[str, ...] | None = None,
                   dtypes: tuple[str, ...] = ("float32", "float64"), tolerance: Any = None, doc: str = "",
                   groups: Groups = (), **hparams: Any) -> OptimizerPair:
    """A pair from torch's own terms: the optimizer class (or its name in torch.optim) and
    its hyperparameters, a torch lr scheduler, gradient clipping and accumulation. The optax
    side is built by `equivcheck.optim.mapping` (or `optax_map(cls, hparams, lr)`, for a port of
    your own), with every hyperparameter passed explicitly.

    `groups=[(predicate(path, leaf) -> bool, overrides), ...]`: torch param groups
    (equivcheck.optim.groups); leaves no predicate picks keep `hparams`. A hyperparameter that
    differs between groups reaches the mapping as a `PerGroup` and becomes masked optax pieces;
    one the mapping cannot apply per group (mapping.GROUP_HPARAMS: weight_decay and lr for
    most) is refused here with a ValueError naming the group and the hyperparameter.
    """
    import optax
    import torch

    from equivcheck.optim import transforms as ot

    if clip_norm is not None and clip_value is not None:
        raise ValueError(f"pair {name!r}: clip by norm or by value, not both")
    cls, missing = _torch_class(torch_optimizer)
    base_checks = checks or (("step", "quadratic", "mlp")
                             + (("schedule",) if schedule is not None and not schedule.takes_loss else ()))
    if cls is None:
        return OptimizerPair(name, lambda ps: None, lambda: optax.identity(), checks=base_checks, dtypes=dtypes,
                             unavailable=missing, doc=doc)
    hp = torch_hparams(cls, hparams)
    mapped_hp = _grouped(name, cls, hp, groups, schedule, custom=optax_map is not None)
    sched = map_schedule(schedule, hp["lr"]) if schedule is not None else None
    mapped = (optax_map or map_optimizer)(cls, mapped_hp, sched.schedule if sched else None)
    pieces, parts = [mapped.transform], list(mapped.parts)
    if clip_norm is not None:
        pieces.insert(0, ot.clip_by_global_norm_torch(clip_norm))
        parts.insert(0, "equivcheck clip_by_global_norm_torch (torch divides by norm + 1e-6)")
    if clip_value is not None:
        pieces.insert(0, optax.clip(clip_value))
        parts.insert(0, "optax.clip")
    smap = mapped.state_map
    if sched is not None and sched.transform is not None:
        pieces.append(sched.transform)
        parts += list(sched.parts)
        smap = dataclasses.replace(smap, sched=sched.state)
    elif sched is not None:
        parts += list(sched.parts)
    tx = optax.chain(*pieces) if len(pieces) > 1 else pieces[0]
    if accumulate > 1:
        tx = ot.multi_steps(tx, accumulate)
        parts.append(f"optax.MultiSteps(every_k_schedule={accumulate}, use_grad_mean=True, accumulator_dtype=the "
                     "parameters')")
    clip = None
    if clip_norm is not None:
        clip = lambda ps: torch.nn.utils.clip_grad_norm_(ps, clip_norm)
    elif clip_value is not None:
        clip = lambda ps: torch.nn.utils.clip_grad_value_(ps, clip_value)

    def rebuild(**changes: Any) -> OptimizerPair:
        # a probe's change holds for every group ("weight_decay=0 on both sides": no group decays)
        regrouped = [(p, {**o, **{k: v for k, v in changes.items() if k in o}}) for p, o in groups]
        return optimizer_pair(name, cls, schedule=schedule, clip_norm=clip_norm, clip_value=clip_value,
                              accumulate=accumulate, optax_map=optax_map, checks=checks, dtypes=dtypes,
                              tolerance=tolerance, doc=doc, groups=regrouped, **{**hparams, **changes})

    def unclipped() -> OptimizerPair:
        return optimizer_pair(name, cls, schedule=schedule, accumulate=accumulate, optax_map=optax_map, checks=checks,
                              dtypes=dtypes, tolerance=tolerance, doc=doc, groups=groups, **hparams)

    return OptimizerPair(
        name, lambda ps: cls(ps, **hp), lambda: tx, smap, unclipped=unclipped if clip is not None else None,
        torch_scheduler=schedule.torch_factory() if schedule is not None else None,
        optax_schedule=sched.schedule if sched is not None else None,
        schedule_takes_loss=bool(schedule is not None and schedule.takes_loss),
        torch_clip=clip, clip_reports_norm=clip_norm is not None, accumulate=accumulate, param_groups=tuple(groups),
        checks=base_checks,
        dtypes=dtypes, tolerance=tolerance, hparams=hp, rebuild=rebuild, parts=tuple(parts),
        spec="torch" if optax_map is not None and cls.__module__.startswith("torch.optim") else "",
        doc=doc or f"torch.optim.{cls.__name__}({', '.join(f'{k}={v!r}' for k, v in hparams.items())})"
        + (f" + {schedule!r}" if schedule is not None else "")
        + (f"; param groups {', '.join(repr(dict(o)) for _, o in groups)}" if groups else ""),
    )


def _grouped(name: str, cls: Any, hp: dict[str, Any], groups: Groups, schedule: Schedule | None,
             custom: bool) -> dict[str, Any]:
    """hp with the hyperparameters that differ between groups as PerGroup values; a port of
    one's own (optax_map) receives any of them that way."""
    if not groups:
        return hp
    label = f"pair {name!r} (torch.optim.{cls.__name__})"
    if schedule is not None:
        for i, (_, o) in enumerate(groups, start=1):
            if "lr" in o and repr(o["lr"]) != repr(hp["lr"]):
                raise ValueError(f"{label}: param group {i} sets lr={o['lr']!r} under a schedule: torch schedules "
                                 "each group's lr, the optax schedule is one; equivcheck maps a per-group lr "
                                 "without a schedule only")
    allowed = tuple(hp) if custom else GROUP_HPARAMS.get(cls.__name__, ())
    return per_group(label, hp, groups, allowed)


# ---- checkpoints: optimizer state from one framework to the other -----------------------

def _leaves_match(pair: OptimizerPair, optimizer: Any, params: Any, leaves: Any) -> tuple[Any, list[Any]]:
    """The tree's structure and the optimizer's tensors in its leaf order. With several param
    groups torch holds them group by group: `leaves` (the tensors in jax.tree.leaves order)
    says the order, or else the pair's declared param_groups do."""
    import jax
    import numpy as np

    treedef = jax.tree.structure(params)
    held = [p for g in optimizer.param_groups for p in g["params"]]
    if leaves is not None:
        ordered = list(leaves)
    elif len(optimizer.param_groups) == 1:
        ordered = held
    elif pair.param_groups:
        found = [group_index(pair.param_groups, path, x) for path, x in zip(leaf_paths(params), jax.tree.leaves(params))]
        order = sorted(range(len(found)), key=lambda i: found[i])  # stable: tree order within a group
        ordered = list(held)
        if len(order) == len(held):  # else the shapes below say what differs
            for k, i in enumerate(order):
                ordered[i] = held[k]
    else:
        raise ValueError(f"pair {pair.name!r}: the torch optimizer has {len(optimizer.param_groups)} param groups; "
                         "pass leaves=[its tensors in jax.tree.leaves order] (or declare the pair's param_groups)")
    if {id(p) for p in ordered} != {id(p) for p in held} or len(ordered) != len(held):
        raise ValueError(f"pair {pair.name!r}: `leaves` must be the optimizer's {len(held)} tensors, each once")
    t_shapes = [tuple(p.shape) for p in ordered]
    j_shapes = [tuple(np.shape(x)) for x in jax.tree.leaves(params)]
    if t_shapes != j_shapes:
        paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
        raise ValueError(f"pair {pair.name!r}: the torch optimizer holds {len(held)} parameters of shapes {t_shapes}, "
                         f"the params tree {len(j_shapes)} leaves {dict(zip(paths, j_shapes))} (in tree order); "
                         "build the optimizer from the tree's leaves in jax.tree.leaves order")
    return treedef, ordered


def optax_state_from_torch(pair: OptimizerPair, optimizer: Any, params: Any, *, step: int | None = None,
                           scheduler: Any = None, leaves: Any = None) -> Any:
    """The optax state that continues `optimizer` (and `scheduler`) exactly: moments,
    step counts and schedule state, for `pair.optax_transform()` on the pytree `params`
    (its leaves in tree order are the optimizer's parameters). `step` is needed only for
    optimizers that keep no count of their own (SGD without a scheduler). With param groups,
    `leaves` gives the optimizer's tensors in tree order (else the pair's declared groups do)."""
    treedef, ordered = _leaves_match(pair, optimizer, params, leaves)
    import jax
    import jax.numpy as jnp

    neutral = torch_to_neutral(optimizer, pair.state_map, treedef, step or 0, scheduler, params=ordered)
    return jax.tree.map(jnp.asarray, neutral_to_optax(pair.optax_transform().init(params), pair.state_map, neutral))


def load_torch_state(pair: OptimizerPair, opt_state: Any, optimizer: Any, params: Any, *, step: int | None = None,
                     scheduler: Any = None, leaves: Any = None) -> None:
    """Load an optax state into a fresh torch `optimizer` (and `scheduler`) so that it
    continues the optax run exactly; `leaves` as in optax_state_from_torch."""
    treedef, ordered = _leaves_match(pair, optimizer, params, leaves)
    load_torch(optimizer, pair.state_map, treedef, optax_to_neutral(opt_state, pair.state_map, step or 0), scheduler,
               params=ordered)
