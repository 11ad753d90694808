"""Inputs drawn where the torch model itself behaves specially.

Read off the model before drawing: an `nn.Embedding(padding_idx=p)` gets token p drawn often
(torch gives its row no gradient; a port that forgets is wrong only when p occurs), and padding
masks drawn by `Lengths` get rows that keep `min_keep` positions exactly (nearly fully masked
rows, where a masked softmax goes wrong first). The loss target, last, is left as drawn.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from equivcheck.ops.strategies import Inputs, Ints, Lengths

EDGE_ROWS = 0.25  # the share of mask rows kept at min_keep: often enough for 3 examples to see one


def model_inputs(inputs: Inputs, model: Any) -> Inputs:
    """`inputs` with the model's special values drawn often (see the module docstring)."""
    import torch

    pads = sorted({m.padding_idx % m.num_embeddings for m in model.modules()
                   if isinstance(m, torch.nn.Embedding) and m.padding_idx is not None})
    args = list(inputs.args)
    for i, spec in enumerate(args[:-1]):
        if isinstance(spec, Ints):
            extra = tuple(p for p in pads if spec.lo <= p <= spec.hi and p not in spec.special)
            if extra:
                args[i] = dataclasses.replace(spec, special=spec.special + extra)
        elif isinstance(spec, Lengths) and spec.edge == 0:
            args[i] = dataclasses.replace(spec, edge=EDGE_ROWS)
    return dataclasses.replace(inputs, args=tuple(args))
