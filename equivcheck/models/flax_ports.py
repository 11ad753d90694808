"""Flax modules as the JAX port of a ModelPair, without `tap` calls in them.

`linen_port(module)` and `nnx_port(module)` turn a Flax module whose submodules carry the
torch modules' names (`fc1`, `encoder.layers.0.linear1`, ...) into the pure
`apply(params, *inputs, train=...)` a ModelPair takes, over the parameter tree equivcheck
converts from the torch model. Every submodule's output is recorded through Flax's own
intermediate capture (linen `capture_intermediates`, `nnx.capture(method_outputs=...)`) and
tapped under its dotted path, so the first diverging layer is localised as for a hand-tapped
port. Layers the module computes inline (an activation function, not a submodule) are not
tapped: a divergence there is reported at the next submodule.

Train mode runs the module with its train flag (linen: `train_arg`; nnx: `.train()`); dropout
masks match torch's only where the module applies `equivcheck.models.dropout` with the torch
module's name. BatchNorm statistics need the port to return them (`ModelPair(stateful=True)`):
write that port as a pure apply.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from equivcheck.models.tap import first_array, tap

ToTorch = Callable[[str, Any], Any]


def _tap_tree(tree: Mapping[str, Any], prefix: str, to_torch: ToTorch | None) -> None:
    for key, value in tree.items():
        if key == "__call__":
            if prefix:  # the top module's own output is the model's output, compared anyway
                # Flax keeps one entry per call (a tuple): the first call's output, then the
                # same unwrapping as torch's side (a module returning (output, weights))
                out = first_array(value[0] if isinstance(value, tuple) and value else value)
                tap(prefix, to_torch(prefix, out) if to_torch else out)
        elif isinstance(value, Mapping):
            _tap_tree(value, f"{prefix}.{key}" if prefix else str(key), to_torch)


def linen_port(module: Any, *, train_arg: str | None = None, to_torch: ToTorch | None = None,
               method: str | None = None) -> Callable[..., Any]:
    """A ModelPair `jax_apply` from a flax.linen Module.

    train_arg  the module's keyword for train mode (e.g. "train"), if it has one
    to_torch   (layer name, output) -> the output in torch's layout (NHWC -> NCHW), if they differ
    """

    def apply(params: Any, *inputs: Any, train: bool = False, **keywords: Any) -> Any:
        kw = {train_arg: train, **keywords} if train_arg else dict(keywords)
        if method:
            kw["method"] = method
        out, state = module.apply({"params": params}, *inputs, capture_intermediates=True,
                                  mutable=["intermediates"], **kw)
        _tap_tree(state.get("intermediates", {}), "", to_torch)
        return out

    apply.__name__ = f"linen_port({type(module).__name__})"
    return apply


def nnx_port(module: Any, *, to_torch: ToTorch | None = None) -> Callable[..., Any]:
    """A ModelPair `jax_apply` from a flax.nnx Module (its parameters are replaced by the
    converted tree on every call; the module itself is left as it was).

    The returned function's `jax_params()` is the module's own parameter tree: pass it as
    `ModelPair(jax_params=port.jax_params)` so the converted tree is checked key for key."""
    import jax
    from flax import nnx

    if not hasattr(nnx, "capture"):
        raise RuntimeError(f"flax {getattr(__import__('flax'), '__version__', '?')} has no nnx.capture: "
                           "nnx_port needs flax >= 0.12.8; write the port as a pure apply with equivcheck.models.tap")
    graphdef, template, rest = nnx.split(module, nnx.Param, ...)
    pure = getattr(nnx, "to_pure_dict", None) or (lambda state: state.to_pure_dict())

    def apply(params: Any, *inputs: Any, train: bool = False, **keywords: Any) -> Any:
        state = jax.tree_util.tree_map(lambda v: v, template)  # a fresh copy: the template stays untraced
        nnx.replace_by_pure_dict(state, params)
        model = nnx.merge(graphdef, state, rest)
        model.train() if train else model.eval()
        out, inter = nnx.capture(model, nnx.Intermediate, method_outputs=nnx.Intermediate)(*inputs, **keywords)
        _tap_tree(pure(inter), "", to_torch)
        return out

    apply.__name__ = f"nnx_port({type(module).__name__})"
    apply.jax_params = lambda: pure(template)  # type: ignore[attr-defined]
    return apply
