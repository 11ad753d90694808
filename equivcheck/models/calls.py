"""Models called as people call them: keyword inputs and structured outputs.

`ModelPair(keywords=("attention_mask",))` passes the last drawn model inputs by those names,
`model(input_ids, attention_mask=...)` on both sides; `ModelPair(output="logits")` (or a
function) picks, from a dict, dataclass or Hugging Face `ModelOutput`, the output both sides
compare and the loss takes. The torch model is called through its own forward, rebound on the
instance, so its module names, hooks and state_dict are the model's own.
"""
from __future__ import annotations

import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def split(keywords: Sequence[str], inputs: Sequence[Any]) -> tuple[list[Any], dict[str, Any]]:
    """(positional, keyword) arguments: the last len(keywords) inputs go by those names."""
    inputs = list(inputs)
    if not keywords:
        return inputs, {}
    cut = len(inputs) - len(keywords)
    return inputs[:cut], dict(zip(keywords, inputs[cut:], strict=True))


def pick(output: str | Callable[[Any], Any] | None, out: Any, side: str) -> Any:
    """The part of a model's output named by `output`: a key of a mapping, else an attribute
    (a ModelOutput is both), or the result of a function. Raises KeyError naming the side and
    the keys there are."""
    if output is None:
        return out
    if callable(output):
        return output(out)
    if isinstance(out, Mapping) and output in out:
        return out[output]
    if hasattr(out, output):
        return getattr(out, output)
    if isinstance(out, Mapping):
        has = f"it has {list(out)}"
    elif isinstance(out, (tuple, list)):
        has = f"it has fields {list(out._fields)}" if hasattr(out, "_fields") else f"it is a {type(out).__name__} of {len(out)}"
    else:
        has = f"its attributes: {[k for k in dir(out) if not k.startswith('_')][:12]}"
    raise KeyError(f"the {side} output ({type(out).__name__}) has no {output!r} ({has}): ModelPair(output=...) "
                   "names the output to compare and take the loss of")


def _holds(output: Any, out: Any) -> bool:
    return callable(output) or (isinstance(out, Mapping) and output in out) or hasattr(out, output)


def _called(self: Any, *inputs: Any) -> Any:
    keywords, output = self._equivcheck_call
    args, kwargs = split(keywords, inputs)
    return pick(output, type(self).forward(self, *args, **kwargs), "torch")


def bind_torch(pair: Any, model: Any) -> Any:
    """The model, called with the pair's keywords and its output picked, from `model(*inputs)`."""
    if pair.keywords or pair.output is not None:
        model._equivcheck_call = (tuple(pair.keywords), pair.output)
        model.forward = types.MethodType(_called, model)  # deepcopy rebinds it to the copy
    return model


def apply_port(pair: Any, tree: Any, inputs: Sequence[Any], train: bool) -> Any:
    """pair.jax_apply on the inputs, by the pair's keywords, its output picked (in a stateful
    port's (output, statistics) too)."""
    args, kwargs = split(pair.keywords, inputs)
    res = pair.jax_apply(tree, *args, **kwargs, train=train)
    if pair.output is None:
        return res
    two = isinstance(res, (tuple, list)) and len(res) == 2
    if pair.stateful and two:
        return pick(pair.output, res[0], "jax"), res[1]
    if two and not _holds(pair.output, res) and _holds(pair.output, res[0]):
        return pick(pair.output, res[0], "jax"), res[1]  # (output, statistics): port_output says set stateful
    return pick(pair.output, res, "jax")
