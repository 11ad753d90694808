"""Speed and memory of both sides of a check that passed, for pytest-benchmark (`pytest --equiv --equiv-bench`),
and the claims report over its JSON files (`python -m equivcheck claims BENCH.json ...`). No pytest here:
equivcheck.benchmarking makes the benchmark items.

workload  one side's share of a check, fair by construction: same arrays already on the device, same work,
          compiled apart, synchronised; draw_inputs, build
models    a ModelPair's forward, grad and train step on both sides, built as its checks build them
optim     one optimizer step of an OptimizerPair on both sides
sweep     the batch sweep (x4, x16) and the growth section of the claims
memory    peak bytes a call allocates beyond its inputs, per side and device, with the measure named
record    pytest-benchmark's group and extra_info of a side; the TF32 precision banner
claims    the claims report: ratios per group, evidence for and against each claim
"""
from equivcheck.bench.claims import CLAIMS, ClaimsError, claim_rows, load, ratios, render
from equivcheck.bench.memory import jax_memory, torch_memory
from equivcheck.bench.record import domain, extra_info, group, precision_banner
from equivcheck.bench.workload import (
    BENCH_CHECKS,
    SIDES,
    WORK,
    Workload,
    build,
    draw_inputs,
    matched_threads,
    shapes_of,
)

__all__ = [
    "BENCH_CHECKS", "CLAIMS", "SIDES", "WORK", "ClaimsError", "Workload", "build", "claim_rows", "domain", "draw_inputs",
    "extra_info", "group", "jax_memory", "load", "matched_threads", "precision_banner", "ratios", "render",
    "shapes_of", "torch_memory",
]
