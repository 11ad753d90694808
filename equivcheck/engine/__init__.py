"""The engine every kind of check shares: inputs in, a judged and recorded check out.

dtypes      DTYPES, the dtype names a check runs at, and their NumPy dtypes
kind        CheckKind, the interface every kind implements; SIDES, FAMILIES (report sections), name rules
records     RunSettings (how a check runs) and CheckRecord (one report row)
tolerance   the one tolerance table (dtype x device x precision) and named overrides
compare     pytrees in, a Verdict out: structure, shape, dtype, NaN/Inf positions, values
search      the Hypothesis loop every kind runs: profiles, seeding, bounded shrinking
knowns      known divergences: id patterns with their reasons, per-version files, strictness (settle)
"""
from equivcheck.engine.compare import LeafDiff, Verdict, compare, flatten, format_args, leaves
from equivcheck.engine.dtypes import DTYPES, np_dtype
from equivcheck.engine.kind import FAMILIES, SIDES, CheckKind, Known, check_name, family_of
from equivcheck.engine.knowns import KnownDivergences, settle, versioned
from equivcheck.engine.records import CheckRecord, RunSettings, check_id
from equivcheck.engine.search import FLAKY_NOTE, PROFILES, Search, seeded_generation
from equivcheck.engine.tolerance import CHECK_SCALE, Tolerance, lookup, require_reasons

__all__ = [
    "CHECK_SCALE",
    "DTYPES",
    "FAMILIES",
    "FLAKY_NOTE",
    "PROFILES",
    "SIDES",
    "CheckKind",
    "CheckRecord",
    "Known",
    "KnownDivergences",
    "LeafDiff",
    "RunSettings",
    "Search",
    "Tolerance",
    "Verdict",
    "check_id",
    "check_name",
    "compare",
    "family_of",
    "flatten",
    "format_args",
    "leaves",
    "lookup",
    "np_dtype",
    "require_reasons",
    "seeded_generation",
    "settle",
    "versioned",
]
