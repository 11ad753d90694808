"""Both sides of an optimizer trajectory, NumPy in and NumPy out.

torch runs the ordinary eager loop (`zero_grad; loss.backward() per micro-batch; clip;
optimizer.step(); scheduler.step()`). JAX runs the whole trajectory as one `lax.scan` of a
fixed length, compiled ahead of time once per (pair, problem, shapes, dtype): the drawn
number of steps only decides how much of the output is compared, so it never recompiles.
Each step yields `{"params", "state" (neutral form), "lr"?, "grad_norm"?}`.
"""
from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

import numpy as np

from equivcheck.backends import deadline, maps
from equivcheck.optim.groups import group_index, leaf_paths
from equivcheck.optim.state import load_torch, neutral_to_optax, optax_to_neutral, torch_to_neutral

MAX_STEPS = 100  # the longest trajectory a check draws; the scan always runs this many


def scan_length(check: str) -> int:
    """Steps the compiled program of a check runs: 1 for "step", MAX_STEPS for a trajectory check
    (which stops reading at its drawn step count)."""
    return 1 if check == "step" else MAX_STEPS


def treedef_of(tree: Any) -> Any:
    import jax

    return jax.tree.structure(tree)


# ---- torch ------------------------------------------------------------------------------

def torch_optimizer_for(pair: Any, leaves: list[Any], params: Any) -> Any:
    """The pair's torch optimizer on `leaves` (the tree's, in jax.tree.leaves order). With
    declared param groups (`pair.param_groups`) it receives torch's list of group dicts,
    each holding its leaves in tree order with its overrides; empty groups are left out, as
    torch refuses none but a user would not write them."""
    if not pair.param_groups:
        return pair.torch_optimizer(leaves)
    found = [group_index(pair.param_groups, path, p) for path, p in zip(leaf_paths(params), leaves)]
    groups = [{"params": [p for p, g in zip(leaves, found) if g == i],
               **(dict(pair.param_groups[i - 1][1]) if i else {})} for i in range(len(pair.param_groups) + 1)]
    return pair.torch_optimizer([g for g in groups if g["params"]])


@deadline.side("torch")
def run_torch(pair: Any, problem: Any, params0: Any, data: Any, steps: int, *, dtype: str, device: str = "cpu",
              start: dict[str, Any] | None = None, start_step: int = 0,
              jitter: tuple[Any, ...] | None = None) -> list[dict[str, Any]]:
    """The torch trajectory. `jitter=(rng, rel, low[, corner])` makes a float64 run round like the
    dtype `low` (the conditioning test, equivcheck.optim.diagnose; None: float64 itself):
    every gradient moves by
    U(-2, 2) times its own rounding error at `low` (the gradient computed at `low` minus the
    float64 one: cancellation in a backward pass is not relative to the result), or by exactly
    `corner` (-2 or 2) times it, every element the same way (the box's corners: where a side's
    float32 gradient is off by its own size, 1 - tanh**2 at saturation read as 0, Adam's update
    flips or vanishes, which uniform draws over 32 elements and 6 copies missed), and after
    every step the parameters and the optimizer state are multiplied by 1 + rel * U(-1, 1)."""
    import torch

    from equivcheck.backends.torch import device_of

    treedef = treedef_of(params0)
    dev = device_of(device)
    leaves = [torch.tensor(np.array(x), device=dev).requires_grad_() for x in treedef.flatten_up_to(params0)]
    tdata = _to_torch(data, dev)
    optimizer = torch_optimizer_for(pair, leaves, params0)
    _check_torch_optimizer(optimizer, leaves, pair.name)
    scheduler = pair.torch_scheduler(optimizer) if pair.torch_scheduler else None
    if start is not None:
        load_torch(optimizer, pair.state_map, treedef, start, scheduler, params=leaves)
    micro = pair.accumulate
    out = []
    for t in range(steps):
        lr = float(optimizer.param_groups[0]["lr"])
        optimizer.zero_grad(set_to_none=True)
        loss_total = 0.0
        for j in range(micro):
            loss_total += _backward(problem, treedef, leaves, tdata, j, micro)
        if jitter is not None and jitter[2] is not None:
            _jitter_grads(problem, treedef, leaves, data, micro, *jitter)
        norm = pair.torch_clip(leaves) if pair.torch_clip else None
        optimizer.step()
        if scheduler is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                scheduler.step(loss_total) if pair.schedule_takes_loss else scheduler.step()
        if jitter is not None:
            _jitter(leaves, optimizer, *jitter[:2])
        step = {"params": treedef.unflatten([p.detach().cpu().numpy().copy() for p in leaves]),
                "state": torch_to_neutral(optimizer, pair.state_map, treedef, start_step + t + 1, scheduler,
                                          params=leaves)}
        if pair.optax_schedule is not None:
            step["lr"] = np.asarray(lr)
        if norm is not None:
            step["grad_norm"] = np.asarray(float(norm))
        out.append(step)
    return out


