"""The per-call time limit of a side (`--equiv-timeout`): a side that does not return fails its
check naming that side, with its stack at the moment, and the run goes on.

`limit(seconds)` sets the limit for the calling thread (the fixture and `Search` do);
`side("torch")` marks one side's call and arms the limit around it; `wait(fut, "jax", thread)`
waits within the limit for work running on another thread (JAX's background compile thread).

How a stuck call is interrupted, from one watchdog thread:
- on the main thread, `signal.pthread_kill` delivers SIGALRM to it; the handler raises
  `SideTimeout`. A signal interrupts `time.sleep`, lock and queue waits and most blocking system
  calls, which an exception raised from another thread does not;
- elsewhere (or while another SIGALRM handler is installed, e.g. pytest-timeout's),
  `PyThreadState_SetAsyncExc` raises it at the thread's next bytecode: Python loops stop, a
  blocking C call does not.
A machine running more threads than it has cores stretches every call's wall time: when the
limit is reached while the load average per core exceeds 1, the limit is extended once by that
factor (at most `MAX_STRETCH`), so an oversubscribed CI runner or a parallel sweep does not read
as a hung side; the message states the extension.
A call still stuck `grace(seconds)` later runs in C code that ignores both (a kernel that never
returns): the limit's `on_stuck` callback gets the `SideTimeout` (the plugin writes the report and
ends the run), else one line goes to stderr. A C call that holds the GIL starves the watchdog as
well: nothing in the process can act then.
"""
from __future__ import annotations

import ctypes
import dataclasses
import functools
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager, suppress
from types import FrameType, TracebackType
from typing import Any, Self

OnStuck = Callable[["SideTimeout"], None]


class SideTimeout(BaseException):
    """A side's call did not return within the limit (seconds).

    A BaseException so that it passes the sides' `except Exception` (which turn a user's error
    into a finding) and Hypothesis (which would replay and shrink it, each try costing the
    whole limit) on its way to the fixture, which fails the check with `describe()`.
    Constructible without arguments: an exception raised into a thread is built that way."""

    def __init__(self, side: str = "", seconds: float = 0.0, stack: str = "", stuck: bool = False,
                 stretch: str = "", factor: float = 1.0) -> None:
        super().__init__(side, seconds)
        self.side, self.seconds, self.stack, self.stuck, self.stretch = side, seconds, stack, stuck, stretch
        self.factor = factor  # the load extension: the call ran seconds * factor of wall time

    def describe(self) -> str:
        who = f"the {self.side} side" if self.side in ("torch", "jax") else f"the {self.side}" if self.side else "a side"
        limit = f"{self.seconds:g} s" if self.seconds else "the time limit"
        if self.stretch and self.seconds:  # the figure the call really had, then where it comes from
            text = f"{who} did not return within {self.seconds * self.factor:.4g} s (--equiv-timeout {limit}"
            text += f", {self.stretch})"
        else:
            text = f"{who} did not return within {limit} (--equiv-timeout)"
        if self.stuck:
            text += (f", nor {grace(self.seconds):g} s later: it runs C code that ignores signals, "
                     "so the run ends here")
        return text + (f"; its stack at that moment (innermost last):\n{self.stack}" if self.stack else "")

    def __str__(self) -> str:
        return self.describe()


MAX_STRETCH = 8.0  # a hang on a loaded machine still ends within 8x the limit


