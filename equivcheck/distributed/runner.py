"""Run a DistributedPair's checks under Hypothesis on the session's pool; file CheckRecords.

Per check: the pool for (N, device) is taken (started on first use: "start"), each program shape of
the check's palette is run once ("compile": XLA compiles the JAX programs, torch builds DDP's
buckets), then Hypothesis draws examples ("checks"). The three times go into the record's `extra`
and a note. A worker that fails ends the search at once (nothing is shrunk: the pool is gone) and
fails the check naming the rank and the cause.
"""
from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from equivcheck.distributed import batchnorm, results, uneven
from equivcheck.distributed import reference as ref
from equivcheck.distributed.common import (
    NO_REFERENCE,
    Failed,
    Outcome,
    custom_model,
    from_flax,
    judge,
    mlp_example,
    reference_function,
    to_flax,
    tolerance_for,
    worst,
)
from equivcheck.distributed.pool import WorkerFailure, pool_for
from equivcheck.distributed.reference import FSDP_MLP
from equivcheck.distributed.results import BadResult
from equivcheck.engine.compare import compare, format_args
from equivcheck.engine.dtypes import np_dtype
from equivcheck.engine.records import CheckRecord, RunSettings
from equivcheck.engine.search import Search
from equivcheck.engine.tolerance import Tolerance

LRS = (0.05, 0.1, 0.5)


def unavailable(pair: Any, device: str) -> str:
    """Why `pair` cannot run on `device` here ("" if it can): a GPU run needs N GPUs on both sides."""
    if device == "cpu":
        return ""
    import torch

    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if have < pair.world:
        return f"{pair.name} needs {pair.world} GPUs for NCCL ranks; torch sees {have}"
    return ""


def unimportable(pair: Any) -> tuple[str, str] | None:
    """(side, why) for a torch_job / jax_job whose module no process here can import (the workers share
    this process's sys.path), else None. Only the module is looked up (importlib.util.find_spec, nothing
    imported: a job module may import torch or JAX at its top, which the workers do, not the parent)."""
    for side in ("torch", "jax"):
        job = getattr(pair, f"{side}_job")
        if not job:
            continue
        module = job.partition(":")[0]
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a missing parent package raises rather than answering None
            found = False
        if not found:
            return side, (f"the {side} job {job}: no module {module!r} can be imported here (the workers share "
                          "this process's sys.path); nothing was run")
    return None


# ---- collectives ------------------------------------------------------------------------------

def _collective_palette(pair: Any, dtype: str, run: RunSettings) -> list[tuple[int, ...]]:
    rng = np.random.default_rng(run.shape_seed(pair.name, dtype, run.device))
    return [(pair.world * int(rng.integers(1, 3)), *map(int, rng.integers(1, 4, int(rng.integers(0, 3)))))
            for _ in range(2)]


def _collective_strategy(pair: Any, dtype: str, run: RunSettings) -> st.SearchStrategy:
    width = 32 if dtype == "float32" else 64
    elements = st.floats(-8, 8, width=width, allow_subnormal=False)
    roots = st.integers(0, pair.world - 1) if pair.job == "broadcast" else st.just(0)
    return st.tuples(st.sampled_from(_collective_palette(pair, dtype, run)), roots).flatmap(
        lambda sr: st.tuples(st.lists(hnp.arrays(np_dtype(dtype), sr[0], elements=elements), min_size=pair.world,
                                      max_size=pair.world), st.just(sr[1])))


