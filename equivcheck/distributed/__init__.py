"""torch.distributed process groups against jax.sharding: collectives and data-parallel training.

pool        Pool, pool_for, close_all, WorkerFailure: N torch ranks and a JAX process with N devices,
            started once per (N, device) and fed requests with deadlines
worker      the worker processes' loop (python -m equivcheck.distributed.worker)
torch_jobs  the torch side's jobs: collectives, DDP gradients and SGD steps
jax_jobs    the JAX side's jobs: shard_map collectives, sharded data-parallel gradients and steps
"""
from equivcheck.distributed.pool import Pool, WorkerFailure, close_all, pool_for

__all__ = ["Pool", "WorkerFailure", "close_all", "pool_for"]