def _backward(problem: Any, treedef: Any, leaves: Sequence[Any], tdata: Any, j: int, micro: int) -> float:
    """Accumulate micro-batch j's gradient (of loss / micro) into the leaves' .grad, as
    loss.backward() does; return that share of the loss."""
    import torch

    if problem.torch_grad is None:
        loss = problem.torch_loss(treedef.unflatten(leaves), tdata, j) / micro
        loss.backward()
        return float(loss.detach())
    with torch.no_grad():
        loss, grads = problem.torch_grad(treedef.unflatten(leaves), tdata, j)
        for p, g in zip(leaves, treedef.flatten_up_to(grads)):
            g = g / micro if micro != 1 else g
            if p.grad is None:
                p.grad = g
            else:
                p.grad += g
    return float(loss / micro)


def _jitter_grads(problem: Any, treedef: Any, leaves: Sequence[Any], data: Any, micro: int, rng: np.random.Generator,
                  rel: float, low: str, corner: float | None = None) -> None:
    import torch

    from equivcheck.backends.torch import _TORCH_DTYPES

    dt = _TORCH_DTYPES[low]
    lows = [p.detach().to(dt).requires_grad_() for p in leaves]
    ldata = _to_torch(data, leaves[0].device)
    ldata = _map_tensors(ldata, lambda t: t.to(dt))
    for j in range(micro):
        (problem.torch_loss(treedef.unflatten(lows), ldata, j) / micro).backward()
    # JAX's own rounding counts too: XLA's float32 tanh is off by up to 4.2 ulp (torch's
    # by 0.56), so 1 - tanh**2 near saturation carries 7x torch's relative error.
    theirs = jax_grads(problem, micro, treedef.unflatten([q.detach().cpu().numpy() for q in lows]),
                       _map_tensors(ldata, lambda t: t.cpu().numpy()))
    with torch.no_grad():
        for p, q, g in zip(leaves, lows, theirs):
            err = torch.maximum((q.grad.to(p.dtype) - p.grad).abs(), (torch.from_numpy(np.array(g)).to(p.dtype) - p.grad).abs())
            u = np.full(tuple(p.shape), corner) if corner is not None else rng.uniform(-2, 2, tuple(p.shape))
            p.grad.add_(err * torch.from_numpy(np.asarray(u)).to(p.dtype))


_GRADS: dict[Any, Any] = {}


def jax_grads(problem: Any, micro: int, params: Any, data: Any) -> list[np.ndarray]:
    """JAX's gradient of the problem's loss (mean over micro-batches), leaves in tree order."""
    import jax

    key = (problem.name, micro)
    if key not in _GRADS:
        _GRADS[key] = jax.jit(jax.grad(lambda p, d: sum(problem.jax_loss(p, d, j) for j in range(micro)) / micro))
    return [np.asarray(g) for g in jax.tree.leaves(_GRADS[key](_as_jax(params), _as_jax(data)))]


def _map_tensors(tree: Any, fn: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _map_tensors(v, fn) for k, v in tree.items()}
    return fn(tree)


def _jitter(leaves: Sequence[Any], optimizer: Any, rng: np.random.Generator, rel: float) -> None:
    import torch

    with torch.no_grad():
        tensors = list(leaves) + [v for p in leaves for k, v in optimizer.state.get(p, {}).items()
                                  if k != "step" and torch.is_tensor(v) and v.is_floating_point()]
        for t in tensors:
            t.mul_(torch.from_numpy(np.asarray(1 + rel * rng.uniform(-1, 1, tuple(t.shape)))).to(t.dtype))


