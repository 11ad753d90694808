"""Weights between a torch state_dict and a JAX (Flax) parameter tree, both ways.

rules        Rule, Layout and LAYOUTS (the registry of layouts, register_layout); torch_to_jax, jax_to_torch, probe
convert      per-layer conversions (Linear, Conv, norms, Embedding, RNNs, attention) in one table;
             register_module teaches it a module type of your own
layouts      dense and convolutional layouts, their validation, ConversionError
layouts_seq  recurrent and attention layouts
"""
from equivcheck.weights import convert
from equivcheck.weights.convert import register_module
from equivcheck.weights.layouts import ConversionError, channels_first, channels_last
from equivcheck.weights.rules import (
    LAYOUTS,
    PROBE_RTOL,
    Layout,
    Rule,
    jax_to_torch,
    probe,
    register_layout,
    torch_to_jax,
)

__all__ = ["LAYOUTS", "PROBE_RTOL", "ConversionError", "Layout", "Rule", "channels_first", "channels_last", "convert",
           "jax_to_torch", "probe", "register_layout", "register_module", "torch_to_jax"]
