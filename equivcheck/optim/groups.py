"""torch param groups on a parameter pytree, and their optax counterpart.

A group is `(predicate, overrides)`: `predicate(path, leaf)` picks the leaves by their path
in the tree ("inner/p0", "w1") and the array itself (use `.ndim` / `.shape` only: the leaf
is a torch tensor on the torch side and a JAX array or tracer on the optax side); its
`overrides` are the torch hyperparameters that differ from the optimizer's. The first
matching predicate wins; leaves no predicate matches form group 0, with the optimizer's own
hyperparameters. The standard transformer recipe (decay matrices, not biases and norms):

    groups=[(lambda path, leaf: leaf.ndim < 2, {"weight_decay": 0.0})]

On the optax side a hyperparameter that differs between groups becomes a `PerGroup`: the
mapping applies its piece once per distinct value under `optax.masked` with the group's
leaves (torch's groups are disjoint, so every leaf gets exactly its group's value).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

Predicate = Callable[[str, Any], bool]
Groups = Sequence[tuple[Predicate, Mapping[str, Any]]]

__all__ = ["Groups", "PerGroup", "group_index", "labels_of", "leaf_paths", "per_group"]


def _key(k: Any) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def leaf_paths(tree: Any) -> list[str]:
    """Each leaf's path, keys joined by "/", in jax.tree.leaves order."""
    import jax

    return ["/".join(_key(k) for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def group_index(groups: Groups, path: str, leaf: Any) -> int:
    """0 for the optimizer's own group, i + 1 for the first groups[i] whose predicate holds."""
    for i, (predicate, _) in enumerate(groups):
        if predicate(path, leaf):
            return i + 1
    return 0


def labels_of(groups: Groups) -> Callable[[Any], Any]:
    """params tree -> the same tree with each leaf's group index (for optax.masked /
    optax.multi_transform)."""

    def labels(tree: Any) -> Any:
        import jax

        return jax.tree_util.tree_map_with_path(
            lambda path, leaf: group_index(groups, "/".join(_key(k) for k in path), leaf), tree)

    return labels


@dataclasses.dataclass(frozen=True)
class PerGroup:
    """A hyperparameter whose value differs between param groups: values[i] for group i."""

    values: tuple[Any, ...]
    labels: Callable[[Any], Any]

    def __bool__(self) -> bool:
        return any(bool(v) for v in self.values)

    def __repr__(self) -> str:
        return f"PerGroup({', '.join(f'group {i}: {v!r}' for i, v in enumerate(self.values))})"

    def masks(self) -> list[tuple[Any, Callable[[Any], Any]]]:
        """(value, mask) for each distinct value: the mask selects the leaves of every group with it."""
        import jax

        out = []
        for value in dict.fromkeys(self.values):
            chosen = {i for i, v in enumerate(self.values) if v == value}
            out.append((value, lambda tree, c=chosen: jax.tree.map(lambda i: i in c, self.labels(tree))))
        return out


def per_group(name: str, hp: Mapping[str, Any], groups: Groups, allowed: Sequence[str]) -> dict[str, Any]:
    """`hp` with each hyperparameter that some group overrides replaced by a PerGroup.

    Raises ValueError naming the group and the hyperparameter for an override the mapping
    cannot express per group (`allowed`: the ones it applies as a masked piece)."""
    out = dict(hp)
    for i, (predicate, overrides) in enumerate(groups, start=1):
        if not callable(predicate):
            raise TypeError(f"{name}: param group {i}: its predicate must be callable (path, leaf) -> bool")
        for k, v in overrides.items():
            if k == "params":
                raise ValueError(f"{name}: param group {i} sets 'params': the predicate picks the leaves")
            if k not in hp:
                raise ValueError(f"{name}: param group {i} sets {k!r}, which the optimizer does not take; it takes "
                                 f"{', '.join(hp)}")
            if repr(v) != repr(hp[k]) and k not in allowed:
                raise ValueError(
                    f"{name}: param group {i} sets {k}={v!r} (the optimizer's: {hp[k]!r}); equivcheck maps per-group "
                    f"{' and '.join(allowed) or 'nothing'} for this optimizer: build one pair per group, or map "
                    "the groups yourself with optax.multi_transform (optimizer_pair(..., optax_map=...))")
    labels = labels_of(groups)
    for k in {k for _, o in groups for k in o}:
        values = (hp[k],) + tuple(o.get(k, hp[k]) for _, o in groups)
        if len({repr(v) for v in values}) > 1:
            out[k] = PerGroup(values, labels)
    return out
