"""Pure-numpy twin of the compiled kernels in ``mds/_core.pyx``.

Every public name here exists in ``mds._core`` with the same signature and the same results
(tests/test_core_properties.py holds them equal). Import kernels through :mod:`mds._kernels`,
which picks the implementation; import this module directly only to compare the two.

Conventions shared by both implementations (docs/ARCHITECTURE.md, "Kernel interface"):

- Candle arrays are 1-D ``CANDLE_DTYPE`` arrays; rows are moved as raw 56-byte records
  (``CANDLE_RAW`` views), never field by field.
- Timeframes arrive as ``(interval_ms, origin_ms, is_month)``. Fixed grids are aligned when
  ``ts % interval_ms == origin_ms % interval_ms`` (floor modulo, so no ``ts - origin`` overflow);
  months start on the 1st 00:00 UTC, computed with integer civil-calendar arithmetic
  (days-from-civil), valid over the whole int64 millisecond range.
- Arithmetic near the ends of int64 saturates instead of wrapping, so huge and negative
  timestamps give the same answer in both implementations.
"""

from __future__ import annotations

import os
import struct
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from mds._dtypes import CANDLE_DTYPE, CANDLE_RAW
from mds.errors import InvalidRequestError

__all__ = [
    "CHUNK_KEY_MAX",
    "IMPLEMENTATION",
    "LRU",
    "HitMeter",
    "LatencyRing",
    "ChunkCorrupt",
    "REASONS",
    "SeriesBuffer",
    "file_state",
    "find_gaps",
    "interval_contains",
    "interval_normalize",
    "interval_subtract",
    "interval_union",
    "label_gaps",
    "merge",
    "merge_into",
    "prepare",
    "row_checksum",
    "sort_dedup",
    "ts_bounds",
    "undelta_rows",
    "validate",
    "walk_chunks",
]

IMPLEMENTATION = "numpy"

_T = TypeVar("_T")

#: Reason codes of :func:`validate` (code -> name).
REASONS: dict[int, str] = {
    1: "nonfinite",
    2: "low_above_body",
    3: "high_below_body",
    4: "negative_volume",
    5: "negative_value",
    6: "misaligned",
    7: "future",
    8: "nonpositive_price",
}

