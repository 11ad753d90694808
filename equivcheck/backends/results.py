"""What one framework's run of one example gives back: values or errors per check (SideResult),
the errors kept as text so they travel between xdist workers (SideError), and the random
vectors both sides share (Vectors)."""
from __future__ import annotations

import dataclasses
import sysconfig
import traceback
from typing import Any

DEVICES = ("cpu", "gpu")
# JAX's errors for a concrete value asked of a traced one (jax.errors)
_TRACED = ("ConcretizationTypeError", "TracerArrayConversionError", "TracerBoolConversionError",
           "TracerIntegerConversionError")
_STDLIB = tuple({sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["platstdlib"]})


@dataclasses.dataclass
class SideError:
    """An exception raised by one side's code, kept as text so it can travel (xdist)."""

    side: str
    check: str
    type: str
    message: str
    where: str

    @classmethod
    def from_exc(cls, side: str, check: str, exc: BaseException) -> SideError:
        frames = traceback.extract_tb(exc.__traceback__)
        # The innermost frame outside the frameworks and Python's own library points at the user's
        # callable (a result re-raised by a future read concurrent/futures/_base.py). With none, the
        # error is equivcheck's check of what the side returned, and its message says where.
        user = [f for f in frames if not any(d in f.filename for d in ("site-packages", "dist-packages", "/equivcheck/"))
                and not f.filename.startswith(_STDLIB)]  # dist-packages: Debian's installed packages
        frame = (user or frames[-1:] or [None])[-1]
        where = "" if frame is None or "/equivcheck/" in frame.filename else \
            f"{frame.filename}:{frame.lineno} in {frame.name}"
        text = str(exc).strip().splitlines()
        message = text[0][:300] if text else ""
        if type(exc).__name__ in _TRACED:
            message += (" (the jax side runs traced, under jax.jit and jax.vjp: float(), .item(), np.asarray() "
                        "or an `if` on a traced value cannot run there; use jnp operations and jnp.where)")
        return cls(side, check, type(exc).__name__, message, where)

    def describe(self) -> str:
        where = f" ({self.where})" if self.where else ""
        return f"the {self.side} side raised {self.type} in {self.check}: {self.message}{where}"


@dataclasses.dataclass
class SideResult:
    """What one framework produced for one example: per-check values or errors."""

    side: str
    values: dict[str, Any] = dataclasses.field(default_factory=dict)
    errors: dict[str, SideError] = dataclasses.field(default_factory=dict)
    notes: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # per check
    # Set by the torch side once its forward ran: the float output leaves' shapes (the cotangents
    # follow them), and why autograd cannot see an output: `lost` when the side returned a Python
    # float or a NumPy array, `detached` when a float tensor output is outside the graph.
    outputs: list[tuple[int, ...]] | None = None
    lost: str = ""
    detached: str = ""

    def note(self, check: str, text: str) -> None:
        self.notes.setdefault(check, []).append(text)

    def fail(self, checks: Any, exc: BaseException) -> None:
        for check in [checks] if isinstance(checks, str) else checks:
            if check not in self.errors:
                self.errors[check] = SideError.from_exc(self.side, check, exc)
                self.values.pop(check, None)


class CotangentMismatch(ValueError):
    """The two sides' floating outputs have different shapes, so no cotangent fits both: a fault
    of the pair's structure, not of the side that noticed it."""

    def __init__(self, torch_shapes: list[tuple[int, ...]], jax_shapes: list[tuple[int, ...]]) -> None:
        super().__init__(f"outputs have different shapes (torch {shapes_text(torch_shapes)}, jax "
                         f"{shapes_text(jax_shapes)}), so no common cotangent")


def shapes_text(shapes: list[tuple[int, ...]]) -> str:
    if not shapes:
        return "no floating output"
    return str(tuple(shapes[0])) if len(shapes) == 1 else "[" + ", ".join(str(tuple(s)) for s in shapes) + "]"


@dataclasses.dataclass
class Vectors:
    """Cotangents (one per float output leaf), tangents and HVP directions (one per diff arg)."""

    ct: list[Any]
    t: list[Any]
    v: list[Any]
