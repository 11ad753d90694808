"""Command line, for CI outside pytest:

    python -m equivcheck compare OLD.json NEW.json   what changed between two runs
    python -m equivcheck merge SHARD.json... -o ALL.json   the shards' reports as one run's
    python -m equivcheck html REPORT.json [-o OUT]   a report's HTML page (default: beside it, .html)
    python -m equivcheck convert IN OUT [--check]    a checkpoint from one format to another
    python -m equivcheck claims BENCH.json [...]     torch/JAX speed and memory ratios, and the claims they bear on
    python -m equivcheck onnx MODEL.onnx --torch mod:factory [--jax mod:apply]   an exported file against torch
                                                     (and the JAX port)

Exit codes, every command: 0 all well; 1 the answer is "no" (compare: a regression; convert
--check: the two checkpoints differ; onnx: a side is off); 2 the question could not be asked (a file unreadable,
unwritable, corrupt or of the wrong kind), with one line on stderr naming the path and why;
compare: 3 a report is of a partial run (interrupted, -x) and --allow-partial was not given;
convert ended by SIGTERM: 143, its partial output removed.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any


def _compare(args: argparse.Namespace) -> int:
    from equivcheck.report import compare_runs, read_report
    from equivcheck.report.compare import check_growth, speed_changes
    from equivcheck.report.runs import partial_text

    factors = []
    for option, value in (("--growth", args.growth), ("--speed-growth", args.speed_growth)):
        try:
            factors.append(check_growth(value))
        except ValueError as exc:
            # Checked before the reports are read: a bad option is the first thing to say.
            print(f"equivcheck compare: {option}: {exc}", file=sys.stderr)
            return 2
    growth, speed = factors
    try:
        old, new = read_report(args.old), read_report(args.new)
        lines, regressed = compare_runs(old, new, growth=growth)
        timing, slower = speed_changes(old, new, growth=speed)
    except ValueError as exc:
        print(f"equivcheck compare: {exc}", file=sys.stderr)
        return 2
    lines, regressed = lines + timing, regressed or slower
    partial = [(path, text) for path, rep in ((args.old, old), (args.new, new)) if (text := partial_text(rep["run"]))]
    if partial and not args.allow_partial:
        # Its unrun checks would read as "gone", and a nightly job would pass on half a run.
        for path, text in partial:
            print(f"equivcheck compare: {path}: a partial run ({text}); compare complete runs, "
                  "or pass --allow-partial", file=sys.stderr)
        return 3
    print("\n".join(lines) if lines else "no change in outcomes or margins")
    return 1 if regressed else 0


def _claims(args: argparse.Namespace) -> int:
    from equivcheck.bench.claims import ClaimsError, load, render

    try:
        records = load(args.files)
    except ClaimsError as exc:
        print(f"equivcheck claims: {exc}", file=sys.stderr)
        return 2
    print(render(records), end="")
    return 0


def _merge(args: argparse.Namespace) -> int:
    from equivcheck.report import read_report
    from equivcheck.report.files import unwritable, write_json
    from equivcheck.report.shards import merge

    try:
        merged = merge([(path, read_report(path)) for path in args.reports])
    except ValueError as exc:
        print(f"equivcheck merge: {exc}", file=sys.stderr)
        return 2
    try:
        write_json(merged, args.output)
    except OSError as exc:
        print(f"equivcheck merge: -o {args.output}: {unwritable(os.path.dirname(args.output) or '.', exc)}",
              file=sys.stderr)
        return 2
    s = merged["summary"]
    print(f"wrote {args.output}: {len(args.reports)} shards, {s['total']} records "
          + ", ".join(f"{v} {k}" for k, v in s.items() if k != "total" and v))
    return 0


def _recover(args: argparse.Namespace) -> int:
    from pathlib import Path

    from equivcheck.report import write
    from equivcheck.report.files import unwritable
    from equivcheck.report.journal import recover, writer_alive

    journal = Path(args.journal)
    pid = writer_alive(journal)
    if pid is not None and not args.force:
        # Its report would be a partial copy of a run still adding records, and deleting the
        # journal would lose them if that run then crashed.
        print(f"equivcheck recover: {journal}: the run writing it is still running (PID {pid}) and writes its own "
              "report when it ends; recover only the journal of a run that is gone, or pass --force", file=sys.stderr)
        return 2
    try:
        built = recover(journal)
    except OSError as exc:
        print(f"equivcheck recover: {journal}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"equivcheck recover: {exc}", file=sys.stderr)
        return 2
    out = args.output or str(journal.parent)
    existing = Path(out) / f"{built['run']['id']}.json"
    if existing.exists() and not args.force:
        print(f"equivcheck recover: {journal}: its run already has a report, {existing} (the process ended after "
              "writing it and before deleting the journal); nothing written: delete the journal, or pass --force to "
              "replace that report with the journal's records", file=sys.stderr)
        return 2
    try:
        paths, problems = write(built, out)
    except OSError as exc:
        print(f"equivcheck recover: -o {out}: {unwritable(out, exc)}", file=sys.stderr)
        return 2
    journal.unlink(missing_ok=True)  # its records now live in the report
    for problem in problems:
        print(f"equivcheck recover: {problem}", file=sys.stderr)
    s = built["run"]
    cut = s["journal"]["cut_line"]
    print(f"recovered {built['summary']['total']} records of a run that ended without its report (partial: "
          f"{s['partial']['ran']} tests ran)"
          + (f"; line {cut}, cut off by the crash, dropped: the test it was written for may lack records" if cut
             else "") + ":\n" + "\n".join(f"  {p}" for p in paths))
    return 0


def _html(args: argparse.Namespace) -> int:
    from pathlib import Path

    from equivcheck.report import read_report
    from equivcheck.report.html import render

    out = Path(args.output) if args.output else Path(args.report).with_suffix(".html")
    try:
        text = render(read_report(args.report))
    except ValueError as exc:
        print(f"equivcheck html: {exc}", file=sys.stderr)
        return 2
    except KeyError as exc:  # a field the page shows and read_report does not check (report.html.MissingField)
        print(f"equivcheck html: {args.report}: the report lacks {exc.args[0] if exc.args else exc}, a field the "
              "page shows (edited by hand, or written by another version?)", file=sys.stderr)
        return 2
    try:
        out.write_text(text, encoding="utf-8")
    except OSError as exc:
        print(f"equivcheck html: {out}: cannot write ({exc.strerror or type(exc).__name__})", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def _count(option: str, value: str, least: int) -> int:
    """An integer option >= least; ValueError with the one line otherwise (argparse's type=int would
    answer with its usage block)."""
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"{option} {value}: not an integer") from None
    if n < least:
        raise ValueError(f"{option} {value}: must be at least {least}")
    return n


def _onnx(args: argparse.Namespace) -> int:
    from equivcheck.onnx.cli import BadInput, run

    try:
        examples = _count("--examples", args.examples, 1)
        # None when not given: a batch the graph fixes is then used as it is; a requested one is held to it
        batch = _count("--batch", args.batch, 1) if args.batch is not None else None
        seed = _count("--seed", args.seed, 0)
        return run(args.model, args.torch, args.jax, examples=examples, seed=seed, batch=batch, dims=args.dim)
    except (BadInput, ValueError) as exc:
        print(f"equivcheck onnx: {exc}", file=sys.stderr)
        return 2


def _terminated(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # the shell's code for "ended by signal N"


@contextlib.contextmanager
def _cleanup_on_sigterm() -> Iterator[None]:
    """SIGTERM (kill, a CI job's timeout) ends the command through SystemExit, so the partial
    output is removed on the way out as after any failure; by default SIGTERM ends the process
    at once and left it behind. SIGKILL cannot be caught: the next convert to OUT removes what
    it leaves (equivcheck.checkpoints.atomic)."""
    if threading.current_thread() is not threading.main_thread():  # main() called from a thread
        yield
        return
    before = signal.signal(signal.SIGTERM, _terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def _convert(args: argparse.Namespace) -> int:
    from equivcheck import checkpoints as ck

    def note(message: str) -> None:
        print(f"equivcheck convert: {message}", file=sys.stderr)

    try:
        with _cleanup_on_sigterm():
            return _convert_checked(args, note)
    except SystemExit as exc:
        if exc.code == 128 + signal.SIGTERM:
            print("equivcheck convert: terminated (SIGTERM); no partial output left behind", file=sys.stderr)
        raise
    except ck.CheckpointError as exc:
        print(f"equivcheck convert: {exc}", file=sys.stderr)
        if args.verbose and exc.detail:
            print(exc.detail, file=sys.stderr)
        return 2


def _convert_checked(args: argparse.Namespace, note: Callable[[str], None]) -> int:
    from equivcheck import checkpoints as ck

    try:
        state = ck.convert(args.src, args.dst, src_fmt=args.src_format, dst_fmt=args.dst_format, key=args.key,
                           overwrite=args.overwrite, note=note)
        print(f"wrote {args.dst} ({ck.detect(args.dst, args.dst_format)}): {len(state)} arrays, "
              f"{sum(a.nbytes for a in state.values())} bytes, from {args.src} ({ck.detect(args.src, args.src_format)})")
        if not args.check:
            return 0
        # Both sides read back from disk: the check covers the writer and the reader.
        diffs = ck.differences(ck.load(args.src, args.src_format, key=args.key), ck.load(args.dst, args.dst_format),
                               names=(str(args.src), str(args.dst)))
    except OSError as exc:  # a writer's own failure (disk full, quota) after the path was accepted
        print(f"equivcheck convert: {exc.filename or args.dst}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    if diffs:
        print("check: the two checkpoints differ:\n  " + "\n  ".join(diffs), file=sys.stderr)
        return 1
    print(f"check: {len(state)} arrays identical bit for bit (names, shapes, dtypes, values)")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="equivcheck", description="PyTorch/JAX equivalence reports")
    sub = ap.add_subparsers(dest="command", required=True)
    cmp = sub.add_parser("compare", help="what changed between two report JSON files")
    cmp.add_argument("old")
    cmp.add_argument("new")
    # Parsed by check_growth, not argparse's type=float: argparse takes nan and -1, and answers
    # a non-number with its usage block rather than the one line every exit 2 gives.
    cmp.add_argument("--growth", default="2",
                     help="report a check whose worst error/allowed grew by this factor (default 2)")
    cmp.add_argument("--speed-growth", default="1.5",
                     help="with benchmarks in both reports (--equiv-bench): report a median time that grew by this "
                          "factor, spreads apart, as a regression (default 1.5)")
    cmp.add_argument("--allow-partial", action="store_true",
                     help="compare a partial run (interrupted, -x) too, flagged first, instead of exiting 3")
    cmp.set_defaults(run=_compare)
    mrg = sub.add_parser("merge", help="one report of the whole run from the reports of its shards (--equiv-shard)")
    mrg.add_argument("reports", nargs="+", metavar="SHARD.json")
    mrg.add_argument("-o", "--output", required=True, metavar="ALL.json")
    mrg.set_defaults(run=_merge)
    page = sub.add_parser("html", help="the self-contained HTML page of a report JSON file")
    page.add_argument("report")
    page.add_argument("-o", "--output", help="where to write the page (default: the report's path, .html)")
    page.set_defaults(run=_html)
    rec = sub.add_parser("recover", help="the report of a run that ended without writing it (a crash), from the "
                                         "record journal it left: reports/unfinished-<start>-<pid>-<token>.jsonl")
    rec.add_argument("journal", metavar="JOURNAL.jsonl")
    rec.add_argument("-o", "--output", metavar="DIR", help="where the report goes (default: the journal's directory)")
    rec.add_argument("--force", action="store_true", help="recover even when the journal's process is still running, "
                     "or replace a report the run already has")
    rec.set_defaults(run=_recover)
    conv = sub.add_parser("convert", help="convert a checkpoint: .pt/.pth (weights only), .safetensors, "
                                          ".msgpack (Flax), a directory (Orbax)")
    conv.add_argument("src", metavar="IN")
    conv.add_argument("dst", metavar="OUT")
    conv.add_argument("--check", action="store_true", help="load both and compare them bit for bit")
    conv.add_argument("--key", help="take the weights from this entry of a torch training checkpoint")
    conv.add_argument("--from", dest="src_format", choices=("torch", "safetensors", "orbax", "msgpack"),
                      help="format of IN (default: from its suffix)")
    conv.add_argument("--to", dest="dst_format", choices=("torch", "safetensors", "orbax", "msgpack"),
                      help="format of OUT (default: from its suffix)")
    conv.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    conv.add_argument("-v", "--verbose", action="store_true",
                      help="on a read error, print the library's full message after the one-line summary")
    conv.set_defaults(run=_convert)
    claims = sub.add_parser("claims", help="torch/JAX speed and memory ratios per check, and the claims they bear "
                                           "on, from pytest-benchmark JSON of `pytest --equiv --equiv-bench`")
    claims.add_argument("files", nargs="+", metavar="BENCH.json",
                        help="--benchmark-json output, or a --benchmark-save file (.benchmarks/...)")
    claims.set_defaults(run=_claims)
    onnx = sub.add_parser("onnx", help="check an exported ONNX file against the torch model it was exported from, "
                                       "and the JAX port (needs equivcheck[onnx])")
    onnx.add_argument("model", metavar="MODEL.onnx")
    onnx.add_argument("--torch", required=True, metavar="MODULE:FACTORY",
                      help="a zero-argument callable returning the torch nn.Module the file was exported from "
                           "(pkg.mod:make_model or path/to/file.py:make_model); run in eval mode")
    onnx.add_argument("--jax", metavar="MODULE:APPLY",
                      help="apply(*inputs) -> output, the port with its parameters bound; with it the check "
                           "is three-way (torch, ONNX Runtime, JAX), else torch vs ONNX Runtime")
    onnx.add_argument("--examples", default="10", metavar="N", help="examples to draw (default 10)")
    onnx.add_argument("--seed", default="0", metavar="S", help="seed of the NumPy generator drawing them (default 0)")
    onnx.add_argument("--batch", default=None, metavar="B",
                      help="size of a dynamic first dimension (default 2; refused where the graph fixes it "
                           "otherwise); other dynamic dimensions get 2-5, "
                           "fixed ones their size. Inputs follow the graph's element types: floats uniform in "
                           "[-3, 3], integers in [0, 10), booleans fair coins")
    onnx.add_argument("--dim", action="append", default=[], metavar="INPUT:AXIS=SIZE",
                      help="the size of a dynamic dimension, by input and axis (x:1=4) or by the graph's symbol "
                           "(s27=4); repeatable. Exporters leave dimensions the model fixes (a Linear's width) "
                           "symbolic too")
    onnx.set_defaults(run=_onnx)
    args = ap.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
