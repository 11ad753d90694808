"""The Hypothesis loop every kind of check runs: seeded, with shrinking bounded in time.

Operations (equivcheck.ops.runner), optimizers, models and data pipelines each raise their own
failure type from a test body; `Search` runs that body under the run's profile and seed,
keeps the smallest failure found (and the first few, `seen`), stops shrinking after `run.shrink_seconds` (then every
call reports that failure), and turns a failure that did not replay (Hypothesis's Flaky)
into that failure, marked `flaky`.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import example as explicit_example
from hypothesis import seed as hypothesis_seed
from hypothesis.database import DirectoryBasedExampleDatabase, ExampleDatabase
from hypothesis.errors import Flaky

from equivcheck.backends import deadline

PROFILES = {"dev": 30, "ci": 30, "nightly": 300}
SEEN = 4  # failures kept besides the smallest (Search.seen)
for _name, _count in PROFILES.items():
    settings.register_profile(
        f"equivcheck-{_name}",
        max_examples=_count,
        deadline=None,  # JAX compiles on first sight of a shape: timing says nothing
        database=None,  # replay is by seed (--equiv-seed), exact across machines; --equiv-failures-db adds one
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example,
                               HealthCheck.filter_too_much],
        verbosity=Verbosity.quiet,  # the check's own message carries the minimal example
        report_multiple_bugs=False,
        # "explain" re-runs a failure many times to annotate its printout, which we replace.
        # The target phase (hill-climbing towards the largest error/bound ratio) spends up to half
        # the examples near one input: at 30 it caught no mutant more than fresh draws did
        # (benchmarks/oracle_mutants.py, 12 pairs x 22 mutant classes, x2 included, with and
        # without: identical tables), so only the nightly profile's 300 examples spend it.
        phases=[Phase.explicit, Phase.reuse, Phase.generate, *([Phase.target] if _name == "nightly" else []),
                Phase.shrink],
    )


@contextlib.contextmanager
def seeded_generation() -> Iterator[None]:
    """Hypothesis (6.131+) mixes literals from every loaded non-site-packages module into
    generation, so the same seed drew other examples depending on which tests were imported,
    or whether equivcheck was installed or imported from a checkout: a replay command could
    miss the failure it was printed for. Within equivcheck's runs only its global constants
    pool is used."""
    try:
        from hypothesis.internal.conjecture import providers
    except ImportError:  # pragma: no cover - a Hypothesis without the module has no local pool
        yield
        return
    local = getattr(providers, "_get_local_constants", None)
    empty = getattr(providers, "Constants", None)
    cache = getattr(providers, "CONSTANTS_CACHE", None)
    if local is None or empty is None or cache is None:
        yield
        return
    cache.cache.clear()
    providers._get_local_constants = empty
    try:
        yield
    finally:
        providers._get_local_constants = local
        cache.cache.clear()


class Search:
    """One check's examples. `failure`: the exception type the body raises for a failing
    example; `smaller(new, best)`: whether a new failure is a smaller example than the best
    so far (None: the first one found is kept while shrinking goes on)."""

    def __init__(self, run: Any, failure: type[Exception],
                 smaller: Callable[[Any, Any], bool] | None = None) -> None:
        self.run, self.failure, self.smaller = run, failure, smaller
        self.best: Any = None
        self.since: float | None = None
        self.flaky = False
        # The first failures found, in order: the drawn one before shrinking began, then the
        # shrinker's first steps. A minimal example sits where shrinking leads (zeros, ties,
        # kinks), where a diagnosis may be unable to decide what a generic failure decides.
        self.seen: list[Any] = []

    @property
    def shrinking(self) -> bool:
        """A failure has been found: the examples now run are the shrinker's variants of it."""
        return self.best is not None

    @property
    def out_of_time(self) -> bool:
        return self.since is not None and time.monotonic() - self.since > self.run.shrink_seconds

    def __call__(self, body: Callable[[Any], None], strategy: Any, *, digest: str, seed: int,
                 shrink: bool = True, max_examples: int | None = None, explicit: Sequence[Any] = ()) -> Any:
        """Run `body` over the `explicit` examples (in order, every seed: a known divergence's
        witnesses), then over the drawn ones; the failure to report, or None. An explicit
        example that fails is reported as it is (Hypothesis does not shrink explicit examples)."""
        def test(example: Any) -> None:
            if self.best is not None and self.out_of_time:
                raise self.best  # out of shrinking time: every call reports the smallest found
            try:
                body(example)
            except self.failure as failed:
                if len(self.seen) < SEEN:
                    self.seen.append(failed)
                if self.best is None or (self.smaller is not None and self.smaller(failed, self.best)):
                    self.best, self.since = failed, self.since or time.monotonic()
                raise

        # Hypothesis keys its example database by function digest: keep checks apart.
        test._hypothesis_internal_add_digest = digest.encode()  # type: ignore[attr-defined]
        profile = settings.get_profile(f"equivcheck-{self.run.profile}")
        # A known divergence needs no minimal example: `shrink=False` stops at the first found.
        phases = [p for p in profile.phases if shrink or p != Phase.shrink]
        target = getattr(self.run, "target", None)
        if target is not None:
            phases = [p for p in phases if p != Phase.target] + ([Phase.target] if target else [])
        count = min(self.run.examples, max_examples or self.run.examples)
        inner: Any = test
        # Decorators apply bottom-up and Hypothesis runs the topmost first: reversed keeps the order given.
        for ex in reversed(explicit):
            inner = explicit_example(ex)(inner)
        wrapped = settings(profile, max_examples=count, phases=phases, database=failures_database(self.run))(
            hypothesis_seed(seed)(given(strategy)(inner)))
        try:
            # Each side's call within run.timeout seconds (a script's run too; under the fixture
            # its own, outer limit holds): past it SideTimeout ends the search, never shrunk.
            with seeded_generation(), deadline.limit(getattr(self.run, "timeout", None)):
                wrapped()
        except self.failure as failed:
            return failed
        except Flaky as flaky:
            inner = [e for e in getattr(flaky, "exceptions", ()) if isinstance(e, self.failure)]
            if not inner:
                raise
            self.flaky = True
            return inner[0]
        return None


_DATABASES: dict[str, ExampleDatabase] = {}


def failures_database(run: Any) -> ExampleDatabase | None:
    """The run's failures database (`run.failures_db`, a directory), or None. Hypothesis saves each
    check's failing examples there under the check's digest and replays them in its reuse phase
    before drawing new ones: a check that failed last night is tried on its failing example first
    tonight. Replayed under another seed, a saved example
    picks other shapes (the palette is the seed's), so it is one more drawn example, no more."""
    path = getattr(run, "failures_db", None)
    if not path:
        return None
    if path not in _DATABASES:
        _DATABASES[path] = DirectoryBasedExampleDatabase(path)
    return _DATABASES[path]


FLAKY_NOTE = "flaky: this example failed once and passed when replayed (a nondeterministic op, e.g. scatter-add on GPU)"

__all__ = ["FLAKY_NOTE", "PROFILES", "Search", "failures_database", "seeded_generation"]