def _check_torch_optimizer(optimizer: Any, leaves: Sequence[Any], name: str) -> None:
    """Any param groups, in any order, as long as each leaf is held exactly once: the state
    is read and written leaf by leaf (equivcheck.optim.state)."""
    import torch

    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"pair {name!r}: its torch_optimizer returned {type(optimizer).__name__}, not a "
                        f"torch.optim.Optimizer: return the optimizer built over the parameters it receives")
    held = [p for g in optimizer.param_groups for p in g["params"]]
    mine = {id(p) for p in leaves}
    if len(held) != len(leaves) or {id(p) for p in held} != mine:
        foreign = sum(id(p) not in mine for p in held)
        raise ValueError(f"pair {name!r}: its torch optimizer holds {len(held)} parameters in "
                         f"{len(optimizer.param_groups)} param group(s) ({foreign} not among them), not the "
                         f"{len(leaves)} leaves it was given, each once: build it (and its groups) from the list "
                         "it receives")


def _to_torch(tree: Any, dev: Any) -> Any:
    import torch

    if isinstance(tree, dict):
        return {k: _to_torch(v, dev) for k, v in tree.items()}
    return torch.tensor(np.array(tree), device=dev)


# ---- jax --------------------------------------------------------------------------------

_PROGRAMS: dict[Any, tuple[Any, Future]] = {}
_LOCK = threading.Lock()
maps.on_release(_PROGRAMS.clear)  # compiled ahead of time: jax.clear_caches() does not reach them


def _wide(dtype: str) -> bool:
    return dtype == "float64"


def optax_of(pair: Any) -> Any:
    """pair.optax_transform(), checked: raises TypeError when the factory gives something that is
    not an optax GradientTransformation (a bare update function, the transformation's class)."""
    tx = pair.optax_transform()
    if not (callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None))):
        raise TypeError(f"pair {pair.name!r}: its optax_transform returned {type(tx).__name__}, not an optax "
                        f"GradientTransformation (init and update): pass a factory, e.g. lambda: optax.adam(1e-3)")
    return tx


def _same_layout(params: Any, updates: Any) -> None:
    """At trace time: updates shaped like the parameters. optax.apply_updates broadcasts a scalar or
    a (1, n) update over its leaf, so every element moves alike, which a one-element draw cannot tell
    from the right step. Raises ValueError naming the leaf."""
    import jax

    p_leaves, p_def = jax.tree_util.tree_flatten_with_path(params)
    u_leaves, u_def = jax.tree_util.tree_flatten_with_path(updates)
    if p_def != u_def:
        raise ValueError(f"the optax transformation's updates are not shaped like the parameters' tree: "
                         f"{u_def} where the parameters are {p_def}")
    for (path, p), (_, u) in zip(p_leaves, u_leaves):
        if p.shape != u.shape:
            raise ValueError(f"the optax transformation's update for {jax.tree_util.keystr(path)} has shape "
                             f"{tuple(u.shape)} where the parameter has {tuple(p.shape)}: optax.apply_updates "
                             f"broadcasts it, so the step is not per element")


def _program(pair: Any, problem: Any, length: int) -> Callable[..., Any]:
    import jax
    import jax.numpy as jnp
    import optax

    tx = optax.with_extra_args_support(optax_of(pair))
    loss = problem.jax_loss
    micro, sched = pair.accumulate, pair.optax_schedule

    def trajectory(params0: Any, data: Any, given: Any, use_given: Any, offset: Any) -> Any:
        # tx.init inside the program: run eagerly, every init op compiles on its own
        state0 = jax.tree.map(lambda g, s: jnp.where(use_given, g, s), given, tx.init(params0))

        def body(carry: Any, i: Any) -> Any:
            p, s = carry
            vals, grads = zip(*[jax.value_and_grad(loss)(p, data, j) for j in range(micro)])
            value = sum(vals) / micro
            for g in grads:  # optax.MultiSteps emits zero updates until the last micro-batch
                u, s = tx.update(g, s, p, value=value)
                _same_layout(p, u)
                p = optax.apply_updates(p, u)
            out = {"params": p, "state": s}
            if sched is not None:
                out["lr"] = jnp.asarray(sched(i + offset))
            if pair.clip_reports_norm:
                mean = jax.tree.map(lambda *gs: sum(gs) / micro, *grads)
                out["grad_norm"] = optax.tree.norm(mean)
            return (p, s), out

        return jax.lax.scan(body, (params0, state0), jnp.arange(length))[1]

    return trajectory


