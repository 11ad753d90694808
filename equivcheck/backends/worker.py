"""The JAX side's compile thread, and the process's exit while it is still busy.

`DaemonWorker` runs submitted calls in order on one daemon thread (equivcheck.backends.jax
submits the next test's compilations to it, so -x, --maxfail, Ctrl-C or a stuck side can end
the run in the middle of one). A daemon, so that a call stuck in user code cannot keep the
process alive; yet CPython cannot end a daemon thread that runs under jaxlib's C++: when XLA's
compiler (or a traced jax function, called from jit's C++ dispatch) returns during the
interpreter's shutdown, the thread's GIL reacquire ends it with a forced unwind that those
frames do not let through, and the process aborts ("terminate called after throwing an
instance of ''", SIGABRT, exit 134) instead of leaving with pytest's status.

So a session's end drops the calls still queued (`session_ended`, from the plugin), and at exit
the process waits a bounded time for the running one, else leaves at once with `os._exit` and
the last session's status.
"""
from __future__ import annotations

import atexit
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from equivcheck.backends import deadline

# Seconds the exit waits for a running call: an XLA compile of a large program takes tens.
EXIT_WAIT = 60.0
# Seconds a call may stay outside JAX (a jax_fn sleeping or looping while traced) before the
# exit stops waiting for it: only `os._exit` ends a call that does not return.
STUCK_OUTSIDE = 1.0


class Job(Future):  # type: ignore[type-arg]
    """A future that knows the worker running it, so a wait that times out can abandon it."""

    def __init__(self, worker: DaemonWorker) -> None:
        super().__init__()
        self.worker = worker


class DaemonWorker:
    """One daemon thread running submitted calls in order, with ThreadPoolExecutor's futures
    (a queued one can be cancelled). Not ThreadPoolExecutor itself: concurrent.futures joins
    its threads at interpreter exit, so a compile stuck in user code (a jax_fn that hangs while
    tracing) kept the process alive after Ctrl-C had ended the run; a daemon is abandoned."""

    def __init__(self, name: str) -> None:
        self._queue: queue.SimpleQueue[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]]] = queue.SimpleQueue()
        self.abandoned = False
        self.running: Future[Any] | None = None  # the call in progress, if any
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)
        with _LOCK:
            if not _WORKERS:  # after jax's own exit handlers: ours runs before jax tears its backends down
                atexit.register(_at_exit)
            _WORKERS.append(self)
        self.thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        fut = Job(self)
        self._queue.put((fut, fn, args))
        return fut

    def drop_queued(self) -> None:
        """Cancel what is queued; the call in progress goes on."""
        while True:
            try:
                self._queue.get_nowait()[0].cancel()
            except queue.Empty:
                return

    def abandon(self) -> None:
        """Stop taking work: what is queued is cancelled; the stuck call is left to itself."""
        self.abandoned = True
        self.drop_queued()

    def busy(self) -> bool:
        return self.running is not None and self.thread.is_alive()

    def _loop(self) -> None:
        while not self.abandoned:
            fut, fn, args = self._queue.get()
            self.running = fut  # before it starts: the exit must not miss a call just taken
            try:
                if not fut.set_running_or_notify_cancel():
                    continue
                try:
                    fut.set_result(fn(*args))
                except BaseException as exc:  # handed to whoever waits, as the executor does
                    fut.set_exception(exc)
            finally:
                self.running = None


_WORKERS: list[DaemonWorker] = []  # every one started, the abandoned too: their calls may still run
_LOCK = threading.Lock()
_STATUS: list[int] = []  # the exit status of the last pytest session that ended in this process


def session_ended(status: int) -> None:
    """A pytest session ended with `status`: the compilations queued for its tests are dropped
    (those tests will not run in it: -x, --maxfail, Ctrl-C), and `status` is what the process
    leaves with should a call still run at its exit."""
    with _LOCK:
        workers = list(_WORKERS)
    for w in workers:
        w.drop_queued()
    _STATUS[:] = [int(status)]


def _at_exit() -> None:
    with _LOCK:
        workers = list(_WORKERS)
    for w in workers:  # nothing will use them now
        w.drop_queued()
    if not _STATUS:
        return  # no pytest session ended here: no status to leave with, so the shutdown goes on as it would
    try:
        if _wait_idle(workers, EXIT_WAIT, STUCK_OUTSIDE):
            return
    except KeyboardInterrupt:  # a second Ctrl-C: leave now
        pass
    status = _STATUS[-1]
    print(f"equivcheck: the JAX compile thread is still busy (compiling, or in a jax function that does not "
          f"return); exiting with status {status} without waiting for it or the remaining exit handlers",
          file=sys.__stderr__, flush=True)
    deadline.end_process(status)


def _wait_idle(workers: list[DaemonWorker], seconds: float, outside: float) -> bool:
    """Whether every worker's call ended within `seconds`. False at once when one has run
    outside JAX for `outside` seconds on end: it is stuck in user code, and waiting for the
    others would not spare the `os._exit` anyway."""
    start = time.monotonic()
    since: dict[int, float] = {}
    while True:
        now = time.monotonic()
        running = [w for w in workers if w.busy()]
        if not running:
            return True
        for w in running:
            if _in_jax(w.thread):
                since.pop(id(w), None)
            elif now - since.setdefault(id(w), now) > outside:
                return False
        if now - start > seconds:
            return False
        time.sleep(0.01)


def _in_jax(thread: threading.Thread) -> bool:
    """Whether `thread` runs JAX's code (tracing, lowering, or XLA's compiler, with the GIL
    released) or equivcheck's, rather than a user's function."""
    frame = sys._current_frames().get(thread.ident) if thread.ident is not None else None
    if frame is None:
        return False
    dirs = tuple(os.path.dirname(m.__file__) + os.sep for m in map(sys.modules.get, ("jax", "jaxlib", "equivcheck"))
                 if m is not None and getattr(m, "__file__", None))
    return frame.f_code.co_filename.startswith(dirs)


__all__ = ["EXIT_WAIT", "DaemonWorker", "Job", "session_ended"]
