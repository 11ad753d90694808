"""Shared by the project's own tests."""
from __future__ import annotations

from suites.test_autodiff import PAIRS as SUITE  # noqa: F401


def by_check(records):
    return {r.check: r for r in records}
