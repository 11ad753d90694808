"""Models called as people call them: keyword inputs and structured outputs.

`ModelPair(keywords=("attention_mask",))` passes the last drawn model inputs by those names,
`model(input_ids, attention_mask=...)` on both sides; `ModelPair(output="logits")` (or a
function) picks, from a dict, dataclass or Hugging Face `ModelOutput`, the output both sides
compare and the loss takes. The torch model is called through its own forward, rebound on the
instance, so its module names, hooks and state_dict are the model's own. A picked output of
another shape on one side, or one the loss does not take, is named as such (`shape_cause`),
with the side whose selection it is, rather than read as a numeric divergence of the port.
"""
from __future__ import annotations

import math
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np


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


# ---- outputs whose shapes are the cause -------------------------------------------------------

_WHOSE = {"torch": "torch's", "jax": "the port's"}


def _shapes(tree: Any) -> str:
    from equivcheck.engine.compare import flatten

    leaves = flatten(tree)
    if len(leaves) == 1 and leaves[0][0] == "out":
        return str(list(np.shape(leaves[0][1])))
    return "{" + ", ".join(f"{path[3:]}: {list(np.shape(v))}" for path, v in leaves) + "}"


def _refusal(pair: Any, side: str, out: Any, target: Any, dtype: str) -> str:
    """Why `side`'s loss does not take its output against the target ("" when it does): it raises,
    or the output and the target broadcast to more elements than either has (an elementwise loss
    then compares every output with every target; torch's mse_loss only warns)."""
    import warnings

    import jax

    if pair.loss is None or target is None:
        return ""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if side == "torch":
                import torch

                pair.loss.torch_fn(jax.tree.map(torch.as_tensor, out), torch.as_tensor(np.asarray(target)))
            else:
                from equivcheck.backends.jax import x64

                with x64(dtype == "float64"):
                    pair.loss.jax_fn(jax.tree.map(jax.numpy.asarray, out), jax.numpy.asarray(target))
    except Exception as exc:  # noqa: BLE001 - the refusal is the finding
        return f"raises {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    o, t = np.shape(jax.tree.leaves(out)[0]) if jax.tree.leaves(out) else (), np.shape(target)
    try:
        both = np.broadcast_shapes(o, t)
    except ValueError:  # not elementwise (class logits against labels): the loss decides, and took it
        return ""
    if math.prod(both) > max(math.prod(o), math.prod(t)):
        return f"broadcasts it against the target's {list(t)} to {list(both)} (every output against every target)"
    return ""


def shape_cause(pair: Any, t_out: Any, j_out: Any, target: Any, dtype: str) -> tuple[str, str] | None:
    """(side, text) when the model's outputs are the cause by their shapes, else None.

    Outputs of different shapes are a structural mismatch: the loss, gradients and trajectory
    differ because of it, so no numeric difference is blamed. The side named is the one whose
    output does not suit the loss (its loss raises on it, or broadcasts it against the target);
    torch's being the specification, the port's when neither or both do. Outputs of one shape
    are the cause only where a side's loss raises on them: on both sides, the `output=`
    selection (or the model's output) does not suit the loss; on one, the two losses differ."""
    if j_out is None or t_out is None:
        return None
    ts, js = _shapes(t_out), _shapes(j_out)
    why = {s: _refusal(pair, s, o, target, dtype) for s, o in (("torch", t_out), ("jax", j_out))}
    off = [s for s, w in why.items() if w]
    chosen = getattr(pair.output, "__name__", "a function") if callable(pair.output) else repr(pair.output)
    sel = "the whole model outputs" if pair.output is None else f"ModelPair(output={chosen}) picks them"
    loss = (f"the loss ({pair.loss.name}) against the target of shape {list(np.shape(target))}" if pair.loss
            else "the loss")
    if ts != js:
        text = (f"the outputs have different shapes ({sel}): torch {ts}, the port {js}; a structural mismatch, not "
                "a numeric difference")
        if len(off) == 1:
            side, other = off[0], "jax" if off[0] == "torch" else "torch"
            what = "output= selection (or the shape of what it picks)" if pair.output is not None else "output's shape"
            return side, (f"{text}: {_WHOSE[side]} output does not suit {loss}, {_WHOSE[other]} does "
                          f"({_WHOSE[side]} loss {why[side]}): {_WHOSE[side]} {what} is off")
        neither = "; ".join(f"{_WHOSE[s]} loss {why[s]}" for s in off)
        return "jax", (f"{text}: torch's output is the specification; give the port's output (its output= selection "
                       "or its shape) torch's shape" + (f" (neither suits {loss}: {neither})" if neither else ""))
    if not any(w.startswith("raises") for w in why.values()):
        return None
    if len(off) == 1:  # the other side's loss takes the very same shape: the losses differ, not the output
        return off[0], (f"the outputs agree in shape ({ts}; target {list(np.shape(target))}), but {_WHOSE[off[0]]} "
                        f"loss {why[off[0]]} where the other side's takes them: the two sides' losses "
                        f"({pair.loss.name}) differ in what they accept")
    return "both", (f"the output does not suit {loss}: both sides give {ts} ({sel}), and "
                    + "; ".join(f"{_WHOSE[s]} loss {why[s]}" for s in off)
                    + ": pick the output the loss takes (ModelPair(output=...)) or reshape it")
