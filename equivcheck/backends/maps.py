"""Memory maps held by compiled programs, released before a long run runs out of them.

XLA's CPU backend maps every compiled executable into memory (about three maps each: 300 small
jitted functions took 968 maps, jax 0.10 on this machine), and the jit caches keep every
executable of every pair alive for the life of the process. Linux caps a process at
vm.max_map_count maps (65530 by default); past it mmap fails, LLVM says "Cannot allocate memory"
and the process dies with a segmentation fault. A serial run of the built-in suites died that
way after 883 s and 601 tests, and the mutation benchmark twice after 68 of its 84 pairs (~75 new
maps a second). `relieve()`, called before each check, drops every compiled program once the
process holds HIGH_WATER of the cap: programs still in use compile again, from the persistent
compilation cache where there is one. Elsewhere than Linux it does nothing.
"""
from __future__ import annotations

import gc
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["HIGH_WATER", "held", "on_release", "release", "relieve"]

HIGH_WATER = 0.5  # of vm.max_map_count: at ~75 maps a second, minutes of margin
CHECK_EVERY = 5.0  # seconds between two counts: a count reads /proc/self/maps, ~10 ms at 30,000 maps
DRAIN_SECONDS = 120.0  # how long the compile thread gets to finish what is queued before a release

_RELEASES: list[Callable[[], None]] = []
_last = [float("-inf")]
released = [0]  # how many releases this process made


def held() -> tuple[int, int] | None:
    """(maps the process holds, the system's cap), or None where /proc does not say."""
    try:
        cap = int(Path("/proc/sys/vm/max_map_count").read_text())
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f), cap
    except (OSError, ValueError):
        return None


def on_release(fn: Callable[[], None]) -> None:
    """Register `fn` (a cache's clear) to run on release: caches of compiled programs that
    jax.clear_caches() does not reach (AOT-compiled objects held in a dict)."""
    _RELEASES.append(fn)


def release() -> bool:
    """Drop every compiled program: equivcheck's own caches, then JAX's. Waits for the compile
    thread to finish what is queued; returns False, releasing nothing, when it does not within
    DRAIN_SECONDS (a compile must not lose its cache entries while it runs)."""
    import jax

    from equivcheck.backends.jax import drain, forget

    if not drain(DRAIN_SECONDS):
        return False
    forget()
    for fn in _RELEASES:
        fn()
    jax.clear_caches()
    gc.collect()
    released[0] += 1
    return True


def relieve() -> bool:
    """Release when the process holds HIGH_WATER of the cap (counted at most every CHECK_EVERY
    seconds); returns whether it released."""
    now = time.monotonic()
    if now - _last[0] < CHECK_EVERY:
        return False
    _last[0] = now
    counts = held()
    if counts is None or counts[0] < HIGH_WATER * counts[1]:
        return False
    return release()
