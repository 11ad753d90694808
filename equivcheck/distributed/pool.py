"""Worker pools: N torch ranks in one process group and one JAX process with N devices, started once.

Starting processes is what costs (importing torch, joining the group, importing JAX: seconds each), so
a `Pool` starts them once and is fed requests: a named job and NumPy arrays in, NumPy arrays out,
through a socket per worker. `pool_for(world, device)` keeps the session's pools and hands out the
smallest open one of at least `world` ranks (n-rank requests run on ranks 0..n-1 in their own process
group, and on a mesh of the JAX process's first n devices); `close_all()` ends them (the plugin at
session end, and atexit).

Every request has a deadline. A worker that dies, raises or does not answer in time raises
`WorkerFailure` naming the side, the rank and the cause (the worker's traceback, its exit status and
the tail of its stderr, or "rank 1 did not answer within 30 s"); the pool is then torn down (its
process group killed and every child reaped) and `pool_for` starts a fresh one next time. A job that
raised leaves the pool serving when every other worker answered within DRAIN_SECONDS and the torch
ranks then meet in a barrier: a user's job that raises costs its check, not a restart of the pool.

Rendezvous: the parent opens a `torch.distributed.TCPStore` on 127.0.0.1 port 0 (the OS picks a free
port) and passes the port to the ranks; gloo's own connections bind port 0 too, so pools started at
once (pytest -n 2) never collide.
"""
from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing.connection import Connection, wait
from typing import Any

from equivcheck.backends.deadline import load_stretch

START_SECONDS = 120.0  # importing torch in 4 processes on 2 loaded cores takes tens of seconds
REQUEST_SECONDS = 30.0
DRAIN_SECONDS = 3.0  # after a rank raised, how long its peers get to answer before the pool is restarted
_TAIL = 2000  # characters of a dead worker's stderr in the message


class WorkerFailure(RuntimeError):
    """A worker crashed, raised or did not answer. `side` is "torch" or "jax", `rank` the torch
    rank (None for the JAX process), `cause` the text a check record carries."""

    def __init__(self, side: str, rank: int | None, cause: str, ranks: tuple[int, ...] = ()) -> None:
        self.side, self.rank, self.cause = side, rank, cause
        self.intact = False  # the job raised and every other worker answered: the pool may serve on
        self.ranks = ranks or ((rank,) if rank is not None else ())  # several: none of them is singled out
        super().__init__(f"{self.who}: {cause}")

    @property
    def who(self) -> str:
        if self.side != "torch":
            return "the JAX worker process"
        if len(self.ranks) > 1:
            return f"torch ranks {', '.join(map(str, self.ranks[:-1]))} and {self.ranks[-1]}"
        return f"torch rank {self.rank}"


class _Worker:
    def __init__(self, side: str, rank: int | None, argv: list[str], env: dict[str, str], group: int | None) -> None:
        self.side, self.rank = side, rank
        parent, child = socket.socketpair()
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the worker; close() closes it
        kwargs = {"process_group": 0 if group is None else group}  # one group per pool: killpg ends it
        self.proc = subprocess.Popen([sys.executable, "-m", "equivcheck.distributed.worker", side,
                                      "--fd", str(child.fileno()), "--parent", str(os.getpid()), *argv],
                                     pass_fds=(child.fileno(),),
                                     stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log, env=env, **kwargs)
        child.close()
        self.conn = Connection(parent.detach())

    def failure(self, cause: str) -> WorkerFailure:
        return WorkerFailure(self.side, self.rank, cause)

    def died(self) -> WorkerFailure:
        try:
            code = self.proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            code = None
        self.log.seek(0)
        tail = self.log.read().decode(errors="replace")[-_TAIL:].strip()
        how = "closed its connection" if code is None else f"exited with status {code}" if code >= 0 else \
            f"was killed by signal {signal.Signals(-code).name}"
        return self.failure(f"{how}" + (f"; its stderr ends:\n{tail}" if tail else "; it wrote nothing to stderr"))

    def label(self) -> str:
        return f"rank {self.rank}" if self.side == "torch" else "the JAX worker"


