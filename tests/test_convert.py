"""Weight conversion: bit-exact round trips, the trees' fit to the Flax layers, and clear errors
for malformed state_dicts and trees."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn as nn
from flax import linen, nnx

from equivcheck.weights import convert
from equivcheck.weights.convert import ConversionError


def _sd(module):
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def _randomise(module, seed=0):
    """Nonzero, distinct values everywhere (biases and norm weights included), so a transposed
    or misplaced entry cannot hide behind a constant."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        for name, b in module.named_buffers():
            if b.is_floating_point():
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
    return module


MODULES = {
    "linear": lambda: nn.Linear(3, 5),
    "linear_nobias": lambda: nn.Linear(4, 4, bias=False),
    "conv1d": lambda: nn.Conv1d(4, 6, 3, groups=2),
    "conv2d": lambda: nn.Conv2d(3, 4, (3, 2)),
    "conv3d": lambda: nn.Conv3d(2, 3, (1, 2, 3), bias=False),
    "conv_transpose2d": lambda: nn.ConvTranspose2d(3, 5, (2, 3)),
    "layer_norm": lambda: nn.LayerNorm((3, 4)),
    "rms_norm": lambda: nn.RMSNorm(5),
    "group_norm": lambda: nn.GroupNorm(2, 4),
    "instance_norm": lambda: nn.InstanceNorm2d(3, affine=True),
    "batch_norm": lambda: nn.BatchNorm2d(3),
    "embedding": lambda: nn.Embedding(7, 3),
    "mha": lambda: nn.MultiheadAttention(6, 2),
    "mha_kdim": lambda: nn.MultiheadAttention(4, 2, kdim=3, vdim=3),
    "lstm": lambda: nn.LSTM(3, 4, num_layers=2),
    "gru": lambda: nn.GRU(2, 3, num_layers=2),
    "gru_bidirectional": lambda: nn.GRU(2, 3, num_layers=2, bidirectional=True),
}
# Flax keeps one bias per LSTM gate and per GRU r/z gate where torch keeps two: these sums
# are the one place a torch -> Flax -> torch round trip cannot return torch's split.
SUMMED = {"lstm": r"bias_(ih|hh)_l\d", "gru": r"bias_(ih|hh)_l\d"}


@pytest.mark.parametrize("name", MODULES)
def test_torch_to_flax_to_torch_is_bit_exact(name):
    module = _randomise(MODULES[name]())
    kind, cfg = convert.describe(module)
    sd = _sd(module)
    back = convert.to_torch(kind, convert.to_jax(kind, sd, **cfg), **cfg)
    if kind == "batch_norm":
        sd.pop("num_batches_tracked")
        assert back.pop("num_batches_tracked").shape == ()
    assert sorted(back) == sorted(sd)
    for key, want in sd.items():
        got = np.asarray(back[key])
        if kind in SUMMED and key.startswith("bias_"):
            continue  # checked below, as the sum the layer computes with
        assert got.dtype == want.dtype and got.shape == want.shape, key
        assert np.array_equal(got, want), f"{name}: {key} changed in the round trip"
    if kind in SUMMED:
        for k in range(module.num_layers):
            # The function is the same: the per-gate sums come back bit for bit.
            want = sd[f"bias_ih_l{k}"] + sd[f"bias_hh_l{k}"]
            got = np.asarray(back[f"bias_ih_l{k}"]) + np.asarray(back[f"bias_hh_l{k}"])
            if kind == "gru":  # n gate: b_in and b_hn are kept apart (b_hn sits inside r * (...))
                h = module.hidden_size
                assert np.array_equal(np.asarray(back[f"bias_hh_l{k}"])[2 * h:], sd[f"bias_hh_l{k}"][2 * h:])
            assert np.array_equal(got, want)


@pytest.mark.parametrize("name", MODULES)
def test_flax_to_torch_to_flax_is_bit_exact(name):
    module = _randomise(MODULES[name]())
    kind, cfg = convert.describe(module)
    tree = convert.to_jax(kind, _sd(module), **cfg)
    again = convert.to_jax(kind, convert.to_torch(kind, tree, **cfg), **cfg)
    flat = jax.tree_util.tree_leaves_with_path(tree)
    flat_again = dict(jax.tree_util.tree_leaves_with_path(again))
    assert len(flat) == len(flat_again)
    for path, leaf in flat:
        assert np.array_equal(np.asarray(flat_again[path]), np.asarray(leaf)), jax.tree_util.keystr(path)


def _shapes(tree):
    return jax.tree.map(lambda a: tuple(np.shape(a)), tree)


@pytest.mark.parametrize("name, flax_module", [
    ("linear", lambda: nnx.Linear(3, 5, rngs=nnx.Rngs(0))),
    ("conv2d", lambda: nnx.Conv(3, 4, (3, 2), rngs=nnx.Rngs(0))),
    ("conv_transpose2d", lambda: nnx.ConvTranspose(3, 5, (2, 3), transpose_kernel=True, rngs=nnx.Rngs(0))),
    ("layer_norm", lambda: nnx.LayerNorm(12, rngs=nnx.Rngs(0))),
    ("group_norm", lambda: nnx.GroupNorm(4, num_groups=2, rngs=nnx.Rngs(0))),
    ("batch_norm", lambda: nnx.BatchNorm(3, rngs=nnx.Rngs(0))),
    ("embedding", lambda: nnx.Embed(7, 3, rngs=nnx.Rngs(0))),
    ("mha", lambda: nnx.MultiHeadAttention(2, 6, decode=False, rngs=nnx.Rngs(0))),
])
def test_the_tree_is_the_flax_layers_own_state(name, flax_module):
    module = _randomise(MODULES[name]())
    kind, cfg = convert.describe(module)
    want = nnx.to_pure_dict(nnx.state(flax_module()))
    assert _shapes(convert.to_jax(kind, _sd(module), **cfg)) == _shapes(want)


