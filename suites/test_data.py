"""Data pipelines: the batches a model sees, from PyTorch and from the JAX side.

Two tables, one generic test each:
- TRANSFORMS (suites/transform_pairs.py): torchvision.transforms.v2 against equivcheck.data.vision,
  as Pairs with a forward check; skipped, with the reason, where torchvision is not installed.
- LOADERS: torch.utils.data.DataLoader against Grain (MapDataset, DataLoader) and a plain
  NumPy iterator. Hypothesis draws the data set size, batch size, drop_last, epochs and seed;
  `equivcheck.data.compare_epochs` names the first epoch/batch/row that differs and why.
  The `..._same_seed` and `..._streamed` rows are the naive setups, kept as known divergences.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from hypothesis import strategies as st
from torch.utils.data import DataLoader, WeightedRandomSampler

from equivcheck import data as D


def _missing(module: str) -> str | None:
    """Why `module` cannot be used here, or None. A torchvision built for another torch fails at import."""
    try:
        importlib.import_module(module)
    except ImportError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


MISSING = {name: _missing(mod) for name, mod in (("torchvision", "torchvision"), ("grain", "grain"),
                                                 ("scikit-learn", "sklearn"))}
HOW = "pip install 'equivcheck[data]' (grain, scikit-learn); torchvision: 'equivcheck[vision]' with torch 2.14.1"


def _skip(what: str) -> list:
    return [pytest.param(None, id=f"{what}-not-installed",
                         marks=pytest.mark.skip(reason=f"{what} is not installed or does not import "
                                                       f"({MISSING[what]}): {HOW}"))]


if MISSING["torchvision"]:
    TRANSFORMS = _skip("torchvision")
else:
    from suites.transform_pairs import PAIRS as TRANSFORMS


@pytest.mark.parametrize("pair", TRANSFORMS, ids=str)
def test_transform(pair, equiv):
    equiv.check(pair)


# ---------------------------------------------------------------- loaders


def records(n, dtype, seed=0):
    """Dict records as a data set would hold them: index, a raw image, features, a label."""
    rng = np.random.default_rng(seed)
    return [{"index": i, "image": rng.integers(0, 256, (4, 3, 3), dtype=np.uint8),
             "x": rng.standard_normal(5).astype(dtype), "label": int(rng.integers(0, 10))} for i in range(n)]


def tuples(n, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((2, 3)).astype(dtype), int(rng.integers(0, 10))) for _ in range(n)]


SETUP = st.fixed_dictionaries({"n": st.integers(1, 40), "batch": st.integers(1, 12), "drop": st.booleans(),
                               "epochs": st.integers(1, 3), "seed": st.integers(0, 2**31 - 1)})


def sequential(s, dtype):
    ds = records(s["n"], dtype)
    t = D.torch_epochs(DataLoader(ds, batch_size=s["batch"], drop_last=s["drop"]), s["epochs"])
    orders = [np.arange(s["n"])] * s["epochs"]
    v = D.compare_epochs(t, D.grain_epochs(ds, orders, s["batch"], s["drop"]))
    return v if not v.ok else D.compare_epochs(t, D.numpy_epochs(ds, orders, s["batch"], s["drop"]))


def explicit(s, dtype):
    ds, orders = records(s["n"], dtype), D.explicit_orders(s["n"], s["epochs"], s["seed"])
    loader = DataLoader(ds, batch_size=s["batch"], drop_last=s["drop"], sampler=D.EpochOrderSampler(orders))
    return D.compare_epochs(D.torch_epochs(loader, s["epochs"]), D.grain_loader_epochs(ds, orders, s["batch"], s["drop"]))


def torch_seeded(s, dtype):
    """torch's own seeded shuffle, replayed on Grain through the orders it produces."""
    ds = records(s["n"], dtype)
    loader = DataLoader(ds, batch_size=s["batch"], drop_last=s["drop"], shuffle=True,
                        generator=torch.Generator().manual_seed(s["seed"]))
    orders = D.torch_shuffle_orders(s["n"], s["seed"], s["epochs"])
    return D.compare_epochs(D.torch_epochs(loader, s["epochs"]), D.grain_epochs(ds, orders, s["batch"], s["drop"]))


