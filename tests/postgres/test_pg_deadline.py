"""The bound on the PostgreSQL tier's calls (Config.history_timeout_s, mds.tiers.postgres.deadline):
a server that stops answering fails the call within the bound and leaves nothing partial, a
slow statement on a live server is ended by the server itself, and maintenance is not bounded.

A hung server is played by stopping the store connection's backend process (SIGSTOP): its
socket stays open and silent, as with a frozen host.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
from test_pg_review import MIN, NOW, SYM, T0, _rows, _until

import mds
from mds import Config, StorageUnavailableError
from mds.tiers.postgres import PostgresTier


def _open(path: Path, url: str, timeout_s: float) -> mds.Store:
    cfg = Config(lookup="storage_first", history_timeout_s=timeout_s)
    return mds.open(path, config=cfg, clock=lambda: NOW, history=url)


def test_a_write_to_a_hung_server_fails_within_the_bound_and_stores_nothing(
    tmp_path: Path, pg_url: str, stopped: list[int]
) -> None:
    rows = _rows()
    with _open(tmp_path / "a", pg_url, 1.0) as a:
        a.write_candles(SYM, "1m", rows[:50])
        pid = a._health.states["sqlite"].obj._connection().info.backend_pid
        os.kill(pid, signal.SIGSTOP)
        stopped.append(pid)
        t0 = time.monotonic()
        with pytest.raises(StorageUnavailableError, match="did not answer"):
            a.write_candles(SYM, "1m", rows[50:])
        took = time.monotonic() - t0
        assert 1.0 <= took < 10.0, took  # the bound (1 s) and its grace (2 s), with room for a busy machine
        os.kill(pid, signal.SIGCONT)
        with PostgresTier(pg_url, readonly=True) as t:  # the server: nothing of the failed batch
            assert len(t.read_range(SYM, "1m", T0, T0 + 100 * MIN)) == 50
        assert _until(lambda: _write_ok(a, rows))  # the store reconnects by itself (degraded tier retried)
        got = a.candles(SYM, "1m", start=T0, end=T0 + 100 * MIN)
        assert np.array_equal(got, rows)


def _write_ok(store: mds.Store, rows: np.ndarray) -> bool:
    try:
        store.write_candles(SYM, "1m", rows[50:])
    except StorageUnavailableError:
        return False
    return True


def test_a_write_waiting_for_another_hosts_lock_ends_within_the_bound(tmp_path: Path, pg_url: str) -> None:
    """The server ends it (lock_timeout, at most the statement bound) and says what it waited for;
    the connection stays usable."""
    rows = _rows()
    with _open(tmp_path / "a", pg_url, 1.0) as a:
        a.write_candles(SYM, "1m", rows[:50])
        with psycopg.connect(pg_url) as other:  # another host's writer holds the series' lock
            other.execute("SELECT 1 FROM mds_series WHERE symbol = %s FOR UPDATE", (SYM,))
            t0 = time.monotonic()
            with pytest.raises(StorageUnavailableError, match="lock"):
                a.write_candles(SYM, "1m", rows[50:])
            assert time.monotonic() - t0 < 10.0
        assert a.candles(SYM, "1m", start=T0, end=T0 + 50 * MIN).tobytes() == rows[:50].tobytes()


def test_maintenance_waits_as_long_as_it_must(tmp_path: Path, pg_url: str) -> None:
    """VACUUM waits for another session's lock on a table well past the bound, and completes."""
    with _open(tmp_path / "a", pg_url, 0.5) as a:
        a.write_candles(SYM, "1m", _rows())
        locked, release = threading.Event(), threading.Event()

        def hold() -> None:
            with psycopg.connect(pg_url) as other:
                other.execute("LOCK TABLE mds_chunk IN SHARE UPDATE EXCLUSIVE MODE")
                locked.set()
                release.wait(30)

        th = threading.Thread(target=hold, daemon=True)
        th.start()
        assert locked.wait(10)
        threading.Timer(3.5, release.set).start()  # the bound (0.5 s) and its grace (2 s) pass first
        t0 = time.monotonic()
        report = a.maintain(force=True)
        assert time.monotonic() - t0 >= 3.0
        assert report.vacuumed
        th.join(10)
        a.write_candles(SYM, "1m", _rows(110)[100:])  # the session's bounds are back and it writes
        assert len(a.candles(SYM, "1m", start=T0, end=T0 + 110 * MIN)) == 110


def test_the_urls_own_statement_timeout_is_kept(pg_url: str) -> None:
    sep = "&" if "?" in pg_url else "?"
    url = f"{pg_url}{sep}options=-c%20statement_timeout%3D1234"
    with PostgresTier(url, timeout_s=10.0) as t:
        assert t._connection().execute("SHOW statement_timeout").fetchone() == ("1234ms",)
    with PostgresTier(pg_url, timeout_s=10.0) as t:
        assert t._connection().execute("SHOW statement_timeout").fetchone() == ("10s",)
        assert t._connection().execute("SHOW lock_timeout").fetchone() == ("8s",)


def _held_elsewhere(lock: Any) -> bool:
    """Whether another thread holds ``lock`` (a store's lock) now."""
    if lock.acquire(blocking=False):
        lock.release()
        return False
    return True


