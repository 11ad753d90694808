"""Checkpoints across frameworks: torch, safetensors, orbax and msgpack files as one flat
{name: ndarray} view; conversion between them (`python -m equivcheck convert`) and comparison.

errors   CheckpointError: one line naming path and cause, the library's detail kept for --verbose
atomic   atomic_path: writes go to a partial beside the destination; stale partials removed
formats  detect, load, save (atomically), convert, differences, check_against; nest and unnest
"""
from equivcheck.checkpoints.atomic import atomic_path, remove_stale
from equivcheck.checkpoints.formats import (
    FORMATS,
    CheckpointError,
    State,
    check_against,
    convert,
    detect,
    differences,
    load,
    nest,
    save,
    unnest,
)

__all__ = ["FORMATS", "CheckpointError", "State", "atomic_path", "check_against", "convert", "detect",
           "differences", "load", "nest", "remove_stale", "save", "unnest"]
