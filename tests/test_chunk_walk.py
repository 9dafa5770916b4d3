"""The disk tier's read loop ``walk_chunks`` and ``file_state``: compiled == twin == reference.

``walk_chunks`` reads a series' rows out of LMDB chunk values. Hypothesis builds a series (rows on
a grid with gaps, or irregular rows like calendar months), cuts it into chunks by period, marks
some chunks stale, adds keys of neighbouring series, and asks ranges and latest-``n`` reads of
both implementations through a cursor over those keys; the twin is held to a plain reference
(filter the rows, take the last ``n``). Named examples run the kernel on a real LMDB cursor and
check the refusals (a key that is not a chunk key, a view that does not fit its value).
"""

from __future__ import annotations

import bisect
import os
import struct
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from mds import _pycore as P
from mds._dtypes import CANDLE_DTYPE
from mds.testing import dense_candles, kernel_params
from mds.tiers._lmdb_format import _chunk_view, _pack_chunk
from mds.timeframes import DAY_MS, MINUTE_MS

try:
    from mds import _core as C
except ImportError:  # pragma: no cover - CI always builds the core
    C = None  # type: ignore[assignment]

IMPLS = kernel_params()
needs_core = pytest.mark.skipif(C is None, reason="compiled core mds._core not built")
_KEY = struct.Struct(">Q")
_OFFSET = 1 << 63
PREFIX = b"KRW-BTC\x1f1m\x1f"
# Neighbours: a shorter series name and a longer one sort before and after PREFIX's keys.
NEIGHBOURS = (b"KRW-BT\x1f1m\x1f", b"KRW-BTC\x1f1m\x1fz", b"KRW-BTCX\x1f1m\x1f")


class ListCursor:
    """An LMDB cursor's read methods over a sorted list of ``(key, value)`` pairs."""

    def __init__(self, items: list[tuple[bytes, bytes]]) -> None:
        self.items = sorted(items)
        self.keys = [k for k, _ in self.items]
        self.i = len(self.items)

    def _at(self, i: int) -> bool:
        self.i = i if 0 <= i < len(self.items) else len(self.items)
        return self.i < len(self.items)

    def set_range(self, key: bytes) -> bool:
        return self._at(bisect.bisect_left(self.keys, key))

    def last(self) -> bool:
        return self._at(len(self.items) - 1)

    def next(self) -> bool:
        return self._at(self.i + 1)

    def prev(self) -> bool:
        return self._at(self.i - 1) if self.i < len(self.items) else False

    def key(self) -> bytes:
        return self.items[self.i][0] if self.i < len(self.items) else b""

    def value(self) -> bytes:
        return self.items[self.i][1] if self.i < len(self.items) else b""

    def item(self) -> tuple[bytes, bytes]:
        return self.key(), self.value()


def chunk_items(
    rows: np.ndarray, period: int, written: dict[int, int], prefix: bytes = PREFIX
) -> list[tuple[bytes, bytes]]:
    """The tier's chunk entries of ``rows``: one value per period holding rows."""
    out = []
    p_of = rows["ts"] - rows["ts"] % period
    for p in np.unique(p_of).tolist():
        val, _ = _pack_chunk(rows[p_of == p], written.get(p, 10**12))
        out.append((prefix + _KEY.pack(p + _OFFSET), val))
    return out


def reference(
    rows: np.ndarray, period: int, written: dict[int, int], start: int, end: int, limit: int, stale_before: int
) -> Any:
    """What walk_chunks must answer, from the rows and the chunk ages alone."""
    lo, hi = start - start % period, (end - 1) - (end - 1) % period
    p_of = rows["ts"] - rows["ts"] % period
    periods = [p for p in np.unique(p_of).tolist() if lo <= p <= hi]
    old = {p for p in periods if written.get(p, 10**12) < stale_before}

    def pick(p: int) -> np.ndarray:
        r = rows[p_of == p]
        return r[(r["ts"] >= start) & (r["ts"] < end)]

    if limit < 0:
        if old:
            return [p for p in periods if p in old]
        return np.concatenate([pick(p) for p in periods]) if periods else np.empty(0, CANDLE_DTYPE)
    got: list[np.ndarray] = []
    n = 0
    stale: list[int] = []
    for p in reversed(periods):
        if p in old:
            stale.append(p)
            continue
        if stale:
            continue
        r = pick(p)[max(0, len(pick(p)) - (limit - n)) :]
        got.insert(0, r)
        n += len(r)
        if n >= limit:
            break
    if stale:
        return stale
    if n < limit:
        return None
    return np.concatenate(got) if got else np.empty(0, CANDLE_DTYPE)


