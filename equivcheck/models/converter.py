"""The user's own weight converter as a model's mapping: `ModelPair(..., to_jax=fn)`.

fn(torch_module) -> the port's parameter tree (nested mappings, lists or tuples of NumPy, jax or
torch arrays), e.g. the converter a team already has, or a library's. The trainable part and
the statistics part (BatchNorm's running mean and variance) are told apart by what each leaf is
made of: a leaf made of persistent buffers alone is a statistic.

Gradients go back to torch names by the chain rule through fn. A converter reads torch tensors
and leaves autodiff (`.detach().numpy()`), so its derivative is measured rather than traced:
a weight conversion is linear in the weights (transposes, reshapes, slices, concatenations, a
bias summed from two, a constant folded in as a scale), and a linear map whose outputs each
take one element of one tensor times a constant is known from three evaluations: all weights
zero (the constants), every element tagged with its own index t, and tagged with t**2 (the
ratio of the two is the index, whatever the scale). Outputs summed from several tensors are
read one tensor at a time. A fourth evaluation on random weights proves the map; a converter
it does not describe (one that mixes elements of one tensor, or is not linear, such as a
weight-norm fold) is refused, naming the leaf. The adjoint of the map (scatter-add of the
port's gradient times the scale) is then the gradient by torch name.
"""
from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from equivcheck.weights.layouts import ConversionError

Path = tuple[Any, ...]
# The converter runs in the output's own precision (float32 for most): a tag t <= 2**24 is exact,
# and the t**2 / t ratio is read to one part in ~1e7, enough to round to the index below ~5e6.
_DECODE_RTOL = 1e-6
_EXACT = 2**23  # tags read at once: exact in float32 with a bit to spare
# The proof on random weights: a float32 output of a sum carries ~1e-7 of rounding per term.
_PROOF_RTOL = 1e-5


@dataclasses.dataclass(frozen=True)
class StatsEntry:
    """A BatchNorm module's place in the statistics tree (what localisation compares)."""

    module: str
    path: Path
    names: Mapping[str, str]  # leaf name -> "mean" / "var"
    kind: str = "batch_norm"


@dataclasses.dataclass
class _Leaf:
    path: Path
    const: np.ndarray  # flat
    parts: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]  # (torch name, source idx, leaf idx, scale)


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.array(x, copy=True)


def flatten(tree: Any, path: Path = ()) -> dict[Path, Any]:
    """Every leaf of nested mappings, lists and tuples by its path of keys and indices."""
    if isinstance(tree, Mapping):
        out: dict[Path, Any] = {}
        for k, v in tree.items():
            out.update(flatten(v, (*path, k)))
        return out
    if isinstance(tree, (list, tuple)):
        out = {}
        for i, v in enumerate(tree):
            out.update(flatten(v, (*path, i)))
        return out
    return {path: tree}


def _where(path: Path) -> str:
    return "/".join(str(p) for p in path) or "<root>"


def _split(tree: Any, is_stat: Callable[[Path], bool], path: Path = ()) -> tuple[Any, Any]:
    """(trainable tree, statistics tree): mappings are split by their leaves; a list or tuple
    goes whole to one side (the statistics' only when every leaf in it is one)."""
    if isinstance(tree, Mapping):
        params, stats = {}, {}
        for k, v in tree.items():
            p, s = _split(v, is_stat, (*path, k))
            if p is not None:
                params[k] = p
            if s is not None:
                stats[k] = s
        return (params or None), (stats or None)
    leaves = flatten(tree, path)
    if leaves and all(is_stat(p) for p in leaves):
        return None, tree
    return tree, None


def _get(tree: Any, path: Path) -> Any:
    for i, key in enumerate(path):
        try:
            tree = tree[key]
        except (KeyError, IndexError, TypeError):
            raise ConversionError(f"the gradient tree has no {_where(path[:i + 1])!r}") from None
    return tree


