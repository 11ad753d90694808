"""The worker processes' side of a pool: `python -m equivcheck.distributed.worker torch|jax ...`.

A torch worker is one rank of a process group (gloo on CPU, nccl on GPU) that it joins through the
parent's TCPStore; the JAX worker is one process holding N devices (on CPU through
`XLA_FLAGS=--xla_force_host_platform_device_count=N`, set by the parent before this process starts).
Each reads requests from its socket (`multiprocessing.connection`: pickled dicts), runs the named job
and answers `("ok", result)` or `("error", traceback text)`; the first message is `("ready", info)`.

A job is a name in the side's JOBS table (equivcheck.distributed.torch_jobs / jax_jobs) or
"module:function", called as `fn(ctx, **kwargs)` with NumPy arrays in and out.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import os
import socket
import sys
import traceback
from multiprocessing.connection import Connection
from typing import Any


class TorchContext:
    """What a torch job sees: its rank, the world size of the request, the device ("cpu" or
    "cuda:<rank>") and `group`, the process group of ranks 0..world-1 (None: the default group).
    A pool of N ranks serves requests for n <= N ranks through such subgroups, made at start-up."""

    def __init__(self, rank: int, world: int, device: str, groups: dict[int, Any]) -> None:
        self.rank, self.world, self.device, self.groups = rank, world, device, groups
        self.group = groups.get(world)

    def sized(self, world: int) -> TorchContext:
        return TorchContext(self.rank, world, self.device, self.groups)


class JaxContext:
    """What a JAX job sees: the world size of the request, its devices and a 1-D Mesh over them with
    axis "ranks" (the first `world` of the process's devices), and a cache of compiled programs."""

    def __init__(self, world: int) -> None:
        import jax
        from jax.sharding import Mesh

        devices = jax.devices()[:world]
        if len(devices) < world:
            raise RuntimeError(f"JAX sees {len(jax.devices())} devices, the pool needs {world}")
        import numpy as np

        self.world, self.devices = world, devices
        self.mesh = Mesh(np.array(devices), ("ranks",))
        self.cache: dict[Any, Any] = {}  # compiled programs, by the job's own key

    def sized(self, world: int) -> JaxContext:
        view = object.__new__(JaxContext)
        view.__dict__.update(self.__dict__)
        import numpy as np
        from jax.sharding import Mesh

        view.world, view.devices = world, self.devices[:world]
        view.mesh = self.mesh if world == self.world else Mesh(np.array(view.devices), ("ranks",))
        return view


def resolve(name: str, table: dict[str, Any]) -> Any:
    """The job called `name`: a key of `table`, or "module:function". Raises KeyError naming both."""
    if ":" in name:
        module, _, attr = name.partition(":")
        return getattr(importlib.import_module(module), attr)
    try:
        return table[name]
    except KeyError:
        raise KeyError(f"no job {name!r}; built in: {', '.join(sorted(table))}, or give 'module:function'") from None


def _serve(conn: Connection, ctx: Any, table: dict[str, Any]) -> None:
    while True:
        try:
            request = conn.recv()
        except EOFError:  # the parent closed the pool
            return
        if request is None:
            return
        try:
            world = request.get("world", ctx.world)
            result = resolve(request["job"], table)(ctx if world == ctx.world else ctx.sized(world),
                                                    **request.get("kwargs", {}))
            conn.send(("ok", result))
        except Exception:  # noqa: BLE001 - every failure goes back as text; the process stays for the next job
            conn.send(("error", traceback.format_exc()))


def _torch(args: argparse.Namespace, conn: Connection) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # N ranks share this machine's cores
    device = "cpu"
    if args.backend == "nccl":
        device = f"cuda:{args.rank}"
        torch.cuda.set_device(args.rank)
    timeout = datetime.timedelta(seconds=args.pg_timeout)
    store = dist.TCPStore("127.0.0.1", args.port, None, is_master=False, timeout=timeout)
    dist.init_process_group(args.backend, store=dist.PrefixStore(args.prefix, store), rank=args.rank,
                            world_size=args.world, timeout=timeout)
    # DDP's first construction imports torch._dynamo (seconds per rank): paid here, while the ranks
    # and the JAX process start side by side, not inside the first check.
    from torch.nn.parallel import DistributedDataParallel
    # every rank makes every subgroup, in the same order (new_group is collective over the default group)
    groups = {n: dist.new_group(list(range(n))) for n in range(1, args.world)}

    from equivcheck.distributed.torch_jobs import JOBS

    DistributedDataParallel(torch.nn.Linear(1, 1).to(device), device_ids=None if device == "cpu" else [device])
    conn.send(("ready", {"rank": args.rank, "backend": args.backend, "torch": torch.__version__}))
    try:
        _serve(conn, TorchContext(args.rank, args.world, device, groups), JOBS)
    finally:
        dist.destroy_process_group()


def _jax(args: argparse.Namespace, conn: Connection) -> None:
    import jax

    jax.config.update("jax_enable_x64", True)  # float64 checks; every job casts to the dtype it is given
    ctx = JaxContext(args.world)
    from equivcheck.distributed.jax_jobs import JOBS

    conn.send(("ready", {"devices": [str(d) for d in ctx.devices], "jax": jax.__version__}))
    _serve(conn, ctx, JOBS)


def _orphan_watch(parent: int) -> None:
    """End this worker when the process that started it is gone (pytest SIGKILLed, say): its pool's
    close() never runs then, and a worker still starting would otherwise live on under PID 1 for minutes.
    PR_SET_PDEATHSIG (Linux) ends it at once; it fires when the *thread* that started the worker exits, and
    pools start on the plugin's background thread, so it is not used: a daemon thread polls getppid()
    instead, which covers the race of a parent dead before this process looked too."""
    import threading
    import time

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    if parent and os.getppid() != parent:
        os._exit(1)
    threading.Thread(target=watch, name="orphan-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="equivcheck.distributed.worker")
    p.add_argument("side", choices=("torch", "jax"))
    p.add_argument("--fd", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--prefix", default="equivcheck")
    p.add_argument("--backend", default="gloo")
    p.add_argument("--pg-timeout", type=float, default=30.0)
    p.add_argument("--parent", type=int, default=0, help="the starting process's pid (0: not watched)")
    args = p.parse_args(argv)
    _orphan_watch(args.parent)
    conn = Connection(socket.socket(fileno=args.fd).detach())
    try:
        (_torch if args.side == "torch" else _jax)(args, conn)
    except Exception:  # noqa: BLE001 - start-up failures go to the parent as text
        try:
            conn.send(("error", traceback.format_exc()))
        finally:
            os._exit(1)
    sys.stdout.flush()
    os._exit(0)  # no interpreter teardown: XLA's and gloo's threads can abort an orderly exit


if __name__ == "__main__":
    main()