@deadline.side("jax")  # a no-op on the background thread: whoever waits there has the limit
def _compile(key: Any, pair: Any, problem: Any, length: int, params0: Any, data: Any, dtype: str) -> Any:
    import jax

    from equivcheck.backends.jax import x64

    with x64(_wide(dtype)):  # jax config contexts are per thread
        given = state_template(pair, params0, dtype)
        return jax.jit(_program(pair, problem, length)).lower(_as_jax(params0), _as_jax(data), given, False,
                                                              0).compile()


_TEMPLATES: dict[Any, Any] = {}


def state_template(pair: Any, params0: Any, dtype: str) -> Any:
    """The optax state's structure for these parameters, as NumPy zeros: traced, never run."""
    import jax

    from equivcheck.backends.jax import x64

    key = (id(pair), dtype, repr(_shapes(params0)))
    if key not in _TEMPLATES:
        with x64(_wide(dtype)):
            shapes = jax.eval_shape(optax_of(pair).init, _as_jax(params0))
        _TEMPLATES[key] = (pair, jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), shapes))
    return _TEMPLATES[key][1]


def compiled(pair: Any, problem: Any, length: int, params0: Any, data: Any, dtype: str, *, background: bool = False) -> Any:
    """The compiled trajectory program for these shapes, compiling it (here, or on the
    background thread when `background`) unless it is compiled or compiling already."""
    shapes = _shapes(params0), _shapes(data)
    # keyed by the pair object's id: each entry holds the pair, so that id is not reused by
    # another pair (a diagnosis probe, a planted variant) while the entry lives
    key = (id(pair), problem.name, length, dtype, repr(shapes))
    mine = None
    with _LOCK:
        fut = _PROGRAMS.get(key, (None, None))[1]
        if fut is None or fut.cancelled():  # cancelled: queued on an abandoned compile thread, or at a session's end
            if background:
                from equivcheck.backends.jax import background as on_compile_thread

                fut = on_compile_thread(_compile, key, pair, problem, length, params0, data, dtype)
            else:
                fut = mine = Future()
            _PROGRAMS[key] = (pair, fut)
            if len(_PROGRAMS) > 512:  # bounded: probes and planted variants would pile up
                _PROGRAMS.pop(next(iter(_PROGRAMS)))
    if mine is not None:  # compiled here, outside the lock
        try:
            mine.set_result(_compile(key, pair, problem, length, params0, data, dtype))
        except Exception as exc:
            mine.set_exception(exc)
        except BaseException as exc:  # a time limit or Ctrl-C: no program, so none to keep
            mine.set_exception(exc)
            _forget(key, mine)
            raise
    if background:
        return fut
    from equivcheck.backends.jax import wait

    try:
        return wait(fut)
    except deadline.SideTimeout:
        _forget(key, fut)  # stuck on an abandoned thread: the next wait would only time out again
        raise


def _forget(key: Any, fut: Future[Any]) -> None:
    with _LOCK:
        if _PROGRAMS.get(key, (None, None))[1] is fut:
            del _PROGRAMS[key]


def _shapes(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _shapes(v) for k, v in sorted(tree.items())}
    a = np.asarray(tree)
    return (a.shape, str(a.dtype))


def _as_jax(tree: Any) -> Any:
    import jax
    import jax.numpy as jnp

    return jax.tree.map(jnp.asarray, tree)


def run_jax(pair: Any, problem: Any, length: int, params0: Any, data: Any, steps: int, *, dtype: str,
            device: str = "cpu", start: dict[str, Any] | None = None, start_step: int = 0) -> list[dict[str, Any]]:
    import jax

    from equivcheck.backends.jax import device_of, x64

    program = compiled(pair, problem, length, params0, data, dtype)  # waits within its own limit
    with deadline.side("jax"), x64(_wide(dtype)):
        dev = device_of(device)
        given = state_template(pair, params0, dtype)
        if start is not None:
            given = neutral_to_optax(given, pair.state_map, start)
        # NumPy straight to the device: an eager jnp.asarray per leaf cost more than the run
        out = program(*jax.device_put((params0, data, given), dev), start is not None, start_step)
        stacked, layout = jax.tree.flatten(jax.device_get(out))
    steps_out = []
    for t in range(min(steps, length)):
        at = layout.unflatten([x[t] for x in stacked])
        step = {"params": at["params"], "state": optax_to_neutral(at["state"], pair.state_map, start_step + t + 1)}
        for k in ("lr", "grad_norm"):
            if k in at:
                step[k] = np.asarray(at[k], np.float64)  # torch reports Python floats
        steps_out.append(step)
    return steps_out
