"""Peak memory of one side's call, beyond its inputs: what the operation itself allocates (its outputs
and temporaries), each measure named in the record since the two frameworks expose different ones.

GPU   torch: torch.cuda.max_memory_allocated after a reset, less the bytes allocated before the call.
      JAX: the compiled program's own account (XLA memory_analysis: outputs + temporaries - aliased), and
      device.memory_stats()['peak_bytes_in_use'] when the call raised it (that peak cannot be reset, so
      a call below an earlier peak shows nothing there).
CPU   torch: the profiler's allocation events (profile_memory=True), summed in time order at operator
      granularity; the highest running sum is the peak. JAX: XLA memory_analysis, as on GPU.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any


def torch_memory(call: Callable[[], Any], device: str) -> tuple[int | None, str]:
    """(peak bytes allocated by one `call` beyond what was live before it, how it was measured)."""
    import torch

    if device == "gpu":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        call()
        return int(torch.cuda.max_memory_allocated() - before), "torch.cuda.max_memory_allocated above the inputs"
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            call()
    except Exception as exc:  # noqa: BLE001 - a profiler that cannot run leaves the figure out, saying why
        return None, f"torch profiler unavailable: {type(exc).__name__}: {exc}"
    running = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        running += event.self_cpu_memory_usage
        peak = max(peak, running)
    return int(peak), "torch profiler CPU allocations (profile_memory), peak running sum per operator"


def jax_memory(call: Callable[[], Any], executable: Any, dev: Any, device: str) -> tuple[int | None, str]:
    """(peak bytes one call of `executable` allocates beyond its arguments, how it was measured)."""
    analysed = None
    try:
        m = executable.memory_analysis()
        analysed = int(m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)
    except Exception:  # noqa: BLE001, S110 - a backend without the analysis: the GPU counter may still answer
        pass
    if device == "gpu":
        stats = dev.memory_stats() or {}
        before_peak, in_use = stats.get("peak_bytes_in_use", 0), stats.get("bytes_in_use", 0)
        call()
        peak = (dev.memory_stats() or {}).get("peak_bytes_in_use", 0)
        if peak > before_peak:
            return int(peak - in_use), "jax device.memory_stats() peak_bytes_in_use above the inputs"
    if analysed is None:
        return None, "no measure: XLA gives no memory_analysis here"
    return analysed, "XLA compiled memory_analysis: outputs + temporaries - aliased"
