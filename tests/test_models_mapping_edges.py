"""The user's own mapping on the edges a new user's trial found: tied weights, integer and
constant leaves, statistics in lists, frozen parameters (and ones frozen on one side only),
layouts that are not rearrangements, registered modules with children, and the messages for
ports that return the wrong thing."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from equivcheck import Fixed, Floats, Inputs, Ints, Lengths, weights
from equivcheck.engine.records import RunSettings
from equivcheck.models import ModelPair, mse
from equivcheck.models.converter import UserMapping
from equivcheck.models.edges import model_inputs
from equivcheck.optim import optimizer_pair
from equivcheck.weights import ConversionError

RUN = RunSettings(examples=3, seed=1, shrink_seconds=5)
IN2 = Inputs(Fixed((((4, 3), (4, 2)),)), (Floats(-1, 1), Floats(-1, 1)))


def _np(t):
    return t.detach().numpy()


def outcomes(pair, dtype="float64"):
    records = pair.run_checks(dtype=dtype, run=RUN)
    return {r.check: r.outcome for r in records}, [r.failure_text() for r in records if r.outcome != "passed"]


class TwoLinear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 3)
        self.out = torch.nn.Linear(3, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.fc(x)))


def two_apply(p, x, train=False):
    return jnp.tanh(x @ p["fc"]["kernel"] + p["fc"]["bias"]) @ p["out"]["kernel"] + p["out"]["bias"]


def two_converter(m):
    return {"fc": {"kernel": _np(m.fc.weight).T, "bias": _np(m.fc.bias)},
            "out": {"kernel": _np(m.out.weight).T, "bias": _np(m.out.bias)}}


class Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(6, 4)
        self.mid = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 6, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, t):
        return self.head(torch.tanh(self.mid(self.embed(t)))).mean(1)


def tied_port(p, t, train=False):
    e = p["embed"]["embedding"]
    return (jnp.tanh(e[t] @ p["mid"]["kernel"] + p["mid"]["bias"]) @ e.T).mean(1)


def test_a_tied_weight_is_one_trainable_tensor_to_the_converter():
    """state_dict lists the shared tensor twice; it was read as head.weight, which
    named_parameters() does not list, and the embedding became a statistic."""
    conv = lambda m: {"embed": {"embedding": _np(m.embed.weight)},
                      "mid": {"kernel": _np(m.mid.weight).T, "bias": _np(m.mid.bias)}}
    pair = ModelPair("tied", Tied, tied_port, Inputs(Fixed((((3, 5), (3, 6)),)), (Ints(0, 5), Floats(-1, 1))),
                     loss=mse(), optimizer=optimizer_pair("tied.sgd", "SGD", lr=0.1), steps=3,
                     checks=("forward", "grad", "train"), to_jax=conv)
    got, why = outcomes(pair)
    assert got == dict.fromkeys(("forward", "grad", "train"), "passed"), why


class IntBuf(TwoLinear):
    def __init__(self):
        super().__init__()
        self.register_buffer("perm", torch.tensor([2, 0, 1]))
        self.register_buffer("table", torch.linspace(0.5, 1.5, 3), persistent=False)

    def forward(self, x):
        return super().forward(x[:, self.perm] * self.table)


def test_integer_and_constant_leaves_of_a_converter_are_not_trained():
    conv = lambda m: {**two_converter(m), "perm": m.perm.numpy(), "table": np.linspace(0.5, 1.5, 3)}
    pair = ModelPair("intbuf", IntBuf, lambda p, x, train=False: two_apply(p, x[:, p["perm"]] * p["table"]), IN2,
                     loss=mse(), optimizer=optimizer_pair("intbuf.sgd", "SGD", lr=0.1), steps=3,
                     checks=("forward", "grad", "train"), to_jax=conv)
    got, why = outcomes(pair)
    assert got == dict.fromkeys(("forward", "grad", "train"), "passed"), why


class Blocks(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))])

    def forward(self, x):
        return self.layers[0](x)


def test_statistics_inside_a_list_are_refused_saying_to_use_dict_keys():
    def conv(m):
        lin, bn = m.layers[0]
        return {"layers": [{"kernel": _np(lin.weight).T, "bias": _np(lin.bias), "scale": _np(bn.weight),
                            "shift": _np(bn.bias), "mean": _np(bn.running_mean), "var": _np(bn.running_var)}]}

    with pytest.raises(ConversionError, match=r"leaf layers/0/mean holds statistics .* inside a list"):
        UserMapping(conv, Blocks())
    with pytest.raises(ConversionError, match="to_jax returned None"):
        UserMapping(lambda m: None, Blocks())


def test_a_converter_is_read_backwards_where_it_has_an_inverse():
    """The float32 rounding rule loads the port's weights back into torch (equivcheck.models.sensitivity):
    a converter's map, read element by element, runs backwards; a tied key gets its tensor; an element
    that only enters a sum has no unique inverse, and the error names its tensor."""
    torch.manual_seed(0)
    model = Tied()
    um = UserMapping(lambda m: {"embed": {"embedding": _np(m.embed.weight)},
                                "mid": {"kernel": 2.0 * _np(m.mid.weight).T, "bias": _np(m.mid.bias)}}, model)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    params, stats = um.to_jax(state)
    back = um.to_torch(params, stats)
    assert set(back) == set(state)
    for k, v in state.items():
        np.testing.assert_allclose(back[k], v, rtol=1e-6, err_msg=k)
    summed = UserMapping(lambda m: {"fc": {"kernel": _np(m.fc.weight).T, "bias": _np(m.fc.bias) + _np(m.out.bias)[0]},
                                    "out": {"kernel": _np(m.out.weight).T}}, TwoLinear())
    with pytest.raises(ConversionError, match=r"'fc.bias' cannot be read back .* only summed"):
        summed.to_torch(*summed.to_jax({k: v.detach().numpy() for k, v in TwoLinear().state_dict().items()}))


def test_a_frozen_parameter_has_no_gradient_to_compare():
    def frozen():
        m = TwoLinear()
        m.fc.weight.requires_grad_(False)
        return m

    pair = ModelPair("frozen", frozen, two_apply, IN2, loss=mse(), checks=("grad",), to_jax=two_converter)
    got, why = outcomes(pair)
    assert got == {"grad": "passed"}, why


def _frozen_fc():
    m = TwoLinear()
    m.fc.weight.requires_grad_(False)
    return m


@pytest.mark.parametrize("to_jax", [None, two_converter], ids=["automatic", "to_jax"])
def test_a_parameter_frozen_in_torch_that_the_port_trains_is_named(to_jax):
    """torch's optimizer never moves fc.weight; the port's SGD does. Losses and gradients agree
    at step 1, so the verdict was "the optimizer pair passes its own checks"."""
    pair = ModelPair("frozen_moved", _frozen_fc, two_apply, IN2, loss=mse(), to_jax=to_jax, steps=3,
                     optimizer=optimizer_pair("frozen_moved.sgd", "SGD", lr=0.1), checks=("train",))
    (rec,) = pair.run_checks(dtype="float64", run=RUN)
    assert rec.outcome == "failed" and rec.side == "jax", rec.failure_text()
    assert "parameter 'fc.weight' is frozen on the torch side (requires_grad=False" in rec.diagnosis, rec.diagnosis
    assert "but the port updates it" in rec.diagnosis and "optimizer pair" not in rec.diagnosis, rec.diagnosis


def _stop_fc(p, x, train=False):
    return two_apply({**p, "fc": {**p["fc"], "kernel": jax.lax.stop_gradient(p["fc"]["kernel"])}}, x, train)


def _masked_sgd():
    import optax

    from equivcheck.optim import OptimizerPair

    def labels(p):  # any tree (the optimizer pair's own checks use theirs): fc's kernel is frozen
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "frozen" if jax.tree_util.keystr(path) == "['fc']['kernel']" else "sgd", p)

    return OptimizerPair("masked_sgd", lambda ps: torch.optim.SGD(ps, lr=0.1),
                         lambda: optax.multi_transform({"sgd": optax.sgd(0.1), "frozen": optax.set_to_zero()}, labels))


@pytest.mark.parametrize("how", ["stop_gradient", "optax_mask"])
def test_a_parameter_trained_in_torch_that_the_port_freezes_is_named(how):
    apply, opt = (_stop_fc, optimizer_pair("stopped.sgd", "SGD", lr=0.1)) if how == "stop_gradient" else \
        (two_apply, _masked_sgd())
    checks = ("grad", "train") if how == "stop_gradient" else ("train",)
    pair = ModelPair(f"frozen_{how}", TwoLinear, apply, IN2, loss=mse(), optimizer=opt, steps=3, checks=checks)
    for rec in pair.run_checks(dtype="float64", run=RUN):
        assert rec.outcome == "failed" and rec.side == "jax", rec.failure_text()
        assert "parameter 'fc.weight' is trainable on the torch side (requires_grad=True" in rec.diagnosis, \
            rec.diagnosis
        assert "the port does not update it" in rec.diagnosis and "(frozen there" in rec.diagnosis, rec.diagnosis


def test_a_layout_that_scales_is_refused_naming_the_rule():
    weights.register_layout("test_half_linear", weights.Layout(
        {"weight": "kernel", "bias": "bias"}, {"weight": lambda a, m: a.T * 0.5, "bias": lambda a, m: a},
        {"weight": lambda a, m: a.T * 2, "bias": lambda a, m: a}), replace=True)
    pair = ModelPair("half", TwoLinear, two_apply, IN2, loss=mse(), checks=("forward", "grad"),
                     rules=(weights.Rule("fc", "fc", "test_half_linear"),))
    records = pair.run_checks(dtype="float64", run=RUN)
    assert all("layout 'test_half_linear' does not only rearrange 'weight'" in r.failure_text() for r in records)
    with pytest.raises(TypeError, match=r"to_jax\['weight'\] must be callable"):
        weights.register_layout("test_bad", weights.Layout({"weight": "kernel"}, {"weight": 1}, {"weight": 2}))
    with pytest.raises(TypeError, match="names must map each torch parameter name"):
        weights.register_layout("test_bad", weights.Layout(["weight"], {}, {}))


class GainLin(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.gain = torch.nn.Parameter(torch.linspace(0.5, 1.5, 3)[None])
        self.fc = torch.nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(x * self.gain)


def test_a_registered_module_converts_its_own_tensors_and_its_children_convert_as_usual():
    weights.register_module(GainLin, "test_gain_lin", lambda sd: {"scale": sd["gain"].reshape(-1)},
                            lambda tree: {"gain": tree["scale"].reshape(1, -1)})
    model = lambda: torch.nn.Sequential(GainLin())
    port = lambda p, x, train=False: (x * p["0"]["scale"]) @ p["0"]["fc"]["kernel"] + p["0"]["fc"]["bias"]
    got, why = outcomes(ModelPair("gain_lin", model, port, IN2, loss=mse(), checks=("forward", "grad")))
    assert got == {"forward": "passed", "grad": "passed"}, why


class Normed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 2)
        self.bn = torch.nn.BatchNorm1d(2)

    def forward(self, x):
        return {"logits": self.bn(self.fc(x))}


def normed_port(p, x, train=False):
    h = x @ p["fc"]["kernel"] + p["fc"]["bias"]
    out = (h - p["bn"]["mean"]) / jnp.sqrt(p["bn"]["var"] + 1e-5) * p["bn"]["scale"] + p["bn"]["bias"]
    return {"logits": out}, {"bn": {"mean": p["bn"]["mean"], "var": p["bn"]["var"]}}


def test_a_port_returning_statistics_with_a_picked_output_is_told_to_set_stateful():
    (rec,) = ModelPair("normed", Normed, normed_port, IN2, checks=("forward",), output="logits").run_checks(
        dtype="float32", run=RUN)
    assert rec.outcome == "failed" and "the port returns statistics: set stateful=True" in rec.failure_text(), \
        rec.failure_text()


def test_no_shape_hint_when_the_closest_value_is_the_modules_input():
    (rec,) = ModelPair("scaled_input", lambda: torch.nn.Sequential(torch.nn.Linear(3, 2)),
                       lambda p, x, train=False: (x * 1.001) @ p["0"]["kernel"] + p["0"]["bias"], IN2,
                       checks=("forward",)).run_checks(dtype="float64", run=RUN)
    assert rec.outcome == "failed" and "first diverging layer: 0 " in rec.failure_text()
    assert "hint: shape" not in rec.failure_text(), rec.failure_text()


def test_a_mask_spec_with_edge_zero_keeps_its_choice():
    inputs = Inputs(Fixed((((4, 5), (4,)),)), (Lengths(edge=0.0), Ints(0, 1)))
    assert model_inputs(inputs, TwoLinear()).args[0].edge == 0.0


def test_a_float32_converter_past_exact_tags_is_read_in_chunks(monkeypatch):
    """Tags past 2**24 are not exact in float32: a 20M-element model with a `.float()` converter
    was refused as "not a rearrangement". The read goes tensor by tensor, _EXACT tags at a time;
    here _EXACT is 4, so every tensor of TwoLinear is read in chunks."""
    from equivcheck.models import converter

    monkeypatch.setattr(converter, "_EXACT", 4)
    model = TwoLinear()
    um = UserMapping(lambda m: {k: {n: v.astype(np.float32) for n, v in d.items()} for k, d in two_converter(m).items()},
                     model)
    sd = {k: _np(v) for k, v in model.state_dict().items()}
    g = {"fc": {"kernel": np.arange(9.0).reshape(3, 3), "bias": np.ones(3)}, "out": {"kernel": np.ones((3, 2)),
                                                                                 "bias": np.ones(2)}}
    back = um.grads_to_torch(g, sd)
    np.testing.assert_array_equal(back["fc.weight"], np.arange(9.0).reshape(3, 3).T)
    np.testing.assert_array_equal(back["out.weight"], np.ones((2, 3)))


def test_a_tied_weight_converts_once_in_the_automatic_mapping():
    """The head sharing the embedding's weight was converted as a Linear of its own: a correct
    port reading the embedding for both uses passed forward and grad and failed train (the
    head leaf never moved on the JAX side), called "rounding"."""
    from equivcheck.models import mapping as mm

    assert [e.module for e in mm.entries(Tied())] == ["embed", "mid"]
    pair = ModelPair("tied_auto", Tied, tied_port, Inputs(Fixed((((3, 5), (3, 6)),)), (Ints(0, 5), Floats(-1, 1))),
                     loss=mse(), optimizer=optimizer_pair("tied_auto.sgd", "SGD", lr=0.1), steps=3,
                     checks=("forward", "grad", "train"))
    got, why = outcomes(pair)
    assert got == dict.fromkeys(("forward", "grad", "train"), "passed"), why
