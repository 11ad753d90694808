"""Model migration: a torch nn.Module against its JAX port, checked as a whole.

A `ModelPair` declares the torch model (a factory), the JAX port (a pure
`apply(params, *inputs, train=...)` over a Flax parameter tree), the inputs (an
equivcheck `Inputs`, the loss target last), the loss and the matched optimizer. The
weights move through equivcheck.weights.convert for standard layers (automatic) or through
`weights.Rule`s for the rest (or a port laid out otherwise). A user's test is

    @pytest.mark.parametrize("pair", MODELS, ids=str)
    def test_model(pair, equiv):
        equiv.check(pair)

Checks (equivcheck.models.runner): `forward` (eval mode, drawn inputs and weights),
`grad` (the loss's gradient with respect to every parameter, by torch name), `modes`
(a train-mode forward with matched dropout masks, the BatchNorm running statistics it
leaves, and eval mode after it), `train` (K optimizer steps on the same batches, losses,
parameters and statistics compared at every step under a bound growing with the step) and
`fit` (a whole training run on a data set, loss curves and test accuracy) and `onnx` (the torch
model exported to ONNX and run in ONNX Runtime, three ways against torch and the port:
equivcheck.onnx). On a failure
the first diverging layer is localised (equivcheck.models.localise).

The port marks its layers with `tap(name, value)`: the name of the torch module whose
output `value` is (in torch's layout; `to_torch` converts). Dropout goes through
`dropout(name, x, rate, train)`, which applies the very mask the torch nn.Dropout module of
that name drew, so train mode is deterministic on both sides.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from equivcheck.engine.kind import check_name
from equivcheck.engine.tolerance import Tolerance, require_reasons
from equivcheck.ops.pairs import Pair
from equivcheck.ops.strategies import Inputs

MODEL_CHECKS = ("forward", "grad", "modes", "train", "fit", "onnx")

__all__ = ["MODEL_CHECKS", "Fit", "Loss", "ModelPair", "cross_entropy", "mse"]


@dataclasses.dataclass(frozen=True)
class Loss:
    """The loss in both frameworks: torch_fn(output, target), jax_fn(output, target), scalars."""

    name: str
    torch_fn: Callable[[Any, Any], Any]
    jax_fn: Callable[[Any, Any], Any]


def cross_entropy() -> Loss:
    """torch F.cross_entropy (mean over the batch) and optax's integer-label form, averaged."""
    import optax
    import torch.nn.functional as F

    return Loss("cross_entropy", F.cross_entropy,
                lambda logits, y: optax.softmax_cross_entropy_with_integer_labels(logits, y).mean())


def mse() -> Loss:
    import optax
    import torch.nn.functional as F

    return Loss("mse", F.mse_loss, lambda out, y: optax.squared_error(out, y).mean())


@dataclasses.dataclass(frozen=True)
class Fit:
    """A whole training run: `data()` -> (x_train, y_train, x_test, y_test) as NumPy; batches
    in order (no shuffle: both sides must see the same batches), `epochs` passes."""

    data: Callable[[], tuple[Any, Any, Any, Any]]
    epochs: int = 3
    batch_size: int = 64
    max_accuracy_gap: float = 0.01  # the bound: one percentage point


