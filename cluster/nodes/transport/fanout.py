"""Run one function over many hosts at once; every host's outcome comes back, none hides another."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

from cluster.errors import VclusterError

log = logging.getLogger(__name__)

K = TypeVar("K")
T = TypeVar("T")

DEFAULT_PARALLELISM = 64


class UnexpectedHostError(VclusterError):
    """A bug met on one host; kept per host so the other hosts' outcomes survive."""


@dataclass(frozen=True)
class Outcome(Generic[T]):
    """One host's result or error."""

    host: str
    value: T | None = None
    error: VclusterError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class FanOut(Generic[T]):
    """Every host's outcome, in the order the hosts were given."""

    outcomes: tuple[Outcome[T], ...]

    def __iter__(self) -> Iterator[Outcome[T]]:
        return iter(self.outcomes)

    def __getitem__(self, host: str) -> Outcome[T]:
        return next(o for o in self.outcomes if o.host == host)

    @property
    def succeeded(self) -> dict[str, T]:
        return {o.host: o.value for o in self.outcomes if o.ok}  # type: ignore[misc]

    @property
    def failed(self) -> dict[str, VclusterError]:
        return {o.host: o.error for o in self.outcomes if o.error is not None}

    def values(self) -> list[T]:
        """All values; raise `FanOutError` naming every failed host if any failed."""
        self.raise_if_failed()
        return [o.value for o in self.outcomes]  # type: ignore[misc]

    def raise_if_failed(self, doing: str | None = None) -> None:
        if self.failed:
            raise FanOutError(self.failed, doing)


class FanOutError(VclusterError):
    """Some hosts failed; `lines()` gives one line per failed host."""

    def __init__(self, failed: dict[str, VclusterError], doing: str | None = None):
        self.failed = failed
        self.doing = doing
        what = f" while {doing}" if doing else ""
        super().__init__(
            f"{len(failed)} host(s) failed{what}: "
            + "; ".join(e.one_line() for e in failed.values())
        )

    def lines(self) -> list[str]:
        return [error.one_line() for error in self.failed.values()]


def fan_out(
    items: Iterable[K],
    action: Callable[[K], T],
    *,
    name: Callable[[K], str],
    parallelism: int = DEFAULT_PARALLELISM,
) -> FanOut[T]:
    """Run `action` on every item in a bounded thread pool and collect each outcome.

    A `VclusterError` is that host's outcome; any other exception is a bug, logged with its
    traceback and kept as that host's `UnexpectedHostError` rather than lost or fatal.
    """
    items = list(items)
    if not items:
        return FanOut(())

    def attempt(item: K) -> Outcome[T]:
        host = name(item)
        try:
            return Outcome(host, value=action(item))
        except VclusterError as error:
            if error.where is None:
                error.where = host
            return Outcome(host, error=error)
        except Exception as exc:
            log.exception("unexpected error on %s", host)
            return Outcome(
                host,
                error=UnexpectedHostError(f"unexpected {type(exc).__name__}: {exc}", where=host),
            )

    workers = max(1, min(parallelism, len(items)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fanout") as pool:
        return FanOut(tuple(pool.map(attempt, items)))
