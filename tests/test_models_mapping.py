"""The user's own weight mapping (issue 12, section 2): a converter of their own
(`ModelPair(to_jax=fn)`) with gradients back by the chain rule through it, modules holding
non-persistent buffers, and module types and layouts registered through public functions."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from equivcheck import Fixed, Floats, Inputs, Ints, Lengths, weights
from equivcheck.engine.records import RunSettings
from equivcheck.models import ModelPair, mse
from equivcheck.models import mapping as mm
from equivcheck.models.converter import UserMapping
from equivcheck.models.zoo import cnn_pair
from equivcheck.weights import ConversionError, convert

RUN = RunSettings(examples=3, seed=20261130, shrink_seconds=5)


def _np(t):
    return t.detach().numpy()


def digits_cnn_converter(m, slip=""):
    """DigitsCNN's tree written by hand as users write converters: NumPy transposes of
    detached tensors (nothing JAX could trace)."""
    o = m.fc.weight.shape[0]
    fc = _np(m.fc.weight).T if slip == "flatten" else \
        _np(m.fc.weight).reshape(o, 8, 4, 4).transpose(2, 3, 1, 0).reshape(-1, o)
    mean = m.bn1.running_var if slip == "stats" else m.bn1.running_mean
    return {"conv1": {"kernel": _np(m.conv1.weight).transpose(2, 3, 1, 0)},
            "bn1": {"scale": _np(m.bn1.weight), "bias": _np(m.bn1.bias), "mean": _np(mean),
                    "var": _np(m.bn1.running_var)},
            "fc": {"kernel": fc, "bias": _np(m.fc.bias)}}


def test_a_users_converter_passes_every_check_of_a_correct_port():
    pair = cnn_pair("cnn_own_converter").replace(rules=(), to_jax=digits_cnn_converter)
    records = pair.run_checks(dtype="float64", run=RUN)
    assert {r.check: r.outcome for r in records} == dict.fromkeys(("forward", "grad", "modes", "train"), "passed"), \
        [r.failure_text() for r in records if r.outcome != "passed"]


@pytest.mark.parametrize("slip, layer", [("flatten", "fc"), ("stats", "bn1")])
def test_a_slip_in_the_users_converter_fails_and_is_localised(slip, layer):
    pair = cnn_pair(f"cnn_converter_{slip}").replace(rules=(), to_jax=lambda m: digits_cnn_converter(m, slip),
                                                       checks=("forward",))
    (rec,) = pair.run_checks(dtype="float64", run=RUN)
    assert rec.outcome == "failed" and rec.side == "jax", rec.failure_text()
    assert f"first diverging layer: {layer} " in rec.failure_text()


def test_the_statistics_part_is_told_apart_by_what_its_leaves_are_made_of():
    model = cnn_pair().torch_model()
    um = UserMapping(digits_cnn_converter, model)
    params, stats = um.to_jax({k: _np(v) for k, v in model.state_dict().items()})
    assert set(stats) == {"bn1"} and set(stats["bn1"]) == {"mean", "var"}
    assert set(params["bn1"]) == {"scale", "bias"} and set(params) == {"conv1", "bn1", "fc"}
    assert [(e.module, e.path) for e in um] == [("bn1", ("bn1",))]


@pytest.mark.parametrize("bidirectional", [False, True])
def test_gradients_through_a_converter_are_its_chain_rule(bidirectional):
    """convert's GRU tree sums the r/z biases: read as a linear map, its adjoint gives both
    torch biases the summed leaf's gradient, exactly what jax.vjp of the traced conversion gives."""
    gru = torch.nn.GRU(2, 3, num_layers=2, bidirectional=bidirectional)
    um = UserMapping(lambda m: convert.to_jax("gru", m.state_dict()), gru)
    sd = {k: _np(v).copy() for k, v in gru.state_dict().items()}
    rng = np.random.default_rng(0)
    cot = jax.tree.map(lambda a: rng.standard_normal(np.shape(a)).astype(np.float32), convert.to_jax("gru", sd))
    want = mm.chain_rule(lambda s: convert.to_jax("gru", s), sd, cot)
    got = um.grads_to_torch(cot, sd)
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=0, err_msg=k)


