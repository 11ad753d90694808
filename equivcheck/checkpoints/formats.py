"""Checkpoints across frameworks: one flat {name: ndarray} view of a torch state_dict
(.pt/.pth, loaded weights-only), a safetensors file, an Orbax directory and a Flax msgpack
file; bit-exact conversion between them with atomic writes; a bitwise comparison that names
the key and the likely lossy cast.

Names are torch's dotted state_dict keys; Orbax and msgpack hold the same arrays as a nested
tree split at the dots (`nest`/`unnest`). bfloat16 travels as ml_dtypes.bfloat16 (NumPy has
none of its own) and never through float16 or float32.
"""
from __future__ import annotations

import os
import pickle
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from equivcheck.checkpoints.atomic import Note, atomic_path
from equivcheck.checkpoints.errors import CheckpointError, orbax_cause, refusal
from equivcheck.engine.dtypes import np_dtype

FORMATS = ("torch", "safetensors", "orbax", "msgpack")
_SUFFIX = {".pt": "torch", ".pth": "torch", ".safetensors": "safetensors", ".msgpack": "msgpack", ".orbax": "orbax"}
State = dict[str, np.ndarray]


def detect(path: str | os.PathLike[str], fmt: str | None = None) -> str:
    """The format named, or the one the path's suffix says (a directory is Orbax)."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise CheckpointError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}", path=path)
        return fmt
    p = Path(path)
    if p.suffix in _SUFFIX:
        return _SUFFIX[p.suffix]
    if p.is_dir() or not p.suffix:
        return "orbax"
    raise CheckpointError(f"cannot tell the format from suffix {p.suffix!r}: use .pt/.pth, .safetensors, "
                          ".msgpack or a directory (Orbax), or name the format", path=path)


# --------------------------------------------------------------------------- trees


def nest(state: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """{'a.b': x} -> {'a': {'b': x}}; refuses a name that is both a leaf and a prefix."""
    root: dict[str, Any] = {}
    for name, value in state.items():
        node, parts = root, name.split(".")
        for i, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise CheckpointError(f"{'.'.join(parts[:i + 1])!r} is an array and a prefix of other names", key=name)
        if parts[-1] in node:
            raise CheckpointError("the name is a prefix of other names as well as an array", key=name)
        node[parts[-1]] = value
    return root


def unnest(tree: Mapping[str, Any], prefix: str = "") -> State:
    """The inverse of `nest`; a key holding a dot would make names ambiguous and is refused."""
    out: State = {}
    for k, v in tree.items():
        if "." in str(k):
            raise CheckpointError("a tree key holds a '.', which would make the flat names ambiguous", key=str(k))
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(unnest(v, name + "."))
        else:
            out[name] = np.asarray(v)
    return out


# --------------------------------------------------------------------------- torch


def _to_numpy(name: str, t: Any, path: Any) -> np.ndarray:
    import torch

    if not isinstance(t, torch.Tensor):
        raise CheckpointError(f"holds {type(t).__name__}, not a tensor: not a plain state_dict", path=path, key=name)
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np_dtype("bfloat16")).copy()
    try:
        return t.numpy().copy()
    except TypeError as exc:
        raise CheckpointError(f"dtype {t.dtype} has no NumPy counterpart ({exc})", path=path, key=name) from None


def _from_numpy(a: np.ndarray) -> Any:
    import torch

    a = np.array(a, order="C")  # np.ascontiguousarray would turn a 0-d array into shape [1]
    if a.dtype == np_dtype("bfloat16"):
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(a.copy())


def _load_torch(path: Path, key: str | None) -> State:
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            "refused: not a plain state_dict. Files are loaded with torch.load(weights_only=True), which unpickles "
            "only tensors and plain containers, because unpickling anything else can run code from the file. "
            f"Re-save the weights alone: torch.save(model.state_dict(), PATH). (torch: {refusal(exc)})", path=path) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"truncated or not a torch checkpoint ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''})", path=path) from None
    if key is not None:
        if not isinstance(obj, Mapping) or key not in obj:
            have = sorted(map(str, obj)) if isinstance(obj, Mapping) else type(obj).__name__
            raise CheckpointError(f"no entry {key!r} to take the weights from; it holds {have}", path=path)
        obj = obj[key]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"holds a {type(obj).__name__}, not a state_dict (a mapping of names to tensors)",
                              path=path)
    nested = sorted(str(k) for k, v in obj.items() if isinstance(v, Mapping))
    if nested:
        raise CheckpointError(f"a training checkpoint rather than a state_dict: entries {nested} are mappings; "
                              "choose the one holding the weights (--key NAME)", path=path)
    return {str(k): _to_numpy(str(k), v, path) for k, v in obj.items()}


def _save_torch(state: State, path: Path) -> None:
    import torch

    torch.save({k: _from_numpy(v) for k, v in state.items()}, path)


# --------------------------------------------------------------------------- the others


def _load_safetensors(path: Path) -> State:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return dict(load_file(str(path)))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"truncated or not a safetensors file ({exc})", path=path) from None


def _save_safetensors(state: State, path: Path) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.array(v, order="C") for k, v in state.items()}, str(path))


_ORBAX: list[Any] = []
_ORBAX_LOCK = threading.RLock()


def _orbax() -> Any:
    """One checkpointer for the process: closing one shuts down an executor that Orbax shares
    between checkpointers, and the next save then fails ('cannot schedule new futures')."""
    import orbax.checkpoint as ocp

    with _ORBAX_LOCK:
        if not _ORBAX:
            _ORBAX.append(ocp.StandardCheckpointer())
        return _ORBAX[0]


def _load_orbax(path: Path) -> State:
    if not path.is_dir():
        raise CheckpointError("not an Orbax checkpoint directory", path=path)
    try:
        with _ORBAX_LOCK:
            tree = _orbax().restore(path.absolute())
    except Exception as exc:  # Orbax and tensorstore raise many kinds; all mean the same here
        raise CheckpointError(f"truncated or not an Orbax checkpoint: {orbax_cause(exc, path)} ({type(exc).__name__})",
                              path=path, detail=f"{type(exc).__name__}: {exc}") from None
    return unnest(tree)


def _save_orbax(state: State, path: Path) -> None:
    empty = sorted(k for k, v in state.items() if v.size == 0)
    if empty:
        raise CheckpointError(f"Orbax cannot store zero-size arrays (orbax-checkpoint refuses them): {empty}",
                              key=empty[0])
    ck = _orbax()
    with _ORBAX_LOCK:
        ck.save(path.absolute(), nest(state))
        ck.wait_until_finished()


def _load_msgpack(path: Path) -> State:
    from flax import serialization

    try:
        tree = serialization.msgpack_restore(path.read_bytes())
    except Exception as exc:  # msgpack's errors share no base class worth naming
        raise CheckpointError(f"truncated or not a Flax msgpack file ({type(exc).__name__}: {exc})", path=path) from None
    if not isinstance(tree, Mapping):
        raise CheckpointError(f"holds a {type(tree).__name__}, not a tree of arrays", path=path)
    return unnest(tree)


def _save_msgpack(state: State, path: Path) -> None:
    from flax import serialization

    path.write_bytes(serialization.msgpack_serialize(nest(state)))


_SAVE = {"torch": _save_torch, "safetensors": _save_safetensors, "orbax": _save_orbax, "msgpack": _save_msgpack}


def load(path: str | os.PathLike[str], fmt: str | None = None, *, key: str | None = None) -> State:
    """A checkpoint as {dotted name: ndarray}. `key` picks the weights out of a torch training
    checkpoint ({'model': state_dict, 'optimizer': ...})."""
    p, fmt = Path(path), detect(path, fmt)
    if not p.exists():
        raise CheckpointError("no such file or directory", path=p)
    if key is not None and fmt != "torch":
        raise CheckpointError("--key applies to torch checkpoints only", path=p)
    if fmt == "torch":
        return _load_torch(p, key)
    return {"safetensors": _load_safetensors, "orbax": _load_orbax, "msgpack": _load_msgpack}[fmt](p)


def save(state: Mapping[str, np.ndarray], path: str | os.PathLike[str], fmt: str | None = None, *,
         overwrite: bool = False, note: Note | None = None) -> Path:
    """Write `state` to `path` atomically (equivcheck.checkpoints.atomic); `note(message)` hears of
    stale partials of earlier writes removed on the way (default: a RuntimeWarning). Raises
    CheckpointError for a path that exists (without `overwrite`), is of the other kind, or cannot
    be written."""
    fmt = detect(path, fmt)
    p = Path(path)
    # --overwrite replaces a checkpoint with another; a file where a directory goes (or the
    # reverse) is more likely a wrong path than something to delete.
    if overwrite and p.exists() and p.is_dir() != (fmt == "orbax"):
        kinds = (("directory", "directories"), ("file", "files"))
        raise CheckpointError(f"is a {kinds[p.is_file()][0]}, and {fmt} checkpoints are {kinds[fmt != 'orbax'][1]}: "
                              "--overwrite replaces only a checkpoint of the same kind; remove it first", path=p)
    if overwrite and p.exists():
        # what is there must read as a checkpoint of that format: --overwrite never deletes a
        # directory of notes or a file that only shares the suffix
        try:
            load(p, fmt)
        except CheckpointError as exc:
            cause = str(exc).split(": ", 1)[-1]
            raise CheckpointError(f"is not a checkpoint in the {fmt} format ({cause}): --overwrite replaces only a "
                                  "checkpoint; remove it first", path=p) from None
    with atomic_path(path, overwrite=overwrite, note=note) as target:
        _SAVE[fmt]({k: np.asarray(v) for k, v in state.items()}, target)
    return Path(path)


def convert(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, src_fmt: str | None = None,
            dst_fmt: str | None = None, key: str | None = None, overwrite: bool = False,
            note: Note | None = None) -> State:
    state = load(src, src_fmt, key=key)
    save(state, dst, dst_fmt, overwrite=overwrite, note=note)
    return state


# --------------------------------------------------------------------------- comparison


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view(f"u{a.dtype.itemsize}") if a.dtype.itemsize in (1, 2, 4, 8) and a.dtype.kind != "b" else a


def _lossy_hint(a: np.ndarray, b: np.ndarray) -> str:
    """Which narrower type, cast to and back, turns a into b."""
    if a.dtype.kind != "f" and a.dtype != np_dtype("bfloat16"):
        return ""
    for via in ("float16", "bfloat16", "float32"):
        dt = np_dtype(via)
        if dt == a.dtype or dt.itemsize > a.dtype.itemsize:  # a wider type holds every value
            continue
        with np.errstate(over="ignore", invalid="ignore"):
            if np.array_equal(_bits(a.astype(dt).astype(a.dtype)), _bits(b)):
                return f": exactly what a cast through {via} gives; the conversion took a lossy path"
    return ""


def differences(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], names: tuple[str, str] = ("first", "second"),
                limit: int = 10) -> list[str]:
    """Every way two states differ, bit for bit, one line each, naming the key."""
    out = [f"{names[0]} has {k!r}, {names[1]} does not" for k in sorted(set(a) - set(b))]
    out += [f"{names[1]} has {k!r}, {names[0]} does not" for k in sorted(set(b) - set(a))]
    for k in sorted(set(a) & set(b)):
        x, y = np.asarray(a[k]), np.asarray(b[k])
        if x.dtype != y.dtype:
            out.append(f"{k!r}: dtype {x.dtype} in {names[0]}, {y.dtype} in {names[1]}")
        elif x.shape != y.shape:
            out.append(f"{k!r}: shape {list(x.shape)} in {names[0]}, {list(y.shape)} in {names[1]}")
        elif not np.array_equal(_bits(x), _bits(y)):
            bad = np.flatnonzero(_bits(x).ravel() != _bits(y).ravel())
            i = np.unravel_index(bad[0], x.shape) if x.shape else ()
            out.append(f"{k!r}: {bad.size} of {x.size} {x.dtype} values differ in their bits; first at "
                       f"{list(map(int, i))}: {x[i]!r} vs {y[i]!r}{_lossy_hint(x, y)}")
    return out[:limit] + ([f"... and {len(out) - limit} more"] if len(out) > limit else [])


def check_against(state: Mapping[str, np.ndarray], expected: Mapping[str, Any], *, path: Any = None) -> None:
    """Refuse a state that does not fit `expected` (a model's own state: arrays or tensors, or
    (shape, dtype) pairs): missing, extra, shape and dtype mismatches, each naming the key."""
    problems: list[tuple[str, str]] = []
    for k in sorted(set(expected) - set(state)):
        problems.append((k, f"missing key {k!r} (the model expects it)"))
    for k in sorted(set(state) - set(expected)):
        problems.append((k, f"unexpected key {k!r} (the model has no such parameter)"))
    for k in sorted(set(state) & set(expected)):
        want = expected[k]
        shape, dtype = want if isinstance(want, tuple) else (tuple(want.shape), want.dtype)
        dtype = str(dtype).replace("torch.", "")
        got = np.asarray(state[k])
        if tuple(got.shape) != tuple(shape):
            problems.append((k, f"key {k!r}: shape {list(got.shape)}, the model expects {list(shape)}"))
        elif str(got.dtype) != dtype:
            problems.append((k, f"key {k!r}: dtype {got.dtype}, the model expects {dtype}"))
    if problems:
        raise CheckpointError("does not fit the model: " + "; ".join(text for _, text in problems), path=path,
                              key=problems[0][0] if len(problems) == 1 else None)
