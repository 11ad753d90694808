"""The matched pair: one declarative record per operation, and the tables that hold them.

A `Pair` says what to run on each side and how to draw its inputs; everything else
(devices, dtypes, tolerances, Hypothesis settings) comes from the run. Built-in suites
and users' own tests build the same records with the same API.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from equivcheck.engine.dtypes import DTYPES
from equivcheck.engine.kind import FAMILIES, SIDES, CheckKind, Known, check_name
from equivcheck.engine.records import CheckRecord, RunSettings
from equivcheck.engine.tolerance import Tolerance, require_reasons
from equivcheck.ops import runner
from equivcheck.ops.autodiff import CHECKS
from equivcheck.ops.conventions import Convention

# the derivative engine's checks and the ONNX one, which runs after them (equivcheck.ops.runner)
ALL_CHECKS = (*CHECKS, "onnx")

__all__ = ["ALL_CHECKS", "CHECKS", "DTYPES", "SIDES", "Convention", "Pair", "Registry"]



@dataclasses.dataclass(frozen=True, eq=False)
class Pair:
    """One operation in PyTorch and its counterpart in JAX.

    name        unique id (pytest ids, report, known-divergence patterns)
    torch_fn    callable on torch tensors; jax_fn: callable on jax arrays, jit-compatible
    inputs      an `equivcheck.ops.strategies.Inputs`: shapes and values of the arguments
    diff_args   positions of the arguments that get gradients
    checks      subset of forward / vjp / jvp / hvp, and onnx (the torch function exported to ONNX and run
                in ONNX Runtime, three ways: equivcheck.onnx.layers; `--equiv-onnx` adds it to every layer pair)
    dtypes      floating dtypes both frameworks support for this op
    tolerance   override of the tolerance table: a Tolerance (with reason), or a mapping whose keys
                are a dtype, a check, or "dtype/check" ({"float32/forward": Tolerance(...)})
    reference   float64 NumPy implementation of the forward; decides which side is right
                when the two sides differ in float64 too
    conventions `Convention`s at points where derivatives are undefined
    tags        e.g. "matmul" (TF32-affected), "nondeterministic-gpu", "needs-x64"
    arg_names   names of the arguments (a layer's "input", "weight", "bias"): gradients
                are then reported by name, out['weight'] instead of out[1]
    witnesses   argument tuples (nested lists or arrays, cast to each dtype as drawn) run first,
                in order, on every seed before the drawn examples: the input where a known
                divergence shows, or a past failure kept as a regression example
    family      the report section of its records: "operations", or "layers", "data",
                "checkpoints" for pairs that check those (engine.kind.FAMILIES)
    """

    name: str
    torch_fn: Callable[..., Any]
    jax_fn: Callable[..., Any]
    inputs: Any
    diff_args: tuple[int, ...] = (0,)
    checks: tuple[str, ...] = CHECKS
    dtypes: tuple[str, ...] = ("float32", "float64")
    tolerance: Tolerance | Mapping[str, Tolerance] | None = None
    reference: Callable[..., Any] | None = None
    conventions: tuple[Convention, ...] = ()
    tags: frozenset[str] = frozenset()
    doc: str = ""
    arg_names: tuple[str, ...] | None = None
    witnesses: tuple[tuple[Any, ...], ...] = ()
    family: str = "operations"

    all_checks = ALL_CHECKS

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 - frozen dataclass
        set_("diff_args", tuple(self.diff_args))
        set_("checks", tuple(self.checks))
        set_("dtypes", tuple(self.dtypes))
        set_("conventions", tuple(self.conventions))
        if self.arg_names is not None:
            set_("arg_names", tuple(self.arg_names))
        set_("tags", frozenset([self.tags] if isinstance(self.tags, str) else self.tags))
        check_name("Pair", self.name)
        if self.family not in FAMILIES:
            raise ValueError(f"Pair {self.name!r}: family {self.family!r} is not one of {', '.join(FAMILIES)}")
        for label, fn in (("torch_fn", self.torch_fn), ("jax_fn", self.jax_fn)):
            if not callable(fn):
                raise TypeError(f"Pair {self.name!r}: {label} must be callable, got {fn!r}")
        if not hasattr(self.inputs, "strategy"):
            raise TypeError(
                f"Pair {self.name!r}: inputs must be an equivcheck.ops.strategies.Inputs, "
                f"got {type(self.inputs).__name__}"
            )
        bad = [c for c in self.checks if c not in ALL_CHECKS]
        if bad or not self.checks:
            raise ValueError(f"Pair {self.name!r}: checks {bad or '()'} not among {ALL_CHECKS}")
        bad = [d for d in self.dtypes if d not in DTYPES]
        if bad or not self.dtypes:
            raise ValueError(f"Pair {self.name!r}: dtypes {bad or '()'} not among {DTYPES}")
        if any(not isinstance(i, int) or i < 0 for i in self.diff_args):
            raise ValueError(f"Pair {self.name!r}: diff_args must be argument positions")
        n_args = self.inputs.n_args
        if any(i >= n_args for i in self.diff_args):
            raise ValueError(f"Pair {self.name!r}: diff_args {self.diff_args} but inputs draw {n_args} arguments")
        if not self.diff_args and set(self.checks) - {"forward", "onnx"}:
            raise ValueError(f"Pair {self.name!r}: derivative checks need diff_args")
        if isinstance(self.tolerance, Mapping):
            for key in self.tolerance:
                parts = key.split("/")
                if not (len(parts) <= 2 and all(p in DTYPES or p in CHECKS for p in parts)):
                    raise ValueError(f"Pair {self.name!r}: tolerance key {key!r}: use a dtype, a check or 'dtype/check'")
        require_reasons(f"Pair {self.name!r}", self.tolerance)
        if self.arg_names is not None and (len(self.arg_names) != n_args or len(set(self.arg_names)) != n_args):
            raise ValueError(f"Pair {self.name!r}: arg_names needs {n_args} distinct names, got {self.arg_names}")
        set_("witnesses", tuple(tuple(w) for w in self.witnesses))
        for k, w in enumerate(self.witnesses):
            try:
                self.inputs.cast(w, self.dtypes[0])
            except (ValueError, TypeError) as exc:
                raise ValueError(f"Pair {self.name!r}: witness {k}: {exc}") from None
        for conv in self.conventions:
            if conv.arg not in self.diff_args:
                raise ValueError(f"Pair {self.name!r}: convention {conv.name!r} names arg {conv.arg}, not differentiable")

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"Pair({self.name!r})"

    def replace(self, **changes: Any) -> Pair:
        """A copy with some fields changed (a variant of a built-in pair, a planted bug)."""
        return dataclasses.replace(self, **changes)

    def grad_key(self, k: int) -> int | str:
        """How the gradient of the k-th differentiable argument is keyed in results."""
        return self.arg_names[self.diff_args[k]] if self.arg_names else k

    def grad_path(self, k: int) -> str:
        return f"out[{self.grad_key(k)!r}]"

    def grad_index(self, path: str) -> int:
        for k in range(len(self.diff_args)):
            if self.grad_path(k) == path:
                return k
        raise KeyError(f"{path} is no gradient path of pair {self.name!r}")

    def tolerance_for(self, dtype: str, check: str = "forward") -> Tolerance | None:
        """The override for this dtype and check, most specific key first."""
        if isinstance(self.tolerance, Mapping):
            for key in (f"{dtype}/{check}", dtype, check):
                if key in self.tolerance:
                    return self.tolerance[key]
            return None
        return self.tolerance

    # ------------------------------------------------------------- the CheckKind protocol

    def prepare(self, dtype: str, run: RunSettings) -> None:
        """Compile the JAX programs of this pair's first shapes (the plugin's head start)."""
        runner.prepare(self, dtype, run)

    def run_checks(self, *, dtype: str, run: RunSettings, known: Known = lambda _id: None, nodeid: str = "",
                   replay: str = "") -> list[CheckRecord]:
        """Every check of this pair at `dtype` on `run.device` (equivcheck.ops.runner.run_pair)."""
        return runner.run_pair(self, dtype=dtype, run=run, known=known, nodeid=nodeid, replay=replay)


class Registry:
    """An ordered table of check records (any `CheckKind`: Pair, OptimizerPair, ModelPair,
    DataCheck, a user's own) that refuses two records of one name.

    Suites keep one per file (`PAIRS = Registry([...])`) and parametrize over it; the
    plugin also refuses a name defined in two tables of one run, since names key reports.
    """

    def __init__(self, pairs: Iterable[Pair] = ()) -> None:
        self._pairs: dict[str, Pair] = {}
        self.extend(pairs)

    def register(self, pair: Pair) -> Pair:
        if not isinstance(pair, CheckKind):
            raise TypeError(f"can only register check records (a CheckKind such as Pair), got {type(pair).__name__}")
        if pair.name in self._pairs and self._pairs[pair.name] is not pair:
            raise ValueError(f"duplicate pair name {pair.name!r}: names must be unique within a table")
        self._pairs[pair.name] = pair
        return pair

    def extend(self, pairs: Iterable[Pair]) -> Registry:
        for pair in pairs:
            self.register(pair)
        return self

    def __iter__(self) -> Iterator[Pair]:
        return iter(self._pairs.values())

    def __len__(self) -> int:
        return len(self._pairs)

    def __getitem__(self, name: str) -> Pair:
        try:
            return self._pairs[name]
        except KeyError:
            raise KeyError(f"no pair named {name!r}; known: {', '.join(self._pairs)}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._pairs

    def names(self) -> list[str]:
        return list(self._pairs)

    def select(self, *, tags: Iterable[str] = (), exclude_tags: Iterable[str] = ()) -> list[Pair]:
        tags, exclude_tags = set(tags), set(exclude_tags)
        return [p for p in self if tags <= p.tags and not (exclude_tags & p.tags)]