class TwoLinear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 2)
        self.out = torch.nn.Linear(2, 2, bias=False)

    def forward(self, x):
        return self.out(self.fc(x))


def test_a_constant_folded_into_a_leaf_is_read_as_its_scale():
    """A converter folding a constant into a weight (an attention scale, a unit change) is
    linear: each element's scale is read, and the gradient goes back times it."""
    model = TwoLinear()
    um = UserMapping(lambda m: {"fc": {"kernel": _np(m.fc.weight).T * 0.5, "bias": _np(m.fc.bias) * 3},
                                "out": {"kernel": _np(m.out.weight).T}}, model)
    sd = {k: _np(v) for k, v in model.state_dict().items()}
    g = {"fc": {"kernel": np.ones((3, 2)), "bias": np.array([1.0, 2.0])}, "out": {"kernel": np.arange(4.0).reshape(2, 2)}}
    back = um.grads_to_torch(g, sd)
    np.testing.assert_array_equal(back["fc.weight"], np.full((2, 3), 0.5))
    np.testing.assert_array_equal(back["fc.bias"], [3.0, 6.0])
    np.testing.assert_array_equal(back["out.weight"], np.arange(4.0).reshape(2, 2).T)


def test_a_converter_that_is_not_a_rearrangement_is_refused_naming_the_leaf():
    def weight_norm(m):
        w = _np(m.fc.weight)
        return {"fc": {"kernel": (w / np.linalg.norm(w)).T, "bias": _np(m.fc.bias)}, "out": {"kernel": _np(m.out.weight)}}

    with pytest.raises(ConversionError, match="leaf fc/kernel .*not linear"):
        UserMapping(weight_norm, TwoLinear())

    def mixes(m):
        w = _np(m.fc.weight)
        return {"fc": {"kernel": (w + w[::-1]).T, "bias": _np(m.fc.bias)}, "out": {"kernel": _np(m.out.weight)}}

    with pytest.raises(ConversionError, match="leaf fc/kernel mixes several elements of 'fc.weight'"):
        UserMapping(mixes, TwoLinear())


def two_linear_apply(params, x, train=False):
    h = x @ params["fc"]["kernel"] + params["fc"]["bias"]
    return h @ params["out"]["kernel"]


TWO_INPUTS = Inputs(Fixed((((4, 3), (4, 2)),)), (Floats(-1, 1), Floats(-1, 1)))


def test_a_converter_that_raises_fails_every_check_with_its_error():
    def broken(m):
        return {"fc": {"kernel": _np(m.fc.weigth)}}

    pair = ModelPair("two_linear_broken", TwoLinear, two_linear_apply, TWO_INPUTS, loss=mse(), checks=("forward", "grad"),
                     to_jax=broken)
    records = pair.run_checks(dtype="float32", run=RUN)
    assert [r.outcome for r in records] == ["failed", "failed"]
    assert all("to_jax raised on zero weights: AttributeError" in r.failure_text() for r in records)


def test_to_jax_and_rules_together_are_refused():
    with pytest.raises(ValueError, match="rules or to_jax, not both"):
        ModelPair("both", TwoLinear, two_linear_apply, TWO_INPUTS, to_jax=lambda m: {},
                  rules=(weights.Rule("fc", "fc", "linear"),), checks=("forward",))


# --------------------------------------------------------------------------- buffers and registries


class CausalMix(torch.nn.Module):
    """A Linear after a causal mean over positions; the mask is a non-persistent buffer."""

    def __init__(self, n=4):
        super().__init__()
        self.register_buffer("mask", torch.tril(torch.ones(n, n)) / torch.arange(1, n + 1)[:, None], persistent=False)
        self.fc = torch.nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(self.mask @ x)


