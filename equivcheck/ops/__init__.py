"""Operation pairs: one torch function against one JAX function, forward and derivatives.

pairs         Pair (the record), Registry (a suite's table)
conventions   Convention: documented derivatives where a derivative is undefined
shapes        shape rules (Same, Broadcast, MatMul, Square, Fixed, Custom) and their palettes
strategies    value specs (Floats, Ints, Index, Mask, Lengths, Matrices, Static) and Inputs
autodiff      forward, VJP, JVP and HVP of one example on both sides, and their judgement
conditioning  acceptance of ill-conditioned and low-precision disagreements
differences   finite differences of a float64 function on steps relative to each input, and the steps they cannot resolve
finite        the arbiter's derivative from them: two-step agreement, kinks, resolution, forwards that differ
diagnose      which side is off: the float64 re-run, the reference, finite differences, known causes
runner        a pair at one dtype and device under Hypothesis: CheckRecords
mutants       planted bugs sized against the engine's own bound: the engine's mutation test
"""
from equivcheck.ops.autodiff import CHECKS
from equivcheck.ops.conventions import Convention
from equivcheck.ops.pairs import DTYPES, SIDES, Pair, Registry
from equivcheck.ops.runner import prepare, run_pair
from equivcheck.ops.shapes import Broadcast, Custom, Fixed, MatMul, Same, ShapeSpec, Square
from equivcheck.ops.strategies import Floats, Index, Inputs, Ints, Lengths, Mask, Matrices, Static, binary, unary

__all__ = [
    "CHECKS", "DTYPES", "SIDES", "Broadcast", "Convention", "Custom", "Fixed", "Floats", "Index", "Inputs", "Ints",
    "Lengths", "Mask", "MatMul", "Matrices", "Pair", "Registry", "Same", "ShapeSpec", "Square", "Static", "binary", "prepare",
    "run_pair", "unary",
]
