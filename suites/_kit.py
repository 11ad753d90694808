"""Shared by the layer and loss tables: torch modules run on drawn parameters, shape samplers,
and the Pair shorthand those tables use.

A layer pair passes a layer's parameters as explicit arguments in torch layout
(`torch_fn(x, weight, bias, config)` runs the module through torch.func.functional_call;
`jax_fn` converts them with equivcheck.weights.convert inside the traced function and applies the
Flax layer), so gradients come back per parameter name and the weight conversion is part of
what is checked. A pair's hyperparameter configurations are evaluated together in one
program (`bundled`): XLA compilation is what the suites' time goes to (forward+VJP of a
small conv: ~0.5 s of backend compile per shape on the 2-core CI box, against ~1 ms to run).
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from equivcheck import Custom, Floats, Inputs, Pair, Static, Tolerance
from equivcheck.engine.tolerance import BASE

LAYER_CHECKS = ("forward", "vjp")
# Weights and inputs of moderate size: outputs stay well-conditioned, gradients O(1).
X = Floats(-3, 3)
W = Floats(-1, 1)
POSITIVE = Floats(0.5, 2.0, tiny=False)

# jax.nn.dot_product_attention (used by nnx.MultiHeadAttention) computes the softmax in float32
# even for float64 inputs ("Softmax is always computed in float32", jax/_src/nn/functions.py).
# Measured without this override (30 examples, seeds 1-2): float64 errors up to 1.1e-7 in the
# forward and 2.3e-7 in gradients, 1.1x the float64 bound, finite differences blaming jax; under
# the float32-level bound the worst is 0.005x.
ATTENTION_F64 = {"float64": Tolerance(BASE["float32"].rtol, BASE["float32"].atol,
                                      "jax.nn.dot_product_attention runs its softmax in float32 for float64 inputs; "
                                      "measured up to 2.3e-7 (1.1x the float64 bound)")}


def cfg(**kw: Any) -> tuple[tuple[str, Any], ...]:
    """A hashable hyperparameter set for `Static` (dict(cfg) gives it back)."""
    return tuple(sorted(kw.items()))


def module(cls: type, *args: Any, **kwargs: Any) -> torch.nn.Module:
    """One torch module per configuration and device (torch's default device, which the check
    sets to its own: a module cached on the CPU would meet inputs on the GPU); where a pair calls
    it through `call`, its own parameters are never used."""
    return _module(torch.get_default_device(), cls, *args, **kwargs)


@functools.lru_cache(maxsize=None)
def _module(device: torch.device, cls: type, *args: Any, **kwargs: Any) -> torch.nn.Module:
    return cls(*args, **kwargs)  # built inside the device context: parameters and buffers on `device`


def call(mod: torch.nn.Module, params: dict[str, Any], *inputs: Any, **kw: Any) -> Any:
    """The module on the given parameters and buffers (all of them: strict)."""
    return torch.func.functional_call(mod, params, inputs, kw or None, strict=True)


def pick(rng: np.random.Generator, options: Sequence[Any]) -> Any:
    return options[int(rng.integers(len(options)))]


def ints(rng: np.random.Generator, lo: int, hi: int) -> int:
    return int(rng.integers(lo, hi + 1))


def label(config: Any) -> str:
    """A readable key for one configuration's output: 'stride=2,padding=1', 'mean', '(2, 3)'."""
    if isinstance(config, tuple) and config and all(isinstance(i, tuple) and len(i) == 2 and isinstance(i[0], str)
                                                    for i in config):
        return ",".join(f"{k}={v}" for k, v in config)
    return str(config)


def bundled(fn: Callable[..., Any] | None, configs: Sequence[Any]) -> Callable[..., Any] | None:
    """fn(*args, config) for every config, as one output tree keyed by label(config).

    One compiled program then checks every configuration of a pair on a shape: compiling is
    what the suites' time goes to, and configurations that keep the inputs' shapes can share
    it. A failure names the configuration in its leaf path (out['stride=2,padding=1'])."""
    if fn is None:
        return None

    def run(*args: Any) -> dict[str, Any]:
        return {label(c): fn(*args, c) for c in configs}

    return run


def layer(name: str, torch_fn: Callable[..., Any], jax_fn: Callable[..., Any], sampler: Callable[..., Any],
          smallest: tuple[tuple[int, ...], ...], specs: Sequence[Any], names: Sequence[str],
          configs: Sequence[Any] | None = None, diff: Sequence[int] | None = None,
          checks: Sequence[str] = LAYER_CHECKS, static: bool = False, reference: Callable[..., Any] | None = None,
          **kw: Any) -> Pair:
    """A pair whose array arguments are `specs` (named `names`); the functions take a trailing
    config when `configs` are given: bundled into one output tree, or with `static` a `Static`
    argument (needed where the output must stay a single array, as conventions require).
    Gradients: every floating array argument by default."""
    specs = list(specs)
    names = list(names)
    if configs is not None and static:
        specs.append(Static(tuple(configs)))
        names.append("config")
    elif configs is not None:
        torch_fn, jax_fn = bundled(torch_fn, configs), bundled(jax_fn, configs)
        reference = bundled(reference, configs)
    if diff is None:
        diff = [i for i, s in enumerate(specs) if isinstance(s, Floats)]
    return Pair(name, torch_fn, jax_fn, Inputs(Custom(sampler, smallest), tuple(specs)), diff_args=tuple(diff),
                arg_names=tuple(names), checks=tuple(checks), reference=reference, **{"family": "layers", **kw})


def sample_args(pair: Pair, rng: np.random.Generator, dtype: str = "float64") -> tuple[Any, ...]:
    """One argument tuple drawn with NumPy instead of Hypothesis (benchmarks, reference tests):
    shapes from the pair's own rule, values uniform in each spec's range, statics picked."""
    from equivcheck import Index, Ints, Mask, Static
    from equivcheck.engine.dtypes import np_dtype

    all_shapes = pair.inputs.shapes.sample(rng)
    shapes = iter(all_shapes)
    drawn: list[Any] = []
    for spec in pair.inputs.args:
        if isinstance(spec, Static):
            drawn.append(pick(rng, spec.values))
            continue
        shape = next(shapes)
        if isinstance(spec, Floats):
            a = rng.uniform(spec.lo, spec.hi, shape)
            if spec.min_magnitude:
                a = np.where(np.abs(a) < spec.min_magnitude, spec.min_magnitude, a)
            if spec.special:  # the points the op treats specially, as Hypothesis draws them often
                a = np.where(rng.random(shape) < 0.25, rng.choice(np.asarray(spec.special), shape), a)
            drawn.append(a.astype(np_dtype(dtype)))
        elif isinstance(spec, Ints):
            drawn.append(rng.integers(spec.lo, spec.hi + 1, shape))
        elif isinstance(spec, Index):
            drawn.append(rng.integers(0, all_shapes[spec.of][spec.axis], shape))
        elif isinstance(spec, Mask):
            drawn.append(rng.random(shape) < 0.3)
        else:
            raise TypeError(f"sample_args: no NumPy draw for {type(spec).__name__}")
    return tuple(drawn)