def causal_mix_apply(params, x, train=False):
    n = x.shape[1]
    mask = jnp.tril(jnp.ones((n, n), x.dtype)) / jnp.arange(1, n + 1, dtype=x.dtype)[:, None]
    return (mask @ x) @ params["fc"]["kernel"] + params["fc"]["bias"]


def test_a_module_holding_a_non_persistent_buffer_converts_automatically():
    pair = ModelPair("causal_mix", CausalMix, causal_mix_apply, Inputs(Fixed((((2, 4, 3), (2, 4, 2)),)), (Floats(-1, 1),) * 2),
                     loss=mse(), checks=("forward", "grad"))
    assert [e.module for e in mm.entries(CausalMix())] == ["fc"]
    records = pair.run_checks(dtype="float64", run=RUN)
    assert [r.outcome for r in records] == ["passed", "passed"], [r.failure_text() for r in records]


class Gain(torch.nn.Module):
    """A per-feature gain held as (1, d): a module type no built-in conversion knows."""

    def __init__(self, d=3):
        super().__init__()
        self.gain = torch.nn.Parameter(torch.linspace(0.5, 1.5, d)[None])

    def forward(self, x):
        return x * self.gain


class GainNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.g = Gain()
        self.fc = torch.nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(self.g(x))


def gain_net_apply(params, x, train=False):
    return (x * params["g"]["scale"]) @ params["fc"]["kernel"] + params["fc"]["bias"]


def test_a_registered_module_type_converts_and_its_gradients_go_back():
    with pytest.raises(ConversionError, match="Gain.*register_module"):
        mm.entries(GainNet())
    weights.register_module(Gain, "test_gain", lambda sd, d: {"scale": sd["gain"].reshape(-1)},
                            lambda tree, d: {"gain": tree["scale"].reshape(1, d)},
                            config=lambda m: {"d": m.gain.shape[1]})
    pair = ModelPair("gain_net", GainNet, gain_net_apply, TWO_INPUTS, loss=mse(), checks=("forward", "grad"))
    records = pair.run_checks(dtype="float64", run=RUN)
    assert [r.outcome for r in records] == ["passed", "passed"], [r.failure_text() for r in records]
    with pytest.raises(ConversionError, match="'test_gain' is empty or taken"):
        weights.register_module(Gain, "test_gain", lambda sd: sd, lambda t: t)
    with pytest.raises(TypeError, match="module_type must be a class"):
        weights.register_module(Gain(), "test_gain_2", lambda sd: sd, lambda t: t)


def test_register_layout_refuses_a_taken_name_and_a_missing_direction():
    with pytest.raises(weights.rules.CheckpointError, match="'linear' is taken"):
        weights.register_layout("linear", weights.LAYOUTS["linear"])
    with pytest.raises(weights.rules.CheckpointError, match=r"to_torch has no function for \['bias'\]"):
        weights.register_layout("test_half", weights.Layout({"weight": "kernel", "bias": "bias"},
                                                            {"weight": lambda a, m: a.T, "bias": lambda a, m: a},
                                                            {"weight": lambda a, m: a.T}))


