"""Distributed training: torch.distributed on N real processes against JAX sharding over N devices.

One table, one generic test. Each row runs on the session's pool for its N (N gloo ranks and a JAX
process with N host devices on CPU; NCCL ranks and N GPUs under --device=gpu, skipped with the reason
where fewer GPUs exist), started once and shared by every row of that N:
- the collectives (all_reduce sum / mean / max, all_gather, reduce_scatter, broadcast) on
  Hypothesis-drawn per-rank arrays, against jax.shard_map with psum / pmean / pmax / all_gather /
  psum_scatter, the float64 result of the per-rank inputs naming the side that is off;
- DDP against sharded data parallelism on a small MLP: the all-reduced gradients, and 3 SGD steps
  compared after every step, both against single-process float64 training;
- FSDP2 (fully_shard) against the MLP's parameters sharded over the mesh axis: the same two checks, and
  the state dict gathered from FSDP converted to the JAX tree and back;
- an uneven last batch: one epoch over a Hypothesis-sized dataset through DistributedSampler(drop_last=False)
  (N not dividing it pads with the first samples) against the JAX port that pads the same way;
- BatchNorm under DDP (per-replica statistics, rank 0's running statistics broadcast) against the JAX
  port's norm without axis_name; the synced pair's torch side (SyncBatchNorm) is a skip on CPU, its JAX
  port (axis_name, pmean-ed statistics) checked against the float64 global-batch reference.
"""
from __future__ import annotations

import pytest

from equivcheck.distributed import COLLECTIVES, bn_pair, collective_pair, ddp_pair, fsdp_pair, uneven_pair

WORLDS = (4, 2)  # the 4-rank pool starts first and serves the 2-rank rows too (equivcheck.distributed.pool_for)
PAIRS = ([collective_pair(op, n) for n in WORLDS for op in COLLECTIVES] + [ddp_pair(n) for n in WORLDS]
         + [fsdp_pair(2)]  # FSDP at 4 ranks costs ~20 s more (~200 ms an example): tests/test_distributed.py runs it
         + [uneven_pair(4), bn_pair(2), bn_pair(2, sync=True, dtypes=("float32",))])  # more: tests/test_distributed_{uneven,bn}.py


@pytest.mark.parametrize("pair", PAIRS, ids=str)
def test_distributed(pair, equiv):
    equiv.check(pair)
