"""Batches and their order: torch's DataLoader against Grain and a plain NumPy iterator.

A migrated training job only matches if every step sees the same batch. `compare_epochs`
takes both pipelines' batches, epoch by epoch, and names the first epoch, batch, field and
row where they part, with the likely cause (drop_last, a different shuffle, an epoch
boundary, a transform). `DataCheck` (equivcheck.data.check) runs such a comparison under
Hypothesis as a check kind of its own, like `Pair` for an operation.

Seeded shuffles never match across frameworks: torch's RandomSampler permutes with
torch.randperm on a torch.Generator (and DataLoader first draws a worker base seed from the
same generator, every epoch), Grain with its own index shuffle keyed by seed and epoch. The
adapter is an explicit order per epoch: draw it once (`explicit_orders`, or the order either
framework would have used: `torch_shuffle_orders`, `grain_shuffle_orders`, `sampler_orders`)
and give it to both sides (`EpochOrderSampler` for torch, `grain_epochs`/`grain_loader_epochs`).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from equivcheck.engine import tolerance as tolerance_table
from equivcheck.engine.compare import _structure_diff, flatten
from equivcheck.engine.tolerance import Tolerance

Batch = Any  # a pytree of arrays with a leading batch axis
Epochs = list[list[Batch]]


# --------------------------------------------------------------------------- orders


def explicit_orders(n: int, epochs: int, seed: int) -> list[np.ndarray]:
    """One permutation of range(n) per epoch, from NumPy: the shared order both sides replay."""
    rng = np.random.default_rng(seed)
    return [rng.permutation(n) for _ in range(epochs)]


def torch_shuffle_orders(n: int, seed: int, epochs: int) -> list[np.ndarray]:
    """The orders of DataLoader(shuffle=True, generator=torch.Generator().manual_seed(seed)),
    num_workers=0, each epoch run to its end. Per epoch the generator gives, in turn: the
    loader's int64 base seed, RandomSampler's torch.randperm(n), and a second randperm that
    RandomSampler draws for its (empty) remainder once exhausted. So a RandomSampler iterated
    on its own gives other orders, and an epoch cut short shifts every later one."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(epochs):
        torch.empty((), dtype=torch.int64).random_(generator=g)
        out.append(torch.randperm(n, generator=g).numpy())
        torch.randperm(n, generator=g)
    return out


def grain_shuffle_orders(n: int, seed: int, epochs: int) -> list[np.ndarray]:
    """The orders of Grain's MapDataset.shuffle(seed).repeat(epochs), and of
    IndexSampler(n, shuffle=True, seed=seed, num_epochs=epochs): reshuffled every epoch."""
    import grain

    flat = np.asarray(list(grain.MapDataset.range(n).shuffle(seed=seed).repeat(epochs)))
    return list(flat.reshape(epochs, n))


def sampler_orders(sampler: Iterable[int], epochs: int) -> list[np.ndarray]:
    """The indices a torch Sampler yields in each of `epochs` passes (iterate a twin of the
    sampler the loader uses: same class, same arguments, a generator seeded the same)."""
    return [np.asarray(list(iter(sampler)), dtype=np.int64) for _ in range(epochs)]


def EpochOrderSampler(orders: Sequence[Sequence[int]]) -> Any:  # noqa: N802 - a class factory
    """A torch Sampler that yields orders[0] on the first pass, orders[1] on the second..."""
    import torch.utils.data

    class _EpochOrderSampler(torch.utils.data.Sampler):
        def __init__(self) -> None:
            self.orders, self.epoch = [np.asarray(o, dtype=np.int64) for o in orders], 0

        def __iter__(self):
            if self.epoch >= len(self.orders):
                raise RuntimeError(f"EpochOrderSampler holds {len(self.orders)} epochs; a pass beyond them asked")
            order, self.epoch = self.orders[self.epoch], self.epoch + 1
            return iter(order.tolist())

        def __len__(self) -> int:
            return len(self.orders[min(self.epoch, len(self.orders) - 1)])

    return _EpochOrderSampler()


