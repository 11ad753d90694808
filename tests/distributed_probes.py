"""Jobs for the distributed robustness tests, run inside the pool's workers ("tests.distributed_probes:...").

Each takes the built-in job's arguments (equivcheck.distributed.torch_jobs.ddp / jax_jobs.ddp) and fails
on one rank: the process exits, raises, or sleeps past the request's deadline.
"""
from __future__ import annotations

import os
import time
from typing import Any


def exit_on_rank1(ctx: Any, **_: Any) -> None:
    if ctx.rank == 1:
        os._exit(3)
    time.sleep(60)  # rank 0 waits, as it would in a collective with a dead peer


def raise_on_rank1(ctx: Any, **_: Any) -> None:
    if ctx.rank == 1:
        raise ZeroDivisionError("planted: rank 1 divides by zero")
    time.sleep(60)


def hang_on_rank1(ctx: Any, **_: Any) -> None:
    if ctx.rank == 1:  # rank 0 answers at once, rank 1 never does
        time.sleep(3600)


def jax_exit(ctx: Any, **_: Any) -> None:
    os._exit(3)


def mean_without_divide(ctx: Any, op: str, x: Any, root: int = 0) -> Any:
    """The torch collective job with all_reduce_mean planted as a plain sum."""
    from equivcheck.distributed.torch_jobs import collective

    return collective(ctx, "all_reduce_sum" if op == "all_reduce_mean" else op, x, root)
