"""Checkpoints: export from one framework, load in the other, and the model computes the same.

- MODELS: Pairs whose two sides are the same model restored from files: a torch CNN saved as
  .pt, loaded weights-only, converted by `equivcheck.weights` rules and stored in Orbax, run in
  Flax; a Flax MLP saved as msgpack, converted back, stored as safetensors, run in torch.
  Forward and the gradient with respect to the input, against a NumPy float64 forward of the
  original torch-layout weights.
- ROUNDTRIPS: Hypothesis draws state_dicts (float32, float16, bfloat16, float64, int64, bool;
  every bit pattern, NaN payloads included; 0-d and empty arrays) and each chain of formats,
  the command line's `convert --check` and the torch <-> Flax layout mapping must give them
  back bit for bit.
"""
from __future__ import annotations

import functools
import tempfile
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from equivcheck import Custom, Floats, Inputs, Pair, Registry, data
from equivcheck import checkpoints as ck
from equivcheck import weights as W
from equivcheck.engine.dtypes import np_dtype

for _module in ("safetensors", "orbax.checkpoint", "flax"):
    pytest.importorskip(_module, reason=f"{_module} is not installed: pip install 'equivcheck[checkpoints]'")

from suites import ckpt_models as M  # noqa: E402 - needs flax

_DIR = tempfile.TemporaryDirectory(prefix="equivcheck-ckpt-")


_BUILD = threading.Lock()  # the next test's JAX side is traced on a background thread


def once(build):
    """Build the files at first use, on whichever thread comes first, outside any JAX trace."""
    cached = functools.cache(build)

    def get():
        with _BUILD, jax.ensure_compile_time_eval():
            return cached()
    return get


@once
def cnn_files():
    """torch CNN -> .pt -> (weights-only load) -> Flax layout -> Orbax -> Flax params."""
    state = M.torch_state(M.TorchCNN(), seed=5)
    pt, orb = Path(_DIR.name, "cnn.pt"), Path(_DIR.name, "cnn_orbax")
    ck.save(state, pt, overwrite=True)
    ck.save(ck.unnest(W.torch_to_jax(ck.load(pt), M.CNN_RULES)), orb, overwrite=True)
    model, loaded = M.TorchCNN(), ck.load(pt)
    ck.check_against(loaded, model.state_dict(), path=pt)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in loaded.items()})
    return state, model, ck.nest(ck.load(orb))


@once
def mlp_files():
    """Flax MLP -> msgpack -> torch layout -> safetensors -> torch MLP."""
    params = M.FlaxMLP().init(jax.random.PRNGKey(7), jnp.zeros((1, 6)))
    params = jax.tree.map(lambda p: np.asarray(p) * 2.0, params)  # away from init's small scale
    mp, st_path = Path(_DIR.name, "mlp.msgpack"), Path(_DIR.name, "mlp.safetensors")
    ck.save(ck.unnest(params), mp, overwrite=True)
    ck.save(W.jax_to_torch(ck.nest(ck.load(mp)), M.MLP_RULES), st_path, overwrite=True)
    state = ck.load(st_path)
    model = M.torch_mlp()
    ck.check_against(state, model.state_dict(), path=st_path)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    return state, model, params


def torch_run(files, x):
    _, model, _ = files()
    weights = {k: v.to(x.device, x.dtype) for k, v in model.state_dict().items()}
    return torch.func.functional_call(model, weights, (x,))


def flax_run(files, module, nchw, x):
    params = jax.tree.map(lambda p: jnp.asarray(p, x.dtype), files()[2])
    return module.apply(params, jnp.transpose(x, (0, 2, 3, 1)) if nchw else x)


CNN_IN = Inputs(Custom(lambda rng: ((int(rng.integers(1, 5)), 1, M.SIDE, M.SIDE),), ((1, 1, M.SIDE, M.SIDE),)),
                (Floats(-2, 2),))
MLP_IN = Inputs(Custom(lambda rng: ((int(rng.integers(1, 6)), 6),), ((1, 6),)), (Floats(-3, 3),))

MODELS = Registry([
    Pair("ckpt_cnn_pt_to_orbax_flax", functools.partial(torch_run, cnn_files),
         functools.partial(flax_run, cnn_files, M.FlaxCNN(), True), CNN_IN, checks=("forward", "vjp"),
         reference=lambda x: M.cnn_reference(cnn_files()[0], x), tags={"conv", "matmul"}, family="checkpoints"),
    Pair("ckpt_mlp_flax_msgpack_to_safetensors_torch", functools.partial(torch_run, mlp_files),
         functools.partial(flax_run, mlp_files, M.FlaxMLP(), False), MLP_IN, checks=("forward", "vjp"),
         reference=lambda x: M.mlp_reference(mlp_files()[0], x), tags={"matmul"}, family="checkpoints"),
])


