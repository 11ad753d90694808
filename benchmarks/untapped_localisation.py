"""Localisation of model-migration slips in ports written without a single `tap(...)` call.

Users port a torch model as a plain JAX function over the parameter dict equivcheck converts
(`apply(params, *inputs, train=False)`), and they do not tap its layers. This benchmark asks how
far equivcheck's model checks get on such ports. Four tiny torch models (an MLP, a CNN with
BatchNorm, a transformer encoder block with a key padding mask, a GRU classifier;
benchmarks/_untapped_models.py) each have a correct port and copies of it with one planted
migration slip (an untransposed square kernel, a LayerNorm/BatchNorm eps, gelu's tanh
approximation, attention scale/softmax axis/mask polarity, SAME padding on a stride-2 conv,
an NHWC flatten, GRU gate order and reset-gate placement, ...), each recorded with the torch
module it lives in (a name from `model.named_modules()`). Every case runs its checks
(`forward`, and `grad` for some) through `ModelPair.run_checks` and the table prints:

  outcome       passed / failed (or error: the benchmark could not run the case)
  localised-as  the row of the record's layer table marked first (else the layer the diagnosis
                names as "first diverging layer: NAME"), "-" when none is named
  correct?      planted: failed and localised to the expected module; correct port: passed

Totals: planted checks detected (failed) and localised to the expected module, and correct
ports' checks flagged (a failure there is a false alarm). Exit status 0 whatever the numbers:
this is a measurement. A case that raises prints its error and the run goes on.

Two independent sets of cases (`--set 1|2|all`, default all): set 1 above; set 2
(benchmarks/_untapped_models2.py) four more models written the way users write ports (a ResNet
block in NHWC with a non-square stem kernel and a dilated conv, a pre-norm causal decoder block
whose attention is a torch module of its own with q/k/v/o Linears, a 2-layer LSTM run as
`lax.scan`s, an Embedding(padding_idx) + Conv1d text model ported under `jax.vmap` with a
`@jax.jit` helper), 30 slips, and correct ports written in unusual but valid ways (im2col convs
with folded BatchNorm, a fused qkv matmul, precomputed LSTM input projections, one-hot lookups,
jax.lax.map for jax.vmap) that probe false alarms. With both sets the totals are printed per set
and over all. A correct port's check that passes but whose layer table leaves modules unmatched
is listed after the table (no false alarm: the modules a later divergence would be blamed on).

Set 3 (benchmarks/_untapped_models3.py, `--set 3`) is held out: written without reading how the
tool localises, so it measures it fairly where sets 1 and 2 were used while developing it. Four
more model families (a MobileNet-style inverted residual block with a depthwise conv and
squeeze-excitation, a ViT with its class token and position embedding as nn.Parameters behind a
weights.Rule, a U-Net with a ConvTranspose2d, a skip concatenation, GroupNorm and InstanceNorm, a
GRU seq2seq forecaster whose decoder runs an nn.GRU one step at a time with attention), 26 slips
and four correct ports written otherwise (folded BatchNorm with shifted-slice depthwise convs,
jax.nn.dot_product_attention, flax.linen layers applied functionally, linen.GRUCell unrolled).

Set 4 (benchmarks/_untapped_models4.py, `--set 4`) is held out like set 3, written later and
without reading how the tool localises: four more families (a WaveNet-style stack of causal
dilated Conv1d subclasses with gated activations and residual + skip sums, a decoder layer with
causal self-attention and key-padded cross-attention through nn.MultiheadAttention, nn.RMSNorm
and a SwiGLU MLP, an MLP-Mixer whose token and channel counts are equal so that a mixing-axis
slip keeps every shape, a bidirectional GRU tagger ported with forward and reverse `lax.scan`s),
29 slips and four correct ports written otherwise (per-tap shifted einsums in NCW, a fused qkv
projection with heads under jax.vmap, a channels-first Mixer with jax.nn.standardize, both GRU
directions in one vmapped scan).

A slip that only the gradient shows (set 2's padding_idx row) is localised by the diagnosis's
"the gradient of 'embed.weight' differs first": its module ("embed") counts as localised-as.

    python benchmarks/untapped_localisation.py                      # every case (minutes)
    python benchmarks/untapped_localisation.py --cases 'mlp/*'      # fnmatch on model/case
    python benchmarks/untapped_localisation.py --cases '*/correct' --checks forward,grad
    python benchmarks/untapped_localisation.py --examples 10 --seed 1 --json untapped.json
    python benchmarks/untapped_localisation.py --set 2 --cases 'lstm/*'
    python benchmarks/untapped_localisation.py --set 3 --cases 'vit/*'
    python benchmarks/untapped_localisation.py --set 4 --cases 'mixer/*'
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

FIRST = re.compile(r"first diverging layer: (?:at or before )?([^\s(]+)")
GRADIENT = re.compile(r"the gradient of '([^']+)' differs first")


def localised_as(rec: Any) -> str:
    """The module the record localises the failure to ("" for none)."""
    rows = (rec.extra or {}).get("layers", []) or []
    first = [r for r in rows if isinstance(r, dict) and r.get("first")]
    if first:
        return str(first[0].get("layer", ""))
    m = FIRST.search(rec.diagnosis or "")
    if m:
        return m.group(1)
    m = GRADIENT.search(rec.diagnosis or "")  # every module's output agrees; a parameter's gradient does not
    return m.group(1).rsplit(".", 1)[0] if m else ""


def all_cases(which: str) -> list[tuple[str, Any]]:
    """(set, case) of the chosen set(s): "1", "2", "3", "4" or "all"."""
    out: list[tuple[str, Any]] = []
    if which in ("1", "all"):
        from _untapped_models import cases as cases1

        out += [("1", c) for c in cases1()]
    if which in ("2", "all"):
        from _untapped_models2 import cases as cases2

        out += [("2", c) for c in cases2()]
    if which in ("3", "all"):
        from _untapped_models3 import cases as cases3

        out += [("3", c) for c in cases3()]
    if which in ("4", "all"):
        from _untapped_models4 import cases as cases4

        out += [("4", c) for c in cases4()]
    return out


def totals(rows: list[dict[str, Any]], label: str = "") -> None:
    planted = [r for r in rows if r["planted"]]
    correct = [r for r in rows if not r["planted"]]
    n = len(planted)
    detected = sum(r["outcome"] == "failed" for r in planted)
    localised = sum(r["right"] for r in planted)
    pre = f"{label}: " if label else ""
    print(f"{pre}detected        {detected}/{n} planted checks" + (f" ({100 * detected / n:.0f}%)" if n else ""))
    print(f"{pre}localised       {localised}/{n} planted checks" + (f" ({100 * localised / n:.0f}%)" if n else ""))
    print(f"{pre}correct flagged {sum(r['outcome'] != 'passed' for r in correct)}/{len(correct)} checks of correct "
          "ports")
    print(f"{pre}errors          {sum(r['outcome'] == 'error' for r in rows)}/{len(rows)} checks")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="*", help="fnmatch pattern(s) on 'model/case', comma-separated "
                                                  "(e.g. 'mlp/*', '*/correct', 'gru/gru_*')")
    ap.add_argument("--examples", type=int, default=3, help="examples per check")
    ap.add_argument("--seed", type=int, default=20261126)
    ap.add_argument("--shrink-seconds", type=float, default=5.0)
    ap.add_argument("--checks", default=None,
                    help="comma-separated checks for every case (default: forward, plus grad for the correct "
                         "ports and a few slips)")
    ap.add_argument("--json", default=None, help="also write every case's result here")
    ap.add_argument("--set", default="all", choices=("1", "2", "3", "4", "all"),
                    help="which set of cases: 1 (_untapped_models), 2 (_untapped_models2), 3 (_untapped_models3, "
                         "held out), 4 (_untapped_models4, held out) or all (default)")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    args = ap.parse_args(argv)

    from equivcheck.engine import RunSettings

    patterns = [p.strip() for p in args.cases.split(",") if p.strip()]
    every = all_cases(args.set)
    chosen = [(s, c) for s, c in every if any(fnmatch.fnmatchcase(c.id, p) for p in patterns)]
    set_of = {id(c): s for s, c in chosen}
    chosen_cases = [c for _, c in chosen]
    if args.list:
        for s, c in every:
            print(f"{s} {c.model:<9} {c.name:<26} {c.expected or '-':<15} {c.dtype:<8} {','.join(c.checks):<13} "
                  f"{c.what}")
        return 0
    if not chosen:
        print(f"no case matches {args.cases!r} (--list shows them)")
        return 0
    run = RunSettings(examples=args.examples, seed=args.seed, shrink_seconds=args.shrink_seconds)
    only = tuple(c.strip() for c in args.checks.split(",")) if args.checks else None

    rows, results = [], []
    start = time.perf_counter()
    chosen = chosen_cases
    for i, case in enumerate(chosen):
        for check in only or case.checks:
            t0 = time.perf_counter()
            row = {"set": set_of[id(case)], "model": case.model, "case": case.name, "check": check,
                   "dtype": case.dtype,
                   "expected": case.expected, "planted": bool(case.expected)}
            try:
                (rec,) = case.pair.replace(checks=(check,)).run_checks(dtype=case.dtype, run=run)
                row.update(outcome=rec.outcome, side=rec.side, localised=localised_as(rec),
                           diagnosis=rec.diagnosis or "", message=(rec.message or "").split("\n")[0],
                           layers=len((rec.extra or {}).get("layers", []) or []),
                           layer_rows=[r for r in (rec.extra or {}).get("layers", []) or [] if isinstance(r, dict)],
                           unmatched=[str(r.get("layer")) for r in (rec.extra or {}).get("layers", []) or []
                                      if isinstance(r, dict) and r.get("ok") is False])
            except Exception as exc:  # noqa: BLE001 - a crash is a finding of this benchmark, not the end of it
                row.update(outcome="error", side=None, localised="", diagnosis="", unmatched=[],
                           message=f"{type(exc).__name__}: {exc}")
            row["seconds"] = round(time.perf_counter() - t0, 1)
            if row["planted"]:
                row["right"] = row["outcome"] == "failed" and row["localised"] == case.expected
            else:
                row["right"] = row["outcome"] == "passed"
            rows.append(row)
            results.append(row)
        print(f"[{i + 1}/{len(chosen)}] {case.id} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)

    print(f"equivcheck untapped localisation: {len(chosen)} cases, {len(rows)} checks, {args.examples} examples each, "
          f"seed {args.seed}")
    head = (f"{'set':<3} {'model':<9} {'case':<26} {'check':<7} {'dtype':<7} {'expected':<15} {'outcome':<7} "
            f"{'localised-as':<15} correct?")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['set']:<3} {r['model']:<9} {r['case']:<26} {r['check']:<7} {r['dtype']:<7} "
              f"{r['expected'] or '-':<15} "
              f"{r['outcome']:<7} {r['localised'] or '-':<15} {'yes' if r['right'] else 'NO'}")
    for r in rows:
        if r["outcome"] == "error" or (not r["planted"] and r["outcome"] != "passed"):
            print(f"  {r['model']}/{r['case']} {r['check']}: {r['message'][:300]}"
                  + (f"\n    diagnosis: {r['diagnosis'][:300]}" if r["diagnosis"] else ""))
    for r in rows:
        if r["planted"] and not r["right"] and r["outcome"] != "error":
            print(f"  {r['model']}/{r['case']} {r['check']} (expected {r['expected']}, localised-as "
                  f"{r['localised'] or '-'}): {r['message'][:200]}"
                  + (f"\n    diagnosis: {r['diagnosis'][:600]}" if r["diagnosis"] else ""))
    quiet = [r for r in rows if not r["planted"] and r["outcome"] == "passed" and r.get("unmatched")]
    if quiet:  # not a false alarm (the check passed): the modules a later divergence could be blamed on
        print("correct ports whose layer table leaves modules unmatched (their outputs not found among the port's "
              "values; no verdict, the check passed):")
        for r in quiet:
            print(f"  {r['model']}/{r['case']} {r['check']}: {', '.join(r['unmatched'])}")
    sets = sorted({r["set"] for r in rows})
    if len(sets) > 1:
        for s in sets:
            totals([r for r in rows if r["set"] == s], f"set {s}")
    totals(rows, "all" if len(sets) > 1 else "")
    print(f"{time.perf_counter() - start:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
