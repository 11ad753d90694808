"""One side's share of one check, ready to time: inputs already on the device, compiled where the
side compiles, and a call that returns only once its work is done.

Both sides get the same NumPy arrays (drawn once from the pair's own strategy at a fixed seed) and do
the same work: `forward` runs the operation, `vjp` runs it and pulls one cotangent back (forward+VJP),
the work the equivalence check of that name compared. Each rule is stated in `Workload.rules`, which
the benchmark record carries.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed

from equivcheck.backends import jax_side, torch_side
from equivcheck.bench.memory import jax_memory, torch_memory
from equivcheck.engine.search import seeded_generation
from equivcheck.ops.autodiff import make_vectors, wide

if TYPE_CHECKING:
    from equivcheck.ops.pairs import Pair

BENCH_CHECKS = ("forward", "vjp")  # the checks timed: the others (JVP, HVP) are rarely what people run
WORK = {"forward": "forward", "vjp": "forward+VJP"}
SIDES = ("torch", "jax", "torch.compile")
SEED = 20261130  # fixed: every run times the same arrays, so saved runs compare (--benchmark-compare)
DRAWS = 8  # examples drawn; the most varied is timed (Hypothesis starts from zeros and repeated values)


@dataclasses.dataclass
class Workload:
    """What a benchmark times: `call()` does the work once and returns after it is done.

    compile_seconds  tracing, lowering and compiling (JAX, torch.compile), timed apart; None for eager torch
    first_seconds    the first call after compiling, apart from the steady state pytest-benchmark times
    memory_bytes     peak bytes the call allocates beyond its inputs (outputs + temporaries); measure names how
    """

    side: str
    call: Callable[[], Any]
    compile_seconds: float | None
    first_seconds: float
    memory_bytes: int | None
    memory_measure: str
    rules: list[str]
    threads: int


def draw_inputs(pair: Pair, dtype: str, seed: int = SEED) -> tuple[Any, ...]:
    """One argument tuple from the pair's own strategy: the largest shape set of the palette its shape
    rule gives at `seed`, values drawn by Hypothesis at `seed` (the most varied of DRAWS draws)."""
    palette = pair.inputs.palette(seed, 4)
    shapes = max(palette, key=lambda ss: sum(math.prod(s) for s in ss))
    drawn: list[tuple[Any, ...]] = []

    @settings(max_examples=DRAWS, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @hypothesis_seed(seed)
    @given(pair.inputs.strategy(dtype, [shapes]))
    def collect(args: tuple[Any, ...]) -> None:
        drawn.append(args)

    with seeded_generation():
        collect()
    return max(drawn, key=_distinct)


def _distinct(args: tuple[Any, ...]) -> int:
    return sum(len(np.unique(a)) for a in args if isinstance(a, np.ndarray) and a.dtype.kind == "f")


def shapes_of(args: tuple[Any, ...]) -> list[Any]:
    """Array arguments as [shape, dtype]; statics as their value, for the record."""
    return [[list(a.shape), str(a.dtype)] if isinstance(a, np.ndarray) else repr(a) for a in args]


def cotangents(pair: Pair, args: tuple[Any, ...], dtype: str, device: str) -> tuple[list[np.ndarray], bool]:
    """The VJP's cotangents, shaped from torch's outputs as the checks shape them, and whether
    torch's function needs its default device set to the GPU (`placed`): it is timed outside
    that mode (a Python call per torch call) unless it fails there, as one making its own
    tensors on the CPU does."""
    tb = torch_side()
    dev = tb.device_of(device)
    targs = [tb.to_torch(a, dev) for a in args]
    placed = False
    with torch_grad(False):
        try:
            out = pair.torch_fn(*targs)
        except RuntimeError:
            if dev.type == "cpu":
                raise
            placed = True
            with tb.placed(dev):
                out = pair.torch_fn(*targs)
    leaves = [tb.to_numpy(x) for x in tb.float_leaves(out)]
    return make_vectors(SEED, leaves, [args[i] for i in pair.diff_args]).ct, placed


@contextlib.contextmanager
def torch_grad(enabled: bool) -> Iterator[None]:
    import torch

    with torch.set_grad_enabled(enabled):
        yield


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def torch_workload(pair: Pair, check: str, args: tuple[Any, ...], dtype: str, device: str,
                   compiled: bool = False) -> Workload:
    """Torch's share, eager (or through torch.compile with `compiled`): on GPU every call ends with
    torch.cuda.synchronize(), since kernels are queued and a call returns before they ran.

    Raises whatever torch raises (torch.compile's failure to compile, most often)."""
    import torch

    tb = torch_side()
    dev = tb.device_of(device)
    fn = torch.compile(pair.torch_fn, dynamic=False) if compiled else pair.torch_fn
    wants = check == "vjp"
    targs = [tb.to_torch(a, dev, requires_grad=wants and i in pair.diff_args) for i, a in enumerate(args)]
    primals = [targs[i] for i in pair.diff_args]
    cts, placed = cotangents(pair, args, dtype, device)
    cts = [tb.to_torch(c, dev) for c in cts] if wants else []
    context = functools.partial(tb.placed, dev) if placed else contextlib.nullcontext

    def call() -> Any:
        with context():
            out = fn(*targs)
            if wants:  # gradients only: outputs were never leaves, so nothing accumulates between calls
                out = tb.grad(tb.float_leaves(out), primals, cts, create_graph=False)
        tb.sync(device)
        return out

    first, _ = _timed(call)
    compile_seconds = None
    if compiled:  # the first call compiled: the steady state of a second call is what it cost beyond
        again, _ = _timed(call)
        compile_seconds = max(first - again, 0.0)
        first = again
    memory, measure = torch_memory(call, device)
    rules = [
        f"torch {'torch.compile (inductor, dynamic=False)' if compiled else 'eager'}: {WORK[check]}",
        "synchronised: torch.cuda.synchronize() after every call" if device == "gpu"
        else "synchronised: torch's CPU kernels return when done",
        "compile time apart: first call minus the second" if compiled else "no compile step (eager)",
    ] + ([("torch's default device set to the GPU while timed (torch.device mode, a Python call per torch "
           "call): its function makes tensors of its own and fails without it")] if placed else [])
    return Workload("torch.compile" if compiled else "torch", call, compile_seconds, first, memory, measure,
                    rules + shared_rules(), torch.get_num_threads())


def jax_workload(pair: Pair, check: str, args: tuple[Any, ...], dtype: str, device: str) -> Workload:
    """JAX's share: the jitted program the check itself runs, compiled ahead (persistent compilation
    cache off, so the compile time is a compilation's), every call ended by jax.block_until_ready on
    every output leaf, since JAX dispatches asynchronously on every device, the CPU included."""
    import jax

    jb = jax_side()
    dev = jb.device_of(device)
    program = jb.check_program(pair.jax_fn, args, pair.diff_args, (check,))
    cts = cotangents(pair, args, dtype, device)[0] if check == "vjp" else []
    with jb.x64(wide(pair, dtype)), no_persistent_cache():
        dyn = [jax.device_put(a, dev) for a in args if isinstance(a, np.ndarray)]
        cts_dev = [jax.device_put(c, dev) for c in cts]
        jax.block_until_ready((dyn, cts_dev))
        lower_s, lowered = _timed(lambda: program.lower(dyn, cts_dev, [], []))
        compile_s, executable = _timed(lowered.compile)

    def call() -> Any:
        return jax.block_until_ready(executable(dyn, cts_dev, [], []))

    first, _ = _timed(call)
    memory, measure = jax_memory(call, executable, dev, device)
    rules = [f"jax jit: {WORK[check]}, the program the check runs",
             "synchronised: jax.block_until_ready on every output leaf",
             "compile time apart: trace+lower+compile timed before the first call, persistent cache off"]
    return Workload("jax", call, lower_s + compile_s, first, memory, measure, rules + shared_rules(),
                    xla_threads())


def shared_rules() -> list[str]:
    return ["inputs on the device before timing; the same arrays on both sides",
            "same precision mode on both sides (--equiv-precision)"]


@contextlib.contextmanager
def no_persistent_cache() -> Iterator[None]:
    import jax

    before = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", before)


_SINGLE = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def xla_threads() -> int:
    if _SINGLE in os.environ.get("XLA_FLAGS", ""):
        return 1
    # XLA's CPU client sizes its thread pool to the cores this process may run on.
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def single_threaded_xla() -> bool:
    """XLA's CPU computations on one thread. XLA reads the flag when JAX creates its CPU client, so
    this must come before any JAX computation; False (nothing changed) when the client is already up."""
    import sys

    bridge = sys.modules.get("jax._src.xla_bridge")
    flags = os.environ.get("XLA_FLAGS", "")
    if _SINGLE in flags:
        return True
    if bridge is not None and getattr(bridge, "backends_are_initialized", lambda: True)():
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {_SINGLE}".strip()
    return True


@contextlib.contextmanager
def matched_threads(single: bool = False) -> Iterator[int]:
    """Torch's intra-op threads set to the cores XLA's CPU pool uses (one each with `single`), for as
    long as a benchmark runs: the suites pin torch to one thread (tiny tensors), which would race one
    core against all of them. On a loaded machine, torch's spinning threads on a busy core cost far
    more than the work (a 0.2 ms SGD step took 37 ms with 2 threads here, 2 cores, load 7): `single`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1 if single else xla_threads())
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def build(pair: Pair, check: str, side: str, args: tuple[Any, ...], dtype: str, device: str) -> Workload:
    """The workload of `side` ("torch", "jax" or "torch.compile") for `check` of `pair` on `args`."""
    if check not in BENCH_CHECKS:
        raise ValueError(f"check {check!r} is not benchmarked; choose from {BENCH_CHECKS}")
    if side == "jax":
        return jax_workload(pair, check, args, dtype, device)
    if side in ("torch", "torch.compile"):
        return torch_workload(pair, check, args, dtype, device, compiled=side == "torch.compile")
    raise ValueError(f"side {side!r}: choose from {SIDES}")
