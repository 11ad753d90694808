"""Fixtures shared by the project's own tests."""
from __future__ import annotations

import psutil
import pytest


@pytest.fixture(scope="module")
def pools_closed_at_the_end():
    """Close every distributed pool at the module's end, then fail if any worker process survived
    (a pool must reap its ranks and the JAX process whatever made it close)."""
    yield
    from equivcheck.distributed import close_all

    close_all()
    stray = [c for c in psutil.Process().children(recursive=True)
             if "equivcheck.distributed.worker" in " ".join(c.cmdline()) and c.status() != psutil.STATUS_ZOMBIE]
    assert not stray, f"worker processes survived close_all: {[c.pid for c in stray]}"