def _collective(pair: Any, pool: Any, xs: list[np.ndarray], root: int, seconds: float) -> tuple[Any, Any]:
    t = pool.torch(pair.torch_job or "collective", [{"op": pair.job, "x": x, "root": root} for x in xs], seconds)
    j = pool.jax(pair.jax_job or "collective", {"op": pair.job, "x": np.stack(xs), "root": root}, seconds,
                 world=pair.world)
    # each rank's result checked against the shape of the float64 result and the dtype asked
    want, dtype = [w.shape for w in ref.collective(pair.job, xs, root)], str(xs[0].dtype)
    t = [results.array(f"the torch job {pair.torch_job or 'collective'} (rank {r})", "its result", got, want[r], dtype)
         for r, got in enumerate(t)]
    who = f"the jax job {pair.jax_job or 'collective'}"
    if len(set(want)) == 1:  # one shape for every rank: the job answers a stacked (N, ...) array
        j = results.array(who, "its result", j, (pair.world, *want[0]), dtype)
    elif not isinstance(j, (list, tuple)) or len(j) != pair.world:
        raise BadResult("jax", "structure", f"{who} returned {type(j).__name__}, expected {pair.world} per-rank arrays")
    return t, [results.array(who, f"rank {r}'s result", got, want[r], dtype) for r, got in enumerate(j)]


def _collective_example(pair: Any, pool: Any, example: Any, tol: Tolerance, seconds: float) -> Outcome:
    xs, root = example
    t, j = _collective(pair, pool, xs, root, seconds)
    name = lambda rs: {f"rank {r}": a for r, a in enumerate(rs)}
    out = judge(name(t), name(j), name(ref.collective(pair.job, xs, root)), tol,
                f"{pair.job} over {pair.world} ranks" + (f" from root {root}" if pair.job == "broadcast" else ""),
                lambda side, got: "")
    out.inputs = format_args(xs) + (f"; root {root}" if pair.job == "broadcast" else "")
    return out


# ---- data-parallel MLP ------------------------------------------------------------------------

def _mlp_rows(pair: Any, dtype: str, run: RunSettings) -> int:
    return pair.rows[run.shape_seed(pair.name, dtype, run.device) % len(pair.rows)]


def _mlp_sides(pair: Any, pool: Any, params: Any, x: Any, y: Any, lr: float, steps: int, seconds: float) -> Any:
    """Both sides' results, checked (equivcheck.distributed.results) and in torch's layout: (a list of
    each rank's {"grads", "params"}, JAX's {"grads", "params"}). Raises BadResult or WorkerFailure."""
    kw = {"params": params, "x": x, "y": y, "lr": lr, "steps": steps, "accumulate": pair.accumulate}
    builtin = "fsdp" if pair.job == FSDP_MLP else "ddp"
    shapes, dtype = {k: v.shape for k, v in params.items()}, str(x.dtype)
    t = pool.torch(pair.torch_job or builtin, [{**kw, "slips": pair.torch_slips}] * pair.world, seconds)
    t = [results.mlp(f"the torch job {pair.torch_job or builtin} (rank {r})", got, shapes, dtype, steps, flax=False)
         for r, got in enumerate(t)]
    j = pool.jax(pair.jax_job or builtin, {**kw, "params": to_flax(params), "slips": pair.jax_slips}, seconds,
                 world=pair.world)
    return t, results.mlp(f"the jax job {pair.jax_job or builtin}", j, shapes, dtype, steps, flax=True)


def _reference(pair: Any, params: Any, x: Any, y: Any, lr: float, steps: int) -> dict[str, Any] | None:
    """The float64 {"grads", "params": [after each step]} that names the side that is off, in torch's layout:
    the built-in MLP's for the built-in jobs, `pair.reference_job`'s for a custom one, None for a custom job
    without one (the built-in MLP's numbers say nothing of another model: the sides are then compared
    with each other only). Raises BadResult where the reference job returns something malformed."""
    if not custom_model(pair):
        return {"grads": ref.grads(params, x, y), "params": ref.sgd(params, x, y, lr, steps)}
    if not pair.reference_job:
        return None
    wide = {k: np.asarray(v, np.float64) for k, v in params.items()}
    name = pair.reference_job if isinstance(pair.reference_job, str) else getattr(pair.reference_job, "__name__", "")
    try:
        got = reference_function(pair)(params=wide, x=np.asarray(x, np.float64), y=np.asarray(y, np.float64), lr=lr,
                                       steps=steps)
    except Exception as exc:  # noqa: BLE001 - the user's reference failing is a failed check naming it, not a crash
        raise BadResult("reference", "error", f"the reference job {name} raised {type(exc).__name__}: {exc}") from None
    return results.mlp(f"the reference job {name}", got, {k: v.shape for k, v in params.items()}, "float64", steps,
                       flax=False)


