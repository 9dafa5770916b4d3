"""Third hostile review of the shared history: the fixes of 8a2799d (reads off the store's lock
made again under it when the series' stamp moved, check() and maintain() off the lock, a new
connection forgetting the cached series ids) and the design they settle on.

Each test shows one defect and failed on the code it was written against (9090b47); all are
fixed: a read whose series was written while the lock was free starts over on the lock
(Moved), the reads check the cached series id in their first statement (StaleCatalog), panel
reads a series' candles and gaps in one hold of the lock, and the store's lock counts its holds
on Python 3.10 too (mds.store.health.counting).
"""

from __future__ import annotations

import contextlib
import threading
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
from pg_cluster import Cluster, fresh_database
from test_pg_review import MIN, NOW, SYM, T0, WAIT_S, _rows, _until
from test_pg_review2 import (
    HOUR,
    _server_only,
    test_check_on_a_hung_server_does_not_stall_memory_hits as _check_on_a_hung_server,
)

import mds
import mds.store
from mds import Config, StorageUnavailableError
from mds.testing import FakeUpbit, generate_market
from mds.tiers.postgres import PostgresTier


# ---------------------------------------------------------------------------- helpers
class _Paused:
    """A pooled reader whose first call of ``method`` returns its answer only after
    ``meanwhile`` ran (the store's lock is free then, as read_db leaves it)."""

    def __init__(self, inner: Any, state: dict[str, Any]) -> None:
        self._inner = inner
        self._state = state

    def __getattr__(self, name: str) -> Any:
        real = getattr(self._inner, name)
        st = self._state
        if name != st["method"]:
            return real

        def call(*a: Any, **kw: Any) -> Any:
            got = real(*a, **kw)
            if not st["done"].is_set():
                st["meanwhile"]()
                st["done"].set()
            return got

        return call


def _pause_once(monkeypatch: pytest.MonkeyPatch, store: mds.Store, method: str, meanwhile: Any) -> dict[str, Any]:
    """Run ``meanwhile`` (in another thread, waited for) inside the first off-lock ``method``."""
    tier = store._health.states["sqlite"].obj
    real = tier.off_lock
    state: dict[str, Any] = {"method": method, "done": threading.Event(), "error": []}

    def other_thread() -> None:
        def run() -> None:
            try:
                meanwhile()
            except BaseException as exc:  # reported by the test
                state["error"].append(exc)

        th = threading.Thread(target=run, daemon=True)
        th.start()
        th.join(WAIT_S)
        assert not th.is_alive(), "the other thread could not take the store's lock"

    state["meanwhile"] = other_thread

    def off_lock(writable: bool = False) -> Any:
        cm = real(writable)
        if cm is None:
            return None

        @contextlib.contextmanager
        def wrapped() -> Iterator[Any]:
            with cm as reader:
                yield None if reader is None else _Paused(reader, state)

        return wrapped()

    monkeypatch.setattr(tier, "off_lock", off_lock)
    return state


@contextlib.contextmanager
def _with_layer1(path: Path, url: str, rows: np.ndarray) -> Iterator[mds.Store]:
    """A store whose reads all ask the server (no memory, no LMDB), with a Layer 1 that has ``rows``."""
    with FakeUpbit({(SYM, "1m"): rows}, clock=lambda: NOW, rate_limit=None) as up:
        from mds.layer1 import UpbitRouter

        router = UpbitRouter(up.base_url, rate_limit=1000, backoff_s=0.01, max_backoff_s=0.05, clock=lambda: NOW)
        cfg = Config(lookup="storage_first", tiers=("sqlite",))
        with mds.open(path, config=cfg, clock=lambda: NOW, history=url, layer1=router) as store:
            yield store


