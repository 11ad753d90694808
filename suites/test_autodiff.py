"""Autodiff suite: forward, VJP, JVP and HVP of core ops, PyTorch against JAX.

One table, one generic test. Each row names the op on both sides, its input domain (with
the points the op treats specially drawn often), a float64 NumPy/SciPy reference where one
exists, and the documented derivative conventions where a derivative is undefined.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special as sp
import torch
import torch.nn.functional as F

from equivcheck import (
    Broadcast,
    Convention,
    Custom,
    Fixed,
    Floats,
    Index,
    Inputs,
    Mask,
    MatMul,
    Matrices,
    Pair,
    Registry,
    Same,
    Square,
    Static,
    Tolerance,
    binary,
    unary,
)
from equivcheck.engine.tolerance import BASE

ALL_FLOATS = ("float32", "float64", "bfloat16", "float16")
NO_HVP = ("forward", "vjp", "jvp")
TORCH_VERSION = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])


def ew(name, t, j, elements=None, ref=None, dtypes=ALL_FLOATS, **kw):
    """An elementwise unary op over any shape (scalars and empty arrays included)."""
    return Pair(name, t, j, unary(elements), reference=ref, dtypes=dtypes, tags={"elementwise"}, **kw)


def at(*points):
    return lambda x: np.isin(x, points)


def second_at_zero(name, jax_value, doc):
    """A kink of the first derivative at 0: both agree on f'(0), torch takes f''(0) = 0."""
    return Convention(name, at(0.0), 1.0, 1.0, doc, checks=(), hvp=(0.0, jax_value))


# log1p and expm1 exist to stay accurate near 0: an absolute floor would hide log(1 + x). Their
# derivatives are not (both frameworks take expm1' as expm1(x) + 1), so the table holds there.
NEAR_ZERO = {f"{d}/forward": Tolerance(BASE[d].rtol, 0.0, "relative only: log1p/expm1 are accurate near 0")
             for d in ALL_FLOATS}
GELU_TANH_T = functools.partial(F.gelu, approximate="tanh")
GELU_TANH_J = functools.partial(jax.nn.gelu, approximate=True)
GELU_TANH_REF = lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
CUMPROD_T = functools.partial(torch.cumprod, dim=-1)
CUMPROD_J = functools.partial(jnp.cumprod, axis=-1)
F32_MIN_NORMAL = float(np.finfo(np.float32).tiny)
SELU_SCALE, SELU_ALPHA = 1.0507009873554805, 1.6732632423543772


def last(**kw):
    """Shapes with at least one axis, for ops over the last axis."""
    return dict(min_dims=1, zero_size=False, **kw)


def _softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _t_sign(u):
    """Signs that make the largest-magnitude entry of each column of `u` positive:
    eigen- and singular vectors are defined up to sign, the fixed ones are unique."""
    return torch.sign(torch.gather(u, -2, u.abs().argmax(-2, keepdim=True)))


def _t_sym(a):
    return (a + a.transpose(-1, -2)) / 2


def t_eigh(a):
    w, v = torch.linalg.eigh(_t_sym(a))
    return w, v * _t_sign(v)


def t_svd(a):
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    sign = _t_sign(u)
    return u * sign, s, vh * sign.transpose(-1, -2)


def t_qr(a):
    q, r = torch.linalg.qr(a)
    d = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    return q * d.unsqueeze(-2), r * d.unsqueeze(-1)


# The JAX side and the float64 NumPy reference are one function each: jnp and np share the API.
def _sign(xp, u):
    return xp.sign(xp.take_along_axis(u, xp.argmax(xp.abs(u), axis=-2, keepdims=True), axis=-2))


def _sym(xp, a):
    return (a + xp.swapaxes(a, -1, -2)) / 2


def _eigh(xp, a):
    w, v = xp.linalg.eigh(_sym(xp, a))
    return w, v * _sign(xp, v)


def _svd(xp, a):
    u, s, vh = xp.linalg.svd(a, full_matrices=False)
    sign = _sign(xp, u)
    return u * sign, s, vh * xp.swapaxes(sign, -1, -2)


def _qr(xp, a):
    q, r = xp.linalg.qr(a)
    d = xp.sign(xp.diagonal(r, axis1=-2, axis2=-1))
    return q * d[..., None, :], r * d[..., :, None]


j_eigh, j_svd, j_qr = (functools.partial(f, jnp) for f in (_eigh, _svd, _qr))
np_eigh, np_svd, np_qr = (functools.partial(f, np) for f in (_eigh, _svd, _qr))


def np_scatter_add(x, i, s):
    out = np.array(x, np.float64)
    np.add.at(out, i, s)
    return out


