"""What the first `--device=gpu` run (an H200, torch 2.11, jax 0.11) found, made checkable on a CPU:
torch functions that make their own tensors met inputs on the GPU, cuDNN refused an RNN's
eval-mode backward, TF32 rounding through a chain of matmuls failed a correct port, and a float64
failure the arbiter's CPU re-run could not show named both sides."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch

from equivcheck import Fixed, Floats, Inputs, Pair, unary
from equivcheck.backends import torch as tb
from equivcheck.engine import tolerance
from equivcheck.models.sides import _rnn_hooks
from equivcheck.ops.autodiff import evaluate, judge
from equivcheck.ops.conditioning import rounding
from equivcheck.ops.diagnose import diagnose
from suites._kit import module

META = torch.device("meta")  # a device other than the CPU that every machine has


def test_a_torch_function_s_own_tensors_land_on_the_check_s_device():
    with tb.placed(META):
        assert torch.ones(2).device == META
        assert torch.get_default_device() == META
    with tb.placed(torch.device("cpu")):
        assert torch.get_default_device() == torch.device("cpu")


def test_the_suites_module_cache_keeps_one_module_per_device():
    # nn.multihead_attention, the norm traps: a LayerNorm cached on the CPU met cuda inputs.
    cpu = module(torch.nn.LayerNorm, 3)
    with tb.placed(META):
        there = module(torch.nn.LayerNorm, 3)
    assert cpu.weight.device == torch.device("cpu") and there.weight.device == META
    assert module(torch.nn.LayerNorm, 3) is cpu


def _flags_inside(model, train, device):
    seen = []
    for m in model.modules():
        if isinstance(m, torch.nn.RNNBase):
            m.register_forward_hook(lambda *a: seen.append(torch.backends.cudnn.enabled))
    before = torch.backends.cudnn.enabled
    handles = _rnn_hooks(model, train, device)
    try:
        model(torch.zeros(1, 2, 3))
    finally:
        for h in handles:
            h.remove()
    return seen, before, torch.backends.cudnn.enabled


def test_cudnn_is_off_inside_rnn_modules_for_eval_mode_gradients_on_a_gpu():
    # "cudnn RNN backward can only be called in training mode": lstm::grad, gru::grad on the H200.
    model = torch.nn.Sequential(torch.nn.LSTM(3, 2, batch_first=True))
    seen, before, after = _flags_inside(model, train=False, device="gpu")
    assert seen == [False] and after == before
    assert _flags_inside(model, train=True, device="gpu")[0] == [before]  # train mode: cuDNN has a backward
    assert _flags_inside(model, train=False, device="cpu")[0] == [before]


def _tf32(a):
    """TF32's rounding of a matmul's float32 operands (10 explicit mantissa bits), as JAX does on a
    GPU at default precision; float64 is computed in full."""
    return jax.lax.reduce_precision(a, exponent_bits=8, mantissa_bits=10) if a.dtype == jnp.float32 else a


def _mlp_pair(scale=1.0):
    return Pair("mlp_tf32", lambda x, w1, w2: torch.tanh(x @ w1) @ w2,
                lambda x, w1, w2: _tf32(jnp.tanh(_tf32(x) @ _tf32(w1 * scale))) @ _tf32(w2),
                Inputs(Fixed((((1, 3), (3, 2), (2, 1)),)), (Floats(-3, 3),) * 3), checks=("forward",),
                tags={"matmul"})


# Two tanh units whose weighted sum cancels to ~3e-5: TF32's rounding of the terms (~13.7 each)
# is ~0.03 there, 10x the TF32 row of the table.
ARGS = [np.array([[2.9, -2.7, 1.3]], np.float32), np.array([[0.31, -0.7], [0.33, 0.9], [0.1, 0.2]], np.float32),
        np.array([[100.0], [13.7192]], np.float32)]
TF32_TOL = tolerance.lookup("float32", device="gpu", precision="default", tags=frozenset({"matmul"}))


def _rounding(pair, tol):
    ev = evaluate(pair, ARGS, 0, dtype="float32", device="cpu", checks=("forward",))
    verdict = judge(pair, ev, "forward", tol, ARGS)
    assert not verdict.ok, "the example must be past the bound for the test to mean anything"
    return rounding(pair, "forward", ARGS, ev, verdict, "float32", tol, seed=0)


def test_tf32_rounding_through_a_chain_of_matmuls_is_rounding_at_tf32_s_unit():
    # ckpt_cnn_pt_to_orbax_flax at --equiv-precision default on the H200: JAX 0.0117 off an output
    # of -0.0094, torch 3e-6 off; judged at float32's unit that read "jax is off".
    assert TF32_TOL.unit == 2.0**-10
    assert _rounding(_mlp_pair(), TF32_TOL).explained
    assert not _rounding(_mlp_pair(), tolerance.lookup("float32", tags=frozenset({"matmul"}))).explained


def test_a_wrong_weight_is_not_excused_as_tf32_rounding():
    found = _rounding(_mlp_pair(scale=1.01), TF32_TOL)
    assert not found.explained and "float64" in found.why


def test_a_float64_failure_the_cpu_re_run_does_not_show_is_the_device_s_kernel():
    # random_resized_crop::forward::float64 on the H200: torch 0.556, JAX and the reference 0. The
    # arbiter's float64 re-run runs on the CPU, where both sides gave 0; it read "the two sides
    # differ in float64 too (0)" and named both. Here the failing run's torch is made to differ
    # from what the CPU re-run computes, as a GPU kernel would.
    pair = Pair("tanh_device", torch.tanh, jnp.tanh, unary(Floats(-3, 3)), checks=("forward",))
    kernel = pair.replace(torch_fn=lambda x: torch.tanh(x) + (x > 0.5) * 0.5)
    args = [np.array([0.25, 1.0, -2.0])]
    ev = evaluate(kernel, args, 0, dtype="float64", device="cpu", checks=("forward",))
    tol = tolerance.lookup("float64")
    verdict = judge(pair, ev, "forward", tol, args)
    assert not verdict.ok
    diagnose(pair, "forward", args, ev, verdict, dtype="float64", tol=tol)
    assert verdict.side == "torch"
    assert "a kernel of this run's device" in verdict.diagnosis


def test_a_float64_difference_on_the_cpu_itself_is_still_judged_by_the_reference():
    pair = Pair("tanh_wrong", lambda x: torch.tanh(x) + (x > 0.5) * 0.5, jnp.tanh, unary(Floats(-3, 3)),
                checks=("forward",), reference=np.tanh)
    args = [np.array([0.25, 1.0, -2.0])]
    ev = evaluate(pair, args, 0, dtype="float64", device="cpu", checks=("forward",))
    tol = tolerance.lookup("float64")
    verdict = judge(pair, ev, "forward", tol, args)
    diagnose(pair, "forward", args, ev, verdict, dtype="float64", tol=tol)
    assert verdict.side == "torch" and "device" not in verdict.diagnosis
    assert "differ in float64 too" in verdict.diagnosis


def test_an_optimizer_state_gap_at_float32_rounding_is_not_blamed_on_the_state_map():
    # rmsprop_centered_momentum::mlp::float32 on the H200: momentum_buffer 90 ulps apart (8e-6
    # relative) at step 2, the parameters within bounds; it read "check the StateField for it".
    from equivcheck.engine.compare import LeafDiff, Verdict
    from equivcheck.optim.diagnose import _state_only
    from equivcheck.optim.trajectory import Outcome

    def outcome(rel):
        state = LeafDiff("out['state']['momentum_buffer']['w2']", (8, 1), "float32", 4.3e-5, rel, 90.0, 1.6, 0.125,
                         (6, 0), -5.3292594, -5.32921648)
        params = LeafDiff("out['params']['w2']", (8, 1), "float32", 1e-7, 1e-7, 1.0, 0.1, 0.0, (0, 0), 0.5, 0.5)
        return Outcome(False, Verdict(False, "values", leaves=[state, params], path=state.path), step=2)

    assert _state_only(outcome(8.05e-6)) == ""
    assert "check the StateField" in _state_only(outcome(0.5))