class UserMapping:
    """The mapping of a ModelPair given `to_jax=fn`, for a model as built for one dtype and device.

    Iterating it gives a StatsEntry per BatchNorm-like module whose running statistics the
    converter places. Raises ConversionError when fn fails, returns no arrays, or is not a
    rearrangement of torch's weights (see the module docstring).
    """

    def __init__(self, fn: Callable[[Any], Any], model: Any) -> None:
        import torch

        self.fn = fn
        self.template = copy.deepcopy(model)
        self._template64: Any = None
        state = model.state_dict()
        self.keys = list(state)
        self.params = {n for n, _ in model.named_parameters()}
        # a tied tensor (an embedding shared with the output head) is one tensor under several
        # keys: read and loaded as the first, which is the name named_parameters() gives it
        first: dict[tuple[int, tuple[int, ...], tuple[int, ...]], str] = {}
        self.alias = {k: first.setdefault((v.data_ptr(), tuple(v.shape), tuple(v.stride())), k)
                      for k, v in state.items() if v.numel()}
        self.floats = {k: tuple(v.shape) for k, v in state.items()
                       if torch.is_floating_point(v) and self.alias.get(k, k) == k}
        self.dtype = next((v.dtype for k, v in state.items() if k in self.floats), torch.float32)
        self.ints = {k: v.detach().clone() for k, v in state.items() if not torch.is_floating_point(v)}
        self.leaves = self._probe(copy.deepcopy(model).to(device="cpu", dtype=torch.float64))
        stats_inside_lists = [p for p, leaf in self.leaves.items()
                              if leaf.parts and all(n not in self.params for n, *_ in leaf.parts)
                              and any(isinstance(key, int) for key in p)]
        if stats_inside_lists:
            raise ConversionError(f"to_jax's leaf {_where(stats_inside_lists[0])} holds statistics (made of torch "
                                  f"buffers, not parameters) inside a list: the statistics part is split by mapping "
                                  f"keys, so give per-layer trees as a dict ({{'0': ..., '1': ...}}), not a list")
        # not trained: statistics (made of buffers), and leaves made of no torch parameter at all
        # (integer buffers, constants the converter computes): the port's optimizer must not move them
        self.stat_paths = {p for p, leaf in self.leaves.items()
                           if all(name not in self.params for name, *_ in leaf.parts)}
        self.bn = self._stats_entries(model)

    # -------------------------------------------------------------------- the converter, run

    def _run(self, module: Any, what: str) -> dict[Path, np.ndarray]:
        import torch

        try:
            with torch.no_grad():
                tree = self.fn(module)
        except Exception as exc:
            raise ConversionError(f"to_jax raised on {what}: {type(exc).__name__}: {exc}") from exc
        if tree is None:
            raise ConversionError("to_jax returned None: it must return the port's parameter tree")
        leaves = {p: _numpy(v) for p, v in flatten(tree).items()}
        if not leaves:
            raise ConversionError(f"to_jax returned {type(tree).__name__} with no arrays in it")
        bad = [p for p, v in leaves.items() if v.dtype.kind not in "fciub"]
        if bad:
            raise ConversionError(f"to_jax's leaf {_where(bad[0])} is {leaves[bad[0]].dtype}, not an array of numbers")
        return leaves

    def _load(self, module: Any, values: Mapping[str, Any]) -> None:
        import torch

        sd = {k: torch.as_tensor(np.asarray(values[self.alias.get(k, k)])) if self.alias.get(k, k) in values
              else self.ints[k] for k in self.keys}
        module.load_state_dict(sd)

    def _eval(self, module: Any, values: Mapping[str, np.ndarray], what: str) -> dict[Path, np.ndarray]:
        self._load(module, values)
        with warnings.catch_warnings(), np.errstate(all="ignore"):  # zero weights may divide by zero in fn
            warnings.simplefilter("ignore")
            out = {p: v.astype(np.float64).reshape(-1) for p, v in self._run(module, what).items()}
        for p, v in out.items():
            if not np.isfinite(v).all():
                raise ConversionError(f"to_jax's leaf {_where(p)} is not finite on {what}: it is not linear in "
                                      f"torch's weights, so gradients cannot go back through it (a non-linear fold "
                                      f"such as weight norm belongs in the port, not the converter)")
        return out

    # -------------------------------------------------------------------- the linear map, read

    def _probe(self, module: Any) -> dict[Path, _Leaf]:
        zero = {k: np.zeros(s) for k, s in self.floats.items()}
        const = self._eval(module, zero, "zero weights")
        offsets, total = {}, 0
        for k, s in self.floats.items():
            offsets[k], total = total, total + int(np.prod(s))
        tags = {k: (offsets[k] + np.arange(1.0, np.prod(s) + 1)).reshape(s) for k, s in self.floats.items()}
        leaves = {p: _Leaf(p, c, []) for p, c in const.items()}
        if total <= _EXACT:
            pending = self._decode(module, tags, const, leaves, offsets, total, final=False)
        else:  # tags past 2**24 are not exact in a float32 converter: read tensor by tensor, in chunks
            pending = {p: np.arange(len(c)) for p, c in const.items()}
        rng = np.random.default_rng(0)
        rand = {k: rng.standard_normal(s) for k, s in self.floats.items()}
        got = self._eval(module, rand, "random weights")
        for p in self._disproved(leaves, rand, got):
            # a sum over tensors can pass for one scaled element: (t1**2 + t2**2) / (t1 + t2) may be whole
            leaves[p].parts, pending[p] = [], np.arange(len(const[p]))
        if pending:  # read each tensor alone, _EXACT elements at a time
            for k, s in self.floats.items():
                n = int(np.prod(s))
                for a in range(0, n, _EXACT):
                    b = min(n, a + _EXACT)
                    flat = np.zeros(n)
                    flat[a:b] = np.arange(1.0, b - a + 1)
                    local = {**zero, k: flat.reshape(s)}
                    self._decode(module, local, const, leaves, {k: -a}, b - a, final=True, only=pending)
        for p, gap in self._disproved(leaves, rand, got).items():
            raise ConversionError(
                f"to_jax's leaf {_where(p)} is not a rearrangement of torch's weights (each element one element "
                f"of one tensor times a constant, or a sum of such from different tensors): on random weights it "
                f"is {gap:.3g} away from that reading. Gradients cannot go back to torch names through it; a "
                f"non-linear fold (weight norm, BatchNorm folded into a conv) belongs in the port, not the "
                f"converter")
        return leaves

    @staticmethod
    def _disproved(leaves: Mapping[Path, _Leaf], rand: Mapping[str, np.ndarray],
                   got: Mapping[Path, np.ndarray]) -> dict[Path, float]:
        """Leaves whose reading does not give the converter's output on random weights: path -> gap."""
        bad = {}
        for p, leaf in leaves.items():
            want = leaf.const.copy()
            for name, src, dst, scale in leaf.parts:
                np.add.at(want, dst, scale * rand[name].reshape(-1)[src])
            gap = float(np.max(np.abs(got[p] - want), initial=0.0))
            if not gap <= _PROOF_RTOL * max(1.0, float(np.max(np.abs(got[p]), initial=0.0))):
                bad[p] = gap
        return bad

    def _decode(self, module: Any, tags: Mapping[str, np.ndarray], const: Mapping[Path, np.ndarray],
                leaves: dict[Path, _Leaf], offsets: Mapping[str, int], total: int, *, final: bool,
                only: Mapping[Path, np.ndarray] | None = None) -> dict[Path, np.ndarray]:
        """Read each leaf element's (tensor, index, scale) off the tagged runs; returns the
        elements left unread per leaf (a sum of several tensors' elements)."""
        a = self._eval(module, tags, "tagged weights")
        b = self._eval(module, {k: v * v for k, v in tags.items()}, "tagged weights")
        starts = sorted((o, k) for k, o in offsets.items())
        pending: dict[Path, np.ndarray] = {}
        for p, leaf in leaves.items():
            da, db = a[p] - const[p], b[p] - const[p]
            idx = np.flatnonzero((da != 0) | (db != 0))
            if only is not None:
                idx = np.intersect1d(idx, only.get(p, np.empty(0, int)))
            ratio = np.divide(db[idx], da[idx], out=np.full(len(idx), np.nan), where=da[idx] != 0)
            tag = np.rint(ratio)
            scale = np.divide(da[idx], tag, out=np.zeros(len(idx)), where=tag != 0)
            ok = ((tag >= 1) & (tag <= total) & (np.abs(ratio - tag) <= _DECODE_RTOL * np.maximum(tag, 1))
                  & np.isclose(scale * tag * tag, db[idx], rtol=_DECODE_RTOL, atol=0))
            if not ok.all():
                if final:
                    name = next(iter(offsets))
                    raise ConversionError(f"to_jax's leaf {_where(p)} mixes several elements of {name!r} into one "
                                          f"element, or is not linear in them: not a rearrangement, so gradients "
                                          f"cannot go back through it")
                pending[p] = idx[~ok]
            for o, name in reversed(starts):
                sel = ok & (tag > o)
                if sel.any():
                    leaf.parts.append((name, (tag[sel] - o - 1).astype(np.int64), idx[sel], scale[sel]))
                    ok = ok & ~sel
        return pending

    def _stats_entries(self, model: Any) -> list[StatsEntry]:
        out = []
        for name, module in model.named_modules():
            if not hasattr(module, "running_mean"):
                continue
            found = {}
            for p in self.stat_paths:
                for src, *_ in self.leaves[p].parts:
                    for buf, role in (("running_mean", "mean"), ("running_var", "var")):
                        if src == (f"{name}.{buf}" if name else buf):
                            found[p] = role
            parents = {p[:-1] for p in found}
            if len(found) == 2 and len(parents) == 1:
                out.append(StatsEntry(name, parents.pop(), {p[-1]: role for p, role in found.items()}))
        return out

    # -------------------------------------------------------------------- the mapping's API

    def __iter__(self) -> Any:
        return iter(self.bn)

    def to_jax(self, state: Mapping[str, Any]) -> tuple[Any, Any]:
        """(trainable tree, statistics tree) of fn on the model holding `state` (NumPy);
        float leaves in the model's own dtype, or float64 where `state` is (a float32 model's
        mapping converting the float64 re-runs of a diagnosis: in float32 they would start apart)."""
        import torch

        doubled = self.dtype != torch.float64 and any(np.asarray(v).dtype == np.float64 for v in state.values())
        if doubled and self._template64 is None:
            self._template64 = copy.deepcopy(self.template).to(torch.float64)
        template = self._template64 if doubled else self.template
        self._load(template, state)
        with torch.no_grad():
            tree = self.fn(template)
        wide = np.float64 if self.dtype == torch.float64 or doubled else np.float32
        tree = _copy_tree(tree, wide)
        params, stats = _split(tree, lambda p: p in self.stat_paths)
        return (params if params is not None else {}), (stats if stats is not None else {})

    def to_torch(self, params: Any, stats: Any = None) -> dict[str, np.ndarray]:
        """torch-named float arrays (float64) from the port's trees, the map read backwards: each
        torch element from a port element that is it times a constant, plus the converter's
        constant. Tied keys get their tensor. Raises ConversionError when an element enters the
        port only through sums (two biases summed into one) or not at all: no unique inverse."""
        values = {**flatten(params if params is not None else {}), **flatten(stats if stats is not None else {})}
        out = {k: np.zeros(int(np.prod(s))) for k, s in self.floats.items()}
        seen = {k: np.zeros(len(v), bool) for k, v in out.items()}
        for p, leaf in self.leaves.items():
            if p not in values or not leaf.parts:
                continue
            v = np.asarray(values[p], np.float64).reshape(-1)
            if v.shape != leaf.const.shape:
                raise ConversionError(f"the port's leaf {_where(p)} has {v.size} elements where to_jax gives "
                                      f"{leaf.const.size}")
            count = np.zeros(len(leaf.const), np.int64)
            for _, _, dst, _ in leaf.parts:
                np.add.at(count, dst, 1)
            for name, src, dst, scale in leaf.parts:
                alone = count[dst] == 1
                out[name][src[alone]] = (v[dst[alone]] - leaf.const[dst[alone]]) / scale[alone]
                seen[name][src[alone]] = True
        unread = [k for k, m in seen.items() if not m.all()]
        if unread:
            raise ConversionError(f"{unread[0]!r} cannot be read back from the port's trees: some of its elements "
                                  f"enter to_jax's output only summed with others, or not at all")
        result = {k: v.reshape(self.floats[k]) for k, v in out.items()}
        result.update({k: result[first] for k, first in self.alias.items() if k != first and first in result})
        return result

    def grads_to_torch(self, grads: Any, state: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The gradient of every torch tensor the converter reads, from the port's gradient tree
        (shaped like the trainable tree): the map's adjoint. A tensor it never reads is left out."""
        out: dict[str, np.ndarray] = {}
        for p, leaf in self.leaves.items():
            if p in self.stat_paths or not leaf.parts:
                continue
            g = np.asarray(_get(grads, p)).reshape(-1)
            for name, src, dst, scale in leaf.parts:
                acc = out.setdefault(name, np.zeros(int(np.prod(self.floats[name])), g.dtype))
                np.add.at(acc, src, (scale * g[dst]).astype(g.dtype))
        return {k: v.reshape(self.floats[k]) for k, v in out.items()}


def _copy_tree(tree: Any, wide: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _copy_tree(v, wide) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        items = [_copy_tree(v, wide) for v in tree]
        return items if isinstance(tree, list) else tuple(items)
    a = _numpy(tree)
    return a.astype(wide) if a.dtype.kind == "f" else a