def _listed(x: Any) -> list[Any]:
    return x if isinstance(x, list) else [x]


def _ranks_agree(t: list[dict[str, Any]], key: str, tol: Tolerance) -> Outcome | None:
    for r, other in enumerate(t[1:], start=1):
        for k, (a, b) in enumerate(zip(_listed(t[0][key]), _listed(other[key]))):
            v = compare(a, b, tol)
            if not v.ok:
                return Outcome(False, v.ratio, f"torch ranks disagree after the gradients' reduction ({key}, item {k}): "
                               f"{worst(v, 'rank 0', f'rank {r}')}", "torch",
                               f"rank {r} holds other {key} than rank 0: replicas drifted apart (the gradients "
                               "were not all-reduced: DDP's no_sync around every micro-batch, or no reduction)",
                               verdict=v)
    return None


def _mlp_example(pair: Any, check: str, pool: Any, example: Any, dtype: str, run: RunSettings, seconds: float) -> Outcome:
    seed, lr = example
    rows = _mlp_rows(pair, dtype, run)
    params, x, y = mlp_example(pair, dtype, seed, rows)
    steps = pair.steps if check == "train" else 0
    t, j = _mlp_sides(pair, pool, params, x, y, lr, steps, seconds)
    want = _reference(pair, params, x, y, lr, steps)
    builtin = not custom_model(pair)  # the slips below read the built-in MLP's gradients: no other model's
    grad_tol = tolerance_for(pair, dtype, run, "grads")
    n = pair.world
    out = _ranks_agree(t, "grads" if check == "grads" else "params", grad_tol)
    if out is None and check == "grads":
        slip = lambda side, got: ref.gradient_slip(side, got, params, x, y, n, grad_tol, pair.accumulate) \
            if builtin else ""
        out = judge(t[0]["grads"], j["grads"], want and want["grads"], grad_tol,
                    f"gradients over {n} replicas", slip)
    elif out is None:
        trail = want["params"] if want else [None] * steps
        tol_at = lambda k: tolerance_for(pair, dtype, run, "train").scaled(k, f"after {k} steps")
        found = ref.first_divergence(list(zip(t[0]["params"], j["params"], trail)), tol_at)
        if found is None:
            out = Outcome(True, max(compare(a, b, tol_at(k + 1)).ratio
                                    for k, (a, b) in enumerate(zip(t[0]["params"], j["params"]))))
        else:
            k, _ = found
            first = {"torch": t[0], "jax": j}

            def slip(side: str, got: Any) -> str:  # read from the first step; later ones compound it
                if k > 1 or not builtin:
                    return ""
                return ref.update_slip(side, first[side]["params"][0], params, first[side]["grads"], lr, params, x, y,
                                       n, tol_at(1), grad_tol, pair.accumulate)
            out = judge(t[0]["params"][k - 1], j["params"][k - 1], trail[k - 1], tol_at(k),
                        f"parameters after step {k} of {steps} (the first step that diverges; lr {lr:g})", slip)
    if out.ok and check == "train" and pair.job == FSDP_MLP:
        trip = _round_trip(t[0]["params"][-1])
        out = out if trip.ok else trip
    out.inputs = (f"MLP {pair.sizes} from seed {seed}, global batch of {x.shape[0]} ({rows} rows per rank), lr {lr:g}: "
                  + format_args([x, y]))
    return out


def _round_trip(state: dict[str, np.ndarray]) -> Outcome:
    """The state dict gathered from FSDP, converted to the JAX tree (equivcheck.weights) and back: bit for bit."""
    back = from_flax(to_flax(state))
    bad = [k for k in state if back.get(k) is None or back[k].shape != state[k].shape
           or not np.array_equal(back[k], state[k])]
    if bad:
        return Outcome(False, float("inf"), f"the state dict gathered from FSDP does not survive torch -> JAX -> torch "
                       f"conversion: {', '.join(bad)} differ", "torch", "equivcheck.weights' linear rules")
    return Outcome(True)


