"""Planted bugs for operation pairs: the engine's own mutation test.

`mutants(pair, dtype)` wraps one side of a correct pair so that it is wrong in a known way, with
a size stated in multiples of the very bound the engine applies (the tolerance table's row for
the dtype and check, or the pair's override): an engine worth trusting fails every mutant well
past the bound, blames the side that was mutated, and passes mutants inside the bound.

Families (each on the torch side and on the JAX side):
  value        forward output + k x bound (all elements, or one), gradient exact (stop-gradient)
  nonfinite    NaN, +inf or -inf at one output element, gradient exact
  sign         the output negated (forward and derivatives wrong)
  permuted     the output's elements rolled by one (forward and derivatives wrong)
  ulp          every output element one ulp up: inside every bound, must pass
  vjp          the input gradient + k x the VJP bound (custom VJP at the inputs; forward exact)
  jvp          the output tangent + k x the JVP bound (custom JVP at the output; forward exact)

A mutant's `expect` is what a trustworthy engine concludes: "fail" (with `checks`, the checks
of which at least one must fail, and the mutated `side` blamed) or "pass" (size 0.5 or ulp).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from equivcheck.engine import tolerance
from equivcheck.engine.kind import SIDES

if TYPE_CHECKING:
    from equivcheck.ops.pairs import Pair

SIZES = (0.5, 2.0, 10.0, 1000.0)
NONFINITE = (("nan", float("nan")), ("+inf", float("inf")), ("-inf", float("-inf")))

__all__ = ["NONFINITE", "SIZES", "Mutant", "mutants"]


@dataclasses.dataclass(frozen=True)
class Mutant:
    """One planted bug: `pair` with its `side` wrong as `name` says."""

    name: str
    family: str
    side: str
    size: float | None  # multiple of the bound; None where the bug has no size (NaN, sign, ...)
    expect: str  # "fail" | "pass"
    checks: tuple[str, ...]  # the checks to run; with expect "fail", at least one of them must fail
    pair: Pair


def _bound(pair: Pair, dtype: str, check: str, device: str, precision: str) -> tuple[float, float, bool]:
    tol = tolerance.lookup(dtype, device=device, precision=precision, check=check, tags=pair.tags,
                           override=pair.tolerance_for(dtype, check))
    return tol.atol, tol.rtol, tol.per == "leaf"


# ---------------------------------------------------------------------------- leaf plumbing


def _map_float(tree: Any, fn: Callable[[Any], Any], is_float: Callable[[Any], bool]) -> Any:
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):  # a namedtuple (jnp.linalg.slogdet's result)
        return type(tree)(*(_map_float(x, fn, is_float) for x in tree))
    if isinstance(tree, (list, tuple)):
        return type(tree)(_map_float(x, fn, is_float) for x in tree)
    if isinstance(tree, dict):
        return {k: _map_float(v, fn, is_float) for k, v in tree.items()}
    return fn(tree) if is_float(tree) else tree


def _t_float(x: Any) -> bool:
    import torch

    return isinstance(x, torch.Tensor) and x.is_floating_point()


def _j_float(x: Any) -> bool:
    import jax.numpy as jnp

    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)


def _first_only(x: Any, xp: Any) -> Any:
    """A mask of x's shape, true at the first element only (torch or jax.numpy as `xp`)."""
    size = x.numel() if hasattr(x, "numel") else x.size
    index = xp.arange(size, device=x.device) if xp.__name__ == "torch" else xp.arange(size)
    return (index == 0).reshape(x.shape)


# ---------------------------------------------------------------------------- output edits


def _edit_output(pair: Pair, side: str, edit_t: Callable[[Any], Any], edit_j: Callable[[Any], Any]) -> Pair:
    """`pair` with `side`'s output leaves passed through the edit."""
    if side == "torch":
        fn = pair.torch_fn
        return pair.replace(torch_fn=lambda *a: _map_float(fn(*a), edit_t, _t_float))
    fn = pair.jax_fn
    return pair.replace(jax_fn=lambda *a: _map_float(fn(*a), edit_j, _j_float))


def _offset(k: float, atol: float, rtol: float, leaf: bool, one: bool) -> tuple[Callable, Callable]:
    """y + k x (atol + rtol |y|) (or the leaf's largest |y| for a norm-wise bound), as a constant."""

    def torch_edit(y: Any) -> Any:
        import torch

        mag = y.detach().abs().amax() if leaf and y.numel() else y.detach().abs()
        delta = k * (atol + rtol * mag) * torch.ones_like(y)
        return y + (torch.where(_first_only(y, torch), delta, 0.0) if one else delta)

    def jax_edit(y: Any) -> Any:
        import jax
        import jax.numpy as jnp

        ys = jax.lax.stop_gradient(y)
        mag = jnp.max(jnp.abs(ys)) if leaf and ys.size else jnp.abs(ys)
        delta = k * (atol + rtol * mag) * jnp.ones_like(ys)
        return y + (jnp.where(_first_only(ys, jnp), delta, 0.0) if one else delta)

    return torch_edit, jax_edit


def _at_first(value: float) -> tuple[Callable, Callable]:
    def torch_edit(y: Any) -> Any:
        import torch

        return y + torch.where(_first_only(y, torch), torch.full_like(y, value), torch.zeros_like(y)).detach()

    def jax_edit(y: Any) -> Any:
        import jax.numpy as jnp

        return y + jnp.where(_first_only(y, jnp), jnp.full_like(y, value), jnp.zeros_like(y))

    return torch_edit, jax_edit


