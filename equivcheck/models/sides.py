"""Both sides of a model check, NumPy in and NumPy out.

torch runs eagerly with forward hooks: every nn.Dropout draws its mask from a NumPy
generator seeded by (example, module, step) and applies it itself, and the same masks go
to the port (equivcheck.models.dropout), so train mode is deterministic on both sides.
JAX runs jitted programs: a forward, a loss with its gradient, and the whole K-step
trajectory as one lax.scan (compiled once per input shape, whatever number of steps the
example compares).
"""
from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from equivcheck.backends import deadline
from equivcheck.models import mapping as mm
from equivcheck.models.calls import apply_port, bind_torch
from equivcheck.models.tap import capturing
from equivcheck.ops.strategies import Static


def mask_seed(seed: int, name: str, step: int) -> int:
    return zlib.crc32(f"{seed}:{name}:{step}".encode())


# ---- torch ------------------------------------------------------------------------------

@deadline.side("torch")
def build_torch(pair: Any, seed: int, dtype: str, device: str) -> Any:
    import torch

    from equivcheck.backends.torch import _TORCH_DTYPES, device_of

    torch.manual_seed(seed)
    model = pair.torch_model()
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"torch_model() returned {type(model).__name__}, not an nn.Module")
    return bind_torch(pair, model.to(device=device_of(device), dtype=_TORCH_DTYPES[dtype]))


def _dropout_hooks(model: Any, masks: dict[str, Any], seed: int, step: int) -> list[Any]:
    import torch

    handles = []
    for name, module in model.named_modules():
        if type(module) is not torch.nn.Dropout:
            if isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p > 0:
                raise ValueError(f"module {name!r} is {type(module).__name__}: only nn.Dropout's masks are matched")
            continue

        def hook(mod: Any, args: tuple[Any, ...], out: Any, name: str = name) -> Any:
            x = args[0]
            if name not in masks:
                rng = np.random.default_rng(mask_seed(seed, name, step))
                masks[name] = rng.random(tuple(x.shape)) >= mod.p
            if not mod.training or mod.p == 0:
                return None
            keep = torch.from_numpy(masks[name]).to(x.device)
            return torch.where(keep, x / (1 - mod.p), torch.zeros_like(x))

        handles.append(module.register_forward_hook(hook))
    return handles


def _rnn_hooks(model: Any, train: bool, device: str) -> list[Any]:
    """cuDNN off around each RNN module's forward, for gradients in eval mode on a GPU: cuDNN's RNN
    has no backward there ("cudnn RNN backward can only be called in training mode"); torch's
    native RNN kernels compute the same function and differentiate it. Other modules keep cuDNN
    (and its TF32 convolutions). Undone per module; the caller restores the flag whatever happens."""
    import torch

    if train or device == "cpu":
        return []
    saved: list[bool] = []

    def off(mod: Any, args: Any) -> None:
        saved.append(torch.backends.cudnn.enabled)
        torch.backends.cudnn.enabled = False

    def back(mod: Any, args: Any, out: Any) -> None:
        torch.backends.cudnn.enabled = saved.pop()

    return [h for m in model.modules() if isinstance(m, torch.nn.RNNBase)
            for h in (m.register_forward_pre_hook(off), m.register_forward_hook(back))]


def to_torch_args(args: Sequence[Any], device: str) -> list[Any]:
    from equivcheck.backends.torch import device_of, to_torch

    return [to_torch(a, device_of(device)) for a in args]


