"""Atomic writes of a checkpoint: everything goes to a hidden partial directory beside the
destination, `.NAME.PID.XXXXXXXX.partial`, renamed into place only when the writer succeeded.

A failure, Ctrl-C or SIGTERM (the command line turns it into SystemExit) removes the partial on
the way out. SIGKILL, a power cut or a crash of the interpreter cannot: the next write to the same
destination removes such leftovers (`remove_stale`), going by the PID in the name.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

from equivcheck.checkpoints.errors import CheckpointError, unwritable

# A partial whose writer's PID is still alive may belong to another process that got the PID
# later: past this age (seconds) it is taken as a leftover all the same.
STALE_AFTER = 24 * 3600.0
# Partials named before the PID was part of the name: their age (seconds) is all there is to go by.
UNNAMED_STALE_AFTER = 3600.0

Note = Callable[[str], None]


def _warn(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=4)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_stale(final: Path, note: Note | None = None) -> list[Path]:
    """Remove the partial directories other writes to `final` left behind, saying so through
    `note(message)` (default: a RuntimeWarning), and return them. A partial is stale when the
    process named in it has ended, when it is older than STALE_AFTER seconds, or, for one without
    a PID, older than UNNAMED_STALE_AFTER. A partial that cannot be removed is left (no error)."""
    note = note or _warn
    pattern = re.compile(rf"^\.{re.escape(final.name)}\.(?:(\d+)\.)?[^.]+\.partial$")
    removed = []
    try:
        candidates = [p for p in final.parent.iterdir() if pattern.match(p.name)]
    except OSError:  # no directory (yet) or none to read: nothing to clean
        return []
    for p in candidates:
        pid_text = pattern.match(p.name).group(1)  # type: ignore[union-attr]
        try:
            age = time.time() - p.lstat().st_mtime
        except OSError:  # gone meanwhile
            continue
        pid = int(pid_text) if pid_text else None
        if pid == os.getpid():
            continue  # this process's own write, in another thread
        if pid is not None and not _alive(pid):
            why = f"left by process {pid}, which is no longer running"
        elif age > (STALE_AFTER if pid is not None else UNNAMED_STALE_AFTER):
            why = f"left {age / 3600:.0f} h ago" + (f" by process {pid}" if pid is not None else "")
        else:
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()
        if not p.exists():
            removed.append(p)
            note(f"removed a stale partial conversion {p} {why}")
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, overwrite: bool = False, note: Note | None = None) -> Iterator[Path]:
    """A temporary path beside `path` to write to; moved into place only if the block succeeds,
    so a failed write leaves neither a half-written output nor the temporary behind. Stale
    partials of earlier writes to `path` are removed first (`remove_stale`, `note`).
    Raises CheckpointError when `path` exists (without `overwrite`) or cannot be written."""
    final = Path(path).absolute()
    if final.exists() and not overwrite:
        raise CheckpointError("already exists; pass overwrite=True (--overwrite) to replace it", path=final)
    remove_stale(final, note)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        # the PID in the name tells a later run whether the writer is still at work
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{os.getpid()}.", suffix=".partial", dir=final.parent))
    except OSError as exc:
        raise unwritable(final, exc) from None
    try:
        target = tmp / final.name
        yield target
        if not target.exists():
            raise CheckpointError("the writer produced nothing", path=final)
        old = tmp / (final.name + ".old")
        if final.is_dir():  # os.replace cannot put a directory over a non-empty one
            final.rename(old)
        try:
            os.replace(target, final)
        except OSError as exc:
            if old.exists():  # put the checkpoint being replaced back
                old.rename(final)
            raise unwritable(final, exc) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
