"""Each layer checker catches the porting bug it exists for: a planted wrong counterpart fails
with jax named as the side that is off and the leaf that shows it, and the correct
counterpart passes the same run."""
from __future__ import annotations

import jax.numpy as jnp
import pytest
import torch
import torch.nn as nn
from flax import nnx

from equivcheck import Custom, Inputs, RunSettings, run_pair
from equivcheck.layers import flax_bridge as fb
from equivcheck.references import layers as R
from equivcheck.weights import convert
from suites import layer_pairs, loss_pairs, sequence_pairs
from suites._kit import X, ints, layer, module
from tests.helpers import by_check

SEED = 20261126
RUN = RunSettings(examples=30, seed=SEED)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny tensors: torch's thread pool costs more than it saves (see suites/conftest.py)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _square(rng):
    n = ints(rng, 2, 4)
    return ((ints(rng, 1, 3), n), (n, n), (n,))


SQUARE_LINEAR = layer_pairs.LINEAR.replace(name="nn.linear_square",
                                           inputs=Inputs(Custom(_square, ((1, 2), (2, 2), (2,))),
                                                         layer_pairs.LINEAR.inputs.args))


def j_linear_untransposed(x, w, b):
    layer_ = fb.nnx_layer(nnx.Linear, {"kernel": w, "bias": b}, in_features=w.shape[1], out_features=w.shape[0])
    return layer_(x)


LSTM = next(p for p in sequence_pairs.PAIRS if p.name == "nn.lstm")


def j_lstm_gates_ifog(*args):
    """torch's rows are (i, f, g, o); this port reads them as (i, f, o, g)."""
    def swap(a):
        h = a.shape[0] // 4
        return jnp.concatenate([a[:2 * h], a[3 * h:], a[2 * h:3 * h]])

    x, w_ih, w_hh, b_ih, b_hh, *rest = args
    return LSTM.jax_fn(x, swap(w_ih), swap(w_hh), swap(b_ih), swap(b_hh), *rest)


LAYER_NORM = next(p for p in layer_pairs.NORM_PAIRS if p.name == "nn.layer_norm")
BN_TRAIN = next(p for p in layer_pairs.BN_PAIRS if p.name == "nn.batch_norm_train")


def j_bn_momentum_as_torch(x, w, b, rm, rv):
    """torch's momentum (0.1) handed to nnx.BatchNorm unconverted; everything else right."""
    ys = []
    for t in range(x.shape[0]):
        tree = convert.to_jax("batch_norm", {"weight": w, "bias": b, "running_mean": rm, "running_var": rv})
        bn = fb.nnx_layer(nnx.BatchNorm, tree, num_features=x.shape[2], momentum=0.1, use_fast_variance=False,
                          use_running_average=False)
        ys.append(convert.channels_first(bn(convert.channels_last(x[t]))))
        n = x[t].size // x.shape[2]
        rm, rv = bn.mean[...], convert.unbiased_running_var(rv, bn.var[...], 0.1, n)
    return jnp.stack(ys), rm, rv


def t_avg_exclude_pad(x):
    return module(nn.AvgPool2d, 3, 2, 1, count_include_pad=False)(x)


AVG_EXCLUDE = layer("nn.avg_pool2d_exclude_pad", t_avg_exclude_pad,
                    lambda x: fb.avg_pool(x, 3, 2, 1, count_include_pad=False),
                    lambda rng: ((ints(rng, 1, 2), 1, ints(rng, 3, 6), ints(rng, 3, 6)),), ((1, 1, 3, 3),), (X,),
                    ("input",), reference=lambda x: R.avg_pool(x, 3, 2, 1, count_include_pad=False))


def j_avg_default_pad(x):
    """flax avg_pool's count_include_pad defaults to True: torch's False was not passed on."""
    xl = convert.channels_last(x)
    return convert.channels_first(nnx.avg_pool(xl, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1))))


# (correct pair, planted wrong counterpart, the leaf (or leaves) that may be named)
PLANTED = [
    (SQUARE_LINEAR, SQUARE_LINEAR.replace(name="weight_not_transposed_bug", jax_fn=j_linear_untransposed), "out"),
    (LSTM, LSTM.replace(name="lstm_gate_order_bug", jax_fn=j_lstm_gates_ifog), "out["),
    (LAYER_NORM, LAYER_NORM.replace(name="eps_10x_bug",
                                    jax_fn=lambda x, w, b: fb.layer_norm(x, w.shape, w, b, eps=1e-4)), "out"),
    # the running statistics (out[1] mean, out[2] var) are what the momentum moves
    (BN_TRAIN, BN_TRAIN.replace(name="momentum_not_inverted_bug", jax_fn=j_bn_momentum_as_torch), ("out[1]", "out[2]")),
    (AVG_EXCLUDE, AVG_EXCLUDE.replace(name="count_include_pad_missing_bug", jax_fn=j_avg_default_pad), "out"),
]


