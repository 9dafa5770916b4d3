"""The durable tier's interface: what the Store asks of the tier that holds history for good.

The read and write plans (``mds.store``) talk to the durable tier through :class:`DurableTier`
alone; SQLite (:class:`mds.tiers.sqlite.SqliteStore`) is its first implementation and a server
database can be the next one without touching them. :func:`open_durable` is the one place that
chooses and opens the implementation.

Conventions every implementation keeps (the Store relies on them):

- Inputs are canonical: ``symbol`` validated, ``tf`` a :class:`~mds.timeframes.Timeframe`, times
  int epoch ms, candle batches C-contiguous CANDLE_DTYPE arrays sorted by ``ts`` with unique ``ts``.
  Arrays returned are new and share no memory with the backend.
- A read returns exactly what is stored, or raises: a backend failure is a
  :class:`~mds.errors.StorageUnavailableError` (or the backend's own error, which the Store treats
  as the tier being unavailable), damaged rows are :class:`DamagedChunkError`. Never an empty or
  shorter answer because something failed.
- Every write call is one transaction (all or nothing); :meth:`DurableTier.transaction` groups
  many into one.
- ``commit_seq`` counts committed data changes and lives with the data; the Store records the
  value it acknowledged elsewhere and so detects lost commits.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Protocol

import numpy as np

from mds.errors import InvalidRequestError, StorageUnavailableError
from mds.models import Config
from mds.timeframes import Timeframe

__all__ = [
    "ChangeFeed",
    "DamagedChunkError",
    "DurableTier",
    "SharedHistory",
    "is_server_url",
    "open_durable",
    "redact",
    "shown_url",
]


class DamagedChunkError(StorageUnavailableError):
    """Stored candles failed their checksum (or do not decode): they were not served.

    Raised by every read of the damaged rows, and by writes and deletes that would have to read
    them (nothing is changed then). :meth:`DurableTier.quarantine_damaged` removes the damaged
    rows and their span from the coverage, so the span becomes "missing" and is refetched from
    Layer 1.

    Attributes
    ----------
    symbol : str
        Market code of the series.
    timeframe : str
        Timeframe name of the series.
    span : tuple of int
        ``(start, end)``, half-open, epoch ms: the damaged rows' span (a whole chunk's grid span
        where rows are stored in chunks). Also as ``start`` and ``end``.
    """

    def __init__(self, message: str, symbol: str, timeframe: str, start: int, end: int) -> None:
        super().__init__(message)
        self.symbol = symbol
        self.timeframe = timeframe
        self.start = int(start)
        self.end = int(end)

    @property
    def span(self) -> tuple[int, int]:
        return (self.start, self.end)

    def __reduce__(self) -> tuple[Any, ...]:  # pickles (across processes) with its attributes
        return (type(self), (str(self), self.symbol, self.timeframe, self.start, self.end))


class DurableTier(Protocol):
    """Full candle history with its coverage, change tracking, upkeep and self-check.

    Not thread-safe by itself: the Store calls it under its lock.
    """

    #: The commit sequence of this connection's latest committed data change (None before one):
    #: what the Store records as acknowledged, without another query.
    last_commit_seq: int | None

    # writes ---------------------------------------------------------------------------------
    def transaction(self) -> AbstractContextManager[Any]:
        """Group the write calls inside into one transaction (nestable; all or nothing)."""
        ...

    def write(
        self, symbol: str, tf: Timeframe, candles: np.ndarray, covered: Any = None, *, validated: bool = False
    ) -> tuple[int, int, int]:
        """Upsert closed candles (an existing ``ts`` is replaced) and add ``covered`` ranges
        (``(k, 2)`` int64, half-open) to the coverage, in one transaction. Returns
        ``(inserted, updated, unchanged)``. ``validated``: the caller made ``candles`` with
        ``mds._kernels.prepare`` (every row checked as ``validate`` checks it): the tier checks
        their shape, order and ``ts`` range, not every row again."""
        ...

    def delete(self, symbol: str, tf: Timeframe, start: int | None = None, end: int | None = None) -> int:
        """Remove candles and coverage in ``[start, end)`` (None: unbounded); the count removed."""
        ...

    def quarantine_damaged(
        self, symbol: str, tf: Timeframe, start: int | None = None, end: int | None = None
    ) -> list[tuple[int, int]]:
        """Remove damaged rows overlapping ``[start, end)`` and their spans from the coverage;
        the spans removed, ascending."""
        ...

    # reads ----------------------------------------------------------------------------------
    def read_range(self, symbol: str, tf: Timeframe, start: int, end: int) -> np.ndarray:
        """The stored candles in ``[start, end)``, ascending."""
        ...

    def read_latest(self, symbol: str, tf: Timeframe, n: int, end: int | None = None) -> np.ndarray:
        """The newest ``n`` stored candles before ``end`` (None: all), ascending."""
        ...

    def read_from(self, symbol: str, tf: Timeframe, start: int, n: int) -> np.ndarray:
        """The first ``n`` stored candles at or after ``start``, ascending."""
        ...

    def last_ts(self, symbol: str, tf: Timeframe) -> int | None:
        """Open time of the newest stored candle (None: none)."""
        ...

    def coverage(self, symbol: str, tf: Timeframe) -> np.ndarray:
        """Covered ranges, ``(k, 2)`` int64, half-open, merged and ascending."""
        ...

    def series(self) -> list[tuple[str, str, int, int, int]]:
        """Every series with candles: ``(symbol, timeframe name, count, first_ts, last_ts)``."""
        ...

    def known_series(self) -> list[tuple[str, str]]:
        """Every series the tier has a record of, ``(symbol, timeframe name)``, sorted: with
        candles, with coverage alone, or neither any more."""
        ...

    # change tracking ------------------------------------------------------------------------
    def data_version(self) -> int:
        """A counter that changes whenever another connection commits (cheap, no data read)."""
        ...

    def commit_seq(self) -> int:
        """How many committed transactions changed the data (kept with the data)."""
        ...

    # upkeep and checks ----------------------------------------------------------------------
    def maybe_maintain(self) -> bool:
        """Run a bounded scheduled upkeep step if one is due; whether one ran."""
        ...

    def maintain(self, force: bool = False) -> dict[str, Any]:
        """Upkeep now: ``fragmentation_before``, ``fragmentation_after``, ``vacuumed``, ``analyzed``."""
        ...

    def integrity_problems(self) -> list[str]:
        """Everything found wrong (backend integrity, checksums, coverage vs data); [] when sound."""
        ...

    def stats(self) -> dict[str, Any]:
        """JSON-ready figures for ``Store.stats()``."""
        ...

    def close(self) -> None:
        """Release the backend; idempotent."""
        ...


class ChangeFeed(Protocol):
    """A durable tier that several hosts share tells each of them what the others changed.

    A host's fast tiers (memory, LMDB) hold copies of durable rows; a write committed by another
    host makes them stale. A shared tier implements this as well as :class:`DurableTier`.
    """

    @property
    def listening(self) -> bool:
        """Whether every change another origin commits is reported now."""
        ...

    def subscribe(self, callback: Callable[[str | None, str | None, int, int], None]) -> None:
        """Call ``callback(symbol, timeframe_name, start, end)`` (from a background thread) for
        every span another origin committed a change to, and ``callback(None, None, 0, 0)`` each
        time the feed starts or stops listening (see :attr:`listening`): anything may have
        changed meanwhile."""
        ...


def is_server_url(history: str | None) -> bool:
    """Whether ``history`` names a database server (``postgresql://`` or ``postgres://``)."""
    return history is not None and history.split("://", 1)[0].lower() in ("postgresql", "postgres")


class SharedHistory(DurableTier, Protocol):
    """A durable tier on a server that many store directories write (PostgreSQL): besides its
    shared ``commit_seq`` it keeps a ledger of each directory's latest commit, so a directory can
    tell when the server lost commits it acknowledged (``mds.store.changes.SharedAcks``)."""

    #: The server's address and this directory's origin as a number: a directory's record of
    #: commits applies to this pair only.
    identity: int

    def take_commit(self) -> tuple[int, int] | None:
        """``(commit_seq, this directory's ledger entry before it)`` of the latest commit, once."""
        ...

    def acknowledged(self) -> int | None:
        """This directory's ledger entry (0: none; None: the server keeps no ledger)."""
        ...

    def off_lock(self, writable: bool = False) -> AbstractContextManager[DurableTier | None] | None:
        """A tier on a connection of its own for one call that runs while other threads use the
        store, read-only unless ``writable`` (None, or None from the context: call this tier
        itself, e.g. inside a transaction or without a connection to spare)."""
        ...


def open_durable(
    path: str | os.PathLike[str],
    config: Config,
    *,
    readonly: bool,
    clock: Callable[[], int],
    history: str | None = None,
    origin: str = "",
) -> DurableTier:
    """Open the durable tier: the SQLite file under the store directory ``path`` when
    ``history`` is None, else the server database it names (``origin`` tells this store's
    changes apart from other hosts' in the change feed).

    Raises whatever the backend raises when it cannot open (the Store degrades the tier).
    """
    if history is not None:
        if not is_server_url(history):
            raise InvalidRequestError(
                f"history must be None (SQLite under the store path) or a postgresql:// URL, not {shown_url(history)}"
            )
        try:
            from mds.tiers.postgres import PostgresTier
        except ImportError as exc:  # the optional dependency is missing
            raise StorageUnavailableError(
                f"history on PostgreSQL needs the postgres extra: pip install 'upbit-mds[postgres]' ({exc})"
            ) from exc
        return PostgresTier(
            history,
            readonly=readonly,
            clock=clock,
            origin=origin,
            timeout_s=config.history_timeout_s,
            compress_after_days=config.compress_after_days,
            vacuum_threshold=config.vacuum_threshold,
        )
    from mds.tiers.sqlite import SqliteStore

    return SqliteStore(
        os.path.join(os.fspath(path), "candles.sqlite3"),
        readonly=readonly,
        durable=config.durable,
        vacuum_threshold=config.vacuum_threshold,
        maintenance_interval_s=config.maintenance_interval_s,
        compress_after_days=config.compress_after_days,
        clock=clock,
    )


_PASSWORD = re.compile(r"(://[^:/@?#]*:)[^@/?#]*@|(password\s*=\s*)('[^']*'|[^\s&]+)", re.IGNORECASE)


def redact(url: str) -> str:
    """``url`` with any password (``user:password@`` or ``password=``) replaced by ``***``, for
    messages and logs."""
    return _PASSWORD.sub(lambda m: f"{m.group(1)}***@" if m.group(1) else f"{m.group(2)}***", url)


def shown_url(url: str) -> str:
    """A URL for an error message: redacted, and quoted and cut when it is no URL with a host."""
    _, sep, rest = url.partition("://")
    return redact(url) if sep and "@" in rest else repr(redact(url)[:80])