class Pool:
    """N torch ranks (gloo on CPU, nccl on GPU) and one JAX process with N devices.

    `torch(job, per_rank, seconds)`: runs `job` on ranks 0..n-1 (n = len(per_rank) <= N, in a process
    group of those n ranks), rank r with keyword arguments `per_rank[r]`; returns the n results in rank
    order. `jax(job, kwargs, seconds, world=n)`: runs `job` in the JAX process on a mesh of its first
    n devices (default N). Both raise WorkerFailure when a worker fails, and close the pool unless the
    job only raised and the pool passed its health check (`_healthy`); after
    `close()` every request raises RuntimeError. `timings` holds the start-up seconds.
    """

    def __init__(self, world: int, device: str = "cpu", *, start_seconds: float = START_SECONDS) -> None:
        import torch.distributed as dist

        if world < 1:
            raise ValueError(f"a pool needs at least one rank, got {world}")
        self.world, self.device, self.closed = world, device, False
        self.lock = threading.Lock()
        started = time.perf_counter()
        self._store = dist.TCPStore("127.0.0.1", 0, None, is_master=True, wait_for_workers=False,
                                    timeout=datetime.timedelta(seconds=start_seconds))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
               "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "PYTHONUNBUFFERED": "1"}
        jax_env = dict(env)
        if device == "cpu":
            flags = [f for f in env.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
            jax_env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={world}"])
            jax_env["JAX_PLATFORMS"] = "cpu"
        backend = "gloo" if device == "cpu" else "nccl"
        common = ["--world", str(world), "--port", str(self._store.port), "--prefix", f"pool{os.getpid()}",
                  "--backend", backend]
        self.workers: list[_Worker] = []
        try:
            for rank in range(world):
                group = self.workers[0].proc.pid if self.workers else None
                self.workers.append(_Worker("torch", rank, [*common, "--rank", str(rank)], env, group))
            self.workers.append(_Worker("jax", None, ["--world", str(world)], jax_env, self.workers[0].proc.pid))
            self.info = self._gather(self.workers, "ready", start_seconds, "start")
        except BaseException:
            self.close()
            raise
        self.timings = {"start_seconds": time.perf_counter() - started}
        self.reported = False  # the runner puts the start-up time in one record

    @property
    def pids(self) -> list[int]:
        return [w.proc.pid for w in self.workers]

    def torch(self, job: str, per_rank: list[dict[str, Any]], seconds: float = REQUEST_SECONDS) -> list[Any]:
        n = len(per_rank)
        if not 1 <= n <= self.world:
            raise ValueError(f"{job}: {n} sets of arguments for a pool of {self.world} ranks")
        requests = [{"job": job, "kwargs": kw, "world": n} for kw in per_rank]
        return self._request(self.workers[:n], requests, seconds, job)

    def jax(self, job: str, kwargs: dict[str, Any], seconds: float = REQUEST_SECONDS, world: int | None = None) -> Any:
        n = self.world if world is None else world
        if not 1 <= n <= self.world:
            raise ValueError(f"{job}: {n} devices asked of a pool of {self.world}")
        return self._request([self.workers[-1]], [{"job": job, "kwargs": kwargs, "world": n}], seconds, job)[0]

    def _request(self, workers: list[_Worker], requests: list[dict[str, Any]], seconds: float, job: str) -> list[Any]:
        with self.lock:
            if self.closed:
                raise RuntimeError("this pool is closed (a worker failed, or the session ended)")
            try:
                for w, r in zip(workers, requests):
                    w.conn.send(r)
                return self._gather(workers, "ok", seconds, job)
            except WorkerFailure as exc:
                if not (exc.intact and self._healthy(workers)):
                    self.close()
                raise
            except BaseException:  # a deadline, SIGALRM's SideTimeout, Ctrl-C: no half-used pool
                self.close()
                raise

    def _healthy(self, workers: list[_Worker]) -> bool:
        """After a job raised with every worker answering: whether the pool can serve the next check
        without a restart (tens of seconds). The JAX process is alone, so its answering is enough; the
        torch ranks must all meet in a barrier within DRAIN_SECONDS, which a rank still inside a
        collective, or collectives left unmatched between ranks, prevents."""
        if all(w.side == "jax" for w in workers):
            return True
        ranks = [w for w in self.workers if w.side == "torch"]
        try:
            for w in ranks:
                w.conn.send({"job": "barrier", "kwargs": {}, "world": self.world})
            return self._gather(ranks, "ok", DRAIN_SECONDS, "barrier") == list(range(len(ranks)))
        except WorkerFailure:
            return False
        except BaseException:
            self.close()
            raise

    def _gather(self, workers: list[_Worker], tag: str, seconds: float, job: str) -> list[Any]:
        """One answer from each worker within `seconds`; the first failure raises at once (a rank
        that raised leaves its peers waiting in a collective: waiting for them says nothing)."""
        end = time.monotonic() + seconds
        stretch: str | None = None  # consulted once, when the deadline is first reached
        results: dict[int, Any] = {}
        by_conn = {id(w.conn): i for i, w in enumerate(workers)}
        while len(results) < len(workers):
            left = end - time.monotonic()
            pending = [w.conn for i, w in enumerate(workers) if i not in results]
            ready = wait(pending, timeout=max(left, 0.0)) if left > 0 else []
            if not ready and stretch is None:
                factor, stretch = load_stretch()  # an oversubscribed machine is slow, not hung
                if factor > 1.0:
                    end += seconds * (factor - 1.0)
                    continue
            if not ready:
                late = [workers[i] for i in range(len(workers)) if i not in results]
                words = f"{' and '.join(w.label() for w in late)} did not answer within {seconds:g} s ({job})"
                words += f" (the deadline {stretch})" if stretch else ""
                if len(late) == 1:
                    raise late[0].failure(words)
                # Several silent: one may hang while the others wait for it inside a collective, and which is
                # which cannot be told from here, so none is named the culprit (rank None) and all are listed.
                sides = {w.side for w in late}
                side = sides.pop() if len(sides) == 1 else "torch"
                ranks = tuple(w.rank for w in late if w.rank is not None)
                raise WorkerFailure(side, None, words + ("; a rank that waits for a hung peer in a collective looks "
                                                         "the same as the hung one" if len(ranks) > 1 else ""), ranks)
            for conn in ready:
                i = by_conn[id(conn)]
                try:
                    status, value = conn.recv()
                except (EOFError, OSError):
                    raise workers[i].died() from None
                if status == "error":
                    failure = workers[i].failure(f"raised in {job}:\n{value.rstrip()}")
                    failure.intact = self._drain([w for k, w in enumerate(workers) if k not in results and k != i])
                    raise failure
                if status != tag:
                    raise workers[i].failure(f"answered {status!r} where {tag!r} was due")
                results[i] = value
        return [results[i] for i in range(len(workers))]

    @staticmethod
    def _drain(workers: list[_Worker]) -> bool:
        """Read and drop one answer from each of `workers` (the peers of a rank that raised); whether
        all answered within DRAIN_SECONDS. A peer waiting in a collective for the raised rank never does."""
        end = time.monotonic() + DRAIN_SECONDS
        pending = [w.conn for w in workers]
        while pending:
            ready = wait(pending, timeout=max(end - time.monotonic(), 0.0))
            if not ready:
                return False
            for conn in ready:
                try:
                    conn.recv()
                except (EOFError, OSError):
                    return False
                pending.remove(conn)
        return True

    def close(self) -> None:
        """Kill the pool's process group and reap every worker. Idempotent."""
        self.closed = True
        workers = getattr(self, "workers", [])
        if workers:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(workers[0].proc.pid, signal.SIGKILL)
        for w in workers:
            with contextlib.suppress(ProcessLookupError):
                w.proc.kill()  # a worker that left the group (it cannot, but a job might call setsid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                w.proc.wait(timeout=10.0)
            w.conn.close()
            w.log.close()
        self.workers = []
        store = getattr(self, "_store", None)
        self._store = None
        del store


_POOLS: dict[tuple[int, str], Pool] = {}
_POOLS_LOCK = threading.Lock()


def pool_for(world: int, device: str = "cpu") -> Pool:
    """A session's pool of at least `world` ranks on `device` (the smallest open one: a pool of 4 serves
    2-rank checks through its subgroup of ranks 0-1, saving a second start-up), started on first use,
    restarted after a failure closed it. Raises WorkerFailure when a pool cannot start."""
    with _POOLS_LOCK:
        fits = sorted((p for (n, d), p in _POOLS.items() if d == device and n >= world and not p.closed),
                      key=lambda p: p.world)
        if fits:
            return fits[0]
        pool = _POOLS[(world, device)] = Pool(world, device)
        return pool


def close_all() -> None:
    """Close every cached pool (the plugin's session end; also atexit)."""
    with _POOLS_LOCK:
        pools = list(_POOLS.values())
        _POOLS.clear()
    for pool in pools:
        pool.close()


atexit.register(close_all)
