"""Time the built-in model checks and show their margins: forward+grad, the train check (20 steps, GRU 5),
the digits fit; per model and dtype, with the worst error over the allowed error (1 = at tolerance).

    python benchmarks/model_timings.py [--examples 30] [--seed 0]

Figures, not assertions: the CI box is shared and timings are noisy. A first call of each
check includes JAX's compilations (a persistent cache makes later runs faster).
"""
from __future__ import annotations

import argparse
import time

from equivcheck.engine.records import RunSettings
from equivcheck.models.zoo import cnn_pair, encoder_pair, gru_pair, lstm_pair, mlp_pair


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    run = RunSettings(examples=args.examples, seed=args.seed)
    import torch

    torch.set_num_threads(1)  # as the suites run (suites/conftest.py)
    rows = []
    pairs = [mlp_pair(), cnn_pair(), encoder_pair(), lstm_pair(), gru_pair(), gru_pair("gru_bi", 2, True),
             cnn_pair("cnn_digits", checks=("fit",))]
    for pair in pairs:
        groups = [("fit",)] if pair.checks == ("fit",) else [("forward", "grad"), ("train",), ("modes",)]
        for dtype in ("float32", "float64"):
            for checks in groups:
                start = time.perf_counter()
                recs = pair.replace(checks=checks).run_checks(dtype=dtype, run=run)
                seconds = time.perf_counter() - start
                worst = max(r.worst_ratio for r in recs)
                outcome = ",".join(sorted({r.outcome for r in recs}))
                rows.append((pair.name, dtype, "+".join(checks), f"{seconds:.1f}", f"{worst:.2g}", outcome,
                             str(sum(r.examples for r in recs) // len(recs))))
                print(*rows[-1], sep="\t", flush=True)
    print("\nmodel\tdtype\tchecks\tseconds\tworst error/allowed\toutcome\texamples per check")
    for row in rows:
        print(*row, sep="\t")


if __name__ == "__main__":
    main()