def test_recurrent_trees_are_the_flax_cells_state():
    lstm = convert.to_jax("lstm", _sd(MODULES["lstm"]()))
    cells = [nnx.to_pure_dict(nnx.state(nnx.LSTMCell(i, 4, rngs=nnx.Rngs(0)))) for i in (3, 4)]
    assert [_shapes(c) for c in lstm] == [_shapes(c) for c in cells]
    gru = convert.to_jax("gru", _sd(MODULES["gru"]()))
    params = linen.GRUCell(3).init(jax.random.key(0), jnp.zeros((1, 3)), jnp.zeros((1, 2)))["params"]
    assert _shapes(gru[0]) == _shapes(params)


def test_conversion_runs_inside_jit_on_traced_arrays():
    w, b = np.arange(6.0).reshape(2, 3), np.array([1.0, 2.0])

    @jax.jit
    def f(w, b):
        return convert.to_jax("linear", {"weight": w, "bias": b})["kernel"]

    assert np.array_equal(np.asarray(f(w, b)), w.T)


def test_torch_tensors_are_read_as_numpy():
    tree = convert.module_to_jax(nn.Linear(2, 3))
    assert isinstance(tree["kernel"], np.ndarray) and tree["kernel"].shape == (2, 3)


# --------------------------------------------------------------------------- malformed input

MALFORMED = [
    ("linear", {"weight": np.zeros((3, 2))}, {"bias": np.zeros(4)}, "bias", "shape [4], expected [3]"),
    ("conv", {"weight": np.zeros((4, 3, 3, 3)), "bias": np.zeros(4)}, {"scale": np.zeros(4)}, "scale",
     "unexpected key"),
    ("batch_norm", {"weight": np.zeros(3), "bias": np.zeros(3), "running_mean": np.zeros(3)}, {}, "running_var",
     "missing"),
    ("layer_norm", {"weight": np.zeros(4), "bias": np.zeros(5)}, {}, "bias", "shape [5], expected [4]"),
    ("embedding", {}, {"weights": np.zeros((3, 2))}, "weight", "missing"),
    ("lstm", {"weight_ih_l0": np.zeros((8, 3)), "weight_hh_l0": np.zeros((8, 2)), "bias_ih_l0": np.zeros(8),
              "bias_hh_l0": np.zeros(7)}, {}, "bias_hh_l0", "shape [7], expected [8]"),
    ("gru", {"weight_ih_l0": np.zeros((6, 3)), "weight_hh_l0": np.zeros((6, 2))}, {"weight_ih_l1": np.zeros((6, 2))},
     "weight_hh_l1", "missing"),
    ("mha", {"in_proj_weight": np.zeros((12, 4)), "out_proj.weight": np.zeros((4, 4)), "in_proj_bias": np.zeros(12)},
     {}, "out_proj.bias", "missing"),
    ("mha", {"in_proj_weight": np.zeros((12, 4)), "out_proj.weight": np.zeros((4, 4))}, {"bias_k": np.zeros((1, 1, 4))},
     "bias_k", "add_bias_kv"),
]


@pytest.mark.parametrize("kind, sd, extra, key, words", MALFORMED, ids=[f"{m[0]}-{m[3]}" for m in MALFORMED])
def test_a_malformed_state_dict_names_the_key(kind, sd, extra, key, words):
    with pytest.raises(ConversionError) as info:
        convert.to_jax(kind, {**sd, **extra}, num_heads=2)
    assert repr(key) in str(info.value) and words in str(info.value), str(info.value)
    assert str(info.value).startswith(kind)


def test_a_malformed_tree_names_the_key():
    with pytest.raises(ConversionError, match=r"linear: Flax tree key 'bias' has shape \[2\], expected \[5\]"):
        convert.to_torch("linear", {"kernel": np.zeros((3, 5)), "bias": np.zeros(2)})
    tree = convert.to_jax("lstm", _sd(nn.LSTM(2, 3)))
    del tree[0]["hg"]["bias"]
    with pytest.raises(ConversionError, match="'0/hg/bias'"):
        convert.to_torch("lstm", tree)
    with pytest.raises(ConversionError, match="'key/kernel' has shape"):
        bad = convert.to_jax("mha", _sd(nn.MultiheadAttention(4, 2)), num_heads=2)
        bad["key"]["kernel"] = np.zeros((4, 2, 3))
        convert.to_torch("mha", bad)


def test_unsupported_layers_and_options_say_so():
    with pytest.raises(ConversionError, match="unknown layer kind 'dense'"):
        convert.to_jax("dense", {})
    with pytest.raises(ConversionError, match="bidirectional"):
        convert.to_jax("lstm", _sd(nn.LSTM(2, 3, bidirectional=True)))
    with pytest.raises(ConversionError, match="no conversion for ReLU"):
        convert.describe(nn.ReLU())
    with pytest.raises(ConversionError, match="num_heads"):
        convert.to_jax("mha", _sd(nn.MultiheadAttention(4, 2)))
    with pytest.raises(ConversionError, match="momentum=None"):
        convert.flax_momentum(None)


def test_flax_momentum_and_the_unbiased_running_var():
    assert convert.flax_momentum(0.1) == pytest.approx(0.9)
    x = np.random.default_rng(0).standard_normal((6, 2))
    old = np.array([1.0, 2.0])
    flax_new = 0.9 * old + 0.1 * x.var(0)
    assert np.allclose(convert.unbiased_running_var(old, flax_new, 0.9, 6), 0.9 * old + 0.1 * x.var(0, ddof=1))
