"""Flax modules as ports (equivcheck.models.flax_ports): correct ones pass, a slip inside a submodule is
localised to that submodule through Flax's own intermediate capture, a module laid out otherwise
than the torch model is named key by key, and a linen BatchNorm's biased running variance is named."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import linen as lnn
from flax import nnx

from equivcheck import Custom, Fixed, Floats, Inputs
from equivcheck.engine.records import RunSettings
from equivcheck.models import ModelPair, mse, tap
from equivcheck.models.flax_ports import linen_port, nnx_port
from equivcheck.models.zoo import MATMUL, mlp_pair
from equivcheck.optim import optimizer_pair

RUN = RunSettings(examples=10, seed=20261126, shrink_seconds=5)


class LinenMLP(lnn.Module):
    transposed: bool = False

    @lnn.compact
    def __call__(self, x):
        fc1 = LinenTransposed(10, name="fc1") if self.transposed else lnn.Dense(10, name="fc1")
        return lnn.Dense(1, name="fc2")(jax.nn.relu(fc1(x)))


class LinenTransposed(lnn.Module):
    """A Dense whose kernel is applied untransposed: the slip of a square layer's port."""

    features: int

    @lnn.compact
    def __call__(self, x):
        kernel = self.param("kernel", lnn.initializers.lecun_normal(), (x.shape[-1], self.features))
        return x @ kernel.T + self.param("bias", lnn.initializers.zeros, (self.features,))


class NnxTransposed(nnx.Module):
    def __init__(self, n: int, rngs: nnx.Rngs):
        self.kernel = nnx.Param(jax.random.normal(rngs.params(), (n, n)))
        self.bias = nnx.Param(jax.numpy.zeros((n,)))

    def __call__(self, x):
        return x @ self.kernel.T + self.bias


class NnxMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, transposed: bool = False, first: str = "fc1"):
        setattr(self, first, NnxTransposed(10, rngs) if transposed else nnx.Linear(10, 10, rngs=rngs))
        self.first = first
        self.fc2 = nnx.Linear(10, 1, rngs=rngs)

    def __call__(self, x):
        return self.fc2(jax.nn.relu(getattr(self, self.first)(x)))


def _pair(name, port):
    return mlp_pair(name, port, jax_params=getattr(port, "jax_params", None))


PORTS = {"linen": lambda **kw: linen_port(LinenMLP(**kw)),
         "nnx": lambda **kw: nnx_port(NnxMLP(nnx.Rngs(0), **kw))}
NEEDS_CAPTURE = pytest.mark.skipif(not hasattr(nnx, "capture"), reason="this flax has no nnx.capture (flax >= 0.12.8)")


@pytest.mark.parametrize("kind", [k if k == "linen" else pytest.param(k, marks=NEEDS_CAPTURE) for k in PORTS])
def test_a_flax_module_port_passes_forward_gradients_and_training(kind):
    records = _pair(f"flax_{kind}", PORTS[kind]()).run_checks(dtype="float32", run=RUN)
    assert {r.check: r.outcome for r in records} == dict.fromkeys(("forward", "grad", "modes", "train"), "passed"), \
        [r.failure_text() for r in records if r.outcome != "passed"]


@pytest.mark.parametrize("kind", [k if k == "linen" else pytest.param(k, marks=NEEDS_CAPTURE) for k in PORTS])
def test_a_slip_inside_a_submodule_is_localised_to_it(kind):
    pair = _pair(f"flax_{kind}_bug", PORTS[kind](transposed=True)).replace(checks=("forward",))
    (rec,) = pair.run_checks(dtype="float32", run=RUN)
    assert rec.outcome == "failed" and rec.side == "jax", rec.failure_text()
    assert "first diverging layer: fc1 (Linear)" in rec.diagnosis, rec.diagnosis
    assert "untransposed" in rec.diagnosis, rec.diagnosis