@dataclasses.dataclass(frozen=True, eq=False)
class ModelPair:
    """A torch model and its JAX port.

    torch_model  () -> nn.Module; built under torch.manual_seed(s) for every drawn s
    jax_apply    (params, *inputs, train: bool) -> output, or (output, stats) when `stateful`:
                 the new BatchNorm statistics as a tree like the statistics part of params
    inputs       Inputs of the model's inputs followed by the loss target
    rules        weights.Rule(torch_prefix, jax_path, layout) for modules that equivcheck.weights.convert
                 does not describe or that the port lays out otherwise (linear_after_flatten);
                 the other modules convert automatically, nested by their torch names
    to_jax       your own converter instead of rules and the automatic conversion: torch module -> the
                 port's parameter tree (NumPy, jax or torch leaves). Its statistics part (leaves made
                 of persistent buffers) is told apart by itself; gradients go back to torch names by
                 the chain rule through it (equivcheck.models.converter: it must be linear in the weights)
    keywords     names of the last model inputs, passed by keyword on both sides:
                 ("attention_mask",) calls model(input_ids, attention_mask=...) and
                 jax_apply(params, input_ids, attention_mask=..., train=...)
    output       the output compared and given to the loss, from a dict, dataclass or Hugging Face
                 ModelOutput: a key or attribute name ("logits") or a function of each side's output
    layer_names  torch module name -> the port's tap name, where the two differ
    jax_params   () -> the port's own parameter tree (its init): the converted tree must match
                 it key for key and shape for shape
    optimizer    an equivcheck.optim.OptimizerPair (its torch optimizer and optax transformation)
    steps        K, the length of the `train` trajectory (drawn trajectories are 1..K steps)
    witnesses    check -> `equivcheck.models.evaluate.Example`s run first on every seed (args as
                 nested lists, cast to each dtype like `Inputs.cast`): where a known divergence shows
    onnx_export  the `onnx` check's exporter, (model, torch args, directory, name) -> equivcheck.onnx.Exported;
                 None: equivcheck.onnx.export_model (dynamo exporter, dynamic batch, eval mode)
    """

    name: str
    torch_model: Callable[[], Any]
    jax_apply: Callable[..., Any]
    inputs: Inputs
    loss: Loss | None = None
    optimizer: Any = None
    steps: int = 20
    checks: tuple[str, ...] = ("forward", "grad", "modes", "train")
    dtypes: tuple[str, ...] = ("float32", "float64")
    rules: tuple[Any, ...] = ()
    to_jax: Callable[[Any], Any] | None = None
    keywords: tuple[str, ...] = ()
    output: str | Callable[[Any], Any] | None = None
    layer_names: Mapping[str, str] = dataclasses.field(default_factory=dict)
    stateful: bool = False
    jax_params: Callable[[], Any] | None = None
    fit: Fit | None = None
    tolerance: Tolerance | Mapping[str, Tolerance] | None = None
    doc: str = ""
    tags: frozenset[str] = frozenset()
    witnesses: Mapping[str, tuple[Any, ...]] = dataclasses.field(default_factory=dict)
    onnx_export: Callable[..., Any] | None = None

    family = "models"  # the report section (engine.kind.FAMILIES)
    all_checks = MODEL_CHECKS

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        set_("checks", tuple(self.checks))
        set_("dtypes", tuple(self.dtypes))
        set_("rules", tuple(self.rules))
        set_("keywords", (self.keywords,) if isinstance(self.keywords, str) else tuple(self.keywords))
        set_("tags", frozenset(self.tags))
        set_("witnesses", {c: tuple(ws) for c, ws in dict(self.witnesses).items()})
        check_name("ModelPair", self.name)
        for label in ("torch_model", "jax_apply"):
            if not callable(getattr(self, label)):
                raise TypeError(f"ModelPair {self.name!r}: {label} must be callable")
        if self.onnx_export is not None and not callable(self.onnx_export):
            raise TypeError(f"ModelPair {self.name!r}: onnx_export must be callable (model, args, directory, name)")
        if self.to_jax is not None and not callable(self.to_jax):
            raise TypeError(f"ModelPair {self.name!r}: to_jax must be callable (torch module -> the port's params)")
        if self.to_jax is not None and self.rules:
            raise ValueError(f"ModelPair {self.name!r}: give rules or to_jax, not both (to_jax converts everything)")
        if not isinstance(self.inputs, Inputs):
            raise TypeError(f"ModelPair {self.name!r}: inputs must be an equivcheck Inputs (the target last)")
        if not all(isinstance(k, str) and k.isidentifier() for k in self.keywords) or \
                len(set(self.keywords)) != len(self.keywords) or len(self.keywords) > self.inputs.n_args - 1:
            raise ValueError(f"ModelPair {self.name!r}: keywords {self.keywords} must be distinct argument names, at "
                             f"most one per model input ({self.inputs.n_args - 1}; the last input is the loss target)")
        if self.output is not None and not (callable(self.output) or isinstance(self.output, str)):
            raise TypeError(f"ModelPair {self.name!r}: output must be a key or attribute name or a function of the "
                            f"model's output, got {type(self.output).__name__}")
        bad = [c for c in self.checks if c not in MODEL_CHECKS]
        if bad or not self.checks:
            raise ValueError(f"ModelPair {self.name!r}: checks {bad or '()'} not among {MODEL_CHECKS}")
        bad = [c for c in self.witnesses if c not in MODEL_CHECKS or c in ("train", "fit", "onnx")]
        if bad:
            raise ValueError(f"ModelPair {self.name!r}: witnesses for {bad}: only forward, grad and modes take them")
        needs = {"grad": "loss", "train": "loss", "fit": "loss"}
        for check, field in needs.items():
            if check in self.checks and getattr(self, field) is None:
                raise ValueError(f"ModelPair {self.name!r}: the {check} check needs a {field}")
        for check in ("train", "fit"):
            if check in self.checks and self.optimizer is None:
                raise ValueError(f"ModelPair {self.name!r}: the {check} check needs an optimizer (equivcheck.optim)")
        if "fit" in self.checks and self.fit is None:
            raise ValueError(f"ModelPair {self.name!r}: the fit check needs fit=Fit(data, ...)")
        if self.optimizer is not None and getattr(self.optimizer, "accumulate", 1) != 1:
            raise ValueError(f"ModelPair {self.name!r}: gradient accumulation is not modelled in train steps; "
                             "use an optimizer pair with accumulate=1")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"ModelPair {self.name!r}: steps must be a positive int")
        require_reasons(f"ModelPair {self.name!r}", self.tolerance)

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"ModelPair({self.name!r})"

    def replace(self, **changes: Any) -> ModelPair:
        return dataclasses.replace(self, **changes)

    tolerance_for = Pair.tolerance_for

    def run_checks(self, *, dtype: str, run: Any, known: Any = lambda _id: None, nodeid: str = "",
                   replay: str = "") -> list[Any]:
        """The `equiv` fixture's entry point (equivcheck.fixture.Equiv.check)."""
        from equivcheck.models.runner import run_model_pair

        return run_model_pair(self, dtype=dtype, run=run, known=known, nodeid=nodeid, replay=replay)

    def prepare(self, dtype: str, run: Any) -> None:
        """Nothing to compile ahead: the programs depend on the drawn weights' tree."""