# ---- the search and its records -------------------------------------------------------------

def _strategy(pair: Any, check: str, dtype: str, run: RunSettings) -> st.SearchStrategy:
    if check == "collective":
        return _collective_strategy(pair, dtype, run)
    if check == "epoch":
        return uneven.strategy(pair)
    if check in ("bn", "bn_port"):
        return batchnorm.strategy()
    return st.tuples(st.integers(0, 2**32 - 1), st.sampled_from(LRS))


def _warm(pair: Any, check: str, pool: Any, dtype: str, run: RunSettings, seconds: float) -> None:
    """Run each program shape of the check once: the compilations, outside the checks' time."""
    if check == "collective":
        roots = range(pair.world) if pair.job == "broadcast" else (0,)
        for shape in _collective_palette(pair, dtype, run):
            for root in roots:
                _collective(pair, pool, [np.zeros(shape, np_dtype(dtype))] * pair.world, root, seconds)
    elif check == "epoch":
        uneven.warm(pair, pool, dtype, _mlp_rows(pair, dtype, run), seconds)
    elif check in ("bn", "bn_port"):
        batchnorm.warm(pair, check, pool, dtype, _mlp_rows(pair, dtype, run), seconds)
    else:
        params, x, y = mlp_example(pair, dtype, 0, _mlp_rows(pair, dtype, run))
        _mlp_sides(pair, pool, params, x, y, LRS[0], pair.steps if check == "train" else 0, seconds)


def _example(pair: Any, check: str, pool: Any, example: Any, dtype: str, run: RunSettings, tol: Tolerance,
             seconds: float) -> Outcome:
    if check == "collective":
        return _collective_example(pair, pool, example, tol, seconds)
    if check == "epoch":
        return uneven.example(pair, pool, example, dtype, run, _mlp_rows(pair, dtype, run), seconds)
    if check in ("bn", "bn_port"):
        return batchnorm.example(pair, check, pool, example, dtype, run, _mlp_rows(pair, dtype, run), seconds)
    return _mlp_example(pair, check, pool, example, dtype, run, seconds)


def _search(pair: Any, check: str, pool: Any, dtype: str, run: RunSettings, tol: Tolerance, seconds: float,
            expected: bool) -> tuple[list[Outcome], Outcome | None, WorkerFailure | BadResult | None]:
    seen: list[Outcome] = []
    broken: list[WorkerFailure | BadResult] = []  # either ends the search: nothing to shrink in a malformed result

    def test(example: Any) -> None:
        if broken:  # the pool is gone: the remaining examples are no-ops, nothing to shrink
            return
        try:
            out = _example(pair, check, pool, example, dtype, run, tol, seconds)
        except (WorkerFailure, BadResult) as exc:
            broken.append(exc)
            return
        if not out.ok:
            raise Failed(out)
        seen.append(out)

    search = Search(run, Failed)
    failed = search(test, _strategy(pair, check, dtype, run), digest=f"distributed:{pair.name}:{check}:{dtype}",
                    seed=run.item_seed(pair.name, check, dtype, run.device), shrink=not expected)
    return seen, (failed.outcome if failed is not None else None), (broken[0] if broken else None)