@NEEDS_CAPTURE
def test_an_nnx_module_named_otherwise_is_refused_naming_the_keys():
    port = nnx_port(NnxMLP(nnx.Rngs(0), first="dense1"))
    (rec,) = _pair("flax_nnx_names", port).replace(checks=("forward",)).run_checks(dtype="float32", run=RUN)
    assert rec.outcome == "failed", rec
    assert "fc1" in rec.message and "dense1" in rec.message, rec.message


# ---- a submodule returning a tuple, as Hugging Face Flax attention layers do


class AttentionBlock(torch.nn.Module):
    """Residual self-attention (nn.MultiheadAttention returns (output, weights)) -> GELU MLP."""

    def __init__(self):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(4, 2, bias=False, batch_first=True)
        self.ff1, self.act, self.ff2 = torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 2)

    def forward(self, x):
        h = x + self.attn(x, x, x)[0]
        return self.ff2(self.act(self.ff1(h))).mean(1)


class LinenSelfAttention(lnn.Module):
    """Returns (output, attention weights), as FlaxBertSelfAttention and its kin do."""

    heads: int = 2

    @lnn.compact
    def __call__(self, x):
        d = x.shape[-1] // self.heads
        q, k, v = (lnn.DenseGeneral((self.heads, d), use_bias=False, name=n)(x) for n in ("query", "key", "value"))
        weights = lnn.dot_product_attention_weights(q, k)
        mixed = jnp.einsum("...hqk,...khd->...qhd", weights, v)
        return lnn.DenseGeneral(x.shape[-1], axis=(-2, -1), use_bias=False, name="out")(mixed), weights


class LinenBlock(lnn.Module):
    gelu_approximate: bool = False

    @lnn.compact
    def __call__(self, x):
        h = x + LinenSelfAttention(name="attn")(x)[0]
        f = jax.nn.gelu(lnn.Dense(8, name="ff1")(h), approximate=self.gelu_approximate)
        return lnn.Dense(2, name="ff2")(f).mean(1)


BLOCK_INPUTS = Inputs(Custom(lambda rng: ((b := int(rng.integers(1, 4)), 3, 4), (b, 2)), ((1, 3, 4), (1, 2))),
                      (Floats(-1, 1), Floats(-1, 1)))


def _block(name, **kw):
    return ModelPair(name, AttentionBlock, linen_port(LinenBlock(**kw)), BLOCK_INPUTS, loss=mse(),
                     checks=("forward",), tags=MATMUL)


def test_a_submodule_returning_a_tuple_compares_its_first_array_on_both_sides():
    """torch's hook unwrapped (output, weights) to the output, the port's capture one level only:
    the attention layer showed as diverging with infinite error on a passing check."""
    (rec,) = _block("flax_tuple_attn").run_checks(dtype="float32", run=RUN)
    assert rec.outcome == "passed", rec.failure_text()
    rows = {row["layer"]: row for row in rec.extra["layers"]}
    assert rows["attn"]["ok"] and rows["attn"]["ratio"] < 1, rows["attn"]
    assert all(row["ok"] for row in rows.values()), rows


def test_a_slip_after_a_tuple_returning_submodule_is_localised_past_it():
    (rec,) = _block("flax_tuple_gelu", gelu_approximate=True).run_checks(dtype="float32", run=RUN)
    assert rec.outcome == "failed", rec.failure_text()
    # the GELU is inline (no submodule): the first tapped layer after it is ff2
    assert "first diverging layer: ff2 (Linear)" in rec.diagnosis, rec.diagnosis


# ---- linen BatchNorm: running_var from the biased batch variance


class TorchBN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.bn, self.out = torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1)

    def forward(self, x):
        return self.out(torch.relu(self.bn(self.fc(x))))


class LinenBN(lnn.Module):
    taps: bool = False

    @lnn.compact
    def __call__(self, x, train=False):
        mark = tap if self.taps else (lambda name, v: v)
        h = mark("fc", lnn.Dense(4, name="fc")(x))
        h = mark("bn", lnn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name="bn")(h))
        return mark("out", lnn.Dense(1, name="out")(jax.nn.relu(h)))