def same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (
            isinstance(a, np.ndarray)
            and isinstance(b, np.ndarray)
            and a.dtype == b.dtype == CANDLE_DTYPE
            and a.tobytes() == b.tobytes()
        )
    return a == b


@st.composite
def walks(draw: Any) -> tuple[Any, ...]:
    month_like = draw(st.booleans())
    step = 0 if month_like else MINUTE_MS
    n = draw(st.one_of(st.integers(0, 4), st.integers(40, 2500)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    base = 1_750_000_000_000 - 1_750_000_000_000 % DAY_MS + draw(st.integers(-3, 3)) * DAY_MS
    if month_like:  # irregular spacing: a row's index cannot follow from a step
        ts = base + np.cumsum(rng.integers(1, 5_000, n)) * MINUTE_MS
    else:  # a 1m grid, some slots without trades
        slots = np.arange(2 * n + 1, dtype=np.int64)
        ts = base + np.sort(rng.choice(slots, n, replace=False)) * MINUTE_MS if n else slots[:0]
        if draw(st.booleans()):
            ts = base + np.arange(n, dtype=np.int64) * MINUTE_MS  # no gaps at all
    rows = dense_candles(n, base, MINUTE_MS, seed=n)
    rows["ts"] = ts
    periods = [7 * MINUTE_MS, 60 * MINUTE_MS, DAY_MS] if step else [DAY_MS, 64 * DAY_MS]
    period = draw(st.sampled_from(periods))

    def instant() -> int:  # at, just before or after a row, between rows, or anywhere near
        if n and draw(st.integers(0, 3)):
            return int(ts[draw(st.integers(0, n - 1))]) + draw(st.sampled_from([0, 0, -1, 1, -MINUTE_MS // 2]))
        return base + draw(st.integers(-2 * period, 2 * period + (int(ts[-1] - base) if n else 0)))

    a, b = instant(), instant()
    start, end = min(a, b), max(a, b) + draw(st.sampled_from([0, 1]))
    if end <= start:
        end = start + 1
    limit = draw(st.one_of(st.just(-1), st.integers(0, n + 5)))
    p_all = np.unique(ts - ts % period).tolist() if n else []
    old = draw(st.lists(st.sampled_from(p_all), max_size=3)) if p_all and draw(st.integers(0, 4)) == 0 else []
    written = dict.fromkeys(old, 5)
    return rows, period, step, written, start, end, limit


def _run(impl: Any, items: list[tuple[bytes, bytes]], memo: dict[bytes, Any], rows_args: tuple[Any, ...]) -> Any:
    period, step, start, end, limit = rows_args
    return impl.walk_chunks(ListCursor(items), PREFIX, period, start, end, limit, step, 100, memo, _chunk_view)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(walks(), st.booleans())
def test_walk_twin_matches_reference_and_compiled(case: tuple[Any, ...], warm: bool) -> None:
    rows, period, step, written, start, end, limit = case
    items = chunk_items(rows, period, written)
    for other in NEIGHBOURS:  # other series' keys around this one's must never be read
        items += chunk_items(rows[:3], period, {}, other)
    expect = reference(rows, period, written, start, end, limit, 100)
    memo_t: dict[bytes, Any] = {}
    if warm:  # a second read meets the memo instead of the view
        _run(P, items, memo_t, (period, step, start, end, limit))
    got = _run(P, items, memo_t, (period, step, start, end, limit))
    assert same(got, expect)
    if isinstance(got, np.ndarray):
        assert not got.flags.writeable
    if C is not None:
        memo_c: dict[bytes, Any] = {}
        if warm:
            _run(C, items, memo_c, (period, step, start, end, limit))
        got_c = _run(C, items, memo_c, (period, step, start, end, limit))
        assert same(got_c, got)
        assert type(got_c) is type(got)
        if isinstance(got_c, np.ndarray):
            assert not got_c.flags.writeable and got_c.flags.c_contiguous
        assert memo_c == memo_t


@pytest.mark.parametrize("impl", IMPLS)
def test_walk_on_a_real_lmdb_cursor(impl: Any, tmp_path: Path) -> None:
    rows = dense_candles(3 * 1440, 1_750_032_000_000, MINUTE_MS, seed=4)
    with lmdb.open(str(tmp_path / "env"), map_size=64 << 20) as env:
        with env.begin(write=True) as txn:
            for k, v in chunk_items(rows, DAY_MS, {}):
                txn.put(k, v)
            for other in NEIGHBOURS:
                for k, v in chunk_items(rows[:10], DAY_MS, {}, other):
                    txn.put(k, v)
        start, end = int(rows["ts"][700]), int(rows["ts"][2700])
        memo: dict[bytes, Any] = {}
        with env.begin(buffers=True) as txn:
            got = impl.walk_chunks(txn.cursor(), PREFIX, DAY_MS, start, end, -1, MINUTE_MS, 100, memo, _chunk_view)
            latest = impl.walk_chunks(txn.cursor(), PREFIX, DAY_MS, start, end, 1500, MINUTE_MS, 100, memo, _chunk_view)
            short = impl.walk_chunks(txn.cursor(), PREFIX, DAY_MS, start, end, 2001, MINUTE_MS, 100, memo, _chunk_view)
        assert got.tobytes() == rows[700:2700].tobytes()
        assert latest.tobytes() == rows[1200:2700].tobytes()
        assert short is None  # only 2,000 rows lie in the range
        touched = {t - t % DAY_MS for t in rows["ts"][700:2700].tolist()}
        assert set(memo) == {PREFIX + _KEY.pack(p + _OFFSET) for p in touched}  # checked once, remembered


@pytest.mark.parametrize("impl", IMPLS)
def test_walk_refuses_a_foreign_key_inside_the_series_range(impl: Any) -> None:
    rows = dense_candles(2000, 1_750_032_000_000, MINUTE_MS, seed=5)  # two days, two chunks
    items = chunk_items(rows, DAY_MS, {})
    assert len(items) == 2
    k0 = items[0][0]
    items.append((k0 + b"\x00", items[0][1]))  # sorts right after the first chunk key
    start, end = int(rows["ts"][0]), int(rows["ts"][-1]) + MINUTE_MS
    with pytest.raises(P.ChunkCorrupt):
        impl.walk_chunks(ListCursor(items), PREFIX, DAY_MS, start, end, -1, MINUTE_MS, 100, {}, _chunk_view)
    items[-1] = (k0 + b"\x00" * 80, items[0][1])  # too long to be any key the tier writes
    with pytest.raises(P.ChunkCorrupt):
        impl.walk_chunks(ListCursor(items), PREFIX, DAY_MS, start, end, 2000, MINUTE_MS, 100, {}, _chunk_view)


@pytest.mark.parametrize("impl", IMPLS)
def test_walk_refuses_a_view_that_does_not_fit_the_value(impl: Any) -> None:
    rows = dense_candles(10, 1_750_032_000_000, MINUTE_MS, seed=6)
    items = chunk_items(rows, DAY_MS, {})
    start, end = int(rows["ts"][0]), int(rows["ts"][-1]) + 1

    def lying_view(val: Any, key: bytes, memo: dict[bytes, Any]) -> tuple[int, int, int]:
        h, n, w = _chunk_view(val, key, {})
        return h, n + 1, w  # one row more than the value holds

    with pytest.raises(P.ChunkCorrupt):
        impl.walk_chunks(ListCursor(items), PREFIX, DAY_MS, start, end, -1, MINUTE_MS, 100, {}, lying_view)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("period", "start", "end"), [(0, 0, 1), (DAY_MS, 5, 5), (DAY_MS, 0, 2**62 + 1)])
def test_walk_rejects_bad_arguments(impl: Any, period: int, start: int, end: int) -> None:
    with pytest.raises(ValueError):
        impl.walk_chunks(ListCursor([]), PREFIX, period, start, end, -1, MINUTE_MS, 100, {}, _chunk_view)


@needs_core
def test_file_state_compiled_equals_twin(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 12345)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert C.file_state(fd) == P.file_state(fd) == (1, 12345)
        os.truncate(path, 100)
        assert C.file_state(fd) == P.file_state(fd) == (1, 100)
        os.unlink(path)
        assert C.file_state(fd) == P.file_state(fd) == (0, 100)
    finally:
        os.close(fd)
    for impl in (C, P):
        with pytest.raises(OSError):
            impl.file_state(fd)  # closed
