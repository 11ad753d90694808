"""The JAX side: one jitted program per pair computes every check, compiled once per shape.

Forward, VJP, JVP and HVP (forward over reverse) share one XLA program, so a new input
shape costs one compilation instead of four. Compilations are counted through
jax.monitoring so benchmarks can report the share of time spent compiling.
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from typing import Any

# JAX grabs 75% of GPU memory on first use unless told otherwise, which starves torch when
# both share a process. Must be set before jax is imported anywhere.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from equivcheck.backends import deadline  # noqa: E402
from equivcheck.backends.results import CotangentMismatch, SideResult, Vectors  # noqa: E402
from equivcheck.backends.worker import DaemonWorker
from equivcheck.backends.worker import session_ended as _workers_session_ended

NAME = "jax"


_BACKGROUND = "equivcheck-precompile"


class _CompileStats:
    """Counts XLA compilations and the seconds spent tracing, lowering and compiling,
    apart for the background precompile thread (overlapped with checking) and the rest
    (on the critical path)."""

    EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
              "/jax/core/compile/backend_compile_duration")

    def __init__(self) -> None:
        self.count = 0
        self.seconds = 0.0
        self.background = 0.0
        self.waiting = 0.0
        self._lock = threading.Lock()
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **_: Any) -> None:
        if event in self.EVENTS:
            behind = threading.current_thread().name.startswith(_BACKGROUND)
            with self._lock:
                self.seconds += duration
                self.background += duration if behind else 0.0
                self.count += event == self.EVENTS[-1]

    def waited(self, seconds: float) -> None:
        """The checking thread blocked this long on a background compilation."""
        with self._lock:
            self.waiting += seconds

    def snapshot(self) -> tuple[int, float]:
        """(compilations, seconds the checking thread spent compiling or waiting for one)."""
        with self._lock:
            return self.count, self.seconds - self.background + self.waiting

    def overlapped(self) -> float:
        with self._lock:
            return self.background


COMPILES = _CompileStats()


def version() -> str:
    import jaxlib

    return f"{jax.__version__} (jaxlib {jaxlib.__version__})"


def available(device: str) -> bool:
    return bool(_devices(device))


def _devices(device: str) -> list[Any]:
    try:
        return jax.devices("cpu" if device == "cpu" else "gpu")
    except RuntimeError:
        return []


def device_of(device: str) -> Any:
    devs = _devices(device)
    if not devs:
        raise RuntimeError(f"JAX sees no {device} device (backends: {jax.default_backend()})")
    return devs[0]


def device_name(device: str) -> str:
    return getattr(device_of(device), "device_kind", device)


def set_precision(mode: str) -> dict[str, Any]:
    jax.config.update("jax_default_matmul_precision", "highest" if mode == "highest" else None)
    return {"jax_default_matmul_precision": jax.config.jax_default_matmul_precision}


def enable_persistent_cache(path: str) -> None:
    """Compiled programs survive the process: a nightly rerun skips most compilation."""
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    jax.config.update("jax_compilation_cache_max_size", 2**30)  # LRU-evicted beyond 1 GiB


def x64(enabled: bool) -> contextlib.AbstractContextManager[Any]:
    return jax.enable_x64(True) if enabled else contextlib.nullcontext()


def sync(device: str) -> None:
    (jax.device_put(0.0, device_of(device)) + 0).block_until_ready()


def memory(device: str) -> dict[str, int]:
    stats = (device_of(device).memory_stats() or {}) if device == "gpu" else {}
    return {k: int(v) for k, v in stats.items() if k in ("peak_bytes_in_use", "bytes_in_use")}


def to_numpy(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: to_numpy(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [to_numpy(v) for v in tree]
    if tree is None:
        return None
    if isinstance(tree, (jax.Array, np.ndarray, np.generic, int, float, bool)):
        return np.asarray(tree)
    # Any other pytree node (a Flax struct, an optax state): its leaves, in JAX's order.
    return [to_numpy(x) for x in jax.tree_util.tree_leaves(tree)]


def _is_float(x: Any) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def _float_leaves(tree: Any) -> list[Any]:
    return [x for x in jax.tree_util.tree_leaves(tree) if _is_float(x)]


class Programs:
    """Jitted check programs, one per (pair callable, statics, checks)."""

    def __init__(self) -> None:
        self._cache: dict[Any, Callable[..., Any]] = {}

    def get(self, fn: Callable[..., Any], args: Sequence[Any], diff: Sequence[int], checks: Sequence[str]) -> Callable[..., Any]:
        static = tuple((i, _hashable(a)) for i, a in enumerate(args) if not isinstance(a, np.ndarray))
        key = (fn, static, tuple(diff), tuple(checks))
        if key not in self._cache:
            self._cache[key] = jax.jit(_program(fn, len(args), dict(static_values(args)), tuple(diff), tuple(checks)))
        return self._cache[key]


def static_values(args: Sequence[Any]) -> list[tuple[int, Any]]:
    return [(i, a) for i, a in enumerate(args) if not isinstance(a, np.ndarray)]


def _hashable(x: Any) -> Any:
    try:
        hash(x)
        return x
    except TypeError:
        return repr(x)


def _program(fn: Callable[..., Any], n: int, static: dict[int, Any], diff: tuple[int, ...],
             checks: tuple[str, ...]) -> Callable[..., Any]:
    def full(dyn: Sequence[Any], replace: Mapping[int, Any] | None = None) -> list[Any]:
        args = _merge(dyn, static, n)
        for i, x in (replace or {}).items():
            args[i] = x
        return args

    def program(dyn: list[Any], cts: list[Any], ts: list[Any], vs: list[Any]) -> dict[str, Any]:
        args = full(dyn)
        primals = [args[i] for i in diff]

        def f(*d: Any) -> list[Any]:
            return _float_leaves(fn(*full(dyn, dict(zip(diff, d)))))

        def pullback(*d: Any) -> list[Any]:
            outs, back = jax.vjp(f, *d)
            # Cotangents were shaped from torch's outputs: say so when jax's differ.
            if [o.shape for o in outs] != [c.shape for c in cts]:
                raise CotangentMismatch([c.shape for c in cts], [o.shape for o in outs])
            return list(back([c.astype(o.dtype) for c, o in zip(cts, outs)]))

        out: dict[str, Any] = {}
        if "forward" in checks:
            out["forward"] = fn(*args)
        if "vjp" in checks:
            out["vjp"] = pullback(*primals)
        if "jvp" in checks:
            out["jvp"] = jax.jvp(f, tuple(primals), tuple(ts))[1]
        if "hvp" in checks:
            out["hvp"] = jax.jvp(pullback, tuple(primals), tuple(vs))[1]
        return out

    return program


PROGRAMS = Programs()


def check_program(fn: Callable[..., Any], args: Sequence[Any], diff: Sequence[int],
                  checks: Sequence[str]) -> Callable[..., Any]:
    """The jitted program the checks of `checks` run, built afresh (not from PROGRAMS' cache), so
    that a benchmark compiles it itself and times the compilation; called as
    `program(arrays, cotangents, tangents, directions)`, it returns {check: value}."""
    return jax.jit(_program(fn, len(args), dict(static_values(args)), tuple(diff), tuple(checks)))


def output_leaves(fn: Callable[..., Any], args: Sequence[Any], device: str, wide: bool) -> list[np.ndarray]:
    """Zero arrays shaped like the float outputs, without running anything (for cotangents)."""
    with deadline.side(NAME), x64(wide):  # abstract evaluation traces the user's function
        dyn = [a for a in args if isinstance(a, np.ndarray)]
        static = dict(static_values(args))
        shaped = jax.eval_shape(lambda d: _float_leaves(fn(*_merge(d, static, len(args)))), dyn)
    return [np.zeros(s.shape, s.dtype) for s in shaped]


def _merge(dyn: Sequence[Any], static: Mapping[int, Any], n: int) -> list[Any]:
    it = iter(dyn)
    return [static[i] if i in static else next(it) for i in range(n)]


_POOL: list[DaemonWorker] = []
# Precompiles queued or running, by what the compiled program is keyed on. The checking
# thread waits for a running one instead of compiling the same program a second time.
_INFLIGHT: dict[Any, Future[None]] = {}
_INFLIGHT_LOCK = threading.Lock()


def background(fn: Callable[..., Any], *args: Any) -> Future[Any]:
    """Run `fn(*args)` on the one compile thread, shared by every kind of check.

    `fn` must be a function of an already imported module, and must import nothing of
    equivcheck's on that thread: under pytest the plugin's modules are imported through the
    assertion rewriter (ast.parse), and CPython 3.11's AST constructor is not thread-safe
    (gh-106905): a first import on the compile thread while Hypothesis parses a lambda's source
    on the checking thread raised "AST constructor recursion depth mismatch" (the optimizer
    suite, 1 run in 8). Calling this function imports this module on the calling thread.
    """
    if not _POOL:
        _POOL.append(DaemonWorker(_BACKGROUND))
    return _POOL[0].submit(fn, *args)


def drain(seconds: float) -> bool:
    """Wait for the compile thread to finish what is queued on it; False past `seconds`."""
    if not _POOL or not _POOL[0].thread.is_alive():
        return True
    try:
        _POOL[0].submit(int).result(timeout=seconds)
    except Exception:  # noqa: BLE001 - timed out, or cancelled at a session's end: not drained
        return False
    return True


def forget() -> None:
    """Drop the jitted check programs and the record of programs that failed to build
    (equivcheck.backends.maps.release)."""
    PROGRAMS._cache.clear()
    _BROKEN.clear()


def wait(fut: Future[Any]) -> Any:
    """`fut.result()` of a `background` call, within the side's time limit (--equiv-timeout).

    Past it: SideTimeout naming the jax side, with the compile thread's stack; that thread is
    abandoned (what is queued on it is cancelled) and later calls get a fresh one."""
    worker = getattr(fut, "worker", None)
    try:
        return deadline.wait(fut, NAME, worker.thread if worker is not None else None)
    except deadline.SideTimeout:
        if worker is not None:
            _abandon(worker)
        raise


def _abandon(worker: DaemonWorker) -> None:
    worker.abandon()
    if _POOL and _POOL[0] is worker:
        _POOL.clear()
    with _INFLIGHT_LOCK:
        for key in [k for k, f in _INFLIGHT.items() if getattr(f, "worker", None) is worker]:
            del _INFLIGHT[key]


def session_ended(status: int) -> None:
    """A pytest session ended with `status` (the plugin calls this): equivcheck.backends.worker's
    `session_ended` drops the queued calls and keeps `status` for the process's exit. A
    call still running is abandoned with its thread, so that a later session in this process
    (pytester's) gets a fresh one rather than queueing behind a compile that may never return."""
    if _POOL and _POOL[0].busy():
        _abandon(_POOL[0])
    _workers_session_ended(status)
    with _INFLIGHT_LOCK:  # a cancelled entry would keep a later session from compiling its key ahead
        for key in [k for k, f in _INFLIGHT.items() if f.cancelled()]:
            del _INFLIGHT[key]


def _key(fn: Callable[..., Any], args: Sequence[Any], diff: Sequence[int], checks: Sequence[str], wide: bool) -> Any:
    arrays = tuple((np.shape(a), np.asarray(a).dtype.str) for a in args if isinstance(a, np.ndarray))
    static = tuple((i, _hashable(a)) for i, a in enumerate(args) if not isinstance(a, np.ndarray))
    return (fn, arrays, static, tuple(diff), tuple(checks), wide)


def _await_precompile(key: Any) -> None:
    with _INFLIGHT_LOCK:
        fut = _INFLIGHT.pop(key, None)
    if fut is not None and not fut.cancel():  # queued: cancelled, we compile; running: wait
        start = time.perf_counter()
        wait(fut)  # _warm keeps its errors: the real call below reports them
        COMPILES.waited(time.perf_counter() - start)


def precompile(fn: Callable[..., Any], arg_sets: Sequence[Sequence[Any]], diff: Sequence[int],
               checks: Sequence[str], device: str, wide: bool) -> None:
    """Compile the check program for each argument set on a background thread.

    XLA releases the GIL while compiling, so on a second core the compilations of a pair's
    shape palette overlap with the checking of its first examples; the real calls then hit
    the jit cache. Failures are ignored here: the real call reports them.
    """
    for args in arg_sets:
        key = _key(fn, args, diff, checks, wide)
        with _INFLIGHT_LOCK:
            if key not in _INFLIGHT:
                _INFLIGHT[key] = background(_warm, key, fn, list(args), tuple(diff), tuple(checks), device, wide)


def _warm(key: Any, fn: Callable[..., Any], args: list[Any], diff: tuple[int, ...], checks: tuple[str, ...],
          device: str, wide: bool) -> None:
    try:
        with x64(wide):  # jax config contexts are per thread
            leaves = output_leaves(fn, args, device, wide)
            primals = [args[i] for i in diff]
            zeros = [np.zeros_like(p) for p in primals]
            run(fn, args, diff, checks, device, Vectors([np.zeros_like(x) for x in leaves], zeros, zeros), wide,
                split_errors=False, background=True)
    except Exception:
        pass
    finally:
        with _INFLIGHT_LOCK:
            _INFLIGHT.pop(key, None)


def run(fn: Callable[..., Any], args: Sequence[Any], diff: Sequence[int], checks: Sequence[str], device: str,
        vectors: Vectors, wide: bool, split_errors: bool = True, background: bool = False) -> SideResult:
    """All checks in one compiled call; on an error, each check alone, to say which one broke."""
    if not background and _INFLIGHT:
        _await_precompile(_key(fn, args, diff, checks, wide))
    res = SideResult(NAME)
    dev = device_of(device)
    with deadline.side(NAME), x64(wide):  # after the wait above, which has a limit of its own
        dyn, cts, ts, vs = _placed(dev, [a for a in args if isinstance(a, np.ndarray)], vectors)
        try:
            values = _call(fn, args, diff, checks, wide, dyn, cts, ts, vs)
            res.values = {k: to_numpy(v) for k, v in values.items()}
            return res
        except Exception as first:
            if len(checks) == 1 or not split_errors:
                res.fail(checks, first)
                return res
        for check in checks:
            try:
                res.values[check] = to_numpy(_call(fn, args, diff, (check,), wide, dyn, cts, ts, vs)[check])
            except Exception as exc:
                res.fail(check, exc)
    return res


def _placed(dev: Any, arrays: list[np.ndarray], vectors: Vectors) -> tuple[list[Any], ...]:
    """The program's inputs on `dev`: NumPy arrays as they are where `dev` is JAX's default device (the
    jitted call transfers them itself, 0.03 ms for five small arrays against 0.47 ms for five
    jax.device_put calls, measured on this CPU), else one batched device_put (0.29 ms)."""
    groups = (arrays, list(vectors.ct), list(vectors.t), list(vectors.v))
    if dev == _default_device():
        return groups
    return tuple(jax.device_put(groups, dev))


@functools.cache
def _default_device() -> Any:
    return jax.config.jax_default_device or jax.devices()[0]


# Programs that failed to trace or compile, by key: tracing depends on shapes, dtypes and
# statics only, so the same call fails the same way; a shrinking run makes it hundreds of times.
_BROKEN: dict[Any, Exception] = {}


def _call(fn: Callable[..., Any], args: Sequence[Any], diff: Sequence[int], checks: Sequence[str], wide: bool,
          *inputs: Any) -> dict[str, Any]:
    key = _key(fn, args, diff, checks, wide) + (tuple(np.shape(c) for c in inputs[1]),)
    if key in _BROKEN:
        raise _BROKEN[key]
    try:
        return PROGRAMS.get(fn, args, diff, checks)(*inputs)
    except Exception as exc:
        if not isinstance(exc, jax.errors.JaxRuntimeError):  # runtime errors may depend on values
            _BROKEN[key] = exc
        raise
