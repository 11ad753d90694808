"""torch.nn layers on the JAX side, and where the two frameworks' layers differ by default.

flax_bridge  torch.nn layers run through their Flax counterparts, torch signatures and layouts
             (imported on use: it loads jax and flax)
traps        default-configuration traps of layers and losses: cause, size, reconciling setting
"""
from equivcheck.layers import traps
from equivcheck.layers.traps import BY_ID, TABLE, Divergence

__all__ = ["BY_ID", "TABLE", "Divergence", "traps"]