def run_distributed_pair(pair: Any, *, dtype: str, run: RunSettings,
                         known: Callable[[str], tuple[str, str] | None] = lambda _id: None, nodeid: str = "",
                         replay: str = "") -> list[CheckRecord]:
    """Every check of `pair` at `dtype` on `run.device`: one CheckRecord each, never raising for a
    disagreement or a failed worker (both are failed records)."""
    def record(check: str, outcome: str, **fields: Any) -> CheckRecord:
        return CheckRecord(pair.name, check, dtype, run.device, run.precision, outcome, nodeid=nodeid, replay=replay,
                           tags=sorted(pair.tags), family="distributed", **fields)

    why = unavailable(pair, run.device)
    if why:
        return [record(c, "skipped", message=why) for c in pair.checks]
    seconds = pair.seconds if not run.timeout else min(pair.seconds, run.timeout)
    missing = unimportable(pair)
    if missing:  # found here, before a pool is started (or a running one torn down) for a job that cannot run
        side, why = missing
        return [record(c, "failed", kind="error", side=side, message=why, worst_ratio=float("inf"))
                for c in pair.checks]
    records = []
    for check in pair.checks:
        if batchnorm.skip_reason(pair, check, run.device):
            records.append(record(check, "skipped", message=batchnorm.skip_reason(pair, check, run.device)))
            continue
        began = time.perf_counter()
        tol = tolerance_for(pair, dtype, run, "grads" if check in ("epoch", "bn", "bn_port") else check)
        hit = known(f"{pair.name}::{check}::{dtype}::{run.device}")
        times = {"world": pair.world, "start_seconds": 0.0, "compile_seconds": 0.0, "check_seconds": 0.0}
        try:
            pool = pool_for(pair.world, run.device)
            times["start_seconds"] = time.perf_counter() - began  # waiting for a pool that prepare() started
            if not pool.reported:  # the pool's own start-up, once, in the first record that uses it
                pool.reported, times["pool_start_seconds"] = True, pool.timings["start_seconds"]
            _warm(pair, check, pool, dtype, run, seconds)
            times["compile_seconds"] = time.perf_counter() - began - times["start_seconds"]
            seen, failed, broken = _search(pair, check, pool, dtype, run, tol, seconds, hit is not None)
        except (WorkerFailure, BadResult) as exc:
            seen, failed, broken = [], None, exc
        times["check_seconds"] = time.perf_counter() - began - times["start_seconds"] - times["compile_seconds"]
        grow = "; x n after n steps" if check == "train" else ""
        rec = record(check, "passed", examples=len(seen) + (failed is not None), extra=times,
                     tolerance={"rtol": tol.rtol, "atol": tol.atol, "reason": tol.reason + grow},
                     worst_ratio=max((o.ratio for o in seen), default=0.0),
                     notes=[(f"{pair.world} ranks on {run.device}: waited {times['start_seconds']:.2f} s for the pool"
                             + (f" (its start-up took {times['pool_start_seconds']:.2f} s)"
                                if "pool_start_seconds" in times else "")
                             + f", compile {times['compile_seconds']:.2f} s, checks {times['check_seconds']:.2f} s")])
        if pair.torch_slips or pair.jax_slips:
            rec.notes.append(f"planted slips: torch {pair.torch_slips or '-'}, jax {pair.jax_slips or '-'}")
        if pair.torch_job or pair.jax_job:
            rec.notes.append(f"jobs: torch {pair.torch_job or 'built in'}, jax {pair.jax_job or 'built in'}"
                             + (f"; {NO_REFERENCE}" if custom_model(pair) and not pair.reference_job else ""))
        if isinstance(broken, BadResult):  # the job answered, wrongly: the pool is still whole
            rec.outcome, rec.kind, rec.worst_ratio = "failed", broken.kind, float("inf")
            rec.side, rec.message = (broken.side if broken.side != "reference" else None), broken.message
        elif broken is not None:
            rec.outcome, rec.kind, rec.side = "failed", "error", broken.side
            rec.message, rec.worst_ratio = f"{broken.who}: {broken.cause}", float("inf")
            rec.notes.append("the pool was torn down; the next check starts a fresh one")
        elif failed is not None:
            v = failed.verdict
            rec.kind, rec.side, rec.message = (v.kind if v else "values"), failed.side, failed.message
            rec.diagnosis, rec.inputs, rec.worst_ratio = failed.diagnosis, failed.inputs, failed.ratio
        if broken is None:  # a known divergence covers values that differ, never a worker that failed
            rec.settle_known(failed is not None, hit, failed.verdict.worst if failed and failed.verdict else None)
        rec.seconds = time.perf_counter() - began
        records.append(rec)
    return records


__all__ = ["from_flax", "judge", "mlp_example", "run_distributed_pair", "to_flax", "unavailable"]