def np_glu(x):
    a, b = np.split(x, 2, axis=-1)
    return a / (1 + np.exp(-b))


def j_cholesky_inverse(f):
    eye = jnp.broadcast_to(jnp.eye(f.shape[-1], dtype=f.dtype), f.shape)
    return jax.scipy.linalg.cho_solve((jnp.tril(f), True), eye)


def np_cholesky_inverse(f):
    lower = np.tril(f)
    return np.linalg.inv(lower @ np.swapaxes(lower, -1, -2))


def _tall(rng):
    n = int(rng.integers(1, 5))
    return ((*(int(b) for b in rng.integers(1, 3, size=rng.integers(0, 2))), n + int(rng.integers(0, 3)), n),)


def _any_matrix(rng):
    return (tuple(int(d) for d in rng.integers(1, 5, size=2)),)


def _gather(rng):
    a, n, m = (int(x) for x in rng.integers(1, 5, size=3))
    return (a, n), (a, m)


def _scatter(rng):
    n, d, k = (int(x) for x in rng.integers(1, 5, size=3))
    return (n, d), (k,), (k, d)


def _select(rng):
    n, d, k = (int(x) for x in rng.integers(1, 5, size=3))
    return (n, d), (k,)


def _concat(rng):
    a, b, d = (int(x) for x in rng.integers(0, 4, size=3))
    return (a, d + 1), (b, d + 1)


def _bmm(rng):
    b, m, k, n = (int(x) for x in rng.integers(1, 5, size=4))
    return (b, m, k), (b, k, n)


def _even_last(rng):
    lead = tuple(int(x) for x in rng.integers(1, 4, size=rng.integers(0, 3)))
    return (lead + (2 * int(rng.integers(1, 4)),),)


def _reflect(rng):
    return ((int(rng.integers(1, 4)), int(rng.integers(3, 7))),)


clamp_torch_boundary = 1.0 if TORCH_VERSION < (2, 14) else 0.0  # pytorch/pytorch#184574 changed it in 2.14
pos = Floats(lo=1e-3, hi=100.0)
# Norms: all-zero vectors drawn often. Tiny magnitudes have their own pair (norm2_underflow): near
# 1e-15 the 2-norm's Hessian (I - xx'/|x|^2)/|x| cancels terms of size 1/|x| in float32.
zero_heavy = Floats(lo=-5, hi=5, special=(0.0,), fill=True, min_magnitude=1e-3)

