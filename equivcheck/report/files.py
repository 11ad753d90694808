"""The report's files: reports/<run id>.json, .md and .html, and latest.json / .md / .html beside
them, each written to a temporary file of its own first and renamed, so a reader never sees half a
report and two runs writing into one directory at once never take each other's temporary file."""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
from pathlib import Path
from typing import Any, NamedTuple

from equivcheck.report import html as report_html
from equivcheck.report import models as report_models
from equivcheck.report.tables import markdown


class Written(NamedTuple):
    """What `write` wrote: `paths` (the run's JSON, and its Markdown and HTML page unless they failed);
    `problems`, one line each, for a part left out (plots, the page) or latest.* left as it was."""

    paths: tuple[Path, ...]
    problems: tuple[str, ...]


def write(report: dict[str, Any], directory: str | os.PathLike[str]) -> Written:
    """reports/<run id>.json, .md and .html, and latest.json / .md / .html beside them.

    The JSON goes first and alone, then the Markdown, then the page: a failure in the plots, the
    summary or the page (matplotlib, the template) costs that part only and becomes a line of
    `problems`, where it used to cost every file. latest.* moves only to a run that started no
    earlier than the one it shows, so recovering an old run's journal does not take it back (two
    runs finishing at the same moment may still race for it). Raises OSError when the
    directory or a file cannot be written (`unwritable` says why in words)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    stem = report["run"]["id"]
    problems: list[str] = []
    texts = {"json": json.dumps(report, indent=1, sort_keys=False, default=str) + "\n"}
    _replace(out / f"{stem}.json", texts["json"])
    links: dict[str, str] = {}
    try:
        links = report_models.plots(report["records"], out, stem)
    except Exception as exc:  # noqa: BLE001 - a plot library's failure must not cost the report
        problems.append(f"plots left out of {stem}.md: {type(exc).__name__}: {exc}")
    try:
        texts["md"] = markdown(report, links)
    except Exception as exc:  # noqa: BLE001 - the JSON is written: a summary that cannot be made costs itself
        problems.append(f"no Markdown summary for {stem}: {type(exc).__name__}: {exc}")
    else:
        _replace(out / f"{stem}.md", texts["md"])
    try:
        # The page renders from the JSON's own round trip, so it shows what the JSON says and
        # `python -m equivcheck html` on the file makes the same page.
        texts["html"] = report_html.render(json.loads(texts["json"]))
    except Exception as exc:  # noqa: BLE001 - the JSON and Markdown are written; say what is missing
        problems.append(f"no HTML page for {stem}: {type(exc).__name__}: {exc} (the JSON is written; "
                        f"python -m equivcheck html {shlex.quote(str(out / f'{stem}.json'))} retries it)")
    else:
        _replace(out / f"{stem}.html", texts["html"])
    shown = _latest_started(out / "latest.json")
    started = str(report["run"].get("started") or "")
    if shown and started and started < shown:
        problems.append(f"latest.* left on the run started {shown}: this run started earlier ({started})")
    else:
        for suffix, text in texts.items():
            _replace(out / f"latest.{suffix}", text)
        for suffix in ("md", "html"):  # another run's summary or page would sit beside this run's latest.json
            if suffix not in texts:
                (out / f"latest.{suffix}").unlink(missing_ok=True)
    return Written(tuple(out / f"{stem}.{suffix}" for suffix in texts), tuple(problems))


def _latest_started(path: Path) -> str:
    """The start time (ISO 8601, UTC) of the run latest.json shows; '' when none can be read."""
    try:
        started = json.loads(path.read_text(encoding="utf-8"))["run"]["started"]
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    return started if isinstance(started, str) else ""


def write_json(report: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """`report` as JSON at `path`, atomically (a merged report: `python -m equivcheck merge`).
    Raises OSError when it cannot be written."""
    out = Path(path)
    _replace(out, json.dumps(report, indent=1, sort_keys=False, default=str) + "\n")
    return out


def _replace(path: Path, text: str) -> None:
    """`path` holds `text` in full or is left as it was. The temporary name is this writer's own
    (PID and random digits, created exclusively): a fixed `latest.json.tmp` shared by two runs let
    one rename the other's half-written file into place and then fail on its own vanished one.
    Created with os.open rather than mkstemp so that the umask, not mkstemp's 0600, sets its mode."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def unwritable(directory: str | os.PathLike[str], exc: OSError) -> str:
    """Why reports cannot go to `directory`, in words: errno alone says "File exists" for a path
    under a regular file and "No such file or directory" for one under /proc."""
    out = Path(directory)
    for place in (out, *out.parents):
        if place.exists():
            if not place.is_dir():
                return f"{place} is {'a file, ' if place.is_file() else ''}not a directory"
            break
    cause = exc.strerror or type(exc).__name__
    failed = Path(exc.filename) if exc.filename else None
    if failed is not None and not failed.exists() and failed in (out, *out.parents):  # mkdir refused
        return f"cannot create {failed} ({cause})"
    return f"cannot write in {out} ({cause})"


def check_writable(directory: str | os.PathLike[str]) -> str:
    """'' if reports can be written to `directory`, else why not, found by doing it: the directory
    is created and a file written in it and removed, so a bad path is a usage error before any
    check runs rather than a failure after all of them. (Permission bits alone would not tell:
    root passes them and still cannot create in /proc.) The directory stays: removing it again
    could pull it from under a second run checking the same new directory at the same moment."""
    out = Path(directory)
    try:
        out.mkdir(parents=True, exist_ok=True)
        _replace(out / f".equivcheck-probe.{os.getpid()}", "")
        (out / f".equivcheck-probe.{os.getpid()}").unlink()
    except OSError as exc:
        return unwritable(out, exc)
    return ""
