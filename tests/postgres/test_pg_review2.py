"""Second hostile review of the shared history (commits 0cf7bdb, c2a8961, 57fbe80): the ledger of
acknowledged commits (mds_acks, SharedAcks), the bound on every server call (Deadline), and reads
off the store's lock on pooled read connections (Tiers.read_db, mds.tiers.postgres.pool).

Each test shows one defect and failed on the code it was written against (57fbe80); all six are
fixed: the record is kept per server and origin (a copied directory starts a new one), a missing
ledger where commits were acknowledged counts as lost, a read off the lock is made again under it
when a write came between, a read without a connection to spare uses the tier's own, a new
connection forgets the cached series ids, and check() and maintain() run off the store's lock.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
from pg_cluster import Cluster, fresh_database
from test_pg_review import MIN, NOW, SYM, T0, WAIT_S, _open, _rows, _until

import mds
from mds import Config, StorageUnavailableError
from mds.testing import generate_market
from mds.tiers.postgres import PostgresTier
from mds.timeframes import parse_timeframe

HOUR = 3_600_000


def _server_only(path: Path, url: str, **kw: Any) -> mds.Store:
    """A store whose every read asks the server (no memory, no LMDB)."""
    cfg = Config(lookup="storage_first", tiers=("sqlite",), **kw)
    return mds.open(path, config=cfg, clock=lambda: NOW, history=url)


def _lost(problems: tuple[str, ...]) -> list[str]:
    return [p for p in problems if "acknowledged" in p]


# ---------------------------------------------------------------------------- the ledger (0cf7bdb)
def test_a_copied_store_directory_is_not_reported_as_a_server_that_lost_writes(tmp_path: Path, pg_url: str) -> None:
    """A store directory copied while closed (a backup of it restored, a move to another disk or
    volume; likewise a host renamed, a container started again with the directory on a volume)
    gets another origin (host name, device and inode): the ledger has no entry for it, while
    changes.bin, copied along, says commits were acknowledged there. check() then reports that the
    server lost acknowledged writes; it lost nothing."""
    with _open(tmp_path / "a", pg_url) as a:
        a.write_candles(SYM, "1m", _rows(10))
        assert a.check().ok, a.check().problems
    shutil.copytree(tmp_path / "a", tmp_path / "copy")
    with _open(tmp_path / "copy", pg_url) as c:
        problems = c.check().problems
        assert not _lost(problems), problems
        assert len(c.candles(SYM, "1m", start=T0, end=T0 + 10 * MIN)) == 10  # the server has every write


def test_a_server_without_the_ledger_is_reported_when_commits_were_acknowledged_there(
    tmp_path: Path, pg_url: str
) -> None:
    """The server goes back to a backup taken before mds_acks existed (an older mds wrote it):
    the rows this directory got acknowledged since are gone, and so is the ledger. A's record
    says commits were acknowledged on this server, which cannot have happened without the ledger;
    acknowledged() answers None ("no ledger: nothing to compare") and check() finds nothing."""
    rows = _rows()
    with _open(tmp_path / "a", pg_url) as a:
        a.write_candles(SYM, "1m", rows[:50])
        with PostgresTier(pg_url, compress_after_days=None) as t:  # the restore of an older backup:
            t.delete(SYM, "1m", None, None)  # the rows written since are gone ...
        with psycopg.connect(pg_url, autocommit=True) as admin:
            admin.execute("DROP TABLE mds_acks")  # ... and so is the ledger
        problems = a.check().problems
        assert _lost(problems), f"the lost writes are not reported: {problems}"


# ---------------------------------------------------------------------------- reads off the lock (57fbe80)
class _PausingReader:
    """A pooled reader whose ``nth`` read_range of ``tfname`` returns its rows only after
    ``meanwhile`` ran (with the store's lock released, as read_db leaves it): the moment between
    the server's answer and the lock taken back, where another thread may run."""

    def __init__(self, inner: Any, state: dict[str, Any]) -> None:
        self._inner = inner
        self._state = state

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def read_range(self, symbol: str, tf: Any, start: int, end: int) -> np.ndarray:
        got = self._inner.read_range(symbol, tf, start, end)
        st = self._state
        if parse_timeframe(tf).name == st["tf"]:
            st["seen"] += 1
            if st["seen"] == st["nth"]:
                st["read"].set()
                assert st["written"].wait(WAIT_S)
        return got


def _pause_reads(monkeypatch: pytest.MonkeyPatch, store: mds.Store, state: dict[str, Any]) -> None:
    tier = store._health.states["sqlite"].obj
    real = tier.off_lock

    def off_lock(writable: bool = False) -> Any:
        cm = real(writable)
        if cm is None:
            return None

        @contextlib.contextmanager
        def wrapped() -> Iterator[Any]:
            with cm as reader:
                yield _PausingReader(reader, state)

        return wrapped()

    monkeypatch.setattr(tier, "off_lock", off_lock)


def test_a_derived_candle_is_not_built_from_rows_older_than_the_coverage_that_proves_it(
    tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1h candles h0..h2 are stored, coverage [h0, h2). Thread A asks 2h candles of [h0, h4): its
    1h rows come from the server (h0..h2); before A takes the store lock back, this thread stores
    h3 with complete=(h2, h4). A then reads the coverage [h0, h4) and treats h3 as a proven
    no-trade hour: the 2h candle of [h2, h4) is h2 alone. Before the write the right answer has
    no candle there (h3 unknown); after it, the candle of h2 and h3."""
    hours = generate_market(SYM, "1h", T0, T0 + 4 * HOUR, liquidity="liquid", seed=4)
    assert len(hours) == 4 and float(hours["close"][2]) != float(hours["close"][3])
    with _server_only(tmp_path / "b", pg_url) as b:
        assert _until(lambda: b._health.feed_live)
        b.write_candles(SYM, "1h", hours[:2], complete=(T0, T0 + 2 * HOUR))
        b.write_candles(SYM, "1h", hours[2:3])
        # the first 1h read is derived._choose's, the second the answer's
        state: dict[str, Any] = {
            "tf": "1h",
            "nth": 2,
            "seen": 0,
            "read": threading.Event(),
            "written": threading.Event(),
        }
        _pause_reads(monkeypatch, b, state)
        got: list[Any] = []

        def read() -> None:
            try:
                got.append(b.candles(SYM, "2h", start=T0, end=T0 + 4 * HOUR))
            except Exception as exc:  # a typed error would be a fine outcome
                got.append(exc)

        th = threading.Thread(target=read, daemon=True)
        th.start()
        assert state["read"].wait(WAIT_S)
        b.write_candles(SYM, "1h", hours[3:4], complete=(T0 + 2 * HOUR, T0 + 4 * HOUR))
        state["written"].set()
        th.join(WAIT_S)
        assert got and not isinstance(got[0], BaseException), got
        second = got[0][got[0]["ts"] == T0 + 2 * HOUR]
        assert not len(second) or float(second["close"][0]) == float(hours["close"][3]), (
            f"2h candle of [h2, h4) closes at h2's close {float(second['close'][0])}: h3 taken as no trades"
        )


@contextlib.contextmanager
def _every_connection_taken(url: str) -> Iterator[int]:
    """Hold connections to the server until it refuses more (max_connections reached: other hosts
    on a shared server); yields how many were taken."""
    held: list[psycopg.Connection[Any]] = []
    try:
        for _ in range(200):
            try:
                held.append(psycopg.connect(url, autocommit=True, connect_timeout=5))
            except psycopg.OperationalError:
                break
        yield len(held)
    finally:
        for c in held:
            with contextlib.suppress(psycopg.Error):
                c.close()


def test_a_read_is_answered_when_the_server_has_no_connection_to_spare(tmp_path: Path, pg_url: str) -> None:
    """Before the pool a store needed its one connection (and the feed's); now each thread's read
    needs one more, up to four. A shared server at max_connections (other hosts) refuses it: the
    read fails with StorageUnavailableError, and the tier, degraded by it, refuses writes too."""
    rows = _rows()
    with _server_only(tmp_path / "b", pg_url) as b:
        assert _until(lambda: b._health.feed_live)
        b.write_candles(SYM, "1m", rows)
        tier = b._health.states["sqlite"].obj
        assert tier.readers.opened == 0
        with _every_connection_taken(pg_url) as n:
            assert n > 0
            try:
                got = b.candles(SYM, "1m", start=T0, end=T0 + 100 * MIN)
            except StorageUnavailableError as exc:
                pytest.fail(f"the read failed although the store's own connection is open: {exc}")
            assert got.tobytes() == rows.tobytes()
            assert b.stats()["degraded"] == []


def test_a_database_created_again_does_not_answer_another_series_rows(tmp_path: Path, pg_cluster: Cluster) -> None:
    """B reads KRW-BTC (sid 1) through a pooled reader. The server's database is created again
    (the case the ledger is for) and another host writes KRW-ETH first: ETH gets sid 1. B, still
    running, asks KRW-BTC again: its reader reconnects and reads sid 1."""
    btc = _rows(20)
    eth = generate_market("KRW-ETH", "1m", T0, T0 + 20 * MIN, liquidity="liquid", seed=77)
    with fresh_database(pg_cluster) as url, _server_only(tmp_path / "b", url) as b:
        b.write_candles(SYM, "1m", btc)
        assert b.candles(SYM, "1m", start=T0, end=T0 + 20 * MIN).tobytes() == btc.tobytes()
        name = psycopg.conninfo.conninfo_to_dict(url)["dbname"]
        with psycopg.connect(pg_cluster.url(), autocommit=True) as admin:
            admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
            admin.execute(f"CREATE DATABASE {name}")
        with PostgresTier(url, compress_after_days=None) as other:
            other.write("KRW-ETH", "1m", eth)
        try:
            got = b.candles(SYM, "1m", start=T0, end=T0 + 20 * MIN)
        except StorageUnavailableError:
            got = None  # a typed error is a fine answer
        assert got is None or not len(got), "B answers KRW-ETH's candles as KRW-BTC's"
        with PostgresTier(url, readonly=True, compress_after_days=None) as t:  # and ETH is intact
            assert t.read_range("KRW-ETH", "1m", T0, T0 + 20 * MIN).tobytes() == eth.tobytes()


# ---------------------------------------------------------------------------- the bound (c2a8961)
def _held_by_another_thread(lock: Any) -> bool:
    if lock.acquire(blocking=False):
        lock.release()
        return False
    return True


def test_check_on_a_hung_server_does_not_stall_memory_hits(tmp_path: Path, pg_url: str, stopped: list[int]) -> None:
    """c2a8961: "a hung server no longer stalls the store". check() waits on the hung server
    for ever (by design: a full pass may take long), holding the store's lock."""
    rows = _rows()
    cfg = Config(lookup="storage_first", history_timeout_s=1.0)
    with mds.open(tmp_path / "b", config=cfg, clock=lambda: NOW, history=pg_url) as b:
        assert _until(lambda: b._health.feed_live)
        b.write_candles(SYM, "1m", rows, complete=(T0, T0 + 100 * MIN))
        b.candles(SYM, "1m", count=10)
        assert b.candles(SYM, "1m", count=10).tobytes() == rows[-10:].tobytes()  # a memory hit now
        pid = b._health.states["sqlite"].obj._connection().info.backend_pid
        os.kill(pid, signal.SIGSTOP)
        stopped.append(pid)
        done = threading.Event()

        def check() -> None:
            with contextlib.suppress(Exception):
                b.check()
            done.set()

        threading.Thread(target=check, daemon=True).start()
        assert _until(lambda: done.is_set() or _held_by_another_thread(b._lock))
        hit = threading.Event()

        def memory_read() -> None:
            b.candles(SYM, "1m", count=10)
            hit.set()

        threading.Thread(target=memory_read, daemon=True).start()
        served = hit.wait(10.0)  # the bound (1 s) and its grace (2 s) several times over
        os.kill(pid, signal.SIGCONT)
        assert done.wait(WAIT_S)
        assert served, "a memory hit waited for check() on a hung server"
