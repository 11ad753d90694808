"""The report's files: reports/<run id>.json and .md, and latest.json / latest.md beside them,
each written to a temporary file first and renamed, so a reader never sees half a report."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from equivcheck.report import models as report_models
from equivcheck.report.tables import markdown


def write(report: dict[str, Any], directory: str | os.PathLike[str]) -> tuple[Path, Path]:
    """reports/<run id>.json and .md, and latest.json / latest.md beside them."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    stem = report["run"]["id"]
    text_json = json.dumps(report, indent=1, sort_keys=False, default=str) + "\n"
    text_md = markdown(report, report_models.plots(report["records"], out, stem))
    paths = (out / f"{stem}.json", out / f"{stem}.md")
    for path, text in zip(paths + (out / "latest.json", out / "latest.md"), (text_json, text_md) * 2):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    return paths
