"""Value types of the public API: configuration, results, and the seed-compatible request/response."""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from mds.errors import InvalidRequestError
from mds.symbols import validate_symbol
from mds.timeframes import parse_timeframe
from mds.timeutil import to_ms

__all__ = [
    "CheckReport",
    "Config",
    "DataType",
    "Gap",
    "MaintenanceReport",
    "SeriesInfo",
    "StorageMetadata",
    "StorageRequest",
    "StorageResponse",
    "WriteResult",
]

TIER_NAMES = ("memory", "disk", "sqlite")
MAX_SYMBOLS_PER_REQUEST = 500
MAX_COUNT = 10_000_000


@dataclass(frozen=True, slots=True)
class Config:
    """Store configuration; every field has a default.

    Attributes
    ----------
    lookup : {"layer1_first", "storage_first"}
        Ask the Layer 1 cache before the memory tier (default) or the memory tier first.
    tiers : tuple of str
        Subset of ``("memory", "disk", "sqlite")``. Without ``"sqlite"`` nothing persists.
    memory_candles, memory_bytes, memory_ttl_s
        Memory tier: newest closed candles kept per series, byte budget, idle time before an
        entry is dropped.
    disk_days, disk_ttl_s, disk_map_size_cap
        LMDB tier: retention window, age after which an entry is refreshed from SQLite, and the
        largest map size it may grow to (bytes).
    vacuum_threshold, maintenance_interval_s
        SQLite: VACUUM when the free share passes this; how often the writer checks.
    compress_after_days
        SQLite: sealed chunks older than this are stored compressed.
    realtime_ttl_s, orderbook_ttl_s
        History kept for tickers (and trades) and for orderbooks.
    durable
        False: WAL with synchronous=NORMAL (survives a killed process with no acknowledged write
        lost). True: also survives power loss, at an fsync per commit.
    layer1_timeout_s
        Upper bound of one Layer 1 call made by the store.
    history_timeout_s
        Shared history (``history=`` a PostgreSQL URL): bound on every statement, and on every
        call of a server that stops answering (cut 2 s later; the store's lock is never held
        longer). Maintenance and ``check()`` are not bounded.
    live_grace_s
        Live feed (``Store.follow``): how long after an interval closed (store clock) a candle
        the stream sent is taken as final when no message of a later interval came, and how much
        of an epoch's end is left uncovered (a frame sent before the loss may still be in flight).
    """

    lookup: Literal["layer1_first", "storage_first"] = "layer1_first"
    tiers: tuple[str, ...] = TIER_NAMES
    memory_candles: int = 1000
    memory_bytes: int = 256 * 1024 * 1024
    memory_ttl_s: float = 3600.0
    disk_days: float = 31.0
    disk_ttl_s: float = 86400.0
    disk_map_size_cap: int = 8 * 1024**3
    vacuum_threshold: float = 0.15
    maintenance_interval_s: float = 600.0
    compress_after_days: float = 7.0
    realtime_ttl_s: float = 3600.0
    orderbook_ttl_s: float = 1800.0
    durable: bool = False
    layer1_timeout_s: float = 30.0
    live_grace_s: float = 2.0
    history_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if self.lookup not in ("layer1_first", "storage_first"):
            raise InvalidRequestError(f"Config.lookup must be 'layer1_first' or 'storage_first', not {self.lookup!r}")
        tiers = tuple(self.tiers)
        if not tiers or any(t not in TIER_NAMES for t in tiers) or len(set(tiers)) != len(tiers):
            raise InvalidRequestError(f"Config.tiers must be a non-empty subset of {TIER_NAMES}, not {self.tiers!r}")
        object.__setattr__(self, "tiers", tuple(t for t in TIER_NAMES if t in tiers))
        for name in ("memory_candles", "memory_bytes", "disk_map_size_cap"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise InvalidRequestError(f"Config.{name} must be a positive int, not {v!r}")
        for name in (
            "memory_ttl_s",
            "disk_days",
            "disk_ttl_s",
            "maintenance_interval_s",
            "compress_after_days",
            "realtime_ttl_s",
            "orderbook_ttl_s",
            "layer1_timeout_s",
            "live_grace_s",
            "history_timeout_s",
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise InvalidRequestError(f"Config.{name} must be a positive number, not {v!r}")
        if not 0.0 < self.vacuum_threshold < 1.0:
            raise InvalidRequestError(f"Config.vacuum_threshold must be in (0, 1), not {self.vacuum_threshold!r}")


@dataclass(frozen=True, slots=True)
class WriteResult:
    """Counts of a candle write: new timestamps, changed rows, identical rows."""

    inserted: int
    updated: int
    unchanged: int


@dataclass(frozen=True, slots=True)
class Gap:
    """A run of absent candles ``[start, end)`` (epoch ms).

    ``kind`` is ``"no_trades"`` inside covered ranges (the source was asked and had nothing) and
    ``"missing"`` outside them (nobody asked yet).
    """

    start: int
    end: int
    kind: Literal["missing", "no_trades"]


@dataclass(frozen=True, slots=True)
class SeriesInfo:
    """One stored series, as ``Store.series()`` lists it.

    Attributes
    ----------
    symbol : str
        Market code.
    timeframe : str
        Canonical timeframe name (``"1m"``, ``"1M"`` ...).
    first, last : int or None
        Open times (epoch ms) of the oldest and newest stored candle; None when the series holds
        coverage alone (a span known to have had no trades) and no candle.
    count : int
        Stored candles.
    covered : float or None
        The share of the intervals from ``first`` to ``last`` (both included) that coverage
        proves, from 0.0 to 1.0: 1.0 means no ``missing`` gap between the first and the last
        candle (every absent candle there is a known no-trade interval). None without candles.
    """

    symbol: str
    timeframe: str
    first: int | None
    last: int | None
    count: int
    covered: float | None


@dataclass(frozen=True, slots=True)
class MaintenanceReport:
    """What ``Store.maintain()`` did; fragmentation is a share from 0.0 to 1.0."""

    fragmentation_before: float
    fragmentation_after: float
    vacuumed: bool
    analyzed: bool
    disk_entries_purged: int


@dataclass(frozen=True, slots=True)
class CheckReport:
    """Result of ``Store.check()``: ``ok`` is true when ``problems`` is empty."""

    ok: bool
    problems: tuple[str, ...] = ()


class DataType(str, enum.Enum):
    """The kinds of data a :class:`StorageRequest` can ask for."""

    CANDLE = "candle"
    TICKER = "ticker"
    ORDERBOOK = "orderbook"
    TRADE = "trade"


@dataclass(frozen=True, slots=True)
class StorageRequest:
    """A seed-compatible request, validated when constructed.

    ``symbols`` becomes a tuple of validated market codes, ``timeframe`` its canonical name,
    ``start_time``/``end_time`` epoch ms (ints, datetimes, naive = UTC, or ISO strings accepted).

    Raises
    ------
    InvalidRequestError
        Unknown data type, bad or no symbols, a missing or bad timeframe for candles, an inverted
        range, or a count that is not a positive int.
    """

    data_type: DataType
    symbols: Sequence[str]
    timeframe: str | None = None
    start_time: Any = None
    end_time: Any = None
    count: int | None = None

    def __post_init__(self) -> None:
        try:
            dt = DataType(self.data_type)
        except ValueError:
            raise InvalidRequestError(f"unknown data_type {self.data_type!r}") from None
        object.__setattr__(self, "data_type", dt)
        syms = (self.symbols,) if isinstance(self.symbols, str) else self.symbols
        try:
            syms = tuple(syms)
        except TypeError:
            raise InvalidRequestError("symbols must be a list of market codes") from None
        if not syms:
            raise InvalidRequestError("symbols is empty")
        if len(syms) > MAX_SYMBOLS_PER_REQUEST:
            raise InvalidRequestError(f"at most {MAX_SYMBOLS_PER_REQUEST} symbols per request")
        object.__setattr__(self, "symbols", tuple(validate_symbol(s) for s in syms))
        if dt is DataType.CANDLE:
            if self.timeframe is None:
                raise InvalidRequestError("a candle request needs a timeframe")
            object.__setattr__(self, "timeframe", parse_timeframe(self.timeframe, derived=True).name)
        elif self.timeframe is not None:
            object.__setattr__(self, "timeframe", parse_timeframe(self.timeframe, derived=True).name)
        start = None if self.start_time is None else to_ms(self.start_time, name="start_time")
        end = None if self.end_time is None else to_ms(self.end_time, name="end_time")
        if start is not None and end is not None and end <= start:
            raise InvalidRequestError("end_time must be after start_time")
        object.__setattr__(self, "start_time", start)
        object.__setattr__(self, "end_time", end)
        if self.count is not None:
            c = self.count
            if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or not 0 < int(c) <= MAX_COUNT:
                raise InvalidRequestError(f"count must be an int in 1..{MAX_COUNT}, not {c!r}")
            object.__setattr__(self, "count", int(c))


@dataclass(slots=True)
class StorageMetadata:
    """Where an answer came from and what it cost.

    ``source`` is one of ``layer1_cache``, ``storage_memory``, ``storage_disk``, ``sqlite_db``,
    ``layer1_api`` (the slowest tier that contributed); ``cache_hit`` is false exactly when
    Layer 1's API was called; ``layer1_calls`` counts the Layer 1 calls made while serving it.
    """

    source: str = "storage_memory"
    cache_hit: bool = True
    processing_time_ms: float = 0.0
    data_count: int = 0
    layer1_calls: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class StorageResponse:
    """A seed-compatible response. ``arrays`` costs nothing; ``data`` is built on first access.

    Attributes
    ----------
    success : bool
    error : str or None
    arrays : dict
        ``{symbol: numpy array}`` (candles and trades), or ``{symbol: dict}`` for tickers and
        orderbooks.
    metadata : StorageMetadata
    """

    __slots__ = ("_data", "_factory", "arrays", "error", "metadata", "success")

    def __init__(
        self,
        success: bool,
        arrays: dict[str, Any] | None = None,
        metadata: StorageMetadata | None = None,
        error: str | None = None,
        data_factory: Callable[[dict[str, Any]], list[dict[str, Any]]] | None = None,
    ) -> None:
        self.success = success
        self.arrays: dict[str, Any] = arrays if arrays is not None else {}
        self.metadata = metadata if metadata is not None else StorageMetadata()
        self.error = error
        self._factory = data_factory
        self._data: list[dict[str, Any]] | None = None

    @property
    def data(self) -> list[dict[str, Any]]:
        """The answer as a list of dicts in Upbit field names (built lazily, then cached)."""
        if self._data is None:
            self._data = self._factory(self.arrays) if self._factory is not None and self.success else []
        return self._data

    def __repr__(self) -> str:
        return (
            f"StorageResponse(success={self.success}, source={self.metadata.source!r}, "
            f"count={self.metadata.data_count}, error={self.error!r})"
        )