@pytest.mark.parametrize("good, bad, leaf", PLANTED, ids=[bad.name for _, bad, _ in PLANTED])
def test_planted_layer_bug_is_caught_and_blamed_on_jax(good, bad, leaf):
    rec = by_check(run_pair(bad, dtype="float32", run=RUN))["forward"]
    assert rec.outcome == "failed", rec
    assert rec.side == "jax", rec.failure_text()
    assert rec.message.startswith(leaf), rec.message
    assert "jax is off" in rec.diagnosis and "reference decides" in rec.diagnosis, rec.diagnosis


@pytest.mark.parametrize("good, bad, leaf", PLANTED, ids=[good.name for good, _, _ in PLANTED])
def test_correct_layer_counterpart_passes(good, bad, leaf):
    records = run_pair(good, dtype="float32", run=RUN)
    assert [r.outcome for r in records] == ["passed"] * len(records), [r.failure_text() for r in records]


def test_a_gradient_bug_in_a_layer_is_found_per_parameter():
    """A port that gets the forward right but stops the bias gradient: the VJP fails at
    out['bias'] and finite differences blame jax."""
    import jax

    bad = layer_pairs.LINEAR.replace(name="bias_gradient_bug",
                                     jax_fn=lambda x, w, b: fb.linear(x, w, jax.lax.stop_gradient(b)))
    rec = by_check(run_pair(bad, dtype="float64", run=RUN))["vjp"]
    assert rec.outcome == "failed" and rec.side == "jax", rec.failure_text()
    assert rec.message.startswith("out['bias']"), rec.message
    assert "finite differences" in rec.diagnosis


def test_a_layer_that_raises_names_its_side_and_does_not_stop_the_run():
    bad = layer_pairs.LINEAR.replace(name="raising_layer",
                                     jax_fn=lambda x, w, b: fb.linear(x, w[:, :-1], b))
    records = run_pair(bad, dtype="float32", run=RunSettings(examples=5, seed=SEED))
    assert all(r.outcome == "failed" and r.kind == "error" and r.side == "jax" for r in records)
    assert "the jax side raised" in records[0].message


def _perturbed(jax_fn):
    """The JAX side off by 1% + 0.01 in every floating output: what any wrong port looks like."""
    import jax

    def bad(*args):
        return jax.tree.map(lambda y: y * 1.01 + 0.01 if jnp.issubdtype(y.dtype, jnp.floating) else y, jax_fn(*args))

    return bad


CHECKED = [p for p in [*layer_pairs.PAIRS, *sequence_pairs.PAIRS, *loss_pairs.PAIRS] if p.reference is not None]


@pytest.mark.parametrize("pair", CHECKED, ids=str)
def test_every_layer_and_loss_pair_blames_a_perturbed_jax_side(pair):
    """Each pair's forward check fails on a wrong JAX side, and its NumPy reference names jax."""
    bad = pair.replace(name=pair.name + ".perturbed", jax_fn=_perturbed(pair.jax_fn), checks=("forward",),
                       tolerance=None)
    rec = run_pair(bad, dtype="float64", run=RunSettings(examples=5, seed=SEED, palette=1, shrink_seconds=2))[0]
    assert rec.outcome == "failed" and rec.side == "jax", rec.failure_text()
    assert "jax is off" in rec.diagnosis, rec.diagnosis


def test_attention_in_float64_is_judged_at_the_float32_softmax_it_runs():
    """jax.nn.dot_product_attention runs its softmax in float32 for float64 inputs; every pair
    built on it carries that bound (suites._kit.ATTENTION_F64). Seed 1's shrunk input: query 0,
    key = value = 1, nothing masked; the exact query gradient is 0, JAX gives -2.03e-7."""
    from suites import trap_pairs

    guarded, = [p for p in trap_pairs.PAIRS if p.name == "nn.sdpa_masked_rows_guarded"]
    shape = (2, 1, 3, 3)
    given = (jnp.zeros(shape).tolist(), jnp.ones(shape).tolist(), jnp.ones(shape).tolist(), [[[[True] * 3] * 3]] * 2)
    records = run_pair(guarded.replace(witnesses=(given,)), dtype="float64", run=RunSettings(examples=1, seed=1))
    assert {r.check: r.outcome for r in records} == {"forward": "passed", "vjp": "passed"}, \
        [r.failure_text() for r in records]
    assert all(r.witnessed == 1 for r in records)
