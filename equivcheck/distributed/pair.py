"""The distributed check kind: `DistributedPair`, and the factories the suite's table uses.

    PAIRS = [collective_pair("all_reduce_sum", world=2), ddp_pair(world=4)]

    @pytest.mark.parametrize("pair", PAIRS, ids=str)
    def test_distributed(pair, equiv):
        equiv.check(pair)

Checks (equivcheck.distributed.runner):
  collective  one torch.distributed collective on N ranks against its jax.shard_map counterpart on a
              Mesh of N devices, on Hypothesis-drawn per-rank arrays; the float64 NumPy result of the
              per-rank inputs says which side is off
  grads       DDP's all-reduced gradients of a small MLP (one global batch, a shard per rank) against
              the JAX gradient of the same batch sharded over the mesh, and both against the float64
              single-process full-batch gradient
  train       `steps` SGD steps of both against single-process float64 training, compared after every
              step: the first step that diverges is named
  With job "fsdp_mlp" the torch side is FSDP2 (fully_shard) and the JAX side shards the parameters over
  the mesh axis (XLA gathers them and reduce-scatters the gradients); its train check also converts the
  state dict gathered from FSDP to the JAX tree and back, bit for bit.
  epoch       (job "uneven_mlp") one epoch over a Hypothesis-sized dataset through torch's
              DistributedSampler(drop_last=False), which pads N-uneven sizes with the first samples
              (equivcheck.distributed.uneven): the last step's gradient and the parameters after the epoch
  bn, bn_port (job "bn_mlp") BatchNorm under DDP against the JAX port's norm, per replica or synced
              (equivcheck.distributed.batchnorm); "bn_port" checks the JAX port alone against the float64
              reference (a synced pair's "bn" is a skip on CPU: SyncBatchNorm refuses CPU tensors)
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping
from typing import Any

from equivcheck.distributed.common import custom_model
from equivcheck.distributed.reference import BN_MLP, COLLECTIVES, FSDP_MLP, MLP, MODELS, UNEVEN_MLP
from equivcheck.engine.kind import check_name
from equivcheck.engine.tolerance import Tolerance, require_reasons

DISTRIBUTED_CHECKS = ("collective", "grads", "train", "epoch", "bn", "bn_port")
_CHECKS = {UNEVEN_MLP: ("epoch",), BN_MLP: ("bn", "bn_port")}


@dataclasses.dataclass(frozen=True, eq=False)
class DistributedPair:
    """One distributed computation on N torch ranks and on N JAX devices.

    job          a collective (equivcheck.distributed.reference.COLLECTIVES), "mlp" (DDP against data-parallel
                 JAX), "fsdp_mlp" (FSDP2 against parameters sharded over the mesh), "uneven_mlp" (an epoch
                 through DistributedSampler(drop_last=False)) or "bn_mlp" (BatchNorm under DDP)
    world        N, the ranks (torch processes) and devices (JAX mesh); the pool for (N, device) is shared
    checks       ("collective",) for a collective; a subset of ("grads", "train") for the models
    torch_slips, jax_slips  mistakes planted on one side (equivcheck.distributed.torch_jobs / jax_jobs):
                 how the planted-bug tests show that a check catches and names them
    steps        SGD steps of the train check; rows: batch rows per rank; sizes: (d, h, o) of the MLP
    sync         job "bn_mlp": torch's SyncBatchNorm and the JAX port's pmean-ed statistics (global batch)
                 rather than per-replica statistics
    accumulate   micro-batches per step and rank (torch: all but the last backward under DDP's no_sync);
                 every entry of `rows` must be a multiple of it
    seconds      the deadline of one request to the workers (a worker past it fails the check), > 0
    torch_job, jax_job  a job of your own in place of the built-in one ("collective", "ddp" or "fsdp"; not for
                 "uneven_mlp" / "bn_mlp", whose float64 references are the built-in models'): "module:function",
                 importable in the workers, called as fn(ctx, **the built-in job's arguments) and returning
                 what it returns. ctx (equivcheck.distributed.worker): a torch job's has rank, world, group
                 (the process group of the request's ranks) and device; a JAX job's has world, mesh (axis
                 "ranks"), devices and cache. A model job gets and returns torch's layout on the torch side
                 ({"l1.weight": (h, d), ...}) and Flax's on the JAX side ({"l1": {"kernel": (d, h), "bias"}});
                 it returns {"grads": tree, "params": [tree after each of `steps` SGD steps]} in the dtype
                 asked. A malformed result fails the check naming the side and what was expected.
    reference_job  a model job's float64 reference when torch_job / jax_job is your own model: "module:function"
                 or a callable, run in this process as fn(params=, x=, y=, lr=, steps=) with float64 torch-layout
                 params, returning {"grads": tree, "params": [tree after each step]} in float64. Without it a
                 custom model job is compared torch against JAX only, and a disagreement names no side
                 (the built-in MLP's reference says nothing of another model)
    """

    name: str
    job: str
    world: int = 2
    checks: tuple[str, ...] = ()
    dtypes: tuple[str, ...] = ("float32", "float64")
    torch_slips: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    jax_slips: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    steps: int = 3
    rows: tuple[int, ...] = (2, 3)
    sizes: tuple[int, int, int] = (3, 8, 2)
    seconds: float = 30.0
    accumulate: int = 1
    sync: bool = False
    torch_job: str = ""
    jax_job: str = ""
    reference_job: Any = ""
    tolerance: Tolerance | None = None
    doc: str = ""
    tags: frozenset[str] = frozenset()

    family = "distributed"
    all_checks = DISTRIBUTED_CHECKS

    def __post_init__(self) -> None:
        check_name("DistributedPair", self.name)
        set_ = lambda k, v: object.__setattr__(self, k, v)
        if self.job not in (*COLLECTIVES, *MODELS):
            raise ValueError(f"DistributedPair {self.name!r}: job {self.job!r} is none of {(*COLLECTIVES, *MODELS)}")
        allowed = ("collective",) if self.job in COLLECTIVES else _CHECKS.get(self.job, ("grads", "train"))
        default = ("bn",) if self.job == BN_MLP and not self.sync else allowed  # bn_port repeats bn's JAX half
        set_("checks", tuple(self.checks) or default)
        set_("dtypes", tuple(self.dtypes))
        set_("tags", frozenset(self.tags))
        set_("torch_slips", dict(self.torch_slips))
        set_("jax_slips", dict(self.jax_slips))
        bad = [c for c in self.checks if c not in allowed]
        if bad:
            raise ValueError(f"DistributedPair {self.name!r}: checks {bad} do not apply to {self.job!r}; use {allowed}")
        if self.sync and self.job != BN_MLP:
            raise ValueError(f"DistributedPair {self.name!r}: sync=True applies to job {BN_MLP!r} only")
        if not isinstance(self.world, int) or isinstance(self.world, bool) or self.world < 1:
            raise ValueError(f"DistributedPair {self.name!r}: world must be a positive int, got {self.world!r}")
        if self.steps < 1 or not self.rows or min(self.rows) < 1 or self.accumulate < 1:
            raise ValueError(f"DistributedPair {self.name!r}: steps, rows and accumulate must be positive")
        if len(self.sizes) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                           for v in self.sizes):
            raise ValueError(f"DistributedPair {self.name!r}: sizes must be three positive ints (d, h, o), "
                             f"got {self.sizes!r}")
        # 0 is not "no limit" here: a request without a deadline could hang the session on one stuck rank
        if isinstance(self.seconds, bool) or not isinstance(self.seconds, (int, float)) or not self.seconds > 0:
            raise ValueError(f"DistributedPair {self.name!r}: seconds (a request's deadline) must be > 0, "
                             f"got {self.seconds!r}")
        if (self.torch_job or self.jax_job) and self.job in (UNEVEN_MLP, BN_MLP):
            raise ValueError(f"DistributedPair {self.name!r}: torch_job / jax_job apply to the collectives, "
                             f"{MLP!r} and {FSDP_MLP!r}; {self.job!r} is checked against its built-in model")
        if self.reference_job and not custom_model(self):
            raise ValueError(f"DistributedPair {self.name!r}: reference_job applies to a model job of your own "
                             f"(torch_job= / jax_job= with job {MLP!r} or {FSDP_MLP!r})")
        if isinstance(self.reference_job, str) and self.reference_job and (
                not all(self.reference_job.partition(":")[::2])):
            raise ValueError(f"DistributedPair {self.name!r}: reference_job must read 'module:function' or be a "
                             f"callable, got {self.reference_job!r}")
        if self.reference_job and not isinstance(self.reference_job, str) and not callable(self.reference_job):
            raise ValueError(f"DistributedPair {self.name!r}: reference_job must be 'module:function' or a callable")
        if any(r % self.accumulate for r in self.rows):
            raise ValueError(f"DistributedPair {self.name!r}: rows {self.rows} must be multiples of accumulate="
                             f"{self.accumulate} (equal micro-batches)")
        for label in ("torch_job", "jax_job"):
            job = getattr(self, label)
            if job and (":" not in job or not all(job.partition(":")[::2])):
                raise ValueError(f"DistributedPair {self.name!r}: {label} must read 'module:function', got {job!r}")
        require_reasons(f"DistributedPair {self.name!r}", self.tolerance)

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"DistributedPair({self.name!r}, world={self.world})"

    def replace(self, **changes: Any) -> DistributedPair:
        return dataclasses.replace(self, **changes)

    def prepare(self, dtype: str, run: Any) -> None:
        """Start (or reuse) the pool for this pair's world size on the background thread, so that
        the start-up overlaps the test before. A pool that fails to start is reported by run_checks."""
        from equivcheck.distributed.runner import unavailable, unimportable

        if dtype in self.dtypes and not unavailable(self, run.device) and not unimportable(self):
            from equivcheck.distributed.pool import pool_for

            with contextlib.suppress(Exception):  # run_checks starts it again and reports why it fails
                pool_for(self.world, run.device)

    def run_checks(self, *, dtype: str, run: Any, known: Any, nodeid: str = "", replay: str = "") -> list[Any]:
        """The `equiv` fixture's entry point: one CheckRecord per check (equivcheck.distributed.runner)."""
        from equivcheck.distributed.runner import run_distributed_pair

        return run_distributed_pair(self, dtype=dtype, run=run, known=known, nodeid=nodeid, replay=replay)


def collective_pair(op: str, world: int = 2, **fields: Any) -> DistributedPair:
    """`op` on `world` ranks, named "<op>_n<world>"; checks may be given (only ("collective",) applies)."""
    return DistributedPair(fields.pop("name", f"{op}_n{world}"), op, world, fields.pop("checks", ("collective",)),
                           **fields)


def ddp_pair(world: int = 2, **fields: Any) -> DistributedPair:
    """DDP against sharded JAX data parallelism on the MLP, named "ddp_mlp_n<world>"."""
    return DistributedPair(fields.pop("name", f"ddp_mlp_n{world}"), MLP, world, **fields)


def fsdp_pair(world: int = 2, **fields: Any) -> DistributedPair:
    """FSDP2 (fully_shard) against parameters sharded over a JAX mesh axis, on the MLP, named "fsdp_mlp_n<world>"."""
    return DistributedPair(fields.pop("name", f"fsdp_mlp_n{world}"), FSDP_MLP, world, **fields)



def uneven_pair(world: int = 2, **fields: Any) -> DistributedPair:
    """One epoch of DDP through DistributedSampler(drop_last=False) against the JAX port's padded epoch,
    the dataset size drawn from N to 5N; `rows` are the rows per rank and step. Named "uneven_mlp_n<world>"."""
    return DistributedPair(fields.pop("name", f"uneven_mlp_n{world}"), UNEVEN_MLP, world, **fields)


def bn_pair(world: int = 2, sync: bool = False, **fields: Any) -> DistributedPair:
    """BatchNorm under DDP (sync: SyncBatchNorm) against the JAX port's norm (sync: axis_name), 4 or 6 rows
    per rank (2 rows make each feature's shard statistics +-1: too little to tell slips apart).
    Named "bn_mlp_n<world>" or "syncbn_mlp_n<world>"."""
    fields.setdefault("rows", (4, 6))
    return DistributedPair(fields.pop("name", f"{'sync' if sync else ''}bn_mlp_n{world}"), BN_MLP, world,
                           sync=sync, **fields)
