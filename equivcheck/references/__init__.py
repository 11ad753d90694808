"""float64 NumPy references: what decides which side is off when the two differ in float64 too.

layers  torch.nn layers, from torch's documented definitions
losses  torch.nn.functional losses, from torch's documented formulas
"""
from equivcheck.references import layers, losses

__all__ = ["layers", "losses"]
