"""What a benchmark record says besides its times: pytest-benchmark's `extra_info` of one side, and
the precision banner a run at `--equiv-precision default` on a GPU gets.

A pytest-benchmark group is one check (`pair::check::dtype::device`); its benchmarks are named by side
(`torch`, `jax`, `torch.compile`), so pytest-benchmark's own tables put the sides of a check together.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from equivcheck.engine.records import check_id

if TYPE_CHECKING:
    from equivcheck.bench.workload import Workload

FORMAT = 1  # extra_info["equivcheck"]: the claims report reads records of this format
# Families for the claims ("PyTorch is faster on image models"), from the pair's name and tags.
_IMAGE = re.compile(r"conv|pool|interp|resize|upsample|image|vision|cnn|resnet|vit|unet|batch_norm2d|group_norm")
_SEQUENCE = re.compile(r"lstm|gru|rnn|attention|transformer|encoder|gpt|bert|embedding")


def group(pair: str, check: str, dtype: str, device: str) -> str:
    return check_id(pair, check, dtype, device)


def domain(name: str, tags: Any = ()) -> str:
    """image, sequence or other: how the claims report sorts pairs and models ("PyTorch is faster
    on image models"). Not the record's `family`, the report section of its kind."""
    text = " ".join([name.lower(), *sorted(str(t).lower() for t in tags)])
    if _IMAGE.search(text):
        return "image"
    return "sequence" if _SEQUENCE.search(text) else "other"


def extra_info(*, pair: str, check: str, dtype: str, device: str, device_name: str, precision: str,
               settings: dict[str, Any], shapes: list[Any], tags: Any, wl: Workload, work: str,
               family: str) -> dict[str, Any]:
    """The record of one side's benchmark: what ran, how it was made fair, compile time and memory.

    Times are seconds; memory is bytes; `precision_settings` are the switches each framework had;
    `family` is the report section of the pair's kind, as its check's records say it
    (engine.kind.family_of: operations, layers, optimizers, ...); `domain` what the claims sort by."""
    return {
        "equivcheck": FORMAT,
        "pair": pair, "check": check, "dtype": dtype, "device": device, "device_name": device_name,
        "side": wl.side, "work": work, "precision": precision, "precision_settings": dict(settings),
        "shapes": shapes, "tags": sorted(str(t) for t in tags), "family": family,
        "domain": domain(pair, tags),
        "compile_seconds": wl.compile_seconds, "first_call_seconds": wl.first_seconds,
        "memory_bytes": wl.memory_bytes, "memory_measure": wl.memory_measure,
        "threads": wl.threads, "rules": list(wl.rules),
    }


def precision_banner(device: str, precision: str, settings: dict[str, Any]) -> str | None:
    """A warning line when the two sides compute float32 matmuls at different precisions, else None.

    Only a GPU has TF32: at `--equiv-precision default` JAX's float32 dots and convolutions run in TF32
    (jax_default_matmul_precision unset), while torch runs matmul in full float32 unless
    torch.backends.cuda.matmul.allow_tf32 is set (its convolutions use TF32 through cuDNN by default).
    On an H100 a float32 4096^3 matmul took 2.76 ms in torch against 0.54 ms in JAX at these defaults,
    a 5x "win" that became 2.70 against 2.95 ms at matched precision (issue 14)."""
    if device != "gpu" or precision != "default":
        return None
    jax_tf32 = settings.get("jax_default_matmul_precision") in (None, "default", "bfloat16", "tensorfloat32")
    torch_mm = bool(settings.get("matmul_allow_tf32"))
    torch_conv = bool(settings.get("cudnn_allow_tf32"))
    if jax_tf32 == torch_mm == torch_conv:
        return None
    side = lambda on: "TF32" if on else "full float32"
    return (f"PRECISION MISMATCH ({device}, --equiv-precision default): float32 matmul: JAX {side(jax_tf32)}, "
            f"torch {side(torch_mm)}; float32 convolution: JAX {side(jax_tf32)}, torch {side(torch_conv)}. "
            "float32 speed ratios of matmul/conv-heavy groups compare different arithmetic; "
            "rerun with --equiv-precision highest for a like-for-like comparison")