@deadline.side("torch")
def torch_forward(model: Any, inputs: Sequence[Any], *, train: bool, seed: int, device: str, step: int = 0,
                  masks: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
    """(output, masks drawn) with the model in train or eval mode."""
    import torch

    from equivcheck.backends.torch import to_numpy

    masks = {} if masks is None else masks
    model.train(train)
    handles = _dropout_hooks(model, masks, seed, step)
    try:
        with torch.no_grad():
            out = model(*to_torch_args(inputs, device))
    finally:
        for h in handles:
            h.remove()
    return to_numpy(out), masks


def torch_state(model: Any) -> dict[str, np.ndarray]:
    from equivcheck.backends.torch import to_numpy

    return {k: to_numpy(v) for k, v in model.state_dict().items()}


@deadline.side("torch")
def torch_grad(pair: Any, model: Any, inputs: Sequence[Any], target: Any, *, train: bool, seed: int,
               device: str, step: int = 0) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """({"loss", "out", "masks"}, gradients by torch parameter name); "masks" holds the dropout
    masks the forward drew (applied in train mode only; those of training step `step`), for the
    port to take the same ones."""
    import torch

    from equivcheck.backends.torch import to_numpy

    masks: dict[str, Any] = {}
    model.train(train)
    model.zero_grad(set_to_none=True)
    cudnn = torch.backends.cudnn.enabled
    handles = _dropout_hooks(model, masks, seed, step) + _rnn_hooks(model, train, device)
    try:
        out = model(*to_torch_args(inputs, device))
        loss = pair.loss.torch_fn(out, to_torch_args([target], device)[0])
        loss.backward()
    finally:
        torch.backends.cudnn.enabled = cudnn
        for h in handles:
            h.remove()
    grads = {n: to_numpy(p.grad) if p.grad is not None else np.zeros(tuple(p.shape), to_numpy(p.detach()).dtype)
             for n, p in model.named_parameters() if p.requires_grad}  # a frozen parameter has no gradient
    return {"loss": to_numpy(loss), "out": to_numpy(out), "masks": masks}, grads


@deadline.side("torch")
def torch_train(pair: Any, model: Any, ents: Sequence[mm.Entry], batches: Sequence[tuple[Any, ...]], *, seed: int,
                device: str, grads: bool = False, given: Sequence[Mapping[str, Any]] | None = None
                ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """K optimizer steps in torch's own loop: per step the loss before it, and the parameters
    and BatchNorm statistics after it (in the port's layout), with `grads` also the gradient it
    took (by torch name, before clipping); and the masks each step drew. `given[t]` (by torch
    name), if given, replaces step t's gradient before clipping (equivcheck.models.sensitivity)."""
    import torch

    from equivcheck.backends.torch import to_numpy

    opt_pair = pair.optimizer
    optimizer = opt_pair.torch_optimizer(list(model.parameters()))
    scheduler = opt_pair.torch_scheduler(optimizer) if opt_pair.torch_scheduler else None
    model.train(True)
    steps, all_masks = [], []
    for t, batch in enumerate(batches):
        masks: dict[str, Any] = {}
        taken: dict[str, Any] = {}

        def keep(taken: dict[str, Any] = taken, t: int = t) -> None:
            if given is not None:
                with torch.no_grad():
                    for n, p in model.named_parameters():
                        if p.grad is not None:
                            p.grad.copy_(torch.as_tensor(np.asarray(given[t][n])).to(p.grad))
            if grads:
                taken.update({n: to_numpy(p.grad) for n, p in model.named_parameters() if p.grad is not None})

        handles = _dropout_hooks(model, masks, seed, t)
        try:
            loss = torch_step(pair, model, optimizer, scheduler, to_torch_args(batch, device),
                              after_backward=keep if grads or given is not None else None)
        finally:
            for h in handles:
                h.remove()
        with torch.no_grad():
            params, stats = mm.to_jax(ents, torch_state(model))
        steps.append({"loss": to_numpy(loss), "params": params, "stats": stats, **({"grads": taken} if grads else {})})
        all_masks.append(masks)
    return steps, all_masks


def torch_step(pair: Any, model: Any, optimizer: Any, scheduler: Any, targs: Sequence[Any],
               after_backward: Any = None) -> Any:
    """One training step of the model in its current mode on tensors `targs` (inputs, then the
    target): gradients zeroed (set to None), loss, backward, `after_backward()` if given (the
    rounding test moves the gradients there: equivcheck.models.sensitivity), the pair's clipping,
    optimizer.step() and its scheduler's step; parameters and optimizer state updated in place.
    Returns the loss (a 0-d tensor). The `train` check's loop and the `--equiv-bench` train step
    both run it."""
    import warnings

    opt_pair = pair.optimizer
    optimizer.zero_grad(set_to_none=True)
    loss = pair.loss.torch_fn(model(*targs[:-1]), targs[-1])
    loss.backward()
    if after_backward is not None:
        after_backward()
    if opt_pair.torch_clip:
        opt_pair.torch_clip(list(model.parameters()))
    optimizer.step()
    if scheduler is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scheduler.step(float(loss)) if opt_pair.schedule_takes_loss else scheduler.step()
    return loss


# ---- jax --------------------------------------------------------------------------------

_PROGRAMS: dict[Any, tuple[Any, Any]] = {}


def _jnp_tree(tree: Any, dtype: str) -> Any:
    import jax
    import jax.numpy as jnp

    def conv(x: Any) -> Any:
        a = np.asarray(x)
        if a.dtype.kind in "iu" and dtype != "float64":
            a = a.astype(np.int32)  # JAX keeps int32 without x64: say so explicitly, no warning
        return jnp.asarray(a)

    return jax.tree.map(conv, tree)


def _forward(pair: Any, params: Any, stats: Any, inputs: Sequence[Any], masks: Mapping[str, Any], train: bool,
             record: bool) -> tuple[Any, Any, dict[str, Any]]:
    with capturing(masks, record) as cap:
        res = apply_port(pair, mm.merge(params, stats), inputs, train)
    out, new_stats = port_output(pair, res, stats)
    return out, (new_stats if train else stats), dict(cap.taps or {})


def _paths(tree: Any) -> set[str]:
    import jax

    return {jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _overlay(old: Any, new: Any) -> Any:
    """`new` over `old`, mapping by mapping: what `new` leaves out keeps its old value."""
    if not (isinstance(old, Mapping) and isinstance(new, Mapping)):
        return new
    return {**old, **{k: _overlay(old[k], v) if k in old else v for k, v in new.items()}}


def port_output(pair: Any, res: Any, stats: Any) -> tuple[Any, Any]:
    """(output, statistics) of what the port returned, or TypeError saying which of
    `stateful` and the port's return is off: a stateful port returns (output, statistics) in
    eval mode too; a port returning a pair whose second part is shaped like the model's
    BatchNorm statistics needs stateful=True (else it compares as "jax gives list of 2")."""
    two = isinstance(res, (tuple, list)) and len(res) == 2
    if pair.stateful:
        if not two:
            what = f"an array of shape {tuple(res.shape)}" if hasattr(res, "shape") else type(res).__name__
            raise TypeError(f"ModelPair {pair.name!r} has stateful=True, but the port returns a bare output "
                            f"({what}), not (output, statistics): a stateful port returns them in eval mode too "
                            "(the statistics unchanged there)")
        # statistics the port leaves out keep their values (constants the converter placed there)
        return res[0], _overlay(stats, res[1])
    if two and isinstance(res[1], Mapping) and stats and _paths(res[1]) == _paths(stats):
        raise TypeError(f"the port returns statistics: set stateful=True on ModelPair {pair.name!r} (it returns "
                        f"(output, a tree of the model's BatchNorm statistics {sorted(stats)}))")
    return res, stats


def program(pair: Any, kind: str) -> Any:
    """The jitted program of one kind for this pair: forward_eval/forward_train, grad_eval/grad_train,
    train (the K-step scan), train_grads (the scan, recording each step's gradient) or train_step
    (one step, for --equiv-bench)."""
    import jax

    key = (id(pair), kind)
    if key in _PROGRAMS:
        return _PROGRAMS[key][1]
    if kind in ("forward_eval", "forward_train"):
        train = kind == "forward_train"
        fn = jax.jit(lambda p, s, x, m: _forward(pair, p, s, x, m, train, False)[:2])
    elif kind in ("grad_eval", "grad_train"):
        train = kind == "grad_train"
        fn = jax.jit(jax.value_and_grad(lambda p, s, x, y, m: _loss(pair, p, s, x, y, m, train), has_aux=True))
    elif kind in ("train", "train_grads"):  # train_grads: each step's gradient too (models.sensitivity)
        fn = jax.jit(lambda p, s, x, y, m: _trajectory(pair, p, s, x, y, m, kind == "train_grads"))
    elif kind == "train_step":  # one step, its carry (params, stats, optimizer state) donated: --equiv-bench
        fn = jax.jit(train_step(pair), donate_argnums=(0,))
    else:
        raise ValueError(kind)
    _PROGRAMS[key] = (pair, fn)  # holding the pair keeps its id from being reused
    return fn


def _loss(pair: Any, params: Any, stats: Any, inputs: Any, target: Any, masks: Any, train: bool) -> Any:
    out, new_stats, _ = _forward(pair, params, stats, inputs, masks, train, False)
    return pair.loss.jax_fn(out, target), (out, new_stats)


def train_step(pair: Any) -> Any:
    """The port's training step, `step((params, stats, opt_state), (inputs, target, masks))` ->
    ((params, stats, opt_state) after it, loss before it): a train-mode loss, its gradient, the
    optax update. Traceable; the trajectory scans it, the benchmark jits it alone."""
    full = _step_and_gradient(pair)

    def step(carry: Any, batch: Any) -> Any:
        carry, (loss, _) = full(carry, batch)
        return carry, loss

    return step


def _step_and_gradient(pair: Any) -> Any:
    """train_step, also returning the gradient it took (before the optimizer's clipping)."""
    import jax
    import optax

    tx = pair.optimizer.optax_transform()
    grad = jax.value_and_grad(lambda p, s, x, y, m: _loss(pair, p, s, x, y, m, True), has_aux=True)

    def step(carry: Any, batch: Any) -> Any:
        p, s, opt_state = carry
        x, y, m = batch
        (loss, (_, s)), g = grad(p, s, x, y, m)
        updates, opt_state = tx.update(g, opt_state, p)
        return (optax.apply_updates(p, updates), s, opt_state), (loss, g)

    return step


def _trajectory(pair: Any, params: Any, stats: Any, inputs: Any, targets: Any, masks: Any,
                grads: bool = False) -> Any:
    import jax

    step = _step_and_gradient(pair)

    def record(carry: Any, batch: Any) -> Any:
        (p, s, opt_state), (loss, g) = step(carry, batch)
        return (p, s, opt_state), {"loss": loss, "params": p, "stats": s, **({"grads": g} if grads else {})}

    init = pair.optimizer.optax_transform().init(params)
    return jax.lax.scan(record, (params, stats, init), (inputs, targets, masks))[1]


@deadline.side("jax")
def run_jax(pair: Any, kind: str, dtype: str, device: str, *args: Any) -> Any:
    import jax

    from equivcheck.backends.jax import device_of, to_numpy, x64

    with x64(dtype == "float64"):
        dev = device_of(device)
        placed = [jax.device_put(_jnp_tree(a, dtype), dev) for a in args]
        return to_numpy(program(pair, kind)(*placed))


@deadline.side("jax")
def jax_capture(pair: Any, params: Any, stats: Any, inputs: Sequence[Any], masks: Mapping[str, Any], train: bool,
                dtype: str, device: str) -> tuple[Any, dict[str, Any], BaseException | None, Any]:
    """The port run eagerly with its taps recorded: the layers before an exception survive."""
    import jax

    from equivcheck.backends.jax import device_of, to_numpy, x64

    taps: dict[str, Any] = {}
    with x64(dtype == "float64"), jax.default_device(device_of(device)):
        p, s, x, m = (_jnp_tree(a, dtype) for a in (params, stats, list(inputs), masks))
        with capturing(m, True) as cap:
            try:
                out, new_stats = port_output(pair, apply_port(pair, mm.merge(p, s), x, train), s)
            except Exception as exc:  # the layers tapped so far still localise
                return None, {k: to_numpy(v) for k, v in (cap.taps or {}).items()}, exc, None
            taps = dict(cap.taps or {})
    return to_numpy(out), {k: to_numpy(v) for k, v in taps.items()}, None, to_numpy(new_stats if train else stats)


def jax_index(tree: Any, k: int) -> Any:
    """Step k of a scanned trajectory's stacked outputs."""
    import jax

    return jax.tree.map(lambda a: a[k], tree)


# ---- batches for trajectories -------------------------------------------------------------

def numpy_batch(inputs: Any, shapes: tuple[Any, ...], dtype: str, rng: np.random.Generator) -> tuple[Any, ...]:
    """One batch of the pair's inputs from a seeded generator, each array drawn by its spec's
    `sample` within the spec's range (Floats, Ints, Index, Mask, Lengths, Matrices): a
    trajectory needs K batches of one shape, too many values for Hypothesis to draw.
    Raises ValueError naming the argument for a Static one (a trajectory stacks its batches)
    or a spec without `sample`."""
    out, it = [], iter(shapes)
    for k, spec in enumerate(inputs.args):
        if isinstance(spec, Static) or not hasattr(spec, "sample"):
            what = "Static (a trajectory stacks its batches: every input is an array)" if isinstance(spec, Static) \
                else "without a sample(dtype, shape, shapes, rng) method"
            raise ValueError(f"train batches: input {k} is {type(spec).__name__} {what}")
        out.append(spec.sample(dtype, next(it), shapes, rng))
    return tuple(out)