class ExplicitOrderSampler:
    """A Grain sampler (for grain.DataLoader) that reads records in the given order, then stops.
    Several orders are read back to back, as IndexSampler streams its epochs."""

    def __init__(self, orders: Sequence[Sequence[int]]) -> None:
        self.order = np.concatenate([np.asarray(o, dtype=np.int64) for o in orders]) if orders else np.zeros(0, int)

    def __getitem__(self, index: int) -> Any:
        from grain._src.python.record import RecordMetadata

        if not 0 <= index < len(self.order):
            raise IndexError(index)
        return RecordMetadata(index=index, record_key=int(self.order[index]))

    def __len__(self) -> int:
        return len(self.order)


# --------------------------------------------------------------------------- the JAX-side loaders


def stack(records: Sequence[Any]) -> Any:
    """Records -> one batch: dicts by key, tuples/lists by position, leaves np.stack'ed."""
    first = records[0]
    if isinstance(first, dict):
        return {k: stack([r[k] for r in records]) for k in first}
    if isinstance(first, (tuple, list)):
        return type(first)(stack([r[i] for r in records]) for i in range(len(first)))
    return np.stack([np.asarray(r) for r in records])


def numpy_epochs(source: Any, orders: Sequence[Sequence[int]], batch_size: int, drop_last: bool) -> Epochs:
    """A plain NumPy iterator: each epoch's order cut into batches, the remainder kept or dropped."""
    out = []
    for order in orders:
        stop = len(order) - len(order) % batch_size if drop_last else len(order)
        out.append([stack([source[int(i)] for i in order[k:k + batch_size]]) for k in range(0, stop, batch_size)])
    return out


def grain_epochs(source: Any, orders: Sequence[Sequence[int]], batch_size: int, drop_remainder: bool,
                 transform: Callable[[Any], Any] | None = None) -> Epochs:
    """Grain's MapDataset, one pipeline per epoch over that epoch's order (so no batch spans two
    epochs), records mapped through `transform`."""
    import grain

    out = []
    for order in orders:
        ds = grain.MapDataset.source(np.asarray(order)).map(lambda i: source[int(i)])
        if transform is not None:
            ds = ds.map(transform)
        out.append(list(ds.batch(batch_size, drop_remainder=drop_remainder)))
    return out


def grain_loader_epochs(source: Any, orders: Sequence[Sequence[int]], batch_size: int, drop_remainder: bool,
                        per_epoch: bool = True) -> Epochs:
    """grain.DataLoader with an explicit-order sampler and a Batch operation, one loader per epoch.
    per_epoch=False streams all epochs through one loader, as IndexSampler(num_epochs=E) does, and
    cuts the stream after each epoch's number of steps: a batch can then hold the end of one
    epoch and the start of the next."""
    import grain

    def load(chunk):
        loader = grain.DataLoader(data_source=source, sampler=ExplicitOrderSampler(chunk), worker_count=0,
                                  shard_options=grain.sharding.NoSharding(),
                                  operations=[grain.transforms.Batch(batch_size, drop_remainder=drop_remainder)])
        return list(loader)

    if per_epoch:
        return [load([o]) for o in orders]
    # One stream, cut into epochs by a training loop's steps per epoch.
    stream, out = load(orders), []
    for order in orders:
        steps = len(order) // batch_size + (0 if drop_remainder or len(order) % batch_size == 0 else 1)
        out.append(stream[:steps])
        stream = stream[steps:]
    out[-1] += stream
    return out


def torch_epochs(loader: Iterable[Any], epochs: int) -> Epochs:
    """`epochs` passes over a torch DataLoader, batches as NumPy trees."""
    return [[to_numpy(b) for b in loader] for _ in range(epochs)]