def _grain_shuffled(ds, s):
    """Grain's own shuffle: MapDataset.shuffle(seed).repeat(E), batched epoch by epoch."""
    import grain

    n, full = s["n"], grain.MapDataset.source(ds).shuffle(seed=s["seed"] % 2**32).repeat(s["epochs"])
    return [list(full.slice(slice(e * n, (e + 1) * n)).batch(s["batch"], drop_remainder=s["drop"]))
            for e in range(s["epochs"])]


def grain_seeded(s, dtype):
    """Grain's own seeded shuffle, replayed on torch through the orders it produces."""
    ds = records(s["n"], dtype)
    orders = D.grain_shuffle_orders(s["n"], s["seed"] % 2**32, s["epochs"])
    loader = DataLoader(ds, batch_size=s["batch"], drop_last=s["drop"], sampler=D.EpochOrderSampler(orders))
    return D.compare_epochs(D.torch_epochs(loader, s["epochs"]), _grain_shuffled(ds, s))


def grain_index_sampler(s, dtype):
    """grain.DataLoader with Grain's own IndexSampler(shuffle=True) for one epoch, replayed on torch."""
    import grain

    ds, seed = records(s["n"], dtype), s["seed"] % 2**32
    sampler = grain.samplers.IndexSampler(s["n"], shuffle=True, seed=seed, num_epochs=1)
    jax_side = [list(grain.DataLoader(data_source=ds, sampler=sampler, worker_count=0,
                                      shard_options=grain.sharding.NoSharding(),
                                      operations=[grain.transforms.Batch(s["batch"], drop_remainder=s["drop"])]))]
    orders = D.grain_shuffle_orders(s["n"], seed, 1)
    loader = DataLoader(ds, batch_size=s["batch"], drop_last=s["drop"], sampler=D.EpochOrderSampler(orders))
    return D.compare_epochs(D.torch_epochs(loader, 1), jax_side)


def weighted(s, dtype):
    """A sampler with replacement: its draws recorded from a twin and replayed on Grain."""
    ds = records(s["n"], dtype)
    w = np.random.default_rng(s["seed"]).random(s["n"]) + 0.1

    def sampler():
        return WeightedRandomSampler(w, num_samples=s["n"] + 3, generator=torch.Generator().manual_seed(s["seed"]))

    loader = DataLoader(ds, batch_size=s["batch"], drop_last=s["drop"], sampler=sampler())
    orders = D.sampler_orders(sampler(), s["epochs"])
    return D.compare_epochs(D.torch_epochs(loader, s["epochs"]), D.grain_epochs(ds, orders, s["batch"], s["drop"]))


def tuple_records(s, dtype):
    ds, orders = tuples(s["n"], dtype), D.explicit_orders(s["n"], s["epochs"], s["seed"])
    loader = DataLoader(ds, batch_size=s["batch"], drop_last=s["drop"], sampler=D.EpochOrderSampler(orders))
    return D.compare_epochs(D.torch_epochs(loader, s["epochs"]), D.grain_epochs(ds, orders, s["batch"], s["drop"]),
                            index=None)


def same_seed(s, dtype):
    """Naive: the same integer seed given to both frameworks' shuffles."""
    ds = records(s["n"], dtype)
    loader = DataLoader(ds, batch_size=s["batch"], drop_last=s["drop"], shuffle=True,
                        generator=torch.Generator().manual_seed(s["seed"]))
    return D.compare_epochs(D.torch_epochs(loader, s["epochs"]), _grain_shuffled(ds, s))