def test_a_call_holding_the_store_lock_does_not_make_the_feed_deaf(
    tmp_path: Path, pg_url: str, stopped: list[int]
) -> None:
    """Another host's change arrives while a (hung) write holds the store's lock: the feed's
    thread waits for the lock to apply it, its heartbeat unread meanwhile. That wait is not the
    server's silence: the feed must not reconnect (which drops every copy this host holds)."""
    rows = _rows()
    with _open(tmp_path / "b", pg_url, 2.0) as b:
        assert _until(lambda: b._health.feed_live)
        b.write_candles(SYM, "1m", rows[:50])
        tier = b._health.states["sqlite"].obj
        listener = tier._listener
        pid = tier._connection().info.backend_pid
        os.kill(pid, signal.SIGSTOP)
        stopped.append(pid)
        done = threading.Event()

        def write() -> None:
            with contextlib.suppress(StorageUnavailableError):
                b.write_candles(SYM, "1m", rows[50:])  # holds the store's lock until it is cut
            done.set()

        heard = b._remote.received
        threading.Thread(target=write, daemon=True).start()
        assert _until(lambda: _held_elsewhere(b._lock))  # the write has the lock (and waits on the server)
        with PostgresTier(pg_url, compress_after_days=None) as other:  # its change waits for B's lock
            other.write("KRW-XRP", "1m", _rows(5, seed=9))
        assert done.wait(30.0)
        assert _until(lambda: b._remote.received > heard)
        time.sleep(1.0)  # a deaf feed would be reconnecting now
        assert listener.reconnects == 0 and b._health.feed_live


def test_a_read_off_the_lock_does_not_fill_memory_with_rows_a_write_replaced(
    tmp_path: Path, pg_url: str, stopped: list[int]
) -> None:
    """Thread A reads a series from the server on a read connection, off the store's lock; this
    host writes a revision of it meanwhile. A's rows (the server's state before the write) must
    not become the fast tiers' copy (the next reads answer the revision), nor A's answer."""
    rows = _rows()
    with _open(tmp_path / "b", pg_url, 10.0) as b:
        assert _until(lambda: b._health.feed_live)
        with PostgresTier(pg_url, compress_after_days=None) as other:  # in no fast tier of B
            other.write(SYM, "1m", rows)
            other.write("KRW-ETH", "1m", _rows(5, seed=3))
        b.candles("KRW-ETH", "1m", start=T0, end=T0 + 5 * MIN)  # leaves an idle read connection
        readers = b._health.states["sqlite"].obj.readers
        assert len(readers._idle) == 1
        pid = readers._idle[0]._conn.info.backend_pid
        os.kill(pid, signal.SIGSTOP)  # A's read will wait on it
        stopped.append(pid)
        got: list[np.ndarray] = []
        reader = threading.Thread(target=lambda: got.append(b.candles(SYM, "1m", count=50)), daemon=True)
        reader.start()
        assert _until(lambda: not readers._idle)  # A took the read connection: it waits for the server, off the lock
        new = rows[-1:].copy()
        new["close"] = new["open"] = float(rows["close"][-1]) + 1.0
        new["high"] = max(float(rows["high"][-1]), float(new["close"][0]))
        with b._lock:  # A gets its answer (the state before the write) and waits for the lock ...
            os.kill(pid, signal.SIGCONT)
            assert _until(lambda: len(readers._idle) == 1)  # A has its rows and gave the connection back
            b.write_candles(SYM, "1m", new)  # ... while this thread writes the revision
        reader.join(30.0)
        # the write came between A's server read and A's return to the lock: A reads again under
        # the lock (Tiers.read_db), so its answer agrees with everything read after it
        assert got and float(got[0]["close"][-1]) == float(new["close"][0])
        for _ in range(2):  # then memory (or LMDB) answers: the revision
            assert float(b.candles(SYM, "1m", count=50)["close"][-1]) == float(new["close"][0])
            rng = b.candles(SYM, "1m", start=T0, end=T0 + 100 * MIN)
            assert float(rng["close"][-1]) == float(new["close"][0])


def test_threads_read_the_server_at_once_on_connections_of_their_own(tmp_path: Path, pg_url: str) -> None:
    markets = [f"KRW-M{i}" for i in range(8)]
    with PostgresTier(pg_url, compress_after_days=None) as other:
        for i, sym in enumerate(markets):
            other.write(sym, "1m", _rows(200, seed=i))
    cfg = Config(lookup="storage_first", tiers=("sqlite",), history_timeout_s=10.0)  # every read asks the server
    with mds.open(tmp_path / "b", config=cfg, clock=lambda: NOW, history=pg_url) as b:
        errors: list[BaseException] = []

        def work(sym: str, seed: int) -> None:
            want = _rows(200, seed=seed)
            try:
                for _ in range(30):
                    got = b.candles(sym, "1m", start=T0, end=T0 + 200 * MIN)
                    assert got.tobytes() == want.tobytes()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(sym, i)) for i, sym in enumerate(markets)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(120)
        assert not errors, errors[:3]
        readers = b._health.states["sqlite"].obj.readers
        assert 2 <= readers.opened <= 4  # reads overlapped; never more connections than the pool's size