def _ulp_up() -> tuple[Callable, Callable]:
    def torch_edit(y: Any) -> Any:
        import torch

        return y + (torch.nextafter(y.detach(), torch.full_like(y, float("inf"))) - y.detach())

    def jax_edit(y: Any) -> Any:
        import jax
        import jax.numpy as jnp

        ys = jax.lax.stop_gradient(y)
        return y + (jnp.nextafter(ys, jnp.full_like(ys, jnp.inf)) - ys)

    return torch_edit, jax_edit


def _rolled() -> tuple[Callable, Callable]:
    def torch_edit(y: Any) -> Any:
        return y.reshape(-1).roll(1).reshape(y.shape) if y.numel() > 1 else y

    def jax_edit(y: Any) -> Any:
        import jax.numpy as jnp

        return jnp.roll(y.reshape(-1), 1).reshape(y.shape) if y.size > 1 else y

    return torch_edit, jax_edit


# ---------------------------------------------------------------------------- derivative edits


def _bump(g: Any, k: float, atol: float, rtol: float, xp: Any) -> Any:
    """g moved away from itself by k x (atol + rtol |g|), in the direction of its sign."""
    return g + xp.where(g >= 0, 1.0, -1.0) * k * (atol + rtol * xp.abs(g))


def _torch_identity(backward: Callable[[Any], Any], jvp: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """torch's identity with the given VJP and JVP rules (functorch-style, so torch.func.jvp uses it)."""
    import torch

    class Identity(torch.autograd.Function):
        @staticmethod
        def forward(x: Any) -> Any:
            return x.view_as(x)

        @staticmethod
        def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
            pass

        @staticmethod
        def backward(ctx: Any, g: Any) -> Any:
            return backward(g)

        @staticmethod
        def jvp(ctx: Any, t: Any) -> Any:
            return jvp(t)

    return Identity.apply


def _vjp_mutant(pair: Pair, side: str, k: float, atol: float, rtol: float) -> Pair:
    """Every differentiable input passes an identity whose VJP moves the input gradient."""
    diff = set(pair.diff_args)
    if side == "torch":
        import torch

        bumped = _torch_identity(lambda g: _bump(g, k, atol, rtol, torch), lambda t: t)
        fn = pair.torch_fn
        return pair.replace(torch_fn=lambda *a: fn(*(bumped(x) if i in diff else x for i, x in enumerate(a))))
    import jax
    import jax.numpy as jnp

    @jax.custom_vjp
    def bumped_j(x: Any) -> Any:
        return x

    bumped_j.defvjp(lambda x: (x, None), lambda _, g: (_bump(g, k, atol, rtol, jnp),))
    fn = pair.jax_fn
    return pair.replace(jax_fn=lambda *a: fn(*(bumped_j(x) if i in diff else x for i, x in enumerate(a))))


def _jvp_mutant(pair: Pair, side: str, k: float, atol: float, rtol: float) -> Pair:
    """The output passes an identity whose JVP moves the output tangent."""
    if side == "torch":
        import torch

        return _edit_output(pair, side, _torch_identity(lambda g: g, lambda t: _bump(t, k, atol, rtol, torch)),
                            lambda y: y)
    import jax
    import jax.numpy as jnp

    @jax.custom_jvp
    def bumped(y: Any) -> Any:
        return y

    bumped.defjvp(lambda primals, tangents: (primals[0], _bump(tangents[0], k, atol, rtol, jnp)))
    return _edit_output(pair, side, lambda y: y, bumped)


# ---------------------------------------------------------------------------- the set


def mutants(pair: Pair, dtype: str, *, device: str = "cpu", precision: str = "highest",
            sides: Sequence[str] = SIDES, sizes: Sequence[float] = SIZES) -> list[Mutant]:
    """Every mutant of `pair` at `dtype`, each sized against the bound the engine applies there.

    Derivative mutants are made only for the derivative checks the pair declares; each runs
    with the forward and that one check (a custom VJP has no JVP, and the reverse).
    """
    out: list[Mutant] = []
    fwd = ("forward",)
    atol, rtol, leaf = _bound(pair, dtype, "forward", device, precision)
    for side in sides:
        def add(name: str, family: str, size: float | None, expect: str, checks: tuple[str, ...], p: Pair) -> None:
            out.append(Mutant(f"{family}:{name}", family, side, size, expect, checks, p))

        for k in sizes:
            expect = "pass" if k < 1 else "fail"
            for where in ("all", "one"):
                t, j = _offset(k, atol, rtol, leaf, where == "one")
                add(f"x{k:g} {where}", "value", k, expect, fwd, _edit_output(pair, side, t, j))
        for label, value in NONFINITE:
            add(label, "nonfinite", None, "fail", fwd, _edit_output(pair, side, *_at_first(value)))
        add("negated", "sign", None, "fail", pair.checks, _edit_output(pair, side, lambda y: -y, lambda y: -y))
        add("rolled", "permuted", None, "fail", pair.checks, _edit_output(pair, side, *_rolled()))
        add("one ulp up", "ulp", None, "pass", fwd, _edit_output(pair, side, *_ulp_up()))
        for check, make in (("vjp", _vjp_mutant), ("jvp", _jvp_mutant)):
            if check not in pair.checks:
                continue
            c_atol, c_rtol, _ = _bound(pair, dtype, check, device, precision)
            for k in sizes:
                add(f"x{k:g}", check, k, "pass" if k < 1 else "fail", ("forward", check),
                    make(pair, side, k, c_atol, c_rtol))
    return [dataclasses.replace(m, pair=m.pair.replace(checks=tuple(c for c in m.pair.checks if c in m.checks)))
            for m in out]