def to_numpy(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: to_numpy(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [to_numpy(v) for v in tree]
    if hasattr(tree, "detach"):  # a torch tensor
        from equivcheck.backends.torch import to_numpy as t2n

        return t2n(tree)
    return np.asarray(tree)


# --------------------------------------------------------------------------- the checker


@dataclasses.dataclass
class DataVerdict:
    """How two pipelines' batches compare; on a difference, where first and why."""

    ok: bool
    kind: str = "match"  # match | epochs | batches | structure | order | records | dtype | shape | values
    message: str = ""
    epoch: int | None = None
    batch: int | None = None
    path: str | None = None
    side: str | None = None
    batches: int = 0  # batches compared
    worst: float = 0.0  # largest |torch - jax| among floating leaves that matched


def _rows(batch: Batch) -> int:
    leaves = flatten(batch)
    return int(np.shape(leaves[0][1])[0]) if leaves and np.ndim(leaves[0][1]) else 0


def _leaf(batch: Batch, path: str | None) -> np.ndarray | None:
    for p, leaf in flatten(batch):
        if p == path:
            return np.asarray(leaf)
    return None


def _drop_last(sizes_t: list[int], sizes_j: list[int], e: int) -> str | None:
    for long, short, keeps, drops in ((sizes_j, sizes_t, "jax", "torch"), (sizes_t, sizes_j, "torch", "jax")):
        if len(long) == len(short) + 1 and long[:-1] == short and (not short or long[-1] < short[0]):
            return (f"epoch {e}: {keeps} keeps the last, partial batch of {long[-1]} records, {drops} drops it: "
                    f"drop_last (torch) / drop_remainder (Grain) differ; {drops} has {len(short)} batches, "
                    f"{keeps} {len(long)}")
    return None


def compare_epochs(torch_epochs: Epochs, jax_epochs: Epochs, *, index: str | None = "index",
                   tol: Tolerance | None = None) -> DataVerdict:
    """Compare two pipelines' batches epoch by epoch and name the first difference.

    `index` is the record field holding each record's position in the data set (out['index']
    in a dict record): with it an order difference is told apart from a content difference.
    Integer and bool leaves must be equal; floating leaves agree within `tol` (default: the
    tolerance table's row for the leaf's dtype).
    """
    key = f"out[{index!r}]" if index else None
    if len(torch_epochs) != len(jax_epochs):
        return DataVerdict(False, "epochs", f"torch gives {len(torch_epochs)} epochs, jax {len(jax_epochs)}")
    compared, worst = 0, 0.0
    for e, (te, je) in enumerate(zip(torch_epochs, jax_epochs)):
        sizes_t, sizes_j = [_rows(b) for b in te], [_rows(b) for b in je]
        if sizes_t != sizes_j:
            why = _drop_last(sizes_t, sizes_j, e)
            if why:
                side = "jax" if len(sizes_j) > len(sizes_t) else "torch"
                return DataVerdict(False, "batches", why, epoch=e, side=side)
            hint = ("the same records in other batch sizes" if sum(sizes_t) == sum(sizes_j) else
                    "different numbers of records: epoch boundaries differ (one stream over several epochs "
                    "batches across their boundary, e.g. grain.DataLoader with IndexSampler(num_epochs > 1))")
            return DataVerdict(False, "batches", f"epoch {e}: batch sizes differ: torch {sizes_t}, jax {sizes_j}: {hint}",
                               epoch=e)
        idx_t = np.concatenate([_leaf(b, key) for b in te]) if key and te and _leaf(te[0], key) is not None else None
        idx_j = np.concatenate([_leaf(b, key) for b in je]) if key and je and _leaf(je[0], key) is not None else None
        for b, (tb, jb) in enumerate(zip(te, je)):
            where = f"epoch {e}, batch {b}"
            d = _structure_diff(tb, jb)
            if d:
                return DataVerdict(False, "structure", f"{where}: batch structure differs at {d}", e, b)
            if idx_t is not None and idx_j is not None:
                verdict = _order(idx_t, idx_j, tb, jb, key, e, b, sizes_t)
                if verdict is not None:
                    return verdict
            for (path, t), (_, j) in zip(flatten(tb), flatten(jb)):
                bad, gap = _leaf_diff(np.asarray(t), np.asarray(j), tol)
                if bad:
                    return DataVerdict(False, bad[0], f"{where}, {path}: {bad[1]}", e, b, path)
                worst = max(worst, gap)
            compared += 1
    return DataVerdict(True, batches=compared, worst=worst)


def _order(idx_t: np.ndarray, idx_j: np.ndarray, tb: Batch, jb: Batch, key: str, e: int, b: int,
           sizes: list[int]) -> DataVerdict | None:
    it, ij = _leaf(tb, key), _leaf(jb, key)
    if np.array_equal(it, ij):
        return None
    row = int(np.flatnonzero(it != ij)[0])
    pos = sum(sizes[:b]) + row
    same = np.array_equal(np.sort(idx_t), np.sort(idx_j))
    lead = (f"epoch {e}, batch {b}, row {row} (position {pos} of the epoch): torch reads record {it[row]}, "
            f"jax record {ij[row]}")
    if same:
        return DataVerdict(False, "order", lead + ": both epochs hold the same records in another order: the "
                           "shuffles differ. Seeded shuffles of torch and Grain never agree; give both one explicit "
                           "order (equivcheck.data.explicit_orders + EpochOrderSampler / grain_epochs)", e, b, key)
    only_t = sorted(set(idx_t.tolist()) - set(idx_j.tolist()))[:5]
    only_j = sorted(set(idx_j.tolist()) - set(idx_t.tolist()))[:5]
    return DataVerdict(False, "records", lead + f": the epochs hold different records (only torch: {only_t}, "
                       f"only jax: {only_j}; repeated records: a sampler with replacement, or epochs that overlap)",
                       e, b, key)


def _leaf_diff(t: np.ndarray, j: np.ndarray, tol: Tolerance | None) -> tuple[tuple[str, str] | None, float]:
    if t.shape != j.shape:
        return ("shape", f"shape differs: torch {list(t.shape)}, jax {list(j.shape)}"), 0.0
    floats = t.dtype.kind == "f" or t.dtype.name == "bfloat16"
    if t.dtype != j.dtype and not (t.dtype.kind in "iu" and j.dtype.kind in "iu"):
        return ("dtype", f"dtype differs: torch {t.dtype}, jax {j.dtype}"), 0.0
    tw, jw = t.astype(np.float64), j.astype(np.float64)
    if not floats:
        bad = np.flatnonzero(tw.ravel() != jw.ravel())
        if bad.size:
            i = np.unravel_index(bad[0], t.shape)
            return ("values", f"{bad.size} of {t.size} values differ; first at row {i[0]}, index {list(map(int, i))}: "
                              f"torch {t[i]}, jax {j[i]}"), 0.0
        return None, 0.0
    tol = tol or tolerance_table.lookup(str(t.dtype))
    same_nan = np.isnan(tw) == np.isnan(jw)
    err = np.where(np.isnan(tw) & np.isnan(jw), 0.0, np.abs(tw - jw))
    mag = np.maximum(np.abs(tw), np.abs(jw))
    if getattr(tol, "per", "element") == "leaf":  # a norm-wise bound (the table's low-precision rows)
        mag = np.full_like(mag, np.nanmax(mag, initial=0.0))
    allowed = tol.atol + tol.rtol * mag
    bad = ~same_nan | (err > allowed)
    if bad.any():
        i = np.unravel_index(int(np.argmax(np.where(bad, err, -1))), t.shape)
        return ("values", f"{int(bad.sum())} of {t.size} values differ beyond {tol.describe()} ({tol.reason}); "
                          f"worst at row {i[0]}, index {list(map(int, i))}: torch {tw[i]:.9g}, jax {jw[i]:.9g}"), 0.0
    return None, float(err.max(initial=0.0))
