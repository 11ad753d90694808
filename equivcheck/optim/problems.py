"""The losses optimizer trajectories run on, and the Hypothesis strategies that draw them.

Each problem has one loss written in both frameworks over a parameter pytree (nested dicts
of arrays) and a data pytree whose leading axis indexes micro-batches (gradient
accumulation takes one per micro-step). Shapes come from a small palette per check, picked
with the run's seed, so a check compiles once per palette entry; values are drawn by
Hypothesis element by element and shrink.

linear     loss = sum(g * p): its gradient is exactly the drawn g (the one-step check)
quadratic  loss = sum(a * (p - c)**2) / 2 with curvatures a > 0: a fixed, convex landscape
mlp        a one-hidden-layer tanh network, mean squared error on a drawn batch
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
from hypothesis import strategies as st

from equivcheck.ops.strategies import Floats

# Gradient magnitudes span the scales where eps matters (sqrt(v) ~ eps) up to large ones.
GRAD_SCALES = (1e-6, 1e-4, 1e-2, 1.0, 1e2)
# Nonzero values stay >= 1e-6 in magnitude: XLA on CPU flushes subnormal results to zero
# and torch keeps them (measured: 1.2e-38 * 0.01 is 0 in JAX, 1.2e-40 in torch), so inputs
# near the subnormal range (Hypothesis likes 1.1754944e-38) would make every optimizer
# differ for that one reason, once a parameter converges onto such a centre.
MIN_MAGNITUDE = 1e-6
PARAMS = Floats(-2.0, 2.0, tiny=False, min_magnitude=MIN_MAGNITUDE)
UNIT = Floats(-1.0, 1.0, tiny=False, special=(0.0,), min_magnitude=MIN_MAGNITUDE)


def _tree_shapes(rng: np.random.Generator) -> dict[str, Any]:
    """A nested dict of 1-4 leaves of rank 0-2, sides 1-4: several leaves, mixed shapes, and
    few elements (Hypothesis draws each one)."""
    n = int(rng.integers(1, 5))
    leaves = {f"p{i}": tuple(int(s) for s in rng.integers(1, 5, size=int(rng.integers(0, 3)))) for i in range(n)}
    if n > 2:  # some nesting, so paths and tree order are exercised
        return {"inner": {k: leaves[k] for k in list(leaves)[:2]}, **{k: leaves[k] for k in list(leaves)[2:]}}
    return leaves


def _map_shapes(shapes: Any, fn: Callable[[tuple[int, ...]], Any]) -> Any:
    if isinstance(shapes, dict):
        return {k: _map_shapes(v, fn) for k, v in shapes.items()}
    return fn(shapes)


def _tree_strategy(shapes: Any, leaf: Callable[[tuple[int, ...]], st.SearchStrategy]) -> st.SearchStrategy:
    if isinstance(shapes, dict):
        keys = sorted(shapes)
        return st.tuples(*[_tree_strategy(shapes[k], leaf) for k in keys]).map(lambda vs: dict(zip(keys, vs)))
    return leaf(shapes)


@dataclasses.dataclass(frozen=True)
class Problem:
    name: str
    sample: Callable[[np.random.Generator], Any]  # palette entry: the shapes
    draw_fn: Callable[[Any, str, int], st.SearchStrategy]  # (shapes, dtype, micro-batches) -> (params, data)
    zeros_fn: Callable[[Any, str, int], tuple[Any, Any]]  # the same shapes, all zeros (to compile ahead)
    torch_loss: Callable[[Any, Any, int], Any]  # (params tree, data tree, micro-batch) -> scalar
    jax_loss: Callable[[Any, Any, int], Any]
    # (params, data, micro-batch) -> (loss, gradient tree): torch's gradient in closed form, bit
    # for bit what autograd gives (checked in tests/test_optim_problems.py) at a third of
    # the cost, where the eager loop is most of a check's time
    torch_grad: Callable[[Any, Any, int], tuple[Any, Any]] | None = None

    def palette(self, seed: int, size: int) -> list[Any]:
        rng = np.random.default_rng(seed)
        out: list[Any] = []
        for _ in range(50 * size):
            s = self.sample(rng)
            if s not in out:
                out.append(s)
            if len(out) == size:
                break
        return out

    def draw(self, shapes: Any, dtype: str, micro: int) -> st.SearchStrategy:
        return self.draw_fn(shapes, dtype, micro)

    def zeros(self, shapes: Any, dtype: str, micro: int) -> tuple[Any, Any]:
        return self.zeros_fn(shapes, dtype, micro)


def _stacked(micro: int, shape: tuple[int, ...], spec: Floats, dtype: str) -> st.SearchStrategy:
    return spec.draw(dtype, (micro, *shape), ())


def _linear_draw(shapes: Any, dtype: str, micro: int) -> st.SearchStrategy:
    def grads(shape: tuple[int, ...]) -> st.SearchStrategy:
        return st.tuples(_stacked(micro, shape, UNIT, dtype), st.sampled_from(GRAD_SCALES)).map(
            lambda gs: (gs[0] * gs[0].dtype.type(gs[1])).astype(gs[0].dtype))

    return st.tuples(_tree_strategy(shapes, lambda s: PARAMS.draw(dtype, s, ())),
                     st.fixed_dictionaries({"g": _tree_strategy(shapes, grads)}))


def _tree_sum(fn: Callable[..., Any], *trees: Any) -> Any:
    if isinstance(trees[0], dict):
        total = 0
        for k in sorted(trees[0]):
            total = total + _tree_sum(fn, *[t[k] for t in trees])
        return total
    return fn(*trees)


def _linear_loss(params: Any, data: Any, j: int) -> Any:
    return _tree_sum(lambda p, g: (p * g[j]).sum(), params, data["g"])


def _linear_grad(params: Any, data: Any, j: int) -> tuple[Any, Any]:
    return _linear_loss(params, data, j), _map_trees(lambda p, g: g[j].clone(), params, data["g"])


def _map_trees(fn: Callable[..., Any], *trees: Any) -> Any:
    if isinstance(trees[0], dict):
        return {k: _map_trees(fn, *[t[k] for t in trees]) for k in trees[0]}
    return fn(*trees)


def _quadratic_draw(shapes: Any, dtype: str, micro: int) -> st.SearchStrategy:
    curv = Floats(0.1, 10.0, tiny=False)
    return st.tuples(_tree_strategy(shapes, lambda s: PARAMS.draw(dtype, s, ())),
                     st.fixed_dictionaries({"a": _tree_strategy(shapes, lambda s: curv.draw(dtype, s, ())),
                                            "c": _tree_strategy(shapes, lambda s: _stacked(micro, s, PARAMS, dtype))}))


def _quadratic_loss(params: Any, data: Any, j: int) -> Any:
    return _tree_sum(lambda p, a, c: (a * (p - c[j]) ** 2).sum() / 2, params, data["a"], data["c"])


def _quadratic_grad(params: Any, data: Any, j: int) -> tuple[Any, Any]:
    # autograd's a * (2 * (p - c) * 0.5): the powers of two are exact, one rounding remains
    return _quadratic_loss(params, data, j), _map_trees(lambda p, a, c: a * (p - c[j]), params, data["a"], data["c"])


def _mlp_sample(rng: np.random.Generator) -> tuple[int, int, int, int]:
    return (int(rng.choice([2, 3, 4])), int(rng.choice([4, 8])), int(rng.choice([1, 2])), int(rng.choice([4, 8])))


def _mlp_draw(dims: tuple[int, int, int, int], dtype: str, micro: int) -> st.SearchStrategy:
    i, h, o, b = dims
    w = Floats(-1.0, 1.0, tiny=False, min_magnitude=MIN_MAGNITUDE)
    params = st.fixed_dictionaries({"w1": w.draw(dtype, (i, h), ()), "b1": w.draw(dtype, (h,), ()),
                                    "w2": w.draw(dtype, (h, o), ()), "b2": w.draw(dtype, (o,), ())})
    data = st.fixed_dictionaries({"x": PARAMS.draw(dtype, (micro, b, i), ()), "y": w.draw(dtype, (micro, b, o), ())})
    return st.tuples(params, data)


def _mlp_torch(params: Any, data: Any, j: int) -> Any:
    import torch

    h = torch.tanh(data["x"][j] @ params["w1"] + params["b1"])
    return ((h @ params["w2"] + params["b2"] - data["y"][j]) ** 2).mean()


def _mlp_jax(params: Any, data: Any, j: int) -> Any:
    import jax.numpy as jnp

    h = jnp.tanh(data["x"][j] @ params["w1"] + params["b1"])
    return ((h @ params["w2"] + params["b2"] - data["y"][j]) ** 2).mean()


def _zeros(shapes: Any, dtype: str, lead: tuple[int, ...] = ()) -> Any:
    return _map_shapes(shapes, lambda s: np.zeros(lead + s, dtype))


def _linear_zeros(shapes: Any, dtype: str, micro: int) -> tuple[Any, Any]:
    return _zeros(shapes, dtype), {"g": _zeros(shapes, dtype, (micro,))}


def _quadratic_zeros(shapes: Any, dtype: str, micro: int) -> tuple[Any, Any]:
    return _zeros(shapes, dtype), {"a": _zeros(shapes, dtype), "c": _zeros(shapes, dtype, (micro,))}


def _mlp_zeros(dims: tuple[int, int, int, int], dtype: str, micro: int) -> tuple[Any, Any]:
    i, h, o, b = dims
    z = lambda *s: np.zeros(s, dtype)
    return {"w1": z(i, h), "b1": z(h), "w2": z(h, o), "b2": z(o)}, {"x": z(micro, b, i), "y": z(micro, b, o)}


LINEAR = Problem("linear", _tree_shapes, _linear_draw, _linear_zeros, _linear_loss, _linear_loss, _linear_grad)
QUADRATIC = Problem("quadratic", _tree_shapes, _quadratic_draw, _quadratic_zeros, _quadratic_loss, _quadratic_loss,
                    _quadratic_grad)
MLP = Problem("mlp", _mlp_sample, _mlp_draw, _mlp_zeros, _mlp_torch, _mlp_jax)
PROBLEMS = {p.name: p for p in (LINEAR, QUADRATIC, MLP)}
