"""reports/: what a run leaves behind, and the comparison of two runs.

runs     the run's report: records, machine, versions, settings (schema equivcheck.report/1)
files    the JSON and Markdown files, written atomically
tables   the terminal grid and the Markdown summary
models   the model checks' part: per-layer tables and loss curves
compare  two runs' reports: what changed, and whether anything regressed; reading one, checked
shards   a deterministic, balanced share of the tests per CI machine, and the merge of the shards' reports
"""
from equivcheck.report.compare import compare_runs, read_report
from equivcheck.report.files import write
from equivcheck.report.runs import OUTCOMES, SCHEMA, build, machine, run_id, versions
from equivcheck.report.shards import merge as merge_shards
from equivcheck.report.shards import parse_shard
from equivcheck.report.tables import grid, markdown, text_table, xpass_lines

__all__ = ["OUTCOMES", "SCHEMA", "build", "compare_runs", "grid", "machine", "markdown", "merge_shards", "parse_shard",
           "read_report", "run_id", "text_table", "versions", "write", "xpass_lines"]