@pytest.mark.parametrize("pair", MODELS, ids=str)
def test_model_from_checkpoint(pair, equiv):
    equiv.check(pair)


# ---------------------------------------------------------------- bit-exact round trips

DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "bool")
NAMES = ("features.0.weight", "features.0.bias", "fc.weight", "fc.bias", "bn.running_mean", "bn.num_batches_tracked",
         "head.proj.weight", "scale")


def _array(dtype, min_side):
    dt = np_dtype(dtype)
    shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=min_side, max_side=4)
    if dtype == "bool":
        return hnp.arrays(np.bool_, shapes)
    bits = np.dtype(f"u{dt.itemsize}")  # every bit pattern: NaN payloads, subnormals, infinities
    return hnp.arrays(bits, shapes).map(lambda a: a.view(dt))


def states(min_side=0):
    arrays = st.sampled_from(DTYPES).flatmap(lambda d: _array(d, min_side))
    return st.dictionaries(st.sampled_from(NAMES), arrays, min_size=1, max_size=5)


STATES = states()
NONEMPTY = states(min_side=1)  # Orbax refuses zero-size arrays (tests/test_checkpoints.py)


def chain(formats):
    """Save in the first format, convert along the chain, read back: bit-exact or the differences."""
    def body(state):
        with tempfile.TemporaryDirectory(dir=_DIR.name) as d:
            paths = [Path(d, f"s{i}{_SUFFIX[f]}") for i, f in enumerate(formats)]
            ck.save(state, paths[0])
            for a, b in zip(paths, paths[1:]):
                ck.convert(a, b)
            return _verdict(ck.differences(state, ck.load(paths[-1]), names=("drawn", " -> ".join(formats))))
    return body


_SUFFIX = {"torch": ".pt", "safetensors": ".safetensors", "orbax": "", "msgpack": ".msgpack"}


def _verdict(diffs):
    return data.DataVerdict(not diffs, "values" if diffs else "match", "; ".join(diffs))


def cli(state):
    """`python -m equivcheck convert IN OUT --check` along .pt -> .safetensors -> Orbax -> .pth."""
    from equivcheck.__main__ import main

    with tempfile.TemporaryDirectory(dir=_DIR.name) as d:
        paths = [Path(d, n) for n in ("a.pt", "b.safetensors", "c_orbax", "d.pth")]
        ck.save(state, paths[0])
        for a, b in zip(paths, paths[1:]):
            code = main(["convert", str(a), str(b), "--check"])
            if code:
                return data.DataVerdict(False, "values", f"convert {a.name} {b.name} --check exited {code}")
        return _verdict(ck.differences(state, ck.load(paths[-1]), names=("drawn", "after the CLI chain")))


def layout(dtype):
    """torch CNN layout -> Flax -> torch, weights drawn in `dtype`: transposes only, bit-exact."""
    def body(seed):
        rng = np.random.default_rng(seed)
        state = {k: rng.standard_normal(v.shape).astype(np_dtype(dtype)) for k, v in M.TorchCNN().state_dict().items()}
        back = W.jax_to_torch(W.torch_to_jax(state, M.CNN_RULES), M.CNN_RULES)
        return _verdict(ck.differences(state, back, names=("torch", "torch -> flax -> torch")))
    return body


ROUNDTRIPS = {  # name: (body, examples, max examples)
    "roundtrip_torch_pt": (chain(["torch"]), STATES, None),
    "roundtrip_safetensors": (chain(["safetensors"]), STATES, None),
    "roundtrip_orbax": (chain(["orbax"]), NONEMPTY, 10),
    "roundtrip_flax_msgpack": (chain(["msgpack"]), STATES, None),
    "roundtrip_all_formats": (chain(["torch", "safetensors", "orbax", "msgpack", "torch"]), NONEMPTY, 10),
    "cli_convert_check": (cli, NONEMPTY, 5),
    "layout_cnn_float32": (layout("float32"), st.integers(0, 2**31 - 1), 10),
    "layout_cnn_float16": (layout("float16"), st.integers(0, 2**31 - 1), 10),
    "layout_cnn_bfloat16": (layout("bfloat16"), st.integers(0, 2**31 - 1), 10),
}


# dtype-independent: every state mixes six dtypes, so each runs once, at float32
ROUNDTRIP_CHECKS = {name: data.DataCheck(name, lambda example, _dtype, body=body: body(example), examples,
                                         dtypes=("float32",), max_examples=limit)
                    for name, (body, examples, limit) in ROUNDTRIPS.items()}


@pytest.mark.parametrize("name", list(ROUNDTRIPS))
def test_roundtrip(name, equiv):
    if equiv.device != "cpu":
        pytest.skip("device-independent: checkpoint files are read and written on the host; run once, on cpu")
    equiv.check(ROUNDTRIP_CHECKS[name])