def streamed(s, dtype):
    """Naive: one grain.DataLoader over all epochs, cut by steps per epoch."""
    ds, orders = records(s["n"], dtype), D.explicit_orders(s["n"], s["epochs"], s["seed"])
    loader = DataLoader(ds, batch_size=s["batch"], drop_last=s["drop"], sampler=D.EpochOrderSampler(orders))
    return D.compare_epochs(D.torch_epochs(loader, s["epochs"]),
                            D.grain_loader_epochs(ds, orders, s["batch"], s["drop"], per_epoch=False))


def digits(s, dtype):
    """scikit-learn's bundled digits (1797 8x8 images, no download), normalised and batched."""
    from equivcheck.data import vision as V

    images, labels = _digits()
    mean, std = float(images.mean()), float(images.std())
    order = D.explicit_orders(len(labels), 1, s["seed"])

    class Digits(torch.utils.data.Dataset):  # the PyTorch pipeline: a Dataset doing torch ops
        def __len__(self):
            return len(labels)

        def __getitem__(self, i):
            x = torch.from_numpy(images[i]).to(getattr(torch, dtype))[None]
            return {"index": i, "image": (x - mean) / std, "label": int(labels[i])}

    def jax_side(r):  # the JAX-side pipeline: Grain maps equivcheck.data.vision in NumPy
        x = V.to_dtype(V.to_image(images[r["index"]]), dtype)
        return {"index": r["index"], "image": V.normalize(x, [mean], [std]), "label": int(labels[r["index"]])}

    raw = [{"index": i} for i in range(len(labels))]
    batch = s["batch"] * 16
    loader = DataLoader(Digits(), batch_size=batch, drop_last=s["drop"], sampler=D.EpochOrderSampler(order))
    return D.compare_epochs(D.torch_epochs(loader, 1), D.grain_epochs(raw, order, batch, s["drop"], jax_side))


def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images, d.target


LOADERS = {  # name: (body, needs, max examples)
    "loader_sequential": (sequential, "grain", None),
    "loader_shuffle_explicit_order": (explicit, "grain", None),
    "loader_shuffle_torch_seeded": (torch_seeded, "grain", None),
    "loader_shuffle_grain_seeded": (grain_seeded, "grain", None),
    "loader_grain_index_sampler": (grain_index_sampler, "grain", None),
    "loader_weighted_sampler": (weighted, "grain", None),
    "loader_collate_tuples": (tuple_records, "grain", None),
    "loader_shuffle_same_seed": (same_seed, "grain", None),
    "loader_grain_streamed_epochs": (streamed, "grain", None),
    "loader_digits_end_to_end": (digits, "scikit-learn", 8),
}
LOADER_PARAMS = [pytest.param(name, marks=_skip(missing)[0].marks if missing else [])
                 for name, (_, need, _) in LOADERS.items()
                 for missing in [next((m for m in (need, "grain") if MISSING[m]), None)]]


# The known divergences' witnesses (Hypothesis's minimal failing setups): two records already
# tell the two shuffles apart; one record in batches of two over two epochs streams across the
# epoch boundary (torch yields [r0], [r0]; one grain loader [r0, r0]).
WITNESSES = {
    "loader_shuffle_same_seed": ({"n": 2, "batch": 1, "drop": False, "epochs": 1, "seed": 0},),
    "loader_grain_streamed_epochs": ({"n": 1, "batch": 2, "drop": False, "epochs": 2, "seed": 0},),
}
LOADER_CHECKS = {name: D.DataCheck(name, body, SETUP, max_examples=limit, witnesses=WITNESSES.get(name, ()))
                 for name, (body, _, limit) in LOADERS.items()}


@pytest.mark.parametrize("name", LOADER_PARAMS)
def test_loader(name, equiv):
    if equiv.device != "cpu":
        pytest.skip("data loading runs on the host: checked once, on cpu")
    equiv.check(LOADER_CHECKS[name])
