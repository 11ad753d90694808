"""optax transformations for the torch.optim formulas that optax has no setting for.

Each one exists because a measured torch behaviour differs from every optax option (see
`equivcheck.optim.naive`): the mapping in `equivcheck.optim.mapping` uses optax's own
transformations wherever one matches exactly, and these only where none does. They are
plain `optax.GradientTransformation`s, so a port keeps using them in its training loop and
continues a torch run (and its checkpointed optimizer state) step for step.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


def _count_inc(count: Any) -> Any:
    return optax.safe_increment(count)


def _powf(base: float, count: Any, like: Any) -> Any:
    """base ** count in the dtype of the parameters (torch computes it in Python float64)."""
    return jnp.asarray(base, like.dtype) ** jnp.asarray(count, like.dtype)


class DampenedTraceState(NamedTuple):
    count: Any
    trace: Any


def trace_dampened(momentum: float, dampening: float) -> optax.GradientTransformation:
    """torch SGD momentum with dampening: buf = g on the first step, then m*buf + (1-d)*g.

    optax.trace has no dampening, and scaling g by (1-d) before it would dampen the first
    step too, which torch does not.
    """

    def init(params: Any) -> DampenedTraceState:
        return DampenedTraceState(jnp.zeros([], jnp.int32), jax.tree.map(jnp.zeros_like, params))

    def update(updates: Any, state: DampenedTraceState, params: Any = None) -> tuple[Any, DampenedTraceState]:
        first = state.count == 0
        trace = jax.tree.map(lambda g, b: jnp.where(first, g, momentum * b + (1 - dampening) * g), updates, state.trace)
        return trace, DampenedTraceState(_count_inc(state.count), trace)

    return optax.GradientTransformation(init, update)


class TorchAmsgradState(NamedTuple):
    count: Any
    mu: Any
    nu: Any
    nu_max: Any


def scale_by_amsgrad_torch(b1: float, b2: float, eps: float) -> optax.GradientTransformation:
    """torch Adam(amsgrad=True): the running max is over the raw second moment, bias-corrected
    afterwards: m_hat / (sqrt(max v) / sqrt(1 - b2**t) + eps).

    optax.scale_by_amsgrad takes the max over the bias-corrected moment (or skips the
    correction), which no setting turns into torch's order (google-deepmind/optax#1389).
    """

    def init(params: Any) -> TorchAmsgradState:
        z = lambda: jax.tree.map(jnp.zeros_like, params)
        return TorchAmsgradState(jnp.zeros([], jnp.int32), z(), z(), z())

    def update(updates: Any, state: TorchAmsgradState, params: Any = None) -> tuple[Any, TorchAmsgradState]:
        count = _count_inc(state.count)
        mu = jax.tree.map(lambda g, m: (1 - b1) * g + b1 * m, updates, state.mu)
        nu = jax.tree.map(lambda g, v: (1 - b2) * g * g + b2 * v, updates, state.nu)
        nu_max = jax.tree.map(jnp.maximum, state.nu_max, nu)

        def step(m: Any, vmax: Any) -> Any:
            bc1, bc2 = 1 - _powf(b1, count, m), 1 - _powf(b2, count, m)
            return (m / bc1) / (jnp.sqrt(vmax) / jnp.sqrt(bc2) + eps)

        return jax.tree.map(step, mu, nu_max), TorchAmsgradState(count, mu, nu, nu_max)

    return optax.GradientTransformation(init, update)


class TorchNadamState(NamedTuple):
    count: Any
    mu: Any
    nu: Any
    mu_product: Any


def scale_by_nadam_torch(b1: float, b2: float, eps: float, momentum_decay: float) -> optax.GradientTransformation:
    """torch NAdam: Dozat's Nesterov Adam with the momentum schedule
    mu_t = b1 * (1 - 0.5 * 0.96 ** (t * momentum_decay)) and its running product.

    optax.nadam uses a constant mu_t = b1, which torch gives only for momentum_decay=inf.
    torch keeps the product in its scalar dtype (float32 unless the default dtype is
    float64), also for float64 parameters; so does this state, or a float64 run would drift
    from torch by float32 roundings.
    """

    def mu_at(t: Any, like: Any) -> Any:
        return b1 * (1.0 - 0.5 * _powf(0.96, t * momentum_decay if momentum_decay != float("inf") else jnp.inf, like))

    def init(params: Any) -> TorchNadamState:
        z = lambda: jax.tree.map(jnp.zeros_like, params)
        return TorchNadamState(jnp.zeros([], jnp.int32), z(), z(), jnp.ones([], jnp.float32))

    def update(updates: Any, state: TorchNadamState, params: Any = None) -> tuple[Any, TorchNadamState]:
        count = _count_inc(state.count)
        leaves = jax.tree.leaves(updates)
        like = leaves[0] if leaves else state.mu_product
        mu, mu_next = mu_at(count, like), mu_at(count + 1, like)
        prod32 = state.mu_product * mu.astype(jnp.float32)
        prod = prod32.astype(like.dtype)
        prod_next = prod * mu_next
        m_new = jax.tree.map(lambda g, m: (1 - b1) * g + b1 * m, updates, state.mu)
        v_new = jax.tree.map(lambda g, v: (1 - b2) * g * g + b2 * v, updates, state.nu)
        bc2 = 1 - _powf(b2, count, like)

        def step(g: Any, m: Any, v: Any) -> Any:
            denom = jnp.sqrt(v / bc2) + eps
            return ((1 - mu) / (1 - prod)) * g / denom + (mu_next / (1 - prod_next)) * m / denom

        return jax.tree.map(step, updates, m_new, v_new), TorchNadamState(count, m_new, v_new, prod32)

    return optax.GradientTransformation(init, update)


def scale_by_radam_torch(b1: float, b2: float, eps: float) -> optax.GradientTransformation:
    """torch RAdam: eps is added to the uncorrected sqrt(v), and rectification starts when
    rho_t > 5 (strictly).

    optax.scale_by_radam adds eps to sqrt(v_hat) (a step-dependent eps in torch's terms) and
    rectifies from rho_t >= threshold.
    """
    rho_inf = 2 / (1 - b2) - 1

    def init(params: Any) -> optax.ScaleByAdamState:
        z = lambda: jax.tree.map(jnp.zeros_like, params)
        return optax.ScaleByAdamState(jnp.zeros([], jnp.int32), z(), z())

    def update(updates: Any, state: optax.ScaleByAdamState, params: Any = None) -> tuple[Any, Any]:
        count = _count_inc(state.count)
        mu = jax.tree.map(lambda g, m: (1 - b1) * g + b1 * m, updates, state.mu)
        nu = jax.tree.map(lambda g, v: (1 - b2) * g * g + b2 * v, updates, state.nu)

        def step(m: Any, v: Any) -> Any:
            b2t = _powf(b2, count, m)
            bc1, bc2 = 1 - _powf(b1, count, m), 1 - b2t
            rho_t = rho_inf - 2 * jnp.asarray(count, m.dtype) * b2t / bc2
            rect = jnp.sqrt(jnp.maximum((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t), 0))
            adaptive = jnp.sqrt(bc2) / (jnp.sqrt(v) + eps)
            m_hat = m / bc1
            return jnp.where(rho_t > 5.0, m_hat * adaptive * rect, m_hat)

        return jax.tree.map(step, mu, nu), optax.ScaleByAdamState(count, mu, nu)

    return optax.GradientTransformation(init, update)


def scale_by_adagrad_torch(initial_accumulator_value: float, eps: float) -> optax.GradientTransformation:
    """torch Adagrad: g / (sqrt(sum g**2) + eps), eps outside the square root.

    optax.scale_by_rss puts eps inside (rsqrt(sum + eps)); the two agree only for eps = 0.
    """

    def init(params: Any) -> optax.ScaleByRssState:
        return optax.ScaleByRssState(jax.tree.map(lambda p: jnp.full_like(p, initial_accumulator_value), params))

    def update(updates: Any, state: optax.ScaleByRssState, params: Any = None) -> tuple[Any, Any]:
        acc = jax.tree.map(lambda g, s: s + g * g, updates, state.sum_of_squares)
        return jax.tree.map(lambda g, s: g / (jnp.sqrt(s) + eps), updates, acc), optax.ScaleByRssState(acc)

    return optax.GradientTransformation(init, update)


class TorchRpropState(NamedTuple):
    count: Any
    prev: Any
    step_size: Any


def scale_by_rprop_torch(learning_rate: Any, eta_minus: float, eta_plus: float, min_step: float,
                         max_step: float) -> optax.GradientTransformation:
    """torch Rprop (torch/optim/rprop.py), the step of this update: step sizes start at lr,
    are multiplied by eta_plus where the gradient kept its sign, by eta_minus where it
    changed it (and by 1 where either is 0), then clamped; where the sign changed the
    gradient is taken as 0: no move, and the next step sees no sign. The update is
    step_size * sign(g) (negate it after), and `prev` is that masked gradient, as torch keeps it.

    optax.scale_by_rprop returns the update computed at the previous step (its first update
    is zero: one step late) and clamps only where the sign was kept or changed. `learning_rate`
    may be a PerGroup (torch param groups with their own lr: their own initial step size).
    """

    def init(params: Any) -> TorchRpropState:
        if hasattr(learning_rate, "labels"):
            sizes = jax.tree.map(lambda p, i: jnp.full_like(p, learning_rate.values[i]), params,
                                 learning_rate.labels(params))
        else:
            sizes = jax.tree.map(lambda p: jnp.full_like(p, learning_rate), params)
        return TorchRpropState(jnp.zeros([], jnp.int32), jax.tree.map(jnp.zeros_like, params), sizes)

    def update(updates: Any, state: TorchRpropState, params: Any = None) -> tuple[Any, TorchRpropState]:
        def one(g: Any, prev: Any, size: Any) -> tuple[Any, Any]:
            # sign(g) * sign(prev), not sign(g * prev): XLA flushes a subnormal product to 0 (no
            # sign) where torch keeps it; the two differ only below torch's smallest subnormal
            s = jnp.sign(g) * jnp.sign(prev)
            factor = jnp.where(s > 0, jnp.asarray(eta_plus, g.dtype), jnp.where(s < 0, jnp.asarray(eta_minus, g.dtype),
                                                                                 jnp.ones((), g.dtype)))
            size = jnp.clip(size * factor, min_step, max_step)
            g = jnp.where(s < 0, jnp.zeros_like(g), g)
            return size * jnp.sign(g), g, size

        out = jax.tree.map(one, updates, state.prev, state.step_size)
        pick = lambda k: jax.tree.map(lambda _, o: o[k], updates, out)
        return pick(0), TorchRpropState(_count_inc(state.count), pick(1), pick(2))

    return optax.GradientTransformation(init, update)


class TorchAsgdState(NamedTuple):
    count: Any
    eta: Any
    mu: Any
    ax: Any


def asgd_torch(lr: float, lambd: float, alpha: float, t0: float, weight_decay: float) -> optax.GradientTransformation:
    """torch ASGD (torch/optim/asgd.py), the whole step (no lr scaling after it): with
    g += weight_decay * p, p <- p * (1 - lambd * eta) - eta * g; the average ax follows p
    (ax = p while mu is 1, else ax += (p - ax) * mu); then eta = lr / (1 + lambd*lr*t)**alpha
    and mu = 1 / max(1, t - t0). optax has no ASGD.

    torch keeps eta and mu as float32 scalars (its default dtype) also for float64
    parameters, computed in Python floats and rounded once: so are they here.
    """

    def init(params: Any) -> TorchAsgdState:
        return TorchAsgdState(jnp.zeros([], jnp.int32), jnp.asarray(lr, jnp.float32), jnp.ones([], jnp.float32),
                              jax.tree.map(jnp.zeros_like, params))

    def update(updates: Any, state: TorchAsgdState, params: Any = None) -> tuple[Any, TorchAsgdState]:
        if params is None:
            raise ValueError("asgd_torch needs the parameters (its decay term and its average)")

        def new_param(g: Any, p: Any) -> Any:
            eta = state.eta.astype(p.dtype)
            g = g + weight_decay * p if weight_decay else g
            return p * (1 - lambd * eta) - eta * g

        moved = jax.tree.map(new_param, updates, params)
        mu = state.mu
        ax = jax.tree.map(lambda q, a: jnp.where(mu == 1, q, a + (q - a) * mu.astype(q.dtype)), moved, state.ax)
        count = _count_inc(state.count)
        t = jnp.asarray(count, jnp.result_type(float))  # float64 where x64 is on, as Python computes it
        eta = (lr / (1 + lambd * lr * t) ** alpha).astype(jnp.float32)
        mu = (1 / jnp.maximum(1.0, t - t0)).astype(jnp.float32)
        return (jax.tree.map(lambda q, p: q - p, moved, params),
                TorchAsgdState(count, eta, mu, ax))

    return optax.GradientTransformation(init, update)


# torch.nn.utils.clip_grad_norm_ divides by (norm + 1e-6) (torch/nn/utils/clip_grad.py).
TORCH_CLIP_EPS = 1e-6


def clip_by_global_norm_torch(max_norm: float) -> optax.GradientTransformation:
    """torch clip_grad_norm_: g * min(1, max_norm / (norm + 1e-6)).

    optax.clip_by_global_norm scales by max_norm / norm, and only when norm >= max_norm:
    the 1e-6 makes a relative difference of 1e-6 / norm (beyond float64's tolerance).
    """

    def init(params: Any) -> optax.EmptyState:
        return optax.EmptyState()

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        norm = optax.tree.norm(updates)
        coef = jnp.minimum(max_norm / (norm + TORCH_CLIP_EPS), 1.0)
        return jax.tree.map(lambda g: (g * coef).astype(g.dtype), updates), state

    return optax.GradientTransformation(init, update)


class LaggedState(NamedTuple):
    scale: Any
    inner: Any


def lag_one_step(inner: optax.GradientTransformationExtraArgs) -> optax.GradientTransformationExtraArgs:
    """Apply the plateau scale decided *before* this step's loss, as torch does.

    torch calls scheduler.step(loss) after optimizer.step(), so update t uses the learning
    rate decided from losses 1..t-1; optax.contrib.reduce_on_plateau rescales update t with
    loss t already counted.
    """

    def init(params: Any) -> LaggedState:
        state = inner.init(params)
        return LaggedState(state.scale, state)

    def update(updates: Any, state: LaggedState, params: Any = None, **extra: Any) -> tuple[Any, LaggedState]:
        _, new_inner = inner.update(updates, state.inner, params, **extra)
        scaled = jax.tree.map(lambda g: (state.scale * g).astype(g.dtype), updates)
        return scaled, LaggedState(new_inner.scale, new_inner)

    return optax.GradientTransformationExtraArgs(init, update)


def multi_steps(inner: optax.GradientTransformation, every_k: int) -> optax.GradientTransformationExtraArgs:
    """optax.MultiSteps (gradient accumulation, mean over every_k micro-batches) with its
    accumulator in the parameters' dtype.

    MultiSteps' accumulator_dtype defaults to float32, also for float64 parameters: the
    accumulated gradient of a float64 run is rounded to float32. Measured on the suite's
    Adam + clipping + 4 micro-batches at float64: 0.073 of the table's bound with the
    default, 1.5e-9 with the parameters' dtype (within the bound either way: float64's
    rtol of 1e-7 is wider than one float32 rounding, so it is not listed as a divergence).
    The dtype is only known from the parameters, so the wrapper builds MultiSteps for them.
    """

    def make(tree: Any) -> optax.MultiSteps:
        leaves = jax.tree.leaves(tree)
        dtype = leaves[0].dtype if leaves else jnp.float32
        return optax.MultiSteps(inner, every_k_schedule=every_k, use_grad_mean=True, accumulator_dtype=dtype)

    def init(params: Any) -> Any:
        return make(params).init(params)

    def update(updates: Any, state: Any, params: Any = None, **extra: Any) -> Any:
        return make(updates).update(updates, state, params, **extra)

    return optax.GradientTransformationExtraArgs(init, update)