DAY_MS = 86_400_000
I64_MIN = -(2**63)
I64_MAX = 2**63 - 1
# Range of day numbers whose midnight is representable in int64 milliseconds.
_MIN_DAY = -(-I64_MIN // DAY_MS)  # ceil(I64_MIN / DAY_MS)
_MAX_DAY = I64_MAX // DAY_MS

_EMPTY_RANGES = np.zeros((0, 2), dtype=np.int64)


# --------------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------------
def _candles(arr: Any, name: str = "candles") -> np.ndarray:
    if not isinstance(arr, np.ndarray) or arr.dtype != CANDLE_DTYPE or arr.ndim != 1:
        got = getattr(arr, "dtype", type(arr).__name__)
        raise InvalidRequestError(f"{name} must be a 1-D CANDLE_DTYPE array, got {got}")
    return np.ascontiguousarray(arr)


def _raw(arr: np.ndarray) -> np.ndarray:
    return arr.view(CANDLE_RAW)


def _grid(interval_ms: int, origin_ms: int, is_month: bool) -> tuple[int, int, bool]:
    is_month = bool(is_month)
    interval_ms = int(interval_ms)
    if not is_month and interval_ms <= 0:
        raise InvalidRequestError(f"interval_ms must be positive, got {interval_ms}")
    return interval_ms, int(origin_ms), is_month


def _ranges(a: Any, name: str = "ranges") -> np.ndarray:
    arr = np.asarray(a, dtype=np.int64)
    if arr.size == 0:
        return _EMPTY_RANGES
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise InvalidRequestError(f"{name} must have shape (k, 2), got {arr.shape}")
    return arr


# --------------------------------------------------------------------------------------------
# calendar arithmetic (H. Hinnant's civil-from-days / days-from-civil, floor division)
# --------------------------------------------------------------------------------------------
def _civil_from_days_vec(z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    z = z + 719_468
    era = z // 146_097
    doe = z - era * 146_097
    yoe = (doe - doe // 1460 + doe // 36_524 - doe // 146_096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    d = doy - (153 * mp + 2) // 5 + 1
    m = np.where(mp < 10, mp + 3, mp - 9)
    y = yoe + era * 400 + (m <= 2)
    return y, m, d


def _civil_from_days(z: int) -> tuple[int, int, int]:
    y, m, d = _civil_from_days_vec(np.int64(z))
    return int(y), int(m), int(d)


def _days_from_civil(y: int, m: int, d: int) -> int:
    y -= m <= 2
    era = y // 400
    yoe = y - era * 400
    doy = (153 * (m - 3 if m > 2 else m + 9) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146_097 + doe - 719_468


def _days_from_civil_vec(y: np.ndarray, m: np.ndarray) -> np.ndarray:
    y = y - (m <= 2)
    era = y // 400
    yoe = y - era * 400
    doy = (153 * np.where(m > 2, m - 3, m + 9) + 2) // 5
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146_097 + doe - 719_468


def _month_index(ts: int) -> int:
    """Months since 1970-01 of the month containing ``ts``."""
    y, m, _ = _civil_from_days(ts // DAY_MS)
    return (y - 1970) * 12 + (m - 1)


def _month_start(mi: int) -> int:
    """Epoch ms of month index ``mi``, saturated to the int64 range."""
    days = _days_from_civil(1970 + mi // 12, mi % 12 + 1, 1)
    if days > _MAX_DAY:
        return I64_MAX
    if days < _MIN_DAY:
        return I64_MIN
    return days * DAY_MS


def _month_aligned_vec(ts: np.ndarray) -> np.ndarray:
    _, _, d = _civil_from_days_vec(ts // DAY_MS)
    return np.asarray((ts % DAY_MS == 0) & (d == 1))


def _ceil_slot(t: int, interval_ms: int, origin_ms: int, is_month: bool) -> int:
    """First aligned slot ``>= t``, saturated at I64_MAX."""
    if is_month:
        if t % DAY_MS == 0 and _civil_from_days(t // DAY_MS)[2] == 1:
            return t
        return _month_start(_month_index(t) + 1)
    off = (t % interval_ms - origin_ms % interval_ms) % interval_ms
    return t if off == 0 else min(t + (interval_ms - off), I64_MAX)


# --------------------------------------------------------------------------------------------
# validate
# --------------------------------------------------------------------------------------------
def validate(
    candles: np.ndarray,
    interval_ms: int,
    origin_ms: int,
    is_month: bool,
    now_ms: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Find the invalid rows of a candle array.

    Parameters
    ----------
    candles : ndarray of CANDLE_DTYPE
        Rows to check, any order.
    interval_ms, origin_ms, is_month
        The timeframe grid (``Timeframe.kernel_args``).
    now_ms : int, optional
        When given, rows with ``ts > now_ms`` are invalid (reason 7, ``future``).

    Returns
    -------
    idx : ndarray of int64
        Indices of invalid rows, ascending.
    reason : ndarray of uint8
        The first failing reason of each row (codes in :data:`REASONS`, checked in code order).

    Raises
    ------
    InvalidRequestError
        For a wrong dtype or shape, or a non-positive fixed interval.

    Notes
    -----
    Reason 8 (``nonpositive_price``): ``open``, ``high``, ``low`` or ``close`` is ``<= 0``
    (``-0.0`` included); no market trades at a price of zero or below (DESIGN.md section 6). It is
    checked last, so a row that fails an older rule keeps the code it had.
    """
    arr = _candles(candles)
    interval_ms, origin_ms, is_month = _grid(interval_ms, origin_ms, is_month)
    n = arr.shape[0]
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.uint8)
    ts = arr["ts"]
    o, h, lo, c = arr["open"], arr["high"], arr["low"], arr["close"]
    vol, val = arr["volume"], arr["value"]
    floats = arr.view(np.float64).reshape(n, 7)[:, 1:]
    with np.errstate(invalid="ignore"):
        bad = [
            ~np.isfinite(floats).all(axis=1),
            lo > np.minimum(o, c),
            h < np.maximum(o, c),
            vol < 0,
            val < 0,
            ~_month_aligned_vec(ts) if is_month else (ts % interval_ms) != (origin_ms % interval_ms),
            ts > int(now_ms) if now_ms is not None else np.zeros(n, dtype=bool),
            (o <= 0) | (h <= 0) | (lo <= 0) | (c <= 0),
        ]
    reason = np.zeros(n, np.uint8)
    for code in range(len(bad), 0, -1):
        reason[bad[code - 1]] = code
    idx = np.flatnonzero(reason).astype(np.int64)
    return idx, reason[idx]


# --------------------------------------------------------------------------------------------
# sort / dedup / merge
# --------------------------------------------------------------------------------------------
def sort_dedup(batch: np.ndarray) -> np.ndarray:
    """Sort a candle batch by ``ts`` and drop duplicate timestamps, the last occurrence winning.

    Returns a new C-contiguous array (never a view of ``batch``).
    """
    arr = _candles(batch, "batch")
    ts = arr["ts"]
    if ts.shape[0] <= 1 or bool(np.all(ts[1:] > ts[:-1])):
        return _raw(arr).copy().view(CANDLE_DTYPE)
    order = np.argsort(ts, kind="stable")
    st = ts[order]
    keep = np.empty(st.shape[0], dtype=bool)
    keep[:-1] = st[1:] != st[:-1]
    keep[-1] = True
    return _raw(arr)[order[keep]].view(CANDLE_DTYPE)


def prepare(
    candles: np.ndarray,
    interval_ms: int,
    origin_ms: int,
    is_month: bool,
    now_ms: int | None = None,
) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """Check a batch and make the private copy a store keeps.

    Parameters
    ----------
    candles : ndarray of CANDLE_DTYPE
        The batch as given (any order, duplicates allowed).
    interval_ms, origin_ms, is_month, now_ms
        As for :func:`validate`.

    Returns
    -------
    rows : ndarray of CANDLE_DTYPE or None
        A new C-contiguous array, sorted by ``ts`` without duplicates (the last occurrence wins);
        None when any row is invalid.
    idx, reason : ndarray
        As :func:`validate` returns them, for the rows in the order given (empty when valid).

    Notes
    -----
    The rows are copied before they are checked, so what a store keeps is exactly what was
    checked, even if the caller's array changes meanwhile.
    """
    arr = _candles(candles, "candles")
    copy = _raw(arr).copy().view(CANDLE_DTYPE)
    idx, reason = validate(copy, interval_ms, origin_ms, is_month, now_ms)
    if len(idx):
        return None, idx, reason
    return (copy if _is_strict(copy["ts"]) else sort_dedup(copy)), idx, reason


def _is_strict(ts: np.ndarray) -> bool:
    return ts.shape[0] <= 1 or bool(np.all(ts[1:] > ts[:-1]))


def _classify(series: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Positions of ``b`` rows in ``series``, whether they exist, and whether they are identical."""
    sts = series["ts"]
    bts = b["ts"]
    pos = np.searchsorted(sts, bts)
    n = sts.shape[0]
    exist = np.zeros(bts.shape[0], dtype=bool)
    if n:
        exist = (pos < n) & (sts[np.minimum(pos, n - 1)] == bts)
    same = np.zeros(bts.shape[0], dtype=bool)
    same[exist] = _raw(series)[pos[exist]] == _raw(b)[exist]
    return pos, exist, same


def _merge_sorted(series: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, int, int, int]:
    n, k = series.shape[0], b.shape[0]
    if n == 0:
        return b, k, 0, 0
    if k == 0:
        return series, 0, 0, 0
    if b["ts"][0] > series["ts"][-1]:
        out = np.empty(n + k, CANDLE_RAW)
        out[:n] = _raw(series)
        out[n:] = _raw(b)
        return out.view(CANDLE_DTYPE), k, 0, 0
    pos, exist, same = _classify(series, b)
    n_exist = int(exist.sum())
    unchanged = int(same.sum())
    new = ~exist
    inserted = k - n_exist
    out = np.empty(n + inserted, CANDLE_RAW)
    new_ts = b["ts"][new]
    # Each series row shifts right by the number of new rows before it.
    s_out = np.arange(n) + np.searchsorted(new_ts, series["ts"])
    out[s_out] = _raw(series)
    out[s_out[pos[exist]]] = _raw(b)[exist]
    out[pos[new] + np.arange(inserted)] = _raw(b)[new]
    return out.view(CANDLE_DTYPE), inserted, n_exist - unchanged, unchanged


def merge(series: np.ndarray, batch: np.ndarray) -> tuple[np.ndarray, int, int, int]:
    """Merge a batch of candles into a sorted, unique series.

    Parameters
    ----------
    series : ndarray of CANDLE_DTYPE
        Sorted by ``ts``, unique.
    batch : ndarray of CANDLE_DTYPE
        Any order; duplicate ``ts`` allowed, the last occurrence wins.

    Returns
    -------
    merged : ndarray
        A new sorted unique array (shares no memory with the inputs).
    inserted, updated, unchanged : int
        Batch rows (after dedup) with a new ``ts``; with an existing ``ts`` and different bytes;
        byte-identical to the existing row.
    """
    s = _candles(series, "series")
    b = _candles(batch, "batch")
    if not _is_strict(b["ts"]):
        b = sort_dedup(b)
    merged, ins, upd, unch = _merge_sorted(s, b)
    if merged is s or merged is b:
        merged = _raw(merged).copy().view(CANDLE_DTYPE)
    return merged, ins, upd, unch


def merge_into(buf: np.ndarray, n: int, batch: np.ndarray) -> tuple[int, int, int, int]:
    """Merge a batch into the first ``n`` rows of ``buf`` in place (the append fast path).

    ``buf[:n]`` is a sorted unique series and ``buf[n:]`` spare room. Appending after the last
    row costs O(batch); an insert in the middle moves only the rows after it.

    Parameters
    ----------
    buf : ndarray of CANDLE_DTYPE
        C-contiguous and writeable.
    n : int
        Rows in use, ``0 <= n <= len(buf)``.
    batch : ndarray of CANDLE_DTYPE
        Any order, duplicates allowed (last wins).

    Returns
    -------
    n_new, inserted, updated, unchanged : int
        Rows in use afterwards and the counts as in :func:`merge`.

    Raises
    ------
    InvalidRequestError
        When ``buf`` is not a writeable C-contiguous CANDLE_DTYPE array, ``n`` is out of range,
        or the spare room is too small (then ``buf`` is left unchanged).
    """
    if not isinstance(buf, np.ndarray) or buf.dtype != CANDLE_DTYPE or buf.ndim != 1:
        raise InvalidRequestError("buf must be a 1-D CANDLE_DTYPE array")
    if not (buf.flags.c_contiguous and buf.flags.writeable):
        raise InvalidRequestError("buf must be C-contiguous and writeable")
    n = int(n)
    if n < 0 or n > buf.shape[0]:
        raise InvalidRequestError(f"n={n} outside 0..{buf.shape[0]}")
    b = _candles(batch, "batch")
    if not _is_strict(b["ts"]):
        b = sort_dedup(b)
    k = b.shape[0]
    raw = _raw(buf)
    if k == 0:
        return n, 0, 0, 0
    if n == 0 or b["ts"][0] > buf["ts"][n - 1]:
        if n + k > buf.shape[0]:
            raise InvalidRequestError(f"merge_into needs {n + k} rows, buf holds {buf.shape[0]}")
        raw[n : n + k] = _raw(b)
        return n + k, k, 0, 0
    series = buf[:n]
    pos, exist, same = _classify(series, b)
    n_exist = int(exist.sum())
    unchanged = int(same.sum())
    inserted = k - n_exist
    if n + inserted > buf.shape[0]:
        raise InvalidRequestError(f"merge_into needs {n + inserted} rows, buf holds {buf.shape[0]}")
    p = int(pos[~exist].min()) if inserted else n
    head = exist & (pos < p)
    raw[pos[head]] = _raw(b)[head]
    if inserted:
        tail, _, _, _ = _merge_sorted(buf[p:n].copy(), b[pos >= p])
        raw[p : n + inserted] = _raw(tail)
    return n + inserted, inserted, n_exist - unchanged, unchanged


# --------------------------------------------------------------------------------------------
# gaps
# --------------------------------------------------------------------------------------------
def find_gaps(
    ts: np.ndarray,
    interval_ms: int,
    origin_ms: int,
    is_month: bool,
    start: int,
    end: int,
) -> np.ndarray:
    """Missing aligned slots in ``[start, end)``, coalesced into half-open ranges.

    Parameters
    ----------
    ts : ndarray of int64
        Sorted ascending (duplicates and misaligned values are ignored); may be a strided
        field view such as ``candles["ts"]``.
    interval_ms, origin_ms, is_month
        The timeframe grid.
    start, end : int
        The range; ``start`` is rounded up to the grid.

    Returns
    -------
    ndarray of int64, shape (k, 2)
        ``(gap_start, gap_end)`` rows, ascending. Each gap start is an aligned slot; a gap ends
        at the next present slot, or at ``end`` for the last one (so ``gap_end <= end``).
    """
    interval_ms, origin_ms, is_month = _grid(interval_ms, origin_ms, is_month)
    t = np.asarray(ts)
    if t.dtype != np.int64 or t.ndim != 1:
        raise InvalidRequestError(f"ts must be a 1-D int64 array, got {t.dtype} {t.shape}")
    start, end = int(start), int(end)
    c = _ceil_slot(start, interval_ms, origin_ms, is_month)
    if c >= end:
        return _EMPTY_RANGES.copy()
    t = t[np.searchsorted(t, c) : np.searchsorted(t, end)]
    if is_month:
        days = t // DAY_MS
        y, m, d = _civil_from_days_vec(days)
        aligned = (t % DAY_MS == 0) & (d == 1)
        c_mi = _month_index(c)
        k = ((y - 1970) * 12 + (m - 1) - c_mi)[aligned].astype(np.uint64)
        n_slots = _month_index(end - 1) - c_mi + 1
    else:
        d64 = t.view(np.uint64) - np.uint64(c % 2**64)
        aligned = d64 % np.uint64(interval_ms) == 0
        k = d64[aligned] // np.uint64(interval_ms)
        n_slots = (end - 1 - c) // interval_ms + 1
    if k.shape[0] > 1:
        k = k[np.concatenate(([True], k[1:] != k[:-1]))]
    lo = np.concatenate((np.zeros(1, np.uint64), k + np.uint64(1)))
    hi = np.concatenate((k, np.array([n_slots], np.uint64)))
    g = np.flatnonzero(hi > lo)
    if g.shape[0] == 0:
        return _EMPTY_RANGES.copy()
    out = np.empty((g.shape[0], 2), np.int64)
    glo, ghi = lo[g], hi[g]
    last = g[-1] == k.shape[0]
    if is_month:
        out[:, 0] = [_month_start(c_mi + int(i)) for i in glo]
        out[:, 1] = [_month_start(c_mi + int(i)) for i in ghi]
    else:
        base = np.uint64(c % 2**64)
        out[:, 0] = (base + glo * np.uint64(interval_ms)).view(np.int64)
        out[:, 1] = (base + ghi * np.uint64(interval_ms)).view(np.int64)
    if last:
        out[-1, 1] = end
    return out


# --------------------------------------------------------------------------------------------
# interval sets
# --------------------------------------------------------------------------------------------
def interval_normalize(a: Any) -> np.ndarray:
    """Sort ranges, merge overlapping and adjacent ones, drop empty ones.

    Parameters
    ----------
    a : array-like of int64, shape (k, 2)
        Half-open ``(start, end)`` ranges, any order.

    Returns
    -------
    ndarray of int64, shape (m, 2)
        A new array of disjoint, non-adjacent, non-empty ranges in ascending order.
    """
    r = _ranges(a)
    r = r[r[:, 1] > r[:, 0]]
    if r.shape[0] == 0:
        return _EMPTY_RANGES.copy()
    r = r[np.lexsort((r[:, 1], r[:, 0]))]
    out: list[tuple[int, int]] = []
    cs, ce = int(r[0, 0]), int(r[0, 1])
    for s, e in r[1:].tolist():
        if s <= ce:
            ce = max(ce, e)
        else:
            out.append((cs, ce))
            cs, ce = s, e
    out.append((cs, ce))
    return np.array(out, dtype=np.int64).reshape(-1, 2)


def interval_union(a: Any, b: Any) -> np.ndarray:
    """Union of two range sets, normalised (see :func:`interval_normalize`)."""
    return interval_normalize(np.concatenate((_ranges(a, "a"), _ranges(b, "b"))))


def interval_subtract(a: Any, b: Any) -> np.ndarray:
    """The parts of range set ``a`` not covered by ``b``, normalised."""
    na, nb = interval_normalize(a).tolist(), interval_normalize(b).tolist()
    out: list[tuple[int, int]] = []
    j = 0
    for s, e in na:
        while j < len(nb) and nb[j][1] <= s:
            j += 1
        cur = s
        i = j
        while i < len(nb) and nb[i][0] < e:
            if nb[i][0] > cur:
                out.append((cur, nb[i][0]))
            cur = max(cur, nb[i][1])
            i += 1
        if cur < e:
            out.append((cur, e))
    return np.array(out, dtype=np.int64).reshape(-1, 2)


def interval_contains(a: Any, start: int, end: int) -> bool:
    """Whether ``[start, end)`` lies inside the union of ranges ``a`` (an empty range always does)."""
    start, end = int(start), int(end)
    if end <= start:
        return True
    r = interval_normalize(a)
    i = int(np.searchsorted(r[:, 0], start, side="right")) - 1
    return i >= 0 and int(r[i, 1]) >= end


def label_gaps(holes: Any, cov: Any, cls: Callable[..., _T]) -> list[_T]:
    """``holes`` cut at the edges of ``cov``, as ``cls(start, end, kind)`` in ascending order.

    Parameters
    ----------
    holes, cov : int64 ranges, shape (k, 2)
        Range sets (normalised here): the runs of absent candles and the covered ranges.
    cls : callable
        Called as ``cls(start, end, kind)`` for each piece (:class:`mds.Gap`).

    Returns
    -------
    list
        Pieces of ``holes`` inside ``cov`` with kind ``"no_trades"``, the rest ``"missing"``,
        ordered by start; their union is ``holes``.
    """
    h = interval_normalize(holes)
    outside = interval_subtract(h, cov)
    inside = interval_subtract(h, outside)
    runs = np.concatenate((inside, outside))
    kinds = ["no_trades"] * len(inside) + ["missing"] * len(outside)
    order = np.argsort(runs[:, 0], kind="stable").tolist()
    rows = runs.tolist()
    return [cls(rows[i][0], rows[i][1], kinds[i]) for i in order]


# --------------------------------------------------------------------------------------------
# SeriesBuffer
# --------------------------------------------------------------------------------------------
def _spare(k: int) -> int:
    return max(k // 4, 4)


class SeriesBuffer:
    """The newest ``capacity`` candles of one series, handing out read-only views.

    Rows live in an array with a little spare room at its end (a quarter of the rows held,
    at least 4): appends fill the spare room; when it runs out, the newest rows move to a fresh
    array and the old one lives on as long as views of it do. Views returned by
    :meth:`latest` and :meth:`range` are never written again: a correction of a row that a
    live view may hold first moves the rows to a fresh array (copy on write). So
    ``nbytes <= 70 * len(self)`` once 16 or more rows are held.

    Parameters
    ----------
    capacity : int
        Most rows kept (> 0); older rows fall out of the window.
    """

    def __init__(self, capacity: int) -> None:
        capacity = int(capacity)
        if capacity <= 0:
            raise InvalidRequestError(f"capacity must be positive, got {capacity}")
        self.capacity = capacity
        self._alloc(0)

    # -- storage ---------------------------------------------------------------------------
    def _alloc(self, rows: int) -> None:
        buf = np.zeros(rows + (_spare(rows) if rows else 0), dtype=CANDLE_DTYPE)
        self._w = buf.view(CANDLE_RAW)  # stays writeable: our only write path
        buf.flags.writeable = False
        self._buf = buf
        self._ro = buf[:]
        self._lo = 0
        self._hi = 0
        self._exported_hi = 0
        del buf
        self._refs = sys.getrefcount(self._buf)

    def _views_alive(self) -> bool:
        return sys.getrefcount(self._buf) > self._refs

    def _replace(self, rows: np.ndarray) -> None:
        """Move ``rows`` (raw, sorted unique, at most capacity) into a fresh array."""
        k = rows.shape[0]
        self._alloc(k)
        self._w[:k] = rows
        self._hi = k

    def _live(self) -> np.ndarray:
        return self._buf[self._lo : self._hi]

    # -- public -------------------------------------------------------------------------------
    def write(self, batch: np.ndarray) -> tuple[int, int, int]:
        """Merge a batch into the window.

        Parameters
        ----------
        batch : ndarray of CANDLE_DTYPE
            Sorted by ``ts`` and unique (any other order is sorted first, last duplicate wins).

        Returns
        -------
        inserted, updated, unchanged : int
            Counts as :func:`merge` of the current rows with ``batch``; afterwards only the newest
            ``capacity`` rows are kept, so inserted rows older than the window are dropped.
        """
        b = _candles(batch, "batch")
        if not _is_strict(b["ts"]):
            b = sort_dedup(b)
        k = b.shape[0]
        if k == 0:
            return 0, 0, 0
        cap = self.capacity
        count = self._hi - self._lo
        if count == 0 or b["ts"][0] > self._buf["ts"][self._hi - 1]:
            if k >= cap:
                self._replace(_raw(b)[k - cap :])
            elif self._hi + k <= self._buf.shape[0]:
                self._w[self._hi : self._hi + k] = _raw(b)
                self._hi += k
                self._lo = max(self._lo, self._hi - cap)
            else:
                keep = min(count, cap - k)
                rows = np.empty(keep + k, CANDLE_RAW)
                rows[:keep] = self._w[self._hi - keep : self._hi]
                rows[keep:] = _raw(b)
                self._replace(rows)
            return k, 0, 0
        live = self._live()
        pos, exist, same = _classify(live, b)
        n_exist = int(exist.sum())
        unchanged = int(same.sum())
        inserted = k - n_exist
        updated = n_exist - unchanged
        if inserted == 0:
            if updated:
                changed = exist & ~same
                first = self._lo + int(pos[changed].min())
                del live  # a local view would count as a live one
                if first < self._exported_hi and self._views_alive():
                    rows = self._w[self._lo : self._hi].copy()
                    rows[pos[changed]] = _raw(b)[changed]
                    self._replace(rows)
                else:
                    self._w[self._lo + pos[changed]] = _raw(b)[changed]
            return 0, updated, unchanged
        merged, _, _, _ = _merge_sorted(live, b)
        self._replace(_raw(merged)[max(0, merged.shape[0] - cap) :].copy())
        return inserted, updated, unchanged

    def latest(self, n: int) -> np.ndarray:
        """The newest ``n`` rows (all when fewer are held) as a read-only view, no copy.

        The view never changes afterwards, whatever is written later.
        """
        n = max(0, min(int(n), self._hi - self._lo))
        self._exported_hi = max(self._exported_hi, self._hi)
        return self._ro[self._hi - n : self._hi]

    def range(self, start: int, end: int) -> np.ndarray:
        """Rows with ``start <= ts < end`` as a read-only view, no copy (never changes afterwards)."""
        ts = self._buf["ts"][self._lo : self._hi]
        a = self._lo + int(np.searchsorted(ts, int(start)))
        b = self._lo + int(np.searchsorted(ts, int(end)))
        b = max(a, b)
        self._exported_hi = max(self._exported_hi, b)
        return self._ro[a:b]

    def __len__(self) -> int:
        return self._hi - self._lo

    @property
    def first_ts(self) -> int | None:
        """``ts`` of the oldest row held, None when empty."""
        return int(self._buf["ts"][self._lo]) if self._hi > self._lo else None

    @property
    def last_ts(self) -> int | None:
        """``ts`` of the newest row held, None when empty."""
        return int(self._buf["ts"][self._hi - 1]) if self._hi > self._lo else None

    @property
    def nbytes(self) -> int:
        """Bytes of the array currently allocated (older arrays kept alive by views excluded)."""
        return int(self._buf.nbytes)

    def clear(self) -> None:
        """Drop every row and the array (views already handed out stay valid)."""
        self._alloc(0)


# --------------------------------------------------------------------------------------------
# chunk codec 2
# --------------------------------------------------------------------------------------------
def undelta_rows(rows: np.ndarray) -> int:
    """Undo codec 2's delta in place and return the rows' checksum: each row of the
    C-contiguous int64 array ``rows`` of shape ``(n, 7)`` (candle rows as 8-byte words) becomes
    the wrapping sum of itself and every row above it (a cumulative sum down each column), and
    the result is the weighted sum of its 4-byte half-words that ``mds._checksum.row_checksum``
    computes. The sum runs along contiguous columns: numpy sums down a row-major array's columns
    a row at a time, which costs more than the two transposes."""
    if not isinstance(rows, np.ndarray) or rows.dtype != np.int64 or rows.ndim != 2 or rows.shape[1] != 7:
        raise TypeError("rows must be an int64 array of shape (n, 7)")
    if not rows.flags.c_contiguous or not rows.flags.writeable:
        raise ValueError("rows must be C-contiguous and writeable")
    rows = rows.view(np.ndarray)  # a subclass (np.matrix) summed as its buffer, as the compiled kernel does
    cols = rows.T.copy()
    np.cumsum(cols, axis=1, out=cols)
    rows[...] = cols.T
    halves = rows.reshape(-1).view(np.uint32).astype(np.uint64)
    return int(np.dot(halves, np.arange(3, 3 + 2 * len(halves), 2, dtype=np.uint64)))


_ROW_HALVES = struct.Struct(f"<{CANDLE_DTYPE.itemsize // 4}I")
_ROW_HALF_WEIGHTS = list(range(3, 3 + 2 * (CANDLE_DTYPE.itemsize // 4), 2))


def ts_bounds(candles: np.ndarray) -> tuple[int, int] | None:
    """``(first ts, last ts)`` of a CANDLE_DTYPE array (its first and last rows: the bounds of a
    sorted batch), None when it is empty. InvalidRequestError for anything but a 1-D
    CANDLE_DTYPE array."""
    arr = _candles(candles)
    if not len(arr):
        return None
    ts = arr["ts"]
    return int(ts[0]), int(ts[-1])


def row_checksum(buf: Any, offset: int, n: int) -> int:
    """The checksum of ``n`` candle rows starting at byte ``offset`` of ``buf`` (any object with a
    contiguous buffer): the sum of their 4-byte half-words, the j-th weighted by ``2j + 3``,
    modulo 2**64 (see ``mds._checksum.row_checksum``). ValueError when ``buf`` is too short or
    ``offset``/``n`` is negative."""
    if offset < 0 or n < 0:
        raise ValueError(f"offset and n must be >= 0, got {offset} and {n}")
    if n == 1:  # the live edge's one-candle write: struct is several times cheaper than ufuncs here
        try:
            halves = _ROW_HALVES.unpack_from(buf, offset)
        except struct.error as exc:
            raise ValueError(str(exc)) from None
        return sum(w * h for w, h in zip(_ROW_HALF_WEIGHTS, halves)) % 2**64
    m = n * (CANDLE_DTYPE.itemsize // 4)
    if memoryview(buf).nbytes - offset < 4 * m:
        raise ValueError(f"{n} rows from byte {offset} do not fit the buffer")
    if n == 0:
        return 0
    arr = np.frombuffer(buf, dtype="<u4", count=m, offset=offset).astype(np.uint64)
    return int(np.dot(arr, np.arange(3, 3 + 2 * m, 2, dtype=np.uint64)))


# --------------------------------------------------------------------------------------------
# chunk walk (the LMDB disk tier's read loop)
# --------------------------------------------------------------------------------------------
#: Longest key the disk tier writes (symbol, timeframe, separators, 8-byte period). A longer key
#: is refused before its bytes are compared: a damaged node can claim a size reaching past the map.
CHUNK_KEY_MAX = 64
_ROW = CANDLE_DTYPE.itemsize
_ts_at = struct.Struct("<q").unpack_from  # (buffer, offset) -> (ts,)
_KEY = struct.Struct(">Q")
_OFFSET = 1 << 63


class ChunkCorrupt(Exception):
    """A chunk key or value that the disk tier cannot have written."""


def _search(val: Any, h: int, n: int, first: int, t: int, step: int) -> int:
    """Index of the first row with ``ts >= t`` in a chunk whose rows start at byte ``h`` and whose
    first row has ``ts == first < t <= ts`` of its last row (``searchsorted``, side left).

    Inside a chunk without gaps the index follows from ``first`` and the interval ``step``; it
    is proven by its two neighbours. Only a gap before ``t`` (or ``step == 0``, calendar
    months) builds a numpy view to search.
    """
    if step:  # the answer lies in [1, n - 1]
        i = -((first - t) // step)  # ceil((t - first) / step)
        if 0 < i < n and _ts_at(val, h + i * _ROW)[0] >= t > _ts_at(val, h + (i - 1) * _ROW)[0]:
            return i
    ts = np.ndarray((n,), dtype="<i8", buffer=val, offset=h, strides=(_ROW,))
    return int(ts.searchsorted(t))


def _bounds(val: Any, h: int, n: int, start: int, end: int, step: int) -> tuple[int, int]:
    """Rows ``[i0, i1)`` of a chunk with ``start <= ts < end``."""
    first = _ts_at(val, h)[0]
    last = _ts_at(val, h + (n - 1) * _ROW)[0]
    i0 = 0 if start <= first else n if start > last else _search(val, h, n, first, start, step)
    i1 = 0 if end <= first else n if end > last else _search(val, h, n, first, end, step)
    return i0, i1


def walk_chunks(
    cur: Any,
    prefix: bytes,
    period: int,
    start: int,
    end: int,
    limit: int,
    step: int,
    stale_before: int,
    memo: dict[bytes, tuple[bytes, int, int, int]],
    view: Callable[[Any, bytes, dict[bytes, tuple[bytes, int, int, int]]], tuple[int, int, int]],
) -> np.ndarray | list[int] | None:
    """Read the rows with ``start <= ts < end`` of one series from its chunks.

    ``cur`` is an LMDB cursor (or anything with ``set_range item key value next prev last``) over
    keys ``prefix + period start`` (8 bytes, big-endian, offset by 2**63 so byte order is time
    order; periods are multiples of ``period`` ms) whose values are ``header + raw CANDLE_DTYPE
    rows``. ``limit < 0`` walks forward from the period holding ``start`` to the one holding
    ``end - 1`` and takes every row of the range; ``limit >= 0`` walks backward from the period
    holding ``end - 1`` and takes the latest ``limit`` rows of the range. ``view(value, key,
    memo)`` returns ``(header length, rows, written_at)`` of a value it checked and records it
    in ``memo`` (``key -> (header bytes, header length, rows, written_at)``); a value whose size
    and header bytes equal its memo entry is not passed to ``view`` again. ``step`` is the
    interval between rows (0 for calendar months): inside a chunk without gaps a row's index
    follows from it.

    Returns a new read-only CANDLE_DTYPE array; or the period starts of the chunks written
    before ``stale_before`` when there are any (their rows are not read); or None when walking
    backward found fewer than ``limit`` rows. Raises :class:`ChunkCorrupt` for a key in the
    series' range that is not a chunk key, ValueError unless ``period > 0`` and
    ``-2**62 <= start < end <= 2**62``, and whatever ``view`` raises.
    """
    if period <= 0 or not -(1 << 62) <= start < end <= 1 << 62:
        raise ValueError("walk_chunks: period must be positive and start < end within +-2**62")
    back = limit >= 0
    klen = len(prefix) + 8
    lo_key = prefix + _KEY.pack(start - start % period + _OFFSET)
    hi_key = prefix + _KEY.pack(end - 1 - (end - 1) % period + _OFFSET)
    parts: list[Any] = []
    stale: list[int] = []
    got = 0
    if not back:
        ok = cur.set_range(lo_key)
    elif cur.set_range(hi_key):
        k = cur.key()
        ok = (len(k) <= CHUNK_KEY_MAX and bytes(k) == hi_key) or cur.prev()
    else:
        ok = cur.last()
    while ok:
        key = cur.key()
        if len(key) > CHUNK_KEY_MAX:
            raise ChunkCorrupt("key longer than any key the disk tier writes")
        key = bytes(key)
        if (key < lo_key) if back else (key > hi_key):
            break
        if len(key) != klen:
            raise ChunkCorrupt("key in a series' range that is not a chunk key")
        val = cur.value()
        seen = memo.get(key)
        if seen is not None and len(val) == seen[1] + seen[2] * _ROW and val[: seen[1]] == seen[0]:
            _, hl, n, written = seen
        else:
            hl, n, written = view(val, key, memo)
            if n <= 0 or hl < 0 or len(val) != hl + n * _ROW:
                raise ChunkCorrupt("chunk view does not match the value's size")
        if written < stale_before:
            stale.append(_KEY.unpack_from(key, klen - 8)[0] - _OFFSET)
        elif not stale:
            i0, i1 = _bounds(val, hl, n, start, end, step)
            if back:
                i0 = max(i0, i1 - (limit - got))
            if i1 > i0:
                parts.append(val[hl + i0 * _ROW : hl + i1 * _ROW])
                got += i1 - i0
            if back and got >= limit:
                break
        if back:
            ok = cur.prev()
        else:
            ok = key != hi_key and cur.next()
    if stale:
        return stale
    if back:
        if got < limit:
            return None
        parts.reverse()
    if not parts:
        out = np.empty(0, CANDLE_DTYPE)
        out.flags.writeable = False
        return out
    # One copy out of the map (before the transaction ends); the array views the immutable
    # bytes, so it is read-only (CPython places a bytes payload 16-byte aligned).
    return np.frombuffer(b"".join(parts), dtype=CANDLE_DTYPE)


def file_state(fd: int) -> tuple[int, int]:
    """``(link count, size in bytes)`` of an open file: the disk tier's per-read check that its
    mapped file was neither deleted nor truncated. Raises OSError like ``os.fstat``."""
    st = os.fstat(fd)
    return st.st_nlink, st.st_size


# --------------------------------------------------------------------------------------------
# LRU
# --------------------------------------------------------------------------------------------
class LRU:
    """Recency order over integer keys: O(1) touch, remove and pop-oldest."""

    def __init__(self) -> None:
        self._d: OrderedDict[int, None] = OrderedDict()

    def touch(self, key: int) -> None:
        """Mark ``key`` as most recently used (adding it when absent)."""
        key = int(key)
        d = self._d
        if key in d:
            d.move_to_end(key)
        else:
            d[key] = None

    def remove(self, key: int) -> None:
        """Forget ``key``; a missing key is ignored."""
        self._d.pop(int(key), None)

    def pop_oldest(self) -> int:
        """Remove and return the least recently used key.

        Raises
        ------
        KeyError
            When empty.
        """
        if not self._d:
            raise KeyError("pop_oldest from an empty LRU")
        return self._d.popitem(last=False)[0]

    def oldest(self) -> int | None:
        """The least recently used key, None when empty."""
        return next(iter(self._d), None)

    def __len__(self) -> int:
        return len(self._d)

    def __contains__(self, key: object) -> bool:
        return key in self._d


# --------------------------------------------------------------------------------------------
# Latency ring
# --------------------------------------------------------------------------------------------
class LatencyRing:
    """The latest ``size`` latency samples (ms), for percentiles, and the count of all added."""

    def __init__(self, size: int = 4096) -> None:
        if size <= 0:
            raise InvalidRequestError(f"size must be positive, got {size}")
        try:
            self._buf = np.zeros(size, np.float64)
        except ValueError:  # more bytes than an array can address: as the compiled ring says
            raise MemoryError(f"a latency ring of {size} samples") from None
        self.size = int(size)
        self.count = 0

    def add(self, ms: float) -> None:
        """Add one sample."""
        self._buf[self.count % self.size] = ms
        self.count += 1

    def add_since(self, t0: float, other: LatencyRing | None = None) -> None:
        """Add ``(time.perf_counter() - t0) * 1000`` to this ring and to ``other``."""
        ms = (time.perf_counter() - t0) * 1000.0
        self.add(ms)
        if other is not None:
            other.add(ms)

    def samples(self) -> np.ndarray:
        """The samples held (the latest ``size``; in ring order, not time order), a new array."""
        return self._buf[: min(self.count, self.size)].copy()


class HitMeter:
    """Counts one kind of read and adds each one's latency to two rings, in one call."""

    def __init__(self, a: LatencyRing, b: LatencyRing) -> None:
        self._a = a
        self._b = b
        self.count = 0

    def hit(self, t0: float) -> None:
        """One read that began at ``t0`` (``time.perf_counter()``) and ends now."""
        ms = (time.perf_counter() - t0) * 1000.0
        self.count += 1
        self._a.add(ms)
        self._b.add(ms)