class Bias2(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.b = torch.nn.Parameter(torch.tensor([[0.1, -0.2]]))

    def forward(self, x):
        return x + self.b


def test_a_registered_conversion_jax_cannot_trace_is_named_in_the_grad_check():
    """np.* functions on the traced state: the forward converts (NumPy in, NumPy out) but the
    gradient's jax.vjp cannot; the grad check says so instead of a tracer traceback."""
    weights.register_module(Bias2, "test_np_bias", lambda sd: {"bias": np.asarray(sd["b"]).reshape(-1)},
                            lambda tree: {"b": np.reshape(tree["bias"], (1, -1))})
    pair = ModelPair("np_bias", lambda: torch.nn.Sequential(torch.nn.Linear(3, 2), Bias2()), lambda p, x, train=False: x @ p["0"]["kernel"] + p["0"]["bias"] + p["1"]["bias"],
                     TWO_INPUTS, loss=mse(), checks=("forward", "grad"))
    fwd, grad = pair.run_checks(dtype="float64", run=RUN)
    assert fwd.outcome == "passed", fwd.failure_text()
    assert grad.outcome == "failed" and "['test_np_bias'] is not traceable by JAX" in grad.failure_text()


# --------------------------------------------------------------------------- models as people call them


class KeywordClassifier(torch.nn.Module):
    """Called as Hugging Face models are: model(input_ids, attention_mask=...) -> a dict-like
    output whose "logits" the loss takes."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        keep = attention_mask.to(h.dtype)[..., None]
        return {"logits": self.fc((h * keep).sum(1) / keep.sum(1)), "hidden_states": h}


def keyword_port(params, input_ids, *, attention_mask, train=False, slip=False):
    h = params["embed"]["embedding"][input_ids]
    keep = attention_mask.astype(h.dtype)[..., None]
    pooled = (h * keep).sum(1) / (keep.sum(1) + (1.0 if slip else 0.0))
    return {"logits": pooled @ params["fc"]["kernel"] + params["fc"]["bias"], "hidden_states": h}


def _keyword_pair(name, port=keyword_port, **kw):
    from equivcheck import Custom, Ints, Lengths
    from equivcheck.models import cross_entropy
    from equivcheck.optim import optimizer_pair

    shapes = Custom(lambda rng: ((b := int(rng.integers(2, 4)), n := int(rng.integers(3, 6))), (b, n), (b,)),
                    ((2, 3), (2, 3), (2,)))
    return ModelPair(name, KeywordClassifier, port, Inputs(shapes, (Ints(0, 9), Lengths(dtype="int64"), Ints(0, 2))),
                     loss=cross_entropy(), optimizer=optimizer_pair(f"{name}.sgd", "SGD", lr=0.1),
                     **{"checks": ("forward", "grad", "train"), "keywords": ("attention_mask",), **kw})


def test_keyword_inputs_and_a_picked_output_run_every_check():
    records = _keyword_pair("kw_logits", output="logits").run_checks(dtype="float32", run=RUN)
    assert [r.outcome for r in records] == ["passed"] * 3, [r.failure_text() for r in records]


def test_a_slip_behind_keyword_inputs_is_found_and_localised():
    pair = _keyword_pair("kw_slip", port=lambda *a, **k: keyword_port(*a, **k, slip=True), output="logits",
                         checks=("forward",))
    (rec,) = pair.run_checks(dtype="float64", run=RUN)
    assert rec.outcome == "failed" and rec.side == "jax", rec.failure_text()
    assert "first diverging layer: fc " in rec.failure_text(), rec.failure_text()


def test_an_output_name_neither_side_has_is_named_with_the_keys_there():
    (rec,) = _keyword_pair("kw_missing", output="logit", checks=("forward",)).run_checks(dtype="float32", run=RUN)
    assert rec.outcome == "failed" and "has no 'logit' (it has ['logits', 'hidden_states'])" in rec.failure_text()


def test_keywords_are_checked_against_the_inputs():
    with pytest.raises(ValueError, match="at most one per model input"):
        _keyword_pair("kw_bad", keywords=("a", "b", "c"))
    with pytest.raises(ValueError, match="distinct argument names"):
        _keyword_pair("kw_bad", keywords=("attention mask",))


def test_a_plain_torch_factory_and_optax_transformation_are_enough_for_train():
    """No state mapping, no hyperparameter table: parameters and losses compared every step;
    a wrong optax eps fails and the pair's own step check names the optimizer."""
    import optax

    from equivcheck.models.zoo import mlp_pair
    from equivcheck.optim import OptimizerPair

    def adam(eps):
        return OptimizerPair(f"plain_adam_{eps}", lambda ps: torch.optim.Adam(ps, lr=1e-2),
                             lambda: optax.adam(1e-2, eps=eps))

    (ok,) = mlp_pair("mlp_plain", optimizer=adam(1e-8), checks=("train",)).run_checks(dtype="float32", run=RUN)
    assert ok.outcome == "passed", ok.failure_text()
    (bad,) = mlp_pair("mlp_plain_eps", optimizer=adam(1e-3), checks=("train",)).run_checks(dtype="float64", run=RUN)
    assert bad.outcome == "failed" and bad.side == "jax"
    assert "the optimizer differs: 'plain_adam_0.001' alone fails its step check" in bad.diagnosis, bad.diagnosis


class PaddedBag(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(40, 4, padding_idx=7)
        self.fc = torch.nn.Linear(4, 1)

    def forward(self, tokens):
        return self.fc(self.embed(tokens).mean(1))


def padded_bag_port(params, tokens, train=False):
    """Ported without padding_idx: row 7 gets a gradient that torch's does not."""
    return params["embed"]["embedding"][tokens].mean(1) @ params["fc"]["kernel"] + params["fc"]["bias"]


def test_an_embeddings_padding_idx_is_drawn_often_enough_to_show():
    """Token 7 of 40 is in a 2x3 batch with probability 0.14; drawn as a special value it is in
    most examples, so 3 examples find the port that gives its row a gradient (seed 6: without
    the special value these 3 examples pass)."""
    from equivcheck.models.edges import model_inputs

    inputs = Inputs(Fixed((((2, 3), (2, 1)),)), (Ints(0, 39), Floats(-1, 1)))
    assert model_inputs(inputs, PaddedBag()).args[0] == Ints(0, 39, special=(7,))
    pair = ModelPair("padded_bag", PaddedBag, padded_bag_port, inputs, loss=mse(), checks=("grad",))
    (rec,) = pair.run_checks(dtype="float64", run=RunSettings(examples=3, seed=6, shrink_seconds=5))
    assert rec.outcome == "failed" and "only row 7, the padding_idx" in rec.failure_text(), rec.failure_text()


def test_padding_masks_get_nearly_fully_masked_rows():
    from equivcheck.models.edges import EDGE_ROWS, model_inputs

    inputs = Inputs(Fixed((((64, 9), (64,)),)), (Lengths(min_keep=1), Ints(0, 2)))
    spec = model_inputs(inputs, PaddedBag()).args[0]
    assert spec.edge == EDGE_ROWS
    rows = spec.sample("float32", (64, 9), None, np.random.default_rng(0)).sum(1)
    assert rows.min() == 1 and (rows == 1).mean() > 0.15 and rows.max() > 1
    with pytest.raises(ValueError, match="edge is a share of rows"):
        Lengths(edge=2.0)
    with pytest.raises(ValueError, match=r"special values \[12\] lie outside \[0, 9\]"):
        Ints(0, 9, special=(12,))


class CeilPool(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 3, padding=1)
        self.pool = torch.nn.MaxPool2d(2, ceil_mode=True)
        self.fc = torch.nn.Linear(2, 1)

    def forward(self, x):
        return self.fc(self.pool(self.conv(x)).amax((2, 3)))


def test_a_ceil_mode_pool_gets_sizes_where_its_last_window_is_partial():
    """Square images of side 4..9: a 2x2 ceil_mode pool has a partial last window on odd sides
    only; the palette takes at least half of its shapes from those."""
    from equivcheck import Custom
    from equivcheck.models.edges import Steered, model_inputs, partial_window

    assert partial_window(CeilPool().pool, (5, 4)) and not partial_window(CeilPool().pool, (4, 6))
    rule = Custom(lambda rng: ((2, 1, n := int(rng.integers(4, 10)), n), (2, 1)), ((2, 1, 4, 4), (2, 1)))
    inputs = model_inputs(Inputs(rule, (Floats(-1, 1), Floats(-1, 1))), CeilPool())
    assert isinstance(inputs.shapes, Steered)
    palette = inputs.palette(0, 6)
    assert palette[0] == ((2, 1, 4, 4), (2, 1))
    assert sum(s[0][2] % 2 == 1 for s in palette[1:]) >= 3, palette
    assert inputs.palette(0, 1)[0][0][2] % 2 == 1  # the train check's one shape
    assert model_inputs(Inputs(rule, (Floats(-1, 1), Floats(-1, 1))), PaddedBag()).shapes is rule
