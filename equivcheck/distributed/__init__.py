"""torch.distributed process groups against jax.sharding: collectives and data-parallel training.

pool        Pool, pool_for, close_all, WorkerFailure: N torch ranks and a JAX process with N devices,
            started once per (N, device) and fed requests with deadlines
worker      the worker processes' loop (python -m equivcheck.distributed.worker)
torch_jobs  the torch side's jobs: collectives, DDP gradients and SGD steps
jax_jobs    the JAX side's jobs: shard_map collectives, sharded data-parallel gradients and steps
reference   float64 NumPy references (collectives, full-batch MLP training) and the slips they name
pair        DistributedPair (the check kind), collective_pair, ddp_pair, fsdp_pair
runner      a pair's checks under Hypothesis on the session's pool: CheckRecords
"""
from equivcheck.distributed.pair import DISTRIBUTED_CHECKS, DistributedPair, collective_pair, ddp_pair, fsdp_pair
from equivcheck.distributed.pool import Pool, WorkerFailure, close_all, pool_for
from equivcheck.distributed.reference import COLLECTIVES

__all__ = ["COLLECTIVES", "DISTRIBUTED_CHECKS", "DistributedPair", "Pool", "WorkerFailure", "close_all",
           "collective_pair", "ddp_pair", "fsdp_pair", "pool_for"]
