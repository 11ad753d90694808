"""torch.distributed process groups against jax.sharding: collectives and data-parallel training.

pool        Pool, pool_for, close_all, WorkerFailure: N torch ranks and a JAX process with N devices,
            started once per (N, device) and fed requests with deadlines
worker      the worker processes' loop (python -m equivcheck.distributed.worker)
torch_jobs  the torch side's jobs: collectives, DDP gradients and SGD steps
jax_jobs    the JAX side's jobs: shard_map collectives, sharded data-parallel gradients and steps
common      Outcome, judge (the side off the reference named), the MLP's example and layouts
uneven      the uneven last batch: DistributedSampler's padding restated, the float64 epoch, slips named
batchnorm   BatchNorm per replica / synced: the float64 reference, the slips named, the "bn" checks
jax_bn      the JAX port's hand-written BatchNorm in shard_map (axis_name or not)
reference   float64 NumPy references (collectives, full-batch MLP training) and the slips they name
pair        DistributedPair (the check kind), collective_pair, ddp_pair, fsdp_pair, uneven_pair, bn_pair
runner      a pair's checks under Hypothesis on the session's pool: CheckRecords
"""
from equivcheck.distributed.pair import (
                                         DISTRIBUTED_CHECKS,
                                         DistributedPair,
                                         bn_pair,
                                         collective_pair,
                                         ddp_pair,
                                         fsdp_pair,
                                         uneven_pair,
)
from equivcheck.distributed.pool import Pool, WorkerFailure, close_all, pool_for
from equivcheck.distributed.reference import COLLECTIVES

__all__ = ["COLLECTIVES", "DISTRIBUTED_CHECKS", "DistributedPair", "Pool", "WorkerFailure", "bn_pair", "close_all",
           "collective_pair", "ddp_pair", "fsdp_pair", "pool_for", "uneven_pair"]
