"""A ModelPair's checks timed on both sides: `forward`, `grad` and `train`, each the work of the check
of that name, on one batch drawn from the pair's own `Inputs` at a fixed seed.

The model and the port come from the model package itself: the torch module from
`models.sides.build_torch` (the pair's keywords and output selection bound), its weights converted by
the pair's own mapping (`models.evaluate.mapping`, `models.mapping.to_jax`: rules or `to_jax`), the port
called through the jitted programs the checks run (`models.sides.program`):

forward  eval mode, no gradients: torch `model(*x)` under no_grad; JAX the `forward_eval` program
grad     eval mode, forward + backward to every parameter's gradient: torch zeroes the gradients
         (set_to_none) and runs loss.backward(); JAX the `grad_eval` program (jax.value_and_grad, jitted)
train    one optimizer step in train mode: torch `models.sides.torch_step` (zero_grad, loss, backward,
         clipping, optimizer.step(), scheduler) updating parameters and state in place; JAX the
         `train_step` program, (params, BatchNorm statistics, optax state) returned, their buffers donated,
         each call continuing from the last. Dropout: torch's nn.Dropout draws its masks natively, the
         port applies fixed masks of the same shapes (both multiply by a mask; neither draws on the host).

A port that cannot be jitted, or any side that fails to build, raises `NotTimed` with the reason: the
benchmark item is skipped with it.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from equivcheck.backends import jax_side, torch_side
from equivcheck.bench.memory import jax_memory, torch_memory
from equivcheck.bench.workload import Workload, no_persistent_cache, shared_rules, xla_threads

MODEL_CHECKS = ("forward", "grad", "train")  # the ModelPair checks timed (modes, fit and onnx are not)
SWEPT = ("forward", "grad")  # the checks a model's batch sweep (x4, x16) times again
WORK = {"forward": "model forward (eval mode)", "grad": "model forward + backward to parameter gradients",
        "train": "one optimizer step on the model (train mode)"}
DROPOUT = ("dropout in the train step: torch's nn.Dropout draws its masks natively, the port applies fixed masks "
           "of the same shapes (both multiply by a mask on the device)")
WEIGHT_SEED = 0  # torch.manual_seed of the timed model: the weights the checks' witnesses also use


class NotTimed(Exception):
    """A side of a model check that cannot be timed; the message says why (the item's skip reason)."""


def scaled_batch(args: tuple[Any, ...], factor: int) -> tuple[Any, ...]:
    """`args` (the model's inputs and the target) with the batch, axis 0 of every array, repeated
    `factor` times. Raises NotTimed when the arrays do not share their first axis (a batch-second
    model cannot be swept that way)."""
    arrays = [a for a in args if isinstance(a, np.ndarray)]
    if factor == 1:
        return args
    if len({a.shape[0] if a.ndim else None for a in arrays}) != 1:
        raise NotTimed(f"the batch sweep repeats axis 0 of every input, and these arrays do not share it: "
                       f"{[list(a.shape) for a in arrays]}")
    return tuple(np.concatenate([a] * factor, axis=0) if isinstance(a, np.ndarray) else a for a in args)


def _weights(pair: Any, dtype: str, device: str) -> tuple[Any, Any]:
    """(the torch model, its weight mapping): built and converted as the checks build and convert them."""
    from equivcheck.models import sides as ms
    from equivcheck.models.evaluate import mapping

    return ms.build_torch(pair, WEIGHT_SEED, dtype, device), mapping(pair, dtype, device)


def _torch_call(pair: Any, check: str, model: Any, targs: list[Any], compiled: bool) -> Any:
    import torch

    from equivcheck.models import sides as ms

    run = torch.compile(model, dynamic=False) if compiled else model  # shares the model's parameters
    if check == "forward":
        model.eval()

        def call() -> Any:
            with torch.no_grad():
                return run(*targs[:-1])
        return call
    if check == "grad":
        model.eval()

        def call() -> Any:
            model.zero_grad(set_to_none=True)  # each call's gradients are its own, not a sum over calls
            loss = pair.loss.torch_fn(run(*targs[:-1]), targs[-1])
            loss.backward()
            return loss
        return call
    model.train(True)
    optimizer = pair.optimizer.torch_optimizer(list(model.parameters()))
    scheduler = pair.optimizer.torch_scheduler(optimizer) if pair.optimizer.torch_scheduler else None
    return lambda: ms.torch_step(pair, model, optimizer, scheduler, targs)


def torch_model_workload(pair: Any, check: str, args: tuple[Any, ...], dtype: str, device: str,
                         compiled: bool = False) -> Workload:
    """Torch's share of `check` (eager, or torch.compile of the module with `compiled`) on `args`."""
    import torch

    from equivcheck.models import sides as ms

    tb = torch_side()
    model, _ = _weights(pair, dtype, device)
    targs = ms.to_torch_args(args, device)
    # cuDNN's RNN has no backward in eval mode: the grad check turns it off around RNN modules (GPU only)
    cudnn = torch.backends.cudnn.enabled
    if check == "grad":  # the hooks stay on the model, which lives as long as the workload
        ms._rnn_hooks(model, False, device)
    inner = _torch_call(pair, check, model, targs, compiled)

    def call() -> Any:
        try:
            out = inner()
        finally:
            torch.backends.cudnn.enabled = cudnn
        tb.sync(device)
        return out

    start = time.perf_counter()
    call()
    first = time.perf_counter() - start
    compile_seconds = None
    if compiled:  # the first call compiled: a second call's time is what the steady state costs
        start = time.perf_counter()
        call()
        again = time.perf_counter() - start
        compile_seconds, first = max(first - again, 0.0), again
    memory, measure = torch_memory(call, device)
    how = "torch.compile of the module (inductor, dynamic=False)" if compiled else "eager"
    rules = [f"torch {how}: {WORK[check]}" + (", parameters and optimizer state updated in place (optimizer.step())"
                                              if check == "train" else ""),
             "grads zeroed (set_to_none) before every call" if check != "forward" else "no_grad: no graph kept",
             "synchronised: torch.cuda.synchronize() after every call" if device == "gpu"
             else "synchronised: torch's CPU kernels return when done",
             "compile time apart: first call minus the second" if compiled else "no compile step (eager)",
             "the model's weights converted to the port by the pair's own mapping"] + (
                 [DROPOUT] if check == "train" else [])
    return Workload("torch.compile" if compiled else "torch", call, compile_seconds, first, memory, measure,
                    rules + shared_rules(), torch.get_num_threads())


def jax_model_workload(pair: Any, check: str, args: tuple[Any, ...], dtype: str, device: str) -> Workload:
    """JAX's share of `check` on `args`: the check's own jitted program, compiled ahead (persistent cache
    off), every call ended by jax.block_until_ready on every output leaf. Raises NotTimed when the
    port cannot be traced and compiled."""
    import jax

    from equivcheck.models import mapping as mm
    from equivcheck.models import sides as ms

    jb = jax_side()
    dev = jb.device_of(device)
    model, ents = _weights(pair, dtype, device)
    x, y = list(args[:-1]), args[-1]
    masks: dict[str, Any] = {}
    if check == "train":  # the masks torch's dropout modules draw, in their shapes (one train forward)
        _, masks = ms.torch_forward(model, x, train=True, seed=WEIGHT_SEED, device=device)
    params, stats = mm.to_jax(ents, ms.torch_state(model))
    put = lambda tree: jax.device_put(ms._jnp_tree(tree, dtype), dev)
    with jb.x64(dtype == "float64"), no_persistent_cache():
        if check == "train":
            p = put(params)
            carry = (p, put(stats), jax.device_put(pair.optimizer.optax_transform().init(p), dev))
            placed: tuple[Any, ...] = (carry, (put(x), put(y), put(masks)))
        else:
            placed = (put(params), put(stats), put(x), *((put(y),) if check == "grad" else ()), put({}))
        jax.block_until_ready(placed)
        program = ms.program(pair, {"forward": "forward_eval", "grad": "grad_eval", "train": "train_step"}[check])
        start = time.perf_counter()
        try:
            executable = program.lower(*placed).compile()
        except Exception as exc:
            raise NotTimed(f"the port does not trace and compile under jax.jit ({check}, inputs "
                           f"{[list(np.shape(a)) for a in args]}): {type(exc).__name__}: "
                           f"{str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}") from exc
        compile_seconds = time.perf_counter() - start
    state = list(placed)

    def call() -> Any:
        out = executable(*state)
        if check == "train":  # the next step starts from this one's parameters, statistics and state
            state[0] = out[0]
        return jax.block_until_ready(out)

    start = time.perf_counter()
    call()
    first = time.perf_counter() - start
    memory, measure = jax_memory(call, executable, dev, device)
    rules = [f"jax jit: {WORK[check]}, the program the check runs" + (
                 ": parameters, statistics and optax state returned (input buffers donated)"
                 if check == "train" else ""),
             "synchronised: jax.block_until_ready on every output leaf",
             "compile time apart: trace+lower+compile timed before the first call, persistent cache off",
             "the model's weights converted to the port by the pair's own mapping"] + (
                 [DROPOUT] if check == "train" else [])
    return Workload("jax", call, compile_seconds, first, memory, measure, rules + shared_rules(), xla_threads())


def build_model(pair: Any, check: str, side: str, args: tuple[Any, ...], dtype: str, device: str) -> Workload:
    """The workload of `side` ("torch", "jax", "torch.compile") for model check `check` on `args`
    (the model's inputs, then the target). Raises NotTimed, saying why, for a side that cannot be
    timed: torch.compile of a train step is not timed, a port that does not jit, a side that raises."""
    if check not in MODEL_CHECKS:
        raise ValueError(f"model check {check!r} is not benchmarked; choose from {MODEL_CHECKS}")
    if side == "torch.compile" and check == "train":
        raise NotTimed("torch.compile of a whole optimizer step is not timed (forward and grad are)")
    try:
        if side == "jax":
            return jax_model_workload(pair, check, args, dtype, device)
        if side in ("torch", "torch.compile"):
            return torch_model_workload(pair, check, args, dtype, device, compiled=side == "torch.compile")
    except NotTimed:
        raise
    except Exception as exc:  # a side that fails here is not timed: the run goes on, saying why
        raise NotTimed(f"the {side} side failed to run for timing: {type(exc).__name__}: {str(exc)[:300]}") from exc
    raise ValueError(f"side {side!r}: choose from torch, jax, torch.compile")
