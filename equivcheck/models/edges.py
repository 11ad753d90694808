"""Inputs drawn where the torch model itself behaves specially.

Read off the model before drawing: an `nn.Embedding(padding_idx=p)` gets token p drawn often
(torch gives its row no gradient; a port that forgets is wrong only when p occurs), and padding
masks drawn by `Lengths` get rows that keep `min_keep` positions exactly (nearly fully masked
rows, where a masked softmax goes wrong first), and a pooling layer with `ceil_mode=True`
gets input sizes where its last window is partial (torch's pool then covers the padding
past the edge, where a port with VALID or SAME padding computes another window): the shape
rule's palette is drawn wider and at least half of it taken from shapes that give some such
pool a partial window, found by running the model once per candidate. The loss target, last,
is left as drawn.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from equivcheck.ops.shapes import Shape, ShapeSpec
from equivcheck.ops.strategies import Inputs, Ints, Lengths

EDGE_ROWS = 0.25  # the share of mask rows kept at min_keep: often enough for 3 examples to see one


@dataclasses.dataclass(frozen=True)
class Steered(ShapeSpec):
    """A shape rule whose palette prefers shapes `prefer(shapes)` holds for: the minimal shape
    first (where shrinking heads), then at least half of the rest preferred ones, when the rule
    gives any among 4x as many candidates. Draws and the minimal shape are the rule's own."""

    rule: ShapeSpec
    prefer: Callable[[tuple[Shape, ...]], bool]

    @property
    def n(self) -> int:  # type: ignore[override]
        return self.rule.n

    @property
    def zero_size(self) -> bool:  # type: ignore[override]
        return self.rule.zero_size

    def sample(self, rng: np.random.Generator) -> tuple[Shape, ...]:
        return self.rule.sample(rng)

    def minimal(self) -> tuple[Shape, ...]:
        return self.rule.minimal()

    def palette(self, rng: np.random.Generator, size: int) -> list[tuple[Shape, ...]]:
        base = self.rule.palette(rng, size)
        wide = self.rule.palette(rng, 4 * max(size, 2))
        good = [s for s in dict.fromkeys(base[1:] + wide) if self.prefer(s)]
        if not good:
            return base
        if size == 1:
            return base if self.prefer(base[0]) else good[:1]
        rest = [s for s in base[1:] if self.prefer(s)]
        rest += [s for s in good if s not in rest][:max(0, math.ceil((size - 1) / 2) - len(rest))]
        rest += [s for s in base[1:] if s not in rest][:max(0, size - 1 - len(rest))]
        key = lambda s: (sum(map(math.prod, s)), s)
        return base[:1] + sorted(rest, key=key)


def _ceil_pools(model: Any) -> list[Any]:
    from torch import nn

    kinds = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
    return [m for m in model.modules() if isinstance(m, kinds) and m.ceil_mode]


def partial_window(pool: Any, size: tuple[int, ...]) -> bool:
    """Whether a ceil_mode pool over spatial `size` has a last window that runs past the edge."""
    dims = len(size)
    each = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v,) * dims
    k, p = each(pool.kernel_size), each(pool.padding)
    st = each(pool.stride or pool.kernel_size)
    d = each(getattr(pool, "dilation", 1))
    return any((n + 2 * pp - dd * (kk - 1) - 1) % ss != 0 for n, kk, ss, pp, dd in zip(size, k, st, p, d, strict=True))


def _partial_windows(inputs: Inputs, model: Any, pools: list[Any]) -> Callable[[tuple[Shape, ...]], bool]:
    """prefer(shapes): the model, run on a batch of these shapes, gives some pool a partial window."""
    import torch

    from equivcheck.models.sides import numpy_batch

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    dtype = str(next((p.dtype for p in model.parameters()), torch.float32)).removeprefix("torch.")

    def prefer(shapes: tuple[Shape, ...]) -> bool:
        seen: list[bool] = []
        def look(m: Any, args: tuple[Any, ...]) -> None:
            dims = int(type(m).__name__[-2])  # MaxPool2d: 2 spatial axes, the last ones (batched or not)
            seen.append(partial_window(m, tuple(args[0].shape[-dims:])))

        hooks = [m.register_forward_pre_hook(look) for m in pools]
        try:
            batch = numpy_batch(inputs, shapes, dtype, np.random.default_rng(0))
            with torch.no_grad():
                model(*[torch.as_tensor(np.asarray(a)).to(device) for a in batch[:-1]])
        except Exception:  # noqa: BLE001 - a shape the model refuses is not preferred; the checks report it
            return False
        finally:
            for h in hooks:
                h.remove()
        return any(seen)

    return prefer


def model_inputs(inputs: Inputs, model: Any) -> Inputs:
    """`inputs` with the model's special values and sizes drawn often (see the module docstring)."""
    import torch

    pads = sorted({m.padding_idx % m.num_embeddings for m in model.modules()
                   if isinstance(m, torch.nn.Embedding) and m.padding_idx is not None})
    args = list(inputs.args)
    for i, spec in enumerate(args[:-1]):
        if isinstance(spec, Ints):
            extra = tuple(p for p in pads if spec.lo <= p <= spec.hi and p not in spec.special)
            if extra:
                args[i] = dataclasses.replace(spec, special=spec.special + extra)
        elif isinstance(spec, Lengths) and spec.edge is None:
            args[i] = dataclasses.replace(spec, edge=EDGE_ROWS)
    pools = _ceil_pools(model)
    shapes = Steered(inputs.shapes, _partial_windows(inputs, model, pools)) if pools else inputs.shapes
    return dataclasses.replace(inputs, shapes=shapes, args=tuple(args))