PAIRS = Registry([
    # ---------------------------------------------------------------- elementwise math
    ew("exp", torch.exp, jnp.exp, Floats(-20, 20), np.exp),
    # witness of log::hvp::float16: -ct*v/x^2 overflows float16 inside JAX at x = 2.4e-3
    ew("log", torch.log, jnp.log, pos, np.log, witnesses=(([0.00244140625],),)),
    ew("log1p", torch.log1p, jnp.log1p, Floats(-0.99, 10, near=(-1.0,)), np.log1p, tolerance=NEAR_ZERO),
    ew("expm1", torch.expm1, jnp.expm1, Floats(-20, 20), np.expm1, tolerance=NEAR_ZERO),
    # sqrt'' = -x^-1.5/4 overflows in JAX's intermediates below ~1e-200 (float64) while torch's stays
    # finite: magnitudes start at 1e-30; 0 itself (inf in both) is drawn often.
    ew("sqrt", torch.sqrt, jnp.sqrt, Floats(0, 100, special=(0.0,), min_magnitude=1e-30), np.sqrt,
       witnesses=(([1e-4],), ([7.439e-27],))),  # sqrt::hvp::float16, sqrt::hvp::float32
    ew("rsqrt", torch.rsqrt, jax.lax.rsqrt, pos, lambda x: 1 / np.sqrt(x), witnesses=(([0.0078125],),)),
    Pair("pow", torch.pow, jnp.power, binary(Floats(0.1, 10), Floats(-3, 3, exclude=(0.0,))), diff_args=(0, 1),
         reference=np.power, dtypes=ALL_FLOATS),
    Pair("pow_tiny_base", torch.pow, jnp.power,
         binary(Floats(0, 1e-30, special=(F32_MIN_NORMAL,), tiny=False), Floats(0.01, 3), broadcast=False),
         diff_args=(0, 1), reference=np.power, dtypes=("float32",), witnesses=((F32_MIN_NORMAL, 0.03125),),
         doc="bases near float32's smallest normal: torch's second derivative overflows in an intermediate"),
    Pair("pow_zero_exponent", torch.pow, jnp.power, binary(Floats(0.1, 10), Floats(0.0, 0.0, tiny=False),
                                                           broadcast=False),
         diff_args=(0, 1), reference=np.power, witnesses=((1.0, 0.0),),
         doc="torch's pow backward masks d/dx at y == 0 with where(), which also zeroes d2/dxdy (= 1/x)"),
    Pair("pow_int", lambda x, n: torch.pow(x, n), lambda x, n: jnp.power(x, n),
         Inputs(Same(), (Floats(-10, 10, special=(0.0,)), Static((2, 3)))), reference=np.power, dtypes=ALL_FLOATS),
    ew("sin", torch.sin, jnp.sin, Floats(-50, 50), np.sin),
    ew("cos", torch.cos, jnp.cos, Floats(-50, 50), np.cos),
    ew("tan", torch.tan, jnp.tan, Floats(-1.5, 1.5), np.tan),
    ew("tanh", torch.tanh, jnp.tanh, Floats(-20, 20), np.tanh),
    # Near 0 both sides differentiate sin(pi x)/(pi x) by formula, whose terms of size 1/x (second
    # derivative: 1/x^2) cancel: below |x| ~ 0.15 their float32 HVPs differ beyond the table (34x its
    # bound at x = 1e-2 for unit vectors), first derivatives below ~0.03. Magnitudes start at 0.25
    # here; 0 itself is drawn often, tiny magnitudes have their own pair (sinc_tiny).
    ew("sinc", torch.sinc, jnp.sinc, Floats(-10, 10, special=(0.0, 0.5, 1.0, -1.0, 2.0), min_magnitude=0.25),
       np.sinc, dtypes=("float32", "float64"), witnesses=(([0.0],),)),  # sinc::hvp: torch NaN at 0
    ew("sinc_tiny", torch.sinc, jnp.sinc, Floats(-1e-30, 1e-30), np.sinc, dtypes=("float32", "float64"),
       checks=NO_HVP, witnesses=(([4.7e-38],),),  # sinc_tiny::jvp, ::vjp: JAX -inf in float32
       doc="tiny magnitudes: JAX's sinc derivative is -inf where (pi x)**2 underflows. No HVP: neither side's "
           "is right here (exactly -pi**2/3): NaN on both in float32 (in float64 below ~1e-154), above that "
           "torch 0 and JAX noise of size eps/x**2"),
    # Near the origin |grad| ~ 1/r and |H| ~ 1/r^2 overflow, each side to its own inf or NaN:
    # magnitudes below 1e-3 are left out, the origin itself is drawn often.
    Pair("atan2", torch.atan2, jnp.arctan2,
         binary(Floats(special=(0.0,), min_magnitude=1e-3), Floats(special=(0.0,), min_magnitude=1e-3),
                broadcast=False),
         diff_args=(0, 1), reference=np.arctan2, dtypes=ALL_FLOATS,
         witnesses=((0.0, 0.00390625),),  # atan2::*::float16: x^2 + y^2 underflows in torch's float16
         conventions=tuple(Convention("atan2(0, 0)", lambda y, x: (y == 0) & (x == 0), 0.0, np.nan,
                                      "torch's backward gives 0 at the origin, JAX NaN (jax-ml/jax#2377)", arg=i,
                                      checks=("vjp",)) for i in (0, 1))),
    ew("erf", torch.erf, jax.scipy.special.erf, Floats(-5, 5), sp.erf),
    ew("erfinv", torch.erfinv, jax.scipy.special.erfinv, Floats(-0.999, 0.999, special=(0.0,)), sp.erfinv,
       witnesses=(([-0.99853515625],),)),  # erfinv::hvp::float16
    ew("lgamma", torch.lgamma, jax.scipy.special.gammaln, Floats(0.05, 30, special=(1.0, 2.0)), sp.gammaln),
    ew("digamma", torch.digamma, jax.scipy.special.digamma, Floats(0.1, 20), sp.psi),
    ew("abs", torch.abs, jnp.abs, Floats(special=(0.0,)), np.abs,
       conventions=(Convention("abs'(0)", at(0.0), 0.0, 1.0, "torch: sign(0) = 0; JAX: 1 (jax-ml/jax#37820)"),)),
    ew("sign", torch.sign, jnp.sign, Floats(special=(0.0,)), np.sign),
    ew("floor", torch.floor, jnp.floor, Floats(special=(1.0, -1.5, 2.5)), np.floor, checks=NO_HVP),
    ew("round", torch.round, jnp.round, Floats(special=(0.5, 1.5, 2.5, -0.5)), np.round, checks=NO_HVP),
    ew("clamp", lambda x: torch.clamp(x, -1.0, 1.0), lambda x: jnp.clip(x, -1.0, 1.0), Floats(special=(-1.0, 1.0)),
       lambda x: np.clip(x, -1, 1),
       conventions=(Convention("clamp at its bounds", at(-1.0, 1.0), clamp_torch_boundary, 0.5,
                               "torch < 2.14: 1, torch >= 2.14: 0 (pytorch/pytorch#184574); jnp.clip: 0.5"),)),
    # ---------------------------------------------------------------- activations
    ew("relu", torch.relu, jax.nn.relu, Floats(special=(0.0,)), lambda x: np.maximum(x, 0)),
    ew("relu6", F.relu6, jax.nn.relu6, Floats(special=(0.0, 6.0)), lambda x: np.clip(x, 0, 6)),
    ew("leaky_relu", F.leaky_relu, jax.nn.leaky_relu, Floats(special=(0.0,)), lambda x: np.where(x >= 0, x, 0.01 * x),
       conventions=(Convention("leaky_relu'(0)", at(0.0), 0.01, 1.0, "torch: the negative slope; JAX: 1"),)),
    ew("elu", F.elu, jax.nn.elu, Floats(special=(0.0,)), lambda x: np.where(x > 0, x, np.expm1(x)),
       conventions=(second_at_zero("elu''(0)", 1.0, "torch: the x > 0 branch (0); JAX: the x <= 0 branch (1)"),)),
    ew("selu", F.selu, jax.nn.selu, Floats(special=(0.0,)),
       lambda x: SELU_SCALE * np.where(x > 0, x, SELU_ALPHA * np.expm1(x)),
       witnesses=(([-6.0],),),  # selu::hvp::bfloat16
       conventions=(second_at_zero("selu''(0)", SELU_SCALE * SELU_ALPHA,
                                   "torch: the x > 0 branch (0); JAX: the x <= 0 branch (scale * alpha)"),)),
    ew("celu", F.celu, jax.nn.celu, Floats(special=(0.0,)), lambda x: np.where(x > 0, x, np.expm1(x)),
       witnesses=(([-6.0],),),  # celu::*::bfloat16
       conventions=(second_at_zero("celu''(0)", 0.25, "torch: 0; JAX: 0.25, from max/min ties halving twice"),)),
    ew("gelu_exact", F.gelu, functools.partial(jax.nn.gelu, approximate=False), None,
       lambda x: 0.5 * x * (1 + sp.erf(x / np.sqrt(2)))),
    ew("gelu_tanh", GELU_TANH_T, GELU_TANH_J, Floats(-3.5, 3.5), GELU_TANH_REF),
    ew("gelu_tanh_tail", GELU_TANH_T, GELU_TANH_J, Floats(-10, 10, min_magnitude=3.5), GELU_TANH_REF,
       dtypes=("float32",), witnesses=(([-4.86776] * 16,),),  # gelu_tanh_tail::hvp: 6e-5 where the direction is ~2.8
       doc="|x| > 3.5: float32 tanh saturates and JAX's second derivative loses its digits (0 for -2.2e-5 at "
           "-4.868), beyond the HVP's float32 bound (atol 4e-5) where the direction exceeds ~1.8"),
    ew("silu", F.silu, jax.nn.silu, None, lambda x: x / (1 + np.exp(-x))),
    ew("mish", F.mish, jax.nn.mish, Floats(-20, 20), lambda x: x * np.tanh(np.logaddexp(0, x)),
       witnesses=(([12.0],),)),  # mish::hvp::float16
    ew("softplus", F.softplus, jax.nn.softplus, Floats(-30, 30), lambda x: np.logaddexp(0, x),
       doc="JAX computes log1p(exp(x)) everywhere; torch switches to x above 20: equal within tolerance"),
    ew("softplus_threshold", F.softplus, lambda x: jnp.where(x > 20, x, jax.nn.softplus(x)),
       Floats(-30, 30, special=(20.0,), near=(20.0,)), lambda x: np.where(x > 20, x, np.logaddexp(0, x)),
       doc="torch returns x above threshold=20; the JAX side reproduces that"),
    ew("sigmoid", torch.sigmoid, jax.nn.sigmoid, Floats(-30, 30), sp.expit),
    ew("log_sigmoid", F.logsigmoid, jax.nn.log_sigmoid, Floats(-30, 30), lambda x: -np.logaddexp(0, -x)),
    ew("hardtanh", F.hardtanh, jax.nn.hard_tanh, Floats(special=(-1.0, 1.0)), lambda x: np.clip(x, -1, 1),
       conventions=(Convention("hardtanh at its bounds", at(-1.0, 1.0), 0.0, 1.0, "torch: 0; jax.nn.hard_tanh: 1"),)),
    ew("hardswish", F.hardswish, jax.nn.hard_swish, Floats(special=(-3.0, 3.0)),
       lambda x: x * np.clip(x + 3, 0, 6) / 6),
    ew("hardsigmoid", F.hardsigmoid, jax.nn.hard_sigmoid, Floats(special=(-3.0, 3.0)),
       lambda x: np.clip(x / 6 + 0.5, 0, 1), checks=NO_HVP,
       doc="no HVP: torch has no derivative for aten::hardsigmoid_backward"),
    ew("softsign", F.softsign, jax.nn.soft_sign, Floats(special=(0.0,)), lambda x: x / (1 + np.abs(x)),
       conventions=(second_at_zero("softsign''(0)", -2.0, "-2 sign(x) / (1 + |x|)^3 with sign(0): torch 0, JAX 1"),)),
    ew("logit", torch.logit, jax.scipy.special.logit, Floats(1e-3, 1 - 1e-3), sp.logit, witnesses=((0.00390625,),)),
    Pair("softmax", functools.partial(torch.softmax, dim=-1), functools.partial(jax.nn.softmax, axis=-1),
         unary(Floats(-30, 30), **last()), reference=_softmax, dtypes=ALL_FLOATS),
    Pair("log_softmax", functools.partial(torch.log_softmax, dim=-1), functools.partial(jax.nn.log_softmax, axis=-1),
         unary(Floats(-30, 30), **last()), reference=lambda x: np.log(_softmax(x)), dtypes=ALL_FLOATS),
    Pair("glu", functools.partial(F.glu, dim=-1), functools.partial(jax.nn.glu, axis=-1),
         Inputs(Custom(_even_last, ((2,),)), (Floats(),)), reference=np_glu, dtypes=ALL_FLOATS,
         doc="torch has no glu_jvp_cpu kernel for bfloat16/float16: its JVP there is the transpose of its VJP"),
    # ---------------------------------------------------------------- reductions
    Pair("sum", torch.sum, jnp.sum, unary(), reference=np.sum, dtypes=ALL_FLOATS),
    Pair("sum_last", functools.partial(torch.sum, dim=-1), functools.partial(jnp.sum, axis=-1),
         unary(**last()), reference=lambda x: x.sum(-1), dtypes=ALL_FLOATS),
    Pair("mean_first", functools.partial(torch.mean, dim=0), functools.partial(jnp.mean, axis=0),
         unary(**last()), reference=lambda x: x.mean(0), dtypes=ALL_FLOATS),
    # torch's prod gradient divides the product by each input when none is zero: near the underflow
    # threshold its second derivative collapses to 0 (prod_tiny), so magnitudes start at 1e-6 here.
    Pair("prod", torch.prod, jnp.prod, unary(Floats(-2, 2, special=(0.0,), min_magnitude=1e-6), max_side=4),
         reference=np.prod, witnesses=(([[2.0, -1.0, 1e-6]],),)),  # prod::hvp::float32
    Pair("prod_tiny", torch.prod, jnp.prod, unary(Floats(0, 2, special=(1.0, F32_MIN_NORMAL), tiny=False), max_side=4),
         reference=np.prod, dtypes=("float32",), witnesses=(([1.0, 1.0, 1.0, F32_MIN_NORMAL],),)),
    Pair("var_ddof1", lambda x: torch.var(x, dim=-1, correction=1), lambda x: jnp.var(x, axis=-1, ddof=1),
         unary(**last(min_side=2)), reference=lambda x: x.var(-1, ddof=1)),
    Pair("var_ddof0", lambda x: torch.var(x, dim=-1, correction=0), lambda x: jnp.var(x, axis=-1, ddof=0),
         unary(**last()), reference=lambda x: x.var(-1)),
    *(Pair(f"std_ddof{d}", lambda x, d=d: torch.std(x, correction=d), lambda x, d=d: jnp.std(x, ddof=d),
           unary(Floats(-5, 5, unique=True, min_magnitude=1e-15), **last(min_side=2)),
           reference=lambda x, d=d: np.std(x, ddof=d), witnesses=(([1e-15, 0.0],),),  # std_ddof*::hvp
           doc="deviations below ~1e-19 square to subnormals, which XLA on CPU flushes to zero: left out")
      for d in (0, 1)),
    # Two values close together: std is linear on each side of x0 == x1 (gradient +-1/sqrt(2), Hessian
    # 0), so no input rounding explains a gradient error; torch's float32 backward still shows one.
    Pair("std_two_close", lambda x: torch.std(x, correction=1), lambda x: jnp.std(x, ddof=1),
         Inputs(Fixed((((2,),),)), (Floats(2.49, 2.51, unique=True, special=(), tiny=False),)),
         reference=lambda x: np.std(x, ddof=1),
         witnesses=(([2.5, 2.5001],), ([2.5, 2.505099058151245],), ([2.5, 2.490000009536743],))),
    Pair("std_at_zero", lambda x: torch.std(x, correction=1), lambda x: jnp.std(x, ddof=1),
         unary(Floats(0.0, 0.0, tiny=False), **last(min_side=2)), reference=lambda x: np.std(x, ddof=1),
         conventions=(Convention("std of an all-zero array", lambda x: np.ones(x.shape, bool), 0.0, np.nan,
                                 "torch: 0; JAX: NaN (sqrt'(0) times a zero variance gradient)"),)),
    Pair("logsumexp", lambda x: torch.logsumexp(x, dim=-1), lambda x: jax.nn.logsumexp(x, axis=-1),
         unary(Floats(-50, 50), **last()), reference=lambda x: sp.logsumexp(x, axis=-1)),
    Pair("amax", torch.amax, jnp.max, unary(Floats(special=(1.0,), fill=True), **last()), reference=np.max,
         dtypes=ALL_FLOATS, doc="ties split the gradient evenly in both"),
    Pair("amin", torch.amin, jnp.min, unary(Floats(special=(1.0,), fill=True), **last()), reference=np.min,
         dtypes=ALL_FLOATS),
    Pair("amax_last", lambda x: torch.amax(x, dim=-1), lambda x: jnp.max(x, axis=-1),
         unary(Floats(special=(1.0,), fill=True), **last()), reference=lambda x: x.max(-1), dtypes=ALL_FLOATS),
    Pair("cumsum", lambda x: torch.cumsum(x, dim=-1), lambda x: jnp.cumsum(x, axis=-1), unary(**last()),
         reference=lambda x: np.cumsum(x, -1), dtypes=ALL_FLOATS),
    # torch's cumprod gradient divides by the input when it holds no zero: near the underflow
    # threshold its second derivative overflows (cumprod_tiny), so magnitudes start at 1e-6 here.
    Pair("cumprod", CUMPROD_T, CUMPROD_J, unary(Floats(-2, 2, special=(0.0,), min_magnitude=1e-6), **last(max_side=4)),
         reference=lambda x: np.cumprod(x, -1), witnesses=(([[-1e-4, 2.0, -1.0]],),)),  # cumprod::hvp::float32
    Pair("cumprod_tiny", CUMPROD_T, CUMPROD_J,
         unary(Floats(0, 2, special=(1.0, F32_MIN_NORMAL), tiny=False), **last(max_side=4)),
         reference=lambda x: np.cumprod(x, -1), dtypes=("float32",),
         # The last row's tangent sums to 4.25 under direction seed 0: over 4 * F32_MIN_NORMAL it overflows.
         witnesses=(([1.0, F32_MIN_NORMAL],), ([[1.0] * 4] * 7 + [[F32_MIN_NORMAL] * 4],))),  # cumprod_tiny::jvp
    Pair("norm2", torch.linalg.vector_norm, jnp.linalg.vector_norm, unary(zero_heavy, **last()),
         reference=lambda x: np.linalg.norm(x.ravel()),
         conventions=(Convention("norm at 0", lambda x: np.broadcast_to(~x.any(), x.shape), 0.0, np.nan,
                                 "torch: 0 (a subgradient); JAX: NaN (0/0)"),)),
    Pair("norm2_underflow", torch.linalg.vector_norm, jnp.linalg.vector_norm,
         unary(Floats(1e-30, 1e-20, tiny=False), **last()), reference=lambda x: np.linalg.norm(x.ravel()),
         dtypes=("float32",), witnesses=(([1e-30],),), doc="x**2 underflows in float32 below ~1e-19"),
    Pair("norm1", lambda x: torch.linalg.vector_norm(x, ord=1), lambda x: jnp.linalg.vector_norm(x, ord=1),
         unary(zero_heavy, **last()), reference=lambda x: np.abs(x).sum(),
         conventions=(Convention("|x|'(0) inside the 1-norm", at(0.0), 0.0, 1.0, "torch: 0; JAX: 1 as for abs"),)),
    Pair("norm_inf", lambda x: torch.linalg.vector_norm(x, ord=float("inf")),
         lambda x: jnp.linalg.vector_norm(x, ord=jnp.inf), unary(zero_heavy, **last()),
         reference=lambda x: np.abs(x).max(),
         conventions=(Convention("inf-norm at 0", lambda x: np.broadcast_to(~x.any(), x.shape), 0.0,
                                 lambda x: 0.5 / x.size, "torch: 0; JAX: 1/(2n) on each of the n tied zeros"),)),
    # ---------------------------------------------------------------- linear algebra
    Pair("matmul", torch.matmul, jnp.matmul, Inputs(MatMul(), (Floats(), Floats())), diff_args=(0, 1),
         reference=np.matmul, tags={"matmul"}, dtypes=ALL_FLOATS),
    Pair("bmm", torch.bmm, jnp.matmul, Inputs(Custom(_bmm, ((1, 1, 1), (1, 1, 1))), (Floats(), Floats())),
         diff_args=(0, 1), reference=np.matmul, tags={"matmul"}),
    Pair("einsum_bij_bjk", functools.partial(torch.einsum, "bij,bjk->bik"), functools.partial(jnp.einsum, "bij,bjk->bik"),
         Inputs(Custom(_bmm, ((1, 1, 1), (1, 1, 1))), (Floats(), Floats())), diff_args=(0, 1),
         reference=functools.partial(np.einsum, "bij,bjk->bik"), tags={"matmul"}),
    Pair("einsum_trace_outer", lambda a, b: torch.einsum("ii,j->j", a, b), lambda a, b: jnp.einsum("ii,j->j", a, b),
         Inputs(Custom(lambda rng: ((int(rng.integers(1, 5)),) * 2, (int(rng.integers(1, 5)),)), ((1, 1), (1,))),
                (Floats(), Floats())), diff_args=(0, 1), reference=lambda a, b: np.einsum("ii,j->j", a, b)),
    Pair("solve", torch.linalg.solve, jnp.linalg.solve, Inputs(Square(rhs=True), (Matrices("general"), Floats())),
         diff_args=(0, 1), reference=np.linalg.solve, tags={"matmul"}),
    Pair("inv", torch.linalg.inv, jnp.linalg.inv, Inputs(Square(), (Matrices("general"),)), reference=np.linalg.inv,
         tags={"matmul"}),
    Pair("det", torch.linalg.det, jnp.linalg.det, Inputs(Square(), (Matrices("general"),)), reference=np.linalg.det),
    Pair("slogdet", torch.linalg.slogdet, jnp.linalg.slogdet, Inputs(Square(), (Matrices("general"),)),
         reference=lambda a: tuple(np.linalg.slogdet(a))),
    Pair("cholesky", lambda a: torch.linalg.cholesky(_t_sym(a)), lambda a: jnp.linalg.cholesky(_sym(jnp, a)),
         Inputs(Square(), (Matrices("spd"),)), reference=lambda a: np.linalg.cholesky(_sym(np, a)),
         doc="symmetrised input: off the symmetric matrices the two functions differ (cholesky_raw)"),
    Pair("cholesky_raw", torch.linalg.cholesky, jnp.linalg.cholesky, Inputs(Square(), (Matrices("spd"),)),
         reference=np.linalg.cholesky, witnesses=(([[1.0, 0.0], [0.0, 1.0]],),),
         doc="torch reads the lower triangle only; jnp.linalg.cholesky symmetrises (symmetrize_input=True)"),
    # The input is the Cholesky factor L; both sides read its lower triangle (tril: torch's backward
    # alone would give the upper triangle, which its forward ignores, the gradient of a full F in
    # (F F^T)^-1). witness of cholesky_inverse::jvp: torch's JVP is wrong on any non-diagonal factor.
    Pair("cholesky_inverse", lambda f: torch.cholesky_inverse(torch.tril(f)), j_cholesky_inverse,
         Inputs(Square(), (Matrices("cholesky"),)), reference=np_cholesky_inverse, tags={"matmul"},
         witnesses=(([[1.0, 0.0], [1.0, 1.0]],),)),
    Pair("qr", t_qr, j_qr, Inputs(Custom(_tall, ((1, 1),)), (Matrices("general"),)), reference=np_qr),
    Pair("eigh", t_eigh, j_eigh, Inputs(Square(), (Matrices("symmetric"),)), reference=np_eigh,
         doc="symmetrised input and sign-fixed eigenvectors: the function is then well defined"),
    Pair("svd", t_svd, j_svd, Inputs(Custom(_any_matrix, ((1, 1),)), (Matrices("distinct"),)), reference=np_svd,
         doc="reduced SVD with sign-fixed singular vectors"),
    Pair("svdvals", torch.linalg.svdvals, functools.partial(jnp.linalg.svd, compute_uv=False),
         Inputs(Custom(_any_matrix, ((1, 1),)), (Matrices("distinct"),)),
         reference=lambda a: np.linalg.svd(a, compute_uv=False)),
    # ---------------------------------------------------------------- indexing and layout
    Pair("gather", lambda x, i: torch.gather(x, -1, i), lambda x, i: jnp.take_along_axis(x, i, axis=-1),
         Inputs(Custom(_gather, ((1, 1), (1, 1))), (Floats(), Index(of=0, axis=1))),
         reference=lambda x, i: np.take_along_axis(x, i, -1), dtypes=ALL_FLOATS),
    Pair("take_along_axis", lambda x, i: torch.take_along_dim(x, i, dim=0),
         lambda x, i: jnp.take_along_axis(x, i, axis=0),
         Inputs(Custom(lambda rng: ((int(rng.integers(1, 5)), 3), (int(rng.integers(1, 5)), 3)), ((1, 3), (1, 3))),
                (Floats(), Index(of=0, axis=0))), reference=lambda x, i: np.take_along_axis(x, i, 0), dtypes=ALL_FLOATS),
    Pair("scatter_add", lambda x, i, s: x.index_add(0, i, s), lambda x, i, s: x.at[i].add(s),
         Inputs(Custom(_scatter, ((1, 1), (1,), (1, 1))), (Floats(), Index(of=0, axis=0), Floats())),
         diff_args=(0, 2), reference=np_scatter_add, tags={"nondeterministic-gpu"}, dtypes=ALL_FLOATS,
         doc="repeated indices accumulate; on GPU the summation order is not fixed in either framework"),
    Pair("index_select", lambda x, i: torch.index_select(x, 0, i), lambda x, i: jnp.take(x, i, axis=0),
         Inputs(Custom(_select, ((1, 1), (1,))), (Floats(), Index(of=0, axis=0))),
         reference=lambda x, i: x[i], dtypes=ALL_FLOATS),
    Pair("where", torch.where, jnp.where, Inputs(Broadcast(n=3), (Mask(), Floats(), Floats())), diff_args=(1, 2),
         reference=np.where, dtypes=ALL_FLOATS),
    Pair("masked_fill", lambda x, m: x.masked_fill(m, 0.5), lambda x, m: jnp.where(m, 0.5, x),
         Inputs(Same(n=2), (Floats(), Mask())), reference=lambda x, m: np.where(m, 0.5, x), dtypes=ALL_FLOATS),
    Pair("concatenate", lambda a, b: torch.cat([a, b], 0), lambda a, b: jnp.concatenate([a, b], 0),
         Inputs(Custom(_concat, ((0, 1), (0, 1))), (Floats(), Floats())), diff_args=(0, 1),
         reference=lambda a, b: np.concatenate([a, b]), dtypes=ALL_FLOATS),
    Pair("stack", lambda a, b: torch.stack([a, b], -1), lambda a, b: jnp.stack([a, b], -1),
         Inputs(Same(n=2, zero_size=True), (Floats(), Floats())), diff_args=(0, 1),
         reference=lambda a, b: np.stack([a, b], -1), dtypes=ALL_FLOATS),
    Pair("reshape", lambda x: x.reshape(-1), lambda x: x.reshape(-1), unary(), reference=lambda x: x.reshape(-1),
         dtypes=ALL_FLOATS),
    Pair("transpose", lambda x: x.transpose(-1, -2), lambda x: jnp.swapaxes(x, -1, -2), unary(min_dims=2),
         reference=lambda x: np.swapaxes(x, -1, -2), dtypes=ALL_FLOATS),
    Pair("pad_constant", lambda x: F.pad(x, (1, 2), value=0.5), lambda x: jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(1, 2)],
                                                                              constant_values=0.5),
         unary(**last()), reference=lambda x: np.pad(x, [(0, 0)] * (x.ndim - 1) + [(1, 2)], constant_values=0.5),
         dtypes=ALL_FLOATS),
    Pair("pad_reflect", lambda x: F.pad(x, (2, 1), mode="reflect"), lambda x: jnp.pad(x, [(0, 0), (2, 1)], mode="reflect"),
         Inputs(Custom(_reflect, ((1, 3),)), (Floats(),)), reference=lambda x: np.pad(x, [(0, 0), (2, 1)], "reflect"),
         dtypes=ALL_FLOATS),
    Pair("roll", lambda x: torch.roll(x, 1, dims=-1), lambda x: jnp.roll(x, 1, axis=-1), unary(**last()),
         reference=lambda x: np.roll(x, 1, -1), dtypes=ALL_FLOATS),
    Pair("flip", lambda x: torch.flip(x, dims=(-1,)), lambda x: jnp.flip(x, axis=-1), unary(**last()),
         reference=lambda x: np.flip(x, -1), dtypes=ALL_FLOATS),
])


@pytest.mark.parametrize("pair", PAIRS, ids=str)
def test_autodiff(pair, equiv):
    equiv.check(pair)
