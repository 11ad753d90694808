"""Witnesses of the layer and loss tables' known divergences: the input where each one shows,
run first on every seed so that the entry in known_divergences.txt is strict (a witness that
agrees fails the run as "fixed").

Most are the minimal failing inputs `python benchmarks/find_witnesses.py` printed (Hypothesis's
shrink, seed 0); the norm traps need a small variance (eps matters), the conv traps one lit pixel
at the border, the CTC trap a target of length 2 (its mean divides by the target length).
Arguments follow each pair's `Inputs`, `Static` configurations included.
"""
from __future__ import annotations

from typing import Any

import numpy as np

WITNESSES: dict[str, tuple[tuple[Any, ...], ...]] = {
    "nn.trap.layer_norm_eps": (([[0.0, 0.0078125]],),),
    "nn.trap.layer_norm_fast_variance": (([[1001.0, 1000.375]],),),
    "nn.trap.group_norm_eps": (([[[[0.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0078125]]]],),),
    "nn.trap.rms_norm_eps": (([[0.0, 0.00041249909554608166]],),),
    "nn.trap.batch_norm_momentum": (([[0.0], [1.0]], [0.0], [0.0], [0.0], [1.0]),),
    "nn.trap.batch_norm_running_var": (([[0.0], [1.0]], [0.0], [0.0], [0.0], [1.0]),),
    "nn.trap.init_linear": ((16,),),
    "nn.trap.init_embedding": ((8,),),
    "nn.trap.conv_padding_default": ((np.zeros((1, 1, 3, 3)), np.zeros((1, 1, 3, 3)), [0.0]),),
    "nn.trap.conv_same_stride2": (([[[[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0],
                                      [0.0, 0.0, 0.0, 1.0]]]], [[[[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0]]]],
                                   [0.0]),),
    "nn.trap.conv_transpose_no_flip": (([[[[0.0, 0.0], [0.0, 1.0]]]], [[[[0.0, 0.0, 0.0], [0.0, 0.0, 0.0],
                                                                          [0.0, 0.0, 1.0]]]], [0.0]),),
    "nn.trap.max_pool_stride_default": ((np.zeros((2, 2, 3, 2)),),),
    "nn.trap.interp_bilinear_antialias": (([[[[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0],
                                              [0.0, 0.0, 0.0, 1.0]]]],),),
    "nn.trap.interp_nearest": (([[[[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]]],),),
    "nn.trap.mha_batch_first": (([[[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]],
                                  [[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]],),),
    "nn.trap.mha_key_padding_polarity": (([[[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]],
                                           [[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]],
                                          [[False, False], [False, False]]),),
    "nn.trap.sdpa_fully_masked_row": (([[[[0.0]]]], [[[[0.0]]]], [[[[1.0]]]], [[[[False]]]]),),
    # the onnx check's known divergences (suites/known_divergences-torch2.14.txt): a fully masked row,
    # where the exported graph gives mean(V) = 1; one training step whose running_var update (0.95)
    # the exported graph drops (it gives 1)
    "nn.sdpa_masked_rows_guarded": (([[[[0.0]]]], [[[[0.0]]]], [[[[1.0]]]], [[[[False]]]]),),
    "nn.batch_norm_train": (([[[0.0], [1.0]]], [1.0], [0.0], [0.0], [1.0]),),
    "nn.trap.gru_nnx_cell": (([[[0.0]]], [[0.0], [0.0], [0.0]], [[0.0], [0.0], [0.0]], [0.0, 0.0, 0.0],
                              [0.0, 0.0, 1.0]),),
    "nn.trap.gelu_approximate": (([[1.0]],),),
    "nn.interp_bilinear_antialias_width1": (([[[[0.0], [0.0], [1.0]]]],),),
    "nn.layer_norm_offset": (([[11.609375, 11.5]],), ([[11.4375, 11.5]],)),
    "nn.embedding_padding_naive": (([0], [[0.0], [0.0]]),),
    "loss.trap.cross_entropy_reduction": (([[0.0, 0.0]], [0]),),
    "loss.trap.cross_entropy_weighted_mean": (([[0.0, 0.0], [0.0, 0.0]], [0, 0], [0.5, 1.0]),),
    "loss.trap.kl_div_mean": (([[0.0, 0.0]], [[1.0, 0.5]]),),
    "loss.trap.smooth_l1_as_huber": (([[0.0]], [[1.0]]),),
    "loss.trap.mse_as_l2_loss": (([[0.0]], [[1.0]]),),
    "loss.trap.bce_unclamped": (([[0.0]], [[0.0]]),),
    "loss.trap.ctc_mean": ((np.zeros((1, 5, 4)), [[1, 2]], [1]),),
    "loss.bce_saturated": (([[0.0]], [[0.0]]),),
}


def witnessed(pairs: list[Any]) -> list[Any]:
    """`pairs` with their witnesses from this table (tests/test_witnesses.py checks that every
    known divergence of the suites has one)."""
    return [p.replace(witnesses=WITNESSES[p.name]) if p.name in WITNESSES else p for p in pairs]