def linen_bn_port(tree, x, train=False, taps=False, unbiased=False):
    """flax.linen.BatchNorm as a migration writes it: its running_var averages in the biased batch
    variance; `unbiased` applies the divergence table's reconcile."""
    from equivcheck.weights import convert

    params = {k: {n: v for n, v in sub.items() if n not in ("mean", "var")} for k, sub in tree.items()}
    old = {"mean": tree["bn"]["mean"], "var": tree["bn"]["var"]}
    out, new = LinenBN(taps=taps).apply({"params": params, "batch_stats": {"bn": old}}, x, train=train,
                                        mutable=["batch_stats"])
    stats = dict(new["batch_stats"]["bn"])
    if unbiased and train:
        stats["var"] = convert.unbiased_running_var(old["var"], stats["var"], 0.9, x.shape[0])
    return out, {"bn": stats}


BN_INPUTS = Inputs(Fixed((((8, 3), (8, 1)),)), (Floats(-1, 1), Floats(-1, 1)))


def _bn_pair(name, **kw):
    return ModelPair(name, TorchBN, lambda p, x, train=False: linen_bn_port(p, x, train, **kw), BN_INPUTS, loss=mse(),
                     optimizer=optimizer_pair(f"{name}.sgd", "SGD", lr=0.1), stateful=True, steps=3,
                     checks=("modes", "train"))


@pytest.mark.parametrize("taps", [False, True], ids=["untapped", "tapped"])
def test_a_linen_batch_norms_biased_running_var_is_named(taps):
    """torch's BatchNorm averages n/(n-1) x the batch variance into running_var, linen's the batch
    variance itself (measured: the updates differ by 8/7 at n = 8); every output agrees."""
    for rec in _bn_pair(f"linen_bn_{taps}", taps=taps).run_checks(dtype="float64", run=RUN):
        assert rec.outcome == "failed" and rec.side == "jax", rec.failure_text()
        assert "bn (running stats)" in rec.diagnosis, rec.diagnosis
        assert "the port's running_var update is torch's x (n-1)/n, n = 8 values per channel" in rec.diagnosis, \
            rec.diagnosis
        assert "torch updates with the unbiased batch variance, Flax with the biased one" in rec.diagnosis
        assert "(known divergence nn.trap.batch_norm_running_var)" in rec.diagnosis, rec.diagnosis


def test_the_running_var_reconcile_makes_a_linen_batch_norm_port_pass():
    records = _bn_pair("linen_bn_unbiased", unbiased=True).run_checks(dtype="float64", run=RUN)
    assert [r.outcome for r in records] == ["passed", "passed"], [r.failure_text() for r in records]


def test_the_running_var_hint_needs_torchs_update_times_n_minus_1_over_n():
    """Another factor (here a halved update, which is (n-1)/n at n = 2 but not at the batch's
    6 values per channel) is not this divergence: no hint."""
    from equivcheck.engine import tolerance
    from equivcheck.models.slips import _stats_hint

    tol = tolerance.lookup("float64", device="cpu", precision="highest", check="forward")
    x = np.random.default_rng(0).normal(size=(6, 4))
    old = {"mean": np.zeros(4), "var": np.ones(4)}
    t_new = {"mean": 0.1 * x.mean(0), "var": 0.9 + 0.1 * x.var(0, ddof=1)}
    biased = {"mean": t_new["mean"], "var": 0.9 + 0.1 * x.var(0)}
    halved = {"mean": t_new["mean"], "var": 0.9 + 0.05 * x.var(0, ddof=1)}
    assert "n = 6 values per channel" in _stats_hint(old, t_new, biased, 0.1, tol, count=6)
    assert _stats_hint(old, t_new, halved, 0.1, tol, count=6) == ""
