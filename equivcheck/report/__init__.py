"""reports/: what a run leaves behind, and the comparison of two runs.

runs     the run's report: records, machine, versions, settings (schema equivcheck.report/1); kinds
files    the JSON, Markdown and HTML files, written atomically
tables   the terminal grids (one per kind of check) and the Markdown summary
html     the self-contained HTML page (Jinja2 template in templates/, plots inline)
plots    matplotlib figures: worst error / allowed per check, per-layer errors, loss curves (SVG, PNG)
models   the model checks' part of the Markdown: per-layer tables and loss curves
compare  two runs' reports: what changed, and whether anything regressed; reading one, checked
shards   a deterministic, balanced share of the tests per CI machine, and the merge of the shards' reports
"""
from equivcheck.report.compare import compare_runs, read_report
from equivcheck.report.files import write
from equivcheck.report.html import render as render_html
from equivcheck.report.runs import OUTCOMES, SCHEMA, build, by_family, family, machine, run_id, versions
from equivcheck.report.shards import merge as merge_shards
from equivcheck.report.shards import parse_shard
from equivcheck.report.tables import grid, markdown, summary_tables, text_table, xpass_lines

__all__ = ["OUTCOMES", "SCHEMA", "build", "by_family", "compare_runs", "family", "grid", "machine", "markdown",
           "merge_shards", "parse_shard", "read_report", "render_html", "run_id", "summary_tables", "text_table",
           "versions", "write", "xpass_lines"]
