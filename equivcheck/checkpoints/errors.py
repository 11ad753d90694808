"""Why a checkpoint could not be read or written, in one line: the path and the cause, with
the library's own (often kilobytes long) account kept in `detail` for `--verbose`."""
from __future__ import annotations

import os
import re
from pathlib import Path


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, written or matched; names the file and the key."""

    def __init__(self, message: str, *, path: str | os.PathLike[str] | None = None, key: str | None = None,
                 detail: str | None = None) -> None:
        where = " ".join(p for p in (str(path) if path is not None else "", f"[{key!r}]" if key else "") if p)
        super().__init__(f"{where}: {message}" if where else message)
        self.path, self.key, self.detail = path, key, detail


def refusal(exc: Exception) -> str:
    """What torch's weights-only unpickler refused, from its message: the global's name is
    what tells a user which object got into the file. Its wording differs between an allowed
    module ("Unsupported global: GLOBAL x.y was not ...") and a blocked one ("unsupported
    GLOBAL x.y whose module x is blocked"), hence a search rather than a fixed line."""
    text = str(exc)
    found = re.search(r"GLOBAL\s+([\w.]+)", text)
    if found:
        return f"Unsupported global {found.group(1)}"
    lines = [re.split(r"(?i)error:", ln, 1)[1].strip() for ln in text.splitlines() if "error:" in ln.lower()]
    lines += [ln.strip() for ln in text.splitlines() if ln.strip().lower().startswith("unsupported")]
    detail = next((ln for ln in lines if ln), "")
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__


def orbax_cause(exc: Exception, path: Path, limit: int = 200) -> str:
    """The part of an Orbax/tensorstore error a user can act on. tensorstore appends the whole
    spec of the array it was opening (~1 KB of JSON) and nests one "Error ...: " per layer;
    the innermost layer that names a file says which file is broken and how."""
    text = str(exc).split(" [tensorstore_spec=", 1)[0].strip().splitlines()
    text = text[0] if text else ""
    status = re.match(r"([A-Z_]{4,}): ", text)
    if status:
        text = text[status.end():]
    # Quoted paths inside the checkpoint, relative to it: the line already names the checkpoint.
    root = re.escape(str(path.absolute()).rstrip("/"))
    text = re.sub(f'"{root}/?([^"]*)"', lambda m: f'"{m.group(1) or "."}"', text)
    layers = text.split(": ")
    named = [i for i, layer in enumerate(layers) if 'local file "' in layer]
    chosen = layers[named[-1]:] if named else layers[-2:]
    if status and len(chosen) == 1 and chosen[0].endswith('"'):  # only the status says what went wrong
        chosen.append(status.group(1).lower().replace("_", " "))
    text = ": ".join(chosen)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def unwritable(final: Path, exc: OSError) -> CheckpointError:
    """A write refused by the file system, said plainly: errno reads "File exists" for a path
    under a regular file and "No such file" for /proc, neither of which says what to fix."""
    for parent in final.parents:
        if parent.exists():
            if not parent.is_dir():
                return CheckpointError(f"cannot write: {parent} is a file, not a directory", path=final)
            if exc.filename and Path(exc.filename).parent == parent or parent == final.parent:
                return CheckpointError(f"cannot write in {parent} ({exc.strerror or type(exc).__name__})", path=final)
            break
    where = f": {exc.filename}" if exc.filename else ""
    return CheckpointError(f"cannot write ({exc.strerror or type(exc).__name__}{where})", path=final)
