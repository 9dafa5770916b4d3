"""Memory tier: the newest closed candles of each series as numpy rows, bounded by LRU and TTL.

Per series ``(symbol, timeframe)`` the tier keeps a core :class:`~mds._kernels.SeriesBuffer` of
the newest ``capacity`` closed candles and a *held window* ``[held_start, held_end)``: the tier
holds exactly all candles of the series in that window, so an absent timestamp inside it means
"no trades", and a read the window answers needs no other tier. The still-forming (partial)
candle is kept apart and never mixed into the closed rows.

Candles are held as 56-byte CANDLE_DTYPE rows only, never as Upbit dicts (DESIGN.md section 4).
With the buffer's spare room (a quarter) that is at most 70 bytes per candle; the measurement
against the list-of-dicts form is in tests/test_memory_tier.py and benches/bench_memory.py.

Bounds: the entries live in the core LRU, in order of their last read. When the arrays held
pass ``max_bytes`` the least recently read series go first; a series not read for ``ttl_ms``
(counted from its creation while never read) is dropped. Writes do not count as reads: a series
that is written but never read ages out.

Not thread-safe: the store serialises access.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from mds import _kernels as K
from mds._dtypes import CANDLE_DTYPE
from mds._kernels import LRU, SeriesBuffer
from mds.errors import InvalidRequestError
from mds.timeframes import Timeframe, parse_timeframe
from mds.timeutil import Clock, now_ms

__all__ = ["MemoryTier"]

log = logging.getLogger(__name__)

_NEVER = 2**62


class _Entry:
    __slots__ = ("buf", "held_end", "held_start", "holds", "id", "key", "partial", "read")

    def __init__(self, key: tuple[str, str], ident: int, capacity: int, now: int) -> None:
        self.key = key
        self.id = ident
        self.buf = SeriesBuffer(capacity)
        self.holds = False  # whether [held_start, held_end) is a window yet (a partial alone is not)
        self.held_start = 0
        self.held_end = 0
        self.partial: np.ndarray | None = None
        self.read = now

    @property
    def nbytes(self) -> int:
        return int(self.buf.nbytes) + (0 if self.partial is None else self.partial.nbytes)


def _name(tf: str | Timeframe) -> str:
    if isinstance(tf, Timeframe):
        return tf.name
    return parse_timeframe(tf).name  # an alias ("60m") must not make a second series


class MemoryTier:
    """In-process cache of the newest closed candles per series.

    Parameters
    ----------
    capacity : int
        Closed candles kept per series (``Config.memory_candles``, default 1000).
    max_bytes : int
        Budget for the arrays of all series (``Config.memory_bytes``, default 256 MiB); the
        least recently read series are dropped to stay within it.
    ttl_ms : int
        A series not read for this long is dropped (``Config.memory_ttl_s``, default one hour).
    clock : callable, optional
        Returns epoch ms; default the wall clock.

    Notes
    -----
    Arguments are trusted to be canonical (DESIGN and docs/ARCHITECTURE.md: tiers see validated
    symbols, a :class:`~mds.timeframes.Timeframe` or its canonical name, int epoch ms, and
    CANDLE_DTYPE arrays sorted by ``ts`` with unique ``ts``).

    Arrays handed out are read-only views with snapshot semantics: they never change afterwards,
    whatever is written later, and they keep their rows alive after the series is dropped.
    """

    def __init__(
        self,
        *,
        capacity: int = 1000,
        max_bytes: int = 256 * 1024 * 1024,
        ttl_ms: int = 3_600_000,
        clock: Clock | None = None,
    ) -> None:
        for name, v in (("capacity", capacity), ("max_bytes", max_bytes), ("ttl_ms", ttl_ms)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise InvalidRequestError(f"MemoryTier {name} must be a positive int, not {v!r}")
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.ttl_ms = ttl_ms
        self._clock: Clock = clock or now_ms
        self._entries: dict[tuple[str, str], _Entry] = {}
        self._by_id: dict[int, _Entry] = {}
        self._lru = LRU()
        self._next_id = 0
        self._bytes = 0
        self._next_sweep = _NEVER  # earliest clock value at which some entry can expire
        self._hits = 0
        self._misses = 0
        self._evicted_lru = 0
        self._evicted_ttl = 0

    # -- bookkeeping -----------------------------------------------------------------------------
    def _sweep(self, now: int) -> None:
        """Drop entries not read within the TTL (the LRU keeps them in order of last read)."""
        lru, by_id, ttl = self._lru, self._by_id, self.ttl_ms
        while True:
            oldest = lru.oldest()
            if oldest is None:
                self._next_sweep = _NEVER
                return
            e = by_id[oldest]
            if now - e.read <= ttl:
                self._next_sweep = e.read + ttl + 1
                return
            self._drop(e)
            self._evicted_ttl += 1
            log.debug("memory tier: %s %s expired after %d ms unread", *e.key, now - e.read)

    def _drop(self, e: _Entry) -> None:
        del self._entries[e.key]
        del self._by_id[e.id]
        self._lru.remove(e.id)
        self._bytes -= e.nbytes

    def _entry(self, symbol: str, tf: str | Timeframe, now: int) -> _Entry:
        """The entry of a series, created (and counted as read) when absent."""
        key = (symbol, _name(tf))
        e = self._entries.get(key)
        if e is None:
            e = _Entry(key, self._next_id, self.capacity, now)
            self._next_id += 1
            self._entries[key] = e
            self._by_id[e.id] = e
            self._lru.touch(e.id)
            self._bytes += e.nbytes
            if self._next_sweep == _NEVER:
                self._next_sweep = now + self.ttl_ms + 1
        return e

    def _fit(self) -> None:
        """Drop least recently read series until the arrays fit ``max_bytes``."""
        while self._bytes > self.max_bytes and len(self._lru):
            e = self._by_id[self._lru.pop_oldest()]
            self._drop(e)
            self._evicted_lru += 1
            log.debug("memory tier: evicted %s %s to stay within %d bytes", *e.key, self.max_bytes)

    def _read(self, symbol: str, tf: str | Timeframe) -> _Entry | None:
        """The entry for a read (marked as read now), or None after counting a miss."""
        return self._read_at((symbol, tf.name if tf.__class__ is Timeframe else _name(tf)), self._clock())

    def _read_at(self, key: tuple[str, str], now: int) -> _Entry | None:
        if now >= self._next_sweep:
            self._sweep(now)
        e = self._entries.get(key)
        if e is None or not e.holds:
            self._misses += 1
            return None
        e.read = now
        self._lru.touch(e.id)
        return e

    # -- writes ---------------------------------------------------------------------------------
    def put_range(self, symbol: str, tf: str | Timeframe, start: int, end: int, candles: np.ndarray) -> bool:
        """Hold ``candles`` as exactly all candles of the series in ``[start, end)``.

        - No window yet, or ``[start, end)`` disjoint from the held window and newer: the window
          becomes ``[start, end)`` (replacing what was held).
        - ``[start, end)`` touches or overlaps the held window: the window grows to their union;
          candles held inside ``[start, end)`` that ``candles`` lacks are removed.
        - ``[start, end)`` disjoint and older: ignored (returns False).

        When more than ``capacity`` candles would be held, the oldest fall out and the window
        start moves up to the oldest kept ``ts``. A partial candle that the window now covers is
        dropped.

        Parameters
        ----------
        candles : ndarray of CANDLE_DTYPE
            Closed candles, sorted by ``ts``, unique, all with ``start <= ts < end``. Copied.

        Returns
        -------
        bool
            Whether the tier took the range.

        Raises
        ------
        InvalidRequestError
            ``start >= end``, a wrong dtype, or a candle outside ``[start, end)``.
        """
        return self._put(symbol, tf, start, end, candles, merge=False) is not None

    def write_range(
        self, symbol: str, tf: str | Timeframe, start: int, end: int, candles: np.ndarray
    ) -> tuple[int, int, int] | None:
        """Write ``candles`` into the series as a store whose only tier is memory does: merged
        into what is held (on an equal ``ts`` the new candle wins), the window growing to span
        both, whether they touch or not (nothing is stored in a gap between them). Only the
        newest ``capacity`` candles stay, as always.

        Returns
        -------
        tuple of int or None
            ``(inserted, updated, unchanged)`` of the merge.
        """
        return self._put(symbol, tf, start, end, candles, merge=True)

    def _put(
        self, symbol: str, tf: str | Timeframe, start: int, end: int, candles: np.ndarray, merge: bool
    ) -> tuple[int, int, int] | None:
        start, end = int(start), int(end)
        if start >= end:
            raise InvalidRequestError(f"a memory range needs start < end, got [{start}, {end})")
        if not isinstance(candles, np.ndarray) or candles.dtype != CANDLE_DTYPE:
            raise InvalidRequestError("a memory range takes a CANDLE_DTYPE array")
        bounds = K.ts_bounds(candles)
        lowest = None if bounds is None else bounds[0]  # oldest row offered to the buffer
        if bounds is not None and (bounds[0] < start or bounds[1] >= end):
            raise InvalidRequestError(f"memory range: candles outside [{start}, {end})")
        now = self._clock()
        if now >= self._next_sweep:
            self._sweep(now)
        e = self._entries.get((symbol, tf.name if tf.__class__ is Timeframe else _name(tf)))
        if e is None:
            e = self._entry(symbol, tf, now)
        buf = e.buf
        before = buf.nbytes
        hs, he = e.held_start, e.held_end
        if not e.holds or (start > he and not merge):
            if len(buf):
                buf.clear()
            counts = buf.write(candles)
            e.holds, e.held_start, e.held_end = True, start, end
        elif end < hs and not merge:
            return None
        else:
            # A merge (the memory tier is the whole store) spans a gap either side too: nothing is
            # stored in it, so the window holds exactly the store's candles there as well.
            old_first = buf.first_ts
            if old_first is not None and (lowest is None or old_first < lowest):
                lowest = old_first
            if not merge and start < he and _lacks(buf.range(start, end), candles["ts"]):  # nothing held past he
                # The held rows in [start, end) include candles the new range says do not exist.
                rows = np.concatenate([buf.range(-(2**62), start), candles, buf.range(end, 2**62)])
                buf.clear()
                counts = buf.write(rows)
            else:
                counts = buf.write(candles)
            e.held_start, e.held_end = min(hs, start), max(he, end)
        first = buf.first_ts
        if lowest is not None and first is not None and lowest < first:
            e.held_start = first  # rows fell out of the capacity window
        freed = 0
        if e.partial is not None and int(e.partial["ts"][0]) < e.held_end:
            freed = e.partial.nbytes
            e.partial = None
        self._bytes += buf.nbytes - before - freed
        if self._bytes > self.max_bytes:
            self._fit()
        return counts

    def set_partial(self, symbol: str, tf: str | Timeframe, row: Any) -> None:
        """Keep ``row`` as the still-forming candle of the series, replacing the previous one.

        Parameters
        ----------
        row
            One CANDLE_DTYPE row (a record or a 1-row array). Copied.

        Raises
        ------
        InvalidRequestError
            Not exactly one CANDLE_DTYPE row.
        """
        arr = np.array(row, dtype=CANDLE_DTYPE, copy=True).reshape(-1) if _is_candle(row) else None
        if arr is None or arr.shape != (1,):
            raise InvalidRequestError("set_partial takes one CANDLE_DTYPE row")
        arr.flags.writeable = False
        now = self._clock()
        if now >= self._next_sweep:
            self._sweep(now)
        e = self._entry(symbol, tf, now)
        before = e.nbytes
        e.partial = arr
        self._bytes += e.nbytes - before
        self._fit()

    def invalidate(self, symbol: str, tf: str | Timeframe) -> None:
        """Forget the series (rows, window and partial); views already handed out stay valid."""
        e = self._entries.get((symbol, _name(tf)))
        if e is not None:
            self._drop(e)

    def clear(self) -> None:
        """Forget every series."""
        self._entries.clear()
        self._by_id.clear()
        self._lru = LRU()
        self._bytes = 0
        self._next_sweep = _NEVER

    # -- reads ----------------------------------------------------------------------------------
    def latest(self, symbol: str, tf: str | Timeframe, n: int, end: int | None = None) -> np.ndarray | None:
        """The newest ``n`` closed candles before ``end``, if the tier holds all of them.

        Parameters
        ----------
        n : int
            How many candles (``n >= 0``).
        end : int, optional
            Exclusive upper bound (epoch ms); default the end of the held window. Pass the end of
            the last closed interval to get a fresh answer: a window that ends earlier misses.

        Returns
        -------
        ndarray or None
            A read-only view (no copy) of exactly ``n`` rows, ascending ``ts``, that never changes
            afterwards; None when the held window does not reach ``end`` or does not reach far
            enough back to prove these are the newest ``n``.
        """
        return self.latest_at((symbol, tf.name if tf.__class__ is Timeframe else _name(tf)), n, end, self._clock())

    def latest_at(
        self, key: tuple[str, str], n: int, end: int | None, now: int, *, bound: bool = False
    ) -> np.ndarray | None:
        """:meth:`latest` of series ``key`` (``(symbol, timeframe name)``) read at ``now`` (the
        tier's clock, already asked): the store's memory hit, without building either again.
        With ``bound``, ``end`` only bounds the answer: a window ending before it answers too
        (for a store whose memory tier is all it holds)."""
        if now >= self._next_sweep:  # _read_at written out: this is the store's memory hit
            self._sweep(now)
        e = self._entries.get(key)
        if e is None or not e.holds:
            self._misses += 1
            return None
        e.read = now
        self._lru.touch(e.id)
        buf = e.buf
        if end is None or end >= e.held_end:
            if end is not None and end > e.held_end and not bound:
                self._misses += 1
                return None
            if len(buf) >= n:
                self._hits += 1
                return buf.latest(n)
            self._misses += 1
            return None
        rows = buf.range(e.held_start, end)
        if end >= e.held_start and len(rows) >= n:
            self._hits += 1
            return rows[len(rows) - n :]
        self._misses += 1
        return None

    def range(self, symbol: str, tf: str | Timeframe, start: int, end: int) -> np.ndarray | None:
        """All closed candles with ``start <= ts < end``, if the held window covers the range.

        Returns
        -------
        ndarray or None
            A read-only view (no copy; may be empty: no trades) that never changes afterwards, or
            None when ``[start, end)`` is not inside the held window.
        """
        e = self._read(symbol, tf)
        if e is None:
            return None
        if start < e.held_start or end > e.held_end:
            self._misses += 1
            return None
        self._hits += 1
        return e.buf.range(start, max(start, end))

    def held(self, symbol: str, tf: str | Timeframe) -> tuple[int, int] | None:
        """The held window ``(start, end)`` of the series, or None. Does not count as a read."""
        now = self._clock()
        if now >= self._next_sweep:
            self._sweep(now)
        e = self._entries.get((symbol, _name(tf)))
        if e is None or not e.holds:
            return None
        return e.held_start, e.held_end

    def series(self) -> list[tuple[str, str]]:
        """``(symbol, timeframe name)`` of every series that holds a window now."""
        return [k for k in list(self._entries) if self.held(*k) is not None]

    def partial(self, symbol: str, tf: str | Timeframe) -> np.ndarray | None:
        """The still-forming candle as a read-only 1-row array, or None.

        None also when the held window has since covered its ``ts`` (it has closed).
        """
        now = self._clock()
        if now >= self._next_sweep:
            self._sweep(now)
        e = self._entries.get((symbol, _name(tf)))
        if e is None or e.partial is None or (e.holds and int(e.partial["ts"][0]) < e.held_end):
            return None
        e.read = now
        self._lru.touch(e.id)
        return e.partial

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, tuple) or len(key) != 2:
            return False
        return (key[0], _name(key[1])) in self._entries

    def stats(self) -> dict[str, int]:
        """JSON-serialisable sizes and counters.

        Keys: ``series``, ``candles`` (closed rows held), ``partials``, ``bytes`` (arrays
        allocated), ``max_bytes``, ``hits``, ``misses``, ``evicted_lru``, ``evicted_ttl``.
        """
        now = self._clock()
        if now >= self._next_sweep:
            self._sweep(now)
        return {
            "series": len(self._entries),
            "candles": sum(len(e.buf) for e in self._entries.values()),
            "partials": sum(e.partial is not None for e in self._entries.values()),
            "bytes": self._bytes,
            "max_bytes": self.max_bytes,
            "hits": self._hits,
            "misses": self._misses,
            "evicted_lru": self._evicted_lru,
            "evicted_ttl": self._evicted_ttl,
        }


def _lacks(inside: np.ndarray, ts: np.ndarray) -> bool:
    """Whether held rows ``inside`` a range include one whose ``ts`` is not in ``ts``."""
    return bool(len(inside)) and (len(inside) > len(ts) or not np.isin(inside["ts"], ts, assume_unique=True).all())


def _is_candle(row: Any) -> bool:
    dtype = getattr(row, "dtype", None)
    return dtype == CANDLE_DTYPE
