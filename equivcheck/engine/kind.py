"""What a kind of check is: the one interface the `equiv` fixture and the plugin call.

Operation pairs (`Pair`), optimizer pairs, model pairs and data checks each implement
`CheckKind`; so can a user's own kind. The fixture and the plugin's precompile hook call
these members and nothing else, so a new kind is a record with six members, no plugin change.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from equivcheck.engine.records import CheckRecord, RunSettings

SIDES = ("torch", "jax")
# The report's sections, in order: each record names one (`CheckRecord.family`), taken from its
# kind's optional `family` attribute; a kind without one (a user's own) reports as "other".
FAMILIES = ("operations", "layers", "optimizers", "data", "models", "checkpoints", "distributed", "speed",
            "other")
# Names end up in pytest node ids, report ids and glob patterns: keep them plain.
_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")

# known(check_id) -> (pattern, reason) of the known divergence that id matches, or None
Known = Callable[[str], "tuple[str, str] | None"]


@runtime_checkable
class CheckKind(Protocol):
    """A record the `equiv` fixture can run: `equiv.check(record)`.

    name        unique id: pytest ids, report rows, known-divergence patterns
    dtypes      the dtypes it supports; other dtypes of a run are skipped with the reason
    checks      the checks it runs (a subset of `all_checks`)
    all_checks  every check this kind knows, in report order
    replace     a copy with fields changed (`equiv.check(rec, checks=...)` uses `checks=`)
    prepare     compile ahead (called on a background thread for the next test); may do nothing
    family      optional: the report section of its records (one of FAMILIES; "other" if absent)
    run_checks  run every check at one dtype on `run.device`: one CheckRecord per check, never
                raising for a disagreement (that is a failed record); `known` marks known
                divergences, `nodeid` and `replay` go into the records
    """

    name: str
    dtypes: Sequence[str]
    checks: Sequence[str]
    all_checks: Sequence[str]

    def replace(self, **changes: Any) -> CheckKind: ...

    def prepare(self, dtype: str, run: RunSettings) -> None: ...

    def run_checks(self, *, dtype: str, run: RunSettings, known: Known, nodeid: str,
                   replay: str) -> list[CheckRecord]: ...


def family_of(kind: Any) -> str:
    """The report section of `kind`'s records: its `family` attribute where it names one of
    FAMILIES, else "other". Raises nothing: a user's kind need not declare one."""
    family = getattr(kind, "family", "")
    return family if family in FAMILIES else "other"


def check_name(owner: str, name: str) -> None:
    """Raise ValueError unless `name` is plain enough for node ids and glob patterns."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"{owner} name {name!r}: use letters, digits and _ . + - only")