# ---------------------------------------------------------------------------- coverage read before the rows
def test_latest_n_is_not_answered_with_older_candles_when_a_delete_comes_during_the_server_read(
    tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Coverage [T0, T0+100m) and 100 candles stored. Thread A asks the latest 10 before T0+100m:
    the covered tail T0 is taken under the lock, then the rows are read off it. Meanwhile another
    thread of the same store deletes [T0+50m, T0+100m): the stamp moved, so A reads again under
    the lock, gets candles 40..49, and _proves() accepts them against the tail taken before the
    delete. The answer: 10 candles ten to fifty minutes older than the latest, as the latest. Under
    the lock for the whole read (before 57fbe80) this could not happen in one process; the right
    answer is candles 90..99 (refetched from Layer 1) or a typed error."""
    rows = _rows()
    with _with_layer1(tmp_path / "b", pg_url, rows) as b:
        assert _until(lambda: b._health.feed_live)
        b.write_candles(SYM, "1m", rows, complete=(T0, T0 + 100 * MIN))
        state = _pause_once(
            monkeypatch, b, "read_latest", lambda: b.delete(SYM, "1m", start=T0 + 50 * MIN, end=T0 + 100 * MIN)
        )
        try:
            got = b.candles(SYM, "1m", count=10, end=T0 + 100 * MIN)
        except StorageUnavailableError:
            got = None  # a typed error is a fine answer
        assert state["done"].is_set() and not state["error"], state["error"]
        assert got is None or got.tobytes() == rows[-10:].tobytes(), (
            f"latest 10 answered as {[(int(t) - T0) // MIN for t in got['ts']]} (minutes after T0)"
        )


def test_a_range_is_not_answered_short_when_a_delete_comes_during_the_server_read(
    tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same cause for a range read (the case test_pg_review.py's first review fixed for another
    host's delete): the covered range is found whole, the read off the lock meets a delete of the
    second half by another thread, and the read made again under the lock returns 50 of the 100
    candles with nothing fetched: a missing half read as no trades."""
    rows = _rows()
    with _with_layer1(tmp_path / "b", pg_url, rows) as b:
        assert _until(lambda: b._health.feed_live)
        b.write_candles(SYM, "1m", rows, complete=(T0, T0 + 100 * MIN))
        state = _pause_once(
            monkeypatch, b, "read_range", lambda: b.delete(SYM, "1m", start=T0 + 50 * MIN, end=T0 + 100 * MIN)
        )
        try:
            got = b.candles(SYM, "1m", start=T0, end=T0 + 100 * MIN)
        except StorageUnavailableError:
            got = None
        assert state["done"].is_set() and not state["error"], state["error"]
        assert got is None or len(got) == 100, f"{len(got)} of 100 candles, nothing refetched"


# ---------------------------------------------------------------------------- cached series ids
def _drop_tables(url: str) -> None:
    """What a restore with ``pg_restore --clean`` (or an operator starting over) does to the tables
    while every host stays connected: the database, and so every connection, survives."""
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute("DROP TABLE mds_series, mds_chunk, mds_tail, mds_coverage, mds_meta, mds_acks CASCADE")


def test_tables_created_again_under_live_connections_do_not_answer_another_series_rows(
    tmp_path: Path, pg_cluster: Cluster
) -> None:
    """8a2799d fixed a database created again (its connections were cut: a new one forgets the
    ids). The tables created again in the same database leave B's connections open: another host
    opens it (creating the schema) and writes KRW-ETH first, which gets sid 1. B, still running,
    asks KRW-BTC (sid 1 in its cache, on its own connection and on its pooled reader's)."""
    btc = _rows(20)
    eth = generate_market("KRW-ETH", "1m", T0, T0 + 20 * MIN, liquidity="liquid", seed=77)
    with fresh_database(pg_cluster) as url, _server_only(tmp_path / "b", url) as b:
        b.write_candles(SYM, "1m", btc)
        assert b.candles(SYM, "1m", start=T0, end=T0 + 20 * MIN).tobytes() == btc.tobytes()
        _drop_tables(url)
        with PostgresTier(url, compress_after_days=None) as other:
            other.write("KRW-ETH", "1m", eth)
        try:
            got = b.candles(SYM, "1m", start=T0, end=T0 + 20 * MIN)
        except StorageUnavailableError:
            got = None  # a typed error is a fine answer
        assert got is None or not len(got), "B answers KRW-ETH's candles as KRW-BTC's"


# ---------------------------------------------------------------------------- panel
def test_panel_ffill_does_not_carry_a_close_over_candles_written_while_it_reads(
    tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1h candles h0, h1 stored with coverage [h0, h2). A backtest thread asks panel(..., [h0, h4),
    fill="ffill") while a feed thread stores h2, h3 with coverage [h2, h4). panel reads the
    candles (h0, h1: the lock is then free), the feed thread writes, panel reads the gaps (none
    missing now) and fills h2, h3 with h1's close as no-trade hours. Before the write the right
    values there are NaN (unknown); after it, h2's and h3's closes."""
    hours = generate_market(SYM, "1h", T0, T0 + 4 * HOUR, liquidity="liquid", seed=4)
    assert len(hours) == 4 and len({float(c) for c in hours["close"]}) == 4
    with _server_only(tmp_path / "b", pg_url) as b:
        b.write_candles(SYM, "1h", hours[:2], complete=(T0, T0 + 2 * HOUR))
        real = b.candles
        wrote = threading.Event()
        feed: list[threading.Thread] = []

        def candles(*a: Any, **kw: Any) -> np.ndarray:
            got = real(*a, **kw)
            if not wrote.is_set():  # the feed thread runs now, between panel's two reads
                th = threading.Thread(
                    target=b.write_candles,
                    args=(SYM, "1h", hours[2:]),
                    kwargs={"complete": (T0 + 2 * HOUR, T0 + 4 * HOUR)},
                )
                th.start()
                feed.append(th)
                th.join(1.0)  # (fixed: panel holds the store's lock over both reads; the write waits)
                wrote.set()
            return got

        monkeypatch.setattr(b, "candles", candles)
        _, values = b.panel([SYM], "1h", start=T0, end=T0 + 4 * HOUR, fill="ffill")
        assert wrote.is_set()
        feed[0].join(WAIT_S)
        col = values[:, 0]
        assert col[0] == float(hours["close"][0]) and col[1] == float(hours["close"][1])
        later = col[2:].tolist()
        assert later == [float(c) for c in hours["close"][2:]] or bool(np.isnan(col[2:]).all()), (
            f"h2, h3 = {later}: h1's close {float(hours['close'][1])} carried over hours never read"
        )


# ---------------------------------------------------------------------------- Python 3.10
class _RLock310:
    """``threading.RLock()`` as CPython 3.10 makes it (``requires-python = ">=3.10"``): the C
    lock has ``_is_owned``, ``_release_save`` and ``_acquire_restore``, but no
    ``_recursion_count`` (added in 3.11)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return self._lock.acquire(blocking, timeout)

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> bool:
        return self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()

    def _is_owned(self) -> bool:
        return bool(self._lock._is_owned())  # type: ignore[attr-defined]

    def _release_save(self) -> Any:
        return self._lock._release_save()  # type: ignore[attr-defined]

    def _acquire_restore(self, state: Any) -> None:
        self._lock._acquire_restore(state)  # type: ignore[attr-defined]


def test_on_python_3_10_check_on_a_hung_server_does_not_stall_memory_hits(
    tmp_path: Path, pg_url: str, stopped: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Second review's last finding, on the store lock CPython 3.10 gives: check() holds the
    store's lock for its whole unbounded integrity pass on a hung server, and a memory hit of
    another thread waits for it."""
    shim = types.SimpleNamespace(**{**vars(threading), "RLock": _RLock310})
    monkeypatch.setattr(mds.store, "threading", shim)
    _check_on_a_hung_server(tmp_path, pg_url, stopped)