def load_stretch() -> tuple[float, str]:
    """(factor >= 1, why) by which a wall-clock limit is extended on this machine now: the 1-minute
    load average per usable core when above 1 (a runnable thread then waits its turn that much
    longer), capped at MAX_STRETCH; (1.0, "") where the load average is unavailable."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return 1.0, ""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    factor = round(min(MAX_STRETCH, load / max(cores, 1)), 1)  # as the message states it
    if factor <= 1.0:
        return 1.0, ""
    why = (f"extended {factor:.1f}x because the machine was oversubscribed (load average {load:.1f} "
           f"on {cores} core{'s' if cores != 1 else ''})")
    return factor, why


def grace(seconds: float) -> float:
    """Seconds past the limit before a call that ignored the interrupt counts as stuck in C."""
    return max(5.0, seconds)


@dataclasses.dataclass
class _Limit:
    seconds: float
    on_stuck: OnStuck | None


@dataclasses.dataclass(eq=False)
class _Guard:
    side: str
    seconds: float
    ident: int
    entry: FrameType | None  # the caller of `side`: the stack shown stops there
    on_stuck: OnStuck | None
    due: float
    by_signal: bool
    stretch: str | None = None  # None: the load has not been consulted yet; "": no extension
    factor: float = 1.0
    fired: bool = False  # the watchdog interrupted the call
    delivered: bool = False  # the thread got SideTimeout
    closing: bool = False  # the call is over (its guard is exiting)
    stack: str = ""

    def exception(self, stuck: bool = False) -> SideTimeout:
        return SideTimeout(self.side, self.seconds, self.stack, stuck, self.stretch or "", self.factor)


_local = threading.local()


def _current() -> _Limit | None:
    return getattr(_local, "limit", None)


@contextmanager
def limit(seconds: float | None, on_stuck: OnStuck | None = None) -> Iterator[None]:
    """Limit each side's call on this thread to `seconds` (None or 0: no limit) while the block
    runs. Nested limits keep the outer one."""
    mine = _current() is None and bool(seconds)
    if mine:
        _local.limit = _Limit(float(seconds or 0), on_stuck)
    try:
        yield
    finally:
        if mine:
            _local.limit = None


class side:  # lower case: used as a context manager and a decorator, like contextlib's
    """`with side("torch"):` arms the thread's limit around one side's call; a no-op without a
    limit or inside another armed call. Raises SideTimeout past the limit. Also a decorator."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._guard: _Guard | None = None

    def __call__(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            with side(self.name):
                return fn(*args, **kwargs)

        return guarded

    def __enter__(self) -> Self:
        lim = _current()
        if lim is None or _inside_guard():
            return self
        ident = threading.get_ident()
        g = _Guard(self.name, lim.seconds, ident, sys._getframe(1), lim.on_stuck, time.monotonic() + lim.seconds,
                   by_signal=_signal_ready())
        self._guard = _local.guard = g
        _WATCHDOG.arm(g)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> bool:
        g, self._guard = self._guard, None
        if g is None:
            return False
        # The call is over: from here a late signal is ignored and the watchdog lets the guard be.
        g.closing = True
        _local.guard = None
        if kind is not None and issubclass(kind, SideTimeout):
            g.delivered = True
        for _ in range(2):  # an exception raised into the thread may land in the first try
            try:
                _WATCHDOG.disarm(g)
                break
            except SideTimeout:  # the call had returned: its result stands
                continue
        if g.delivered and isinstance(exc, SideTimeout) and not exc.side:
            raise g.exception() from None  # raised into the thread as a bare class: give it the facts
        return False


def wait(fut: futures.Future[Any], name: str, thread: threading.Thread | None) -> Any:
    """`fut.result()`, within this thread's limit when one is set (seconds). Past it, SideTimeout
    naming side `name` with the stack of `thread`, the one running `fut`; the caller abandons
    that thread. Any exception `fut` holds is raised."""
    lim = _current()
    if lim is None or _inside_guard():
        return fut.result()
    done, _ = futures.wait([fut], timeout=lim.seconds)
    factor, stretch = 1.0, ""
    if not done:
        factor, stretch = load_stretch()
        if factor > 1.0:
            done, _ = futures.wait([fut], timeout=lim.seconds * (factor - 1.0))
    if not done:
        frame = sys._current_frames().get(thread.ident) if thread is not None and thread.ident else None
        raise SideTimeout(name, lim.seconds, stack_text(frame, None) if frame is not None else "", stretch=stretch,
                          factor=factor)
    return fut.result()


def _on_stack(frame: FrameType | None, target: FrameType | None) -> bool:
    while frame is not None:
        if frame is target:
            return True
        frame = frame.f_back
    return False


def _inside_guard() -> bool:
    """Whether this thread runs inside an armed call (whose own limit covers what it calls).
    Goes by the guard's frame being on the stack: a guard whose exit an exception cut short
    must not disarm every later call."""
    g = getattr(_local, "guard", None)
    return g is not None and not g.closing and _on_stack(sys._getframe(1), g.entry)


def stack_text(frame: FrameType | None, stop: FrameType | None) -> str:
    """The frames from the outermost (`stop`, else the thread's first) to `frame`, as traceback
    prints them; runs of frames inside installed packages collapse into one line."""
    frames: list[FrameType] = []
    while frame is not None:
        frames.append(frame)
        if frame is stop:
            break
        frame = frame.f_back
    lines: list[str] = []
    hidden: list[str] = []
    for f in reversed(frames):
        path = f.f_code.co_filename
        if path == __file__:  # the guard's own wrapper says nothing about the side
            continue
        if "site-packages" in path or path.startswith((sys.base_prefix, "<frozen ")):
            hidden.append(path)
            continue
        if hidden:
            lines.append(f"  [{len(hidden)} frames in {_packages(hidden)}]\n")
            hidden = []
        lines += traceback.format_list(traceback.StackSummary.extract([(f, f.f_lineno)], capture_locals=False))
    if hidden:
        lines.append(f"  [{len(hidden)} frames in {_packages(hidden)}]\n")
    return "".join(lines).rstrip("\n")


def _packages(paths: list[str]) -> str:
    names = []
    for p in paths:
        parts = p.split("site-packages/", 1)
        name = parts[1].split("/", 1)[0] if len(parts) == 2 else "the standard library"
        name = name.removesuffix(".py")
        if name not in names:
            names.append(name)
    return ", ".join(names)


# -- interrupting ---------------------------------------------------------------------------

def _on_alarm(signum: int, frame: FrameType | None) -> None:
    g = _WATCHDOG.armed
    if (g is None or not g.fired or not g.by_signal or g.delivered or g.closing
            or g.ident != threading.get_ident()):
        return  # late or foreign: nothing of ours is running over its limit
    if frame is not None and frame.f_code.co_filename == __file__:
        return  # in the guard's own entry or exit, outside the side's call: its result stands
    g.delivered = True
    g.stack = stack_text(frame, g.entry)
    raise g.exception()


def _signal_ready() -> bool:
    """Whether SIGALRM can interrupt this thread: the main thread, and the handler ours (installed
    here when SIGALRM has none). Installed once and left: a signal sent just before a call
    returned may arrive after it, and must find this handler, which ignores it, not SIGALRM's
    default action, which ends the process."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_kill"):
        return False
    current = signal.getsignal(signal.SIGALRM)
    if current is _on_alarm:
        return True
    if current in (signal.SIG_DFL, None):
        signal.signal(signal.SIGALRM, _on_alarm)
        return True
    return False  # someone else's (pytest-timeout's signal method): raise into the thread instead


class _Watchdog:
    """One daemon thread, waking at the due time of the armed call (calls nest no deeper than
    one per thread, and the checking thread is the only one armed in practice)."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self.armed: _Guard | None = None
        self._until: float | None = None  # when the thread wakes next; None: when notified
        self._thread: threading.Thread | None = None

    def arm(self, g: _Guard) -> None:
        with self._cond:
            self.armed = g
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="equivcheck-watchdog", daemon=True)
                self._thread.start()
            # Arming and disarming run per side call: wake the thread only when it would oversleep.
            if self._until is None or g.due < self._until:
                self._cond.notify()

    def disarm(self, g: _Guard) -> None:
        """Called by the guarded thread with `g.closing` set. Takes no lock: an exception raised
        into this thread inside a lock's block can land after the acquire and before the block,
        and leave the lock held for ever (the watchdog then hangs, and every later call)."""
        if self.armed is g:
            self.armed = None
        if not g.by_signal and g.fired:
            # raised into the thread but not yet seen: withdraw it before the thread moves on
            _SET_ASYNC_EXC(ctypes.c_ulong(g.ident), None)

    def _loop(self) -> None:
        while True:
            with self._cond:
                g = self.armed
                if g is not None and (g.closing or not _on_stack(sys._current_frames().get(g.ident), g.entry)):
                    g = None  # the call is over (its guard exiting, or cut short by an exception)
                now = time.monotonic()
                due = None if g is None else g.due + (grace(g.seconds) if g.fired else 0.0)
                if due is None or now < due:
                    self._until = due
                    self._cond.wait(None if due is None else due - now)
                    self._until = None
                    continue
                if not g.fired and g.stretch is None:
                    g.factor, g.stretch = load_stretch()
                    if g.factor > 1.0:
                        g.due += g.seconds * (g.factor - 1.0)
                        continue
                if not g.fired:
                    frame = sys._current_frames().get(g.ident)
                    if not g.by_signal and frame is not None and frame.f_code.co_filename == __file__:
                        g.due += 0.001  # in the guard's own code: raising there would cut its exit short
                        continue
                    g.fired = True
                    self._interrupt(g)
                    continue
                self.armed = None  # stuck past the grace: hand it over, outside the lock
            frame = sys._current_frames().get(g.ident)
            g.stack = stack_text(frame, g.entry) if frame is not None else g.stack
            _stuck(g)

    @staticmethod
    def _interrupt(g: _Guard) -> None:
        frame = sys._current_frames().get(g.ident)
        g.stack = stack_text(frame, g.entry) if frame is not None else ""
        if g.by_signal:
            signal.pthread_kill(g.ident, signal.SIGALRM)  # the handler ignores it once the call is over
            return
        ident, exc = ctypes.c_ulong(g.ident), ctypes.py_object(SideTimeout)
        # No call between the test and the raise, so no switch to the guarded thread there:
        # once it has set `closing`, nothing is raised into it (what was, its exit withdraws).
        if not g.closing:
            _SET_ASYNC_EXC(ident, exc)


def _stuck(g: _Guard) -> None:
    exc = g.exception(stuck=True)
    try:
        if g.on_stuck is not None:
            g.on_stuck(exc)
            return
    except Exception as err:  # the callback's own failure must not hide the stuck side
        print(f"equivcheck: the stuck-side callback raised {type(err).__name__}: {err}", file=sys.__stderr__)
    print(f"equivcheck: {exc.describe()}", file=sys.__stderr__, flush=True)


_SET_ASYNC_EXC = ctypes.pythonapi.PyThreadState_SetAsyncExc
_WATCHDOG = _Watchdog()


def end_process(code: int) -> None:
    """Leave at once with `code`, skipping the interpreter's shutdown, which would wait on the
    stuck thread (its module teardown and non-daemon threads)."""
    for stream in (sys.__stdout__, sys.__stderr__):
        with suppress(OSError, ValueError, AttributeError):  # closed or absent: nothing to lose
            stream.flush()
    os._exit(code)


__all__ = ["MAX_STRETCH", "SideTimeout", "end_process", "grace", "limit", "load_stretch", "side", "stack_text", "wait"]
