"""Storage faults: I/O errors in the middle of a write (apsw and lmdb calls), the LMDB map full at its
cap, the SQLite file locked by another process, the LMDB directory deleted while open.

Each ends in a typed error (an MdsError) or a degraded tier with correct answers, and nothing
partial: SQLite holds the batch wholly or not at all, and the disk tier never disagrees with it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import _relutil as R
import apsw
import lmdb
import numpy as np
import pytest

import mds
import mds.store.health
from mds.layer1 import UpbitRouter
from mds.testing import FakeUpbit


class FailingConn:
    """An apsw connection whose statements fail with ``exc`` after ``after`` of them (ROLLBACK passes)."""

    def __init__(self, real: Any, after: float, exc: type[BaseException] = apsw.IOError) -> None:
        self._real = real
        self.after = after
        self.exc = exc
        self.ops = 0
        self.injected = 0

    def _tick(self, sql: Any) -> None:
        if isinstance(sql, str) and sql.lstrip().upper().startswith("ROLLBACK"):
            return
        self.ops += 1
        if self.ops > self.after:
            self.injected += 1
            R.TALLY["faults_injected_apsw"] += 1
            raise self.exc("injected: disk I/O error")

    def execute(self, sql: Any, *a: Any, **k: Any) -> Any:
        self._tick(sql)
        return self._real.execute(sql, *a, **k)

    def executemany(self, sql: Any, *a: Any, **k: Any) -> Any:
        self._tick(sql)
        return self._real.executemany(sql, *a, **k)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


class FailingTxn:
    def __init__(self, real: Any, env: FailingEnv) -> None:
        self._real = real
        self._env = env

    def _tick(self) -> None:
        e = self._env
        e.ops += 1
        if e.ops > e.after and (e.times is None or e.ops <= e.after + e.times):
            R.TALLY["faults_injected_lmdb"] += 1
            raise lmdb.DiskError("injected: Input/output error")

    def put(self, *a: Any, **k: Any) -> Any:
        self._tick()
        return self._real.put(*a, **k)

    def delete(self, *a: Any, **k: Any) -> Any:
        self._tick()
        return self._real.delete(*a, **k)

    def drop(self, *a: Any, **k: Any) -> Any:
        self._tick()
        return self._real.drop(*a, **k)

    def __enter__(self) -> FailingTxn:
        self._real.__enter__()
        return self

    def __exit__(self, *exc: Any) -> Any:
        return self._real.__exit__(*exc)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


class FailingEnv:
    """An LMDB environment whose write transactions fail after ``after`` put/delete/drop calls
    (the next ``times`` of them, or all when None)."""

    def __init__(self, real: Any, after: float, times: int | None = None) -> None:
        self._real = real
        self.after = after
        self.times = times
        self.ops = 0

    def begin(self, *a: Any, **k: Any) -> Any:
        txn = self._real.begin(*a, **k)
        return FailingTxn(txn, self) if k.get("write") else txn

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def sqlite_digest(st: mds.Store) -> str:
    import hashlib

    db = st._health.states["sqlite"].obj
    h = hashlib.sha256()
    for sym, tfname, *_ in db.series():
        h.update(f"{sym}|{tfname}".encode())
        h.update(db.read_range(sym, tfname, -(1 << 60), 1 << 60).tobytes())
        h.update(db.coverage(sym, tfname).tobytes())
    return h.hexdigest()


def seed_store(st: mds.Store) -> None:
    for i, sym in enumerate(("KRW-BTC", "KRW-ETH", "KRW-XRP")):
        ts = R.T0 + R.MIN * np.arange(2000)
        st.write_candles(sym, "1m", R.marked(ts, 1.0 + i), complete=(R.T0, R.T0 + 2000 * R.MIN))
        st.candles(sym, "1m", count=500)  # memory and LMDB hold the newest rows


def new_batch(k: int) -> list[tuple[str, np.ndarray, tuple[int, int]]]:
    s = R.T0 + (1500 + 37 * k) * R.MIN  # overlaps what is stored (updates) and extends it (inserts)
    ts = s + R.MIN * np.arange(800)
    return [(sym, R.marked(ts, 100.0 + k), (s, s + 800 * R.MIN)) for sym in ("KRW-BTC", "KRW-ETH", "KRW-XRP")]


def test_apsw_io_error_at_every_step_of_a_write_leaves_nothing_partial(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(mds.store.health, "_RETRY_DEGRADED_S", 0.0)
    with mds.open(tmp_path / "s", clock=R.Clock()) as st:
        seed_store(st)
        db = st._health.states["sqlite"].obj
        real = db._conn
        counter = FailingConn(real, float("inf"))
        db._conn = counter
        with st.batch():
            for sym, rows, cov in new_batch(0):
                st.write_candles(sym, "1m", rows, complete=cov)
        db._conn = real
        steps = counter.ops
        assert steps > 5
        for k in range(1, 2 + steps):
            for grouped in (True, False):
                before = sqlite_digest(st)
                batch = new_batch(k)
                db._conn = FailingConn(real, k - 1)
                try:
                    if grouped:
                        with st.batch():
                            for sym, rows, cov in batch:
                                st.write_candles(sym, "1m", rows, complete=cov)
                    else:
                        st.write_candles(batch[0][0], "1m", batch[0][1], complete=batch[0][2])
                    failed = False
                except mds.StorageUnavailableError:
                    failed = True
                finally:
                    db._conn = real
                after = sqlite_digest(st)
                if failed:
                    assert after == before, f"a failed write at step {k} changed SQLite"
                st.check()  # comes back into service (retry interval patched to 0)
                rep = st.check()
                assert rep.ok, (k, grouped, rep.problems)
                for sym, rows, cov in batch[: 3 if grouped else 1]:
                    got = st.candles(sym, "1m", start=cov[0], end=cov[1])
                    want = np.full(len(got), rows["volume"][0])
                    if failed:
                        assert not np.array_equal(got["volume"], want) or len(got) == 0, "partial write visible"
                    else:
                        assert got.tobytes() == rows.tobytes()
                R.TALLY["faults_apsw_write_scenarios"] += 1


def _lmdb_faults(tmp_path: Path, monkeypatch: Any, times: int | None) -> None:
    monkeypatch.setattr(mds.store.health, "_RETRY_DEGRADED_S", 0.0)
    with mds.open(tmp_path / "s", clock=R.Clock()) as st:
        seed_store(st)
        h = st._health.states["disk"].obj._env
        real = h.env
        for k in range(0, 12):
            for sym, rows, cov in new_batch(k):
                h.env = FailingEnv(real, k, times)
                try:
                    st.write_candles(sym, "1m", rows, complete=cov)  # SQLite commits: the write stands
                finally:
                    h.env = real
                got = st.candles(sym, "1m", start=cov[0], end=cov[1])
                assert got.tobytes() == rows.tobytes()
                st.check()  # reports the tier degraded once, and brings it back (retry interval 0)
                rep = st.check()
                assert rep.ok, (k, rep.problems)
                R.TALLY["faults_lmdb_write_scenarios"] += 1


def test_transient_lmdb_error_mid_write_never_leaves_the_disk_tier_disagreeing(tmp_path: Path, monkeypatch) -> None:
    _lmdb_faults(tmp_path, monkeypatch, times=1)


def test_persistent_lmdb_error_mid_write_never_leaves_the_disk_tier_disagreeing(tmp_path: Path, monkeypatch) -> None:
    _lmdb_faults(tmp_path, monkeypatch, times=None)


def test_write_while_disk_degraded_does_not_leave_stale_lmdb(tmp_path: Path, monkeypatch) -> None:
    with mds.open(tmp_path / "s", clock=R.Clock()) as st:
        s, e = R.T0, R.T0 + 100 * R.MIN
        st.write_candles("KRW-BTC", "1m", R.marked(np.arange(s, e, R.MIN), 1.0), complete=(s, e))
        st.write_candles("KRW-ETH", "1m", R.marked(np.arange(s, e, R.MIN), 1.0), complete=(s, e))
        h = st._health.states["disk"].obj._env
        real = h.env
        h.env = FailingEnv(real, 0)
        try:  # a failing LMDB write degrades the disk tier (SQLite still takes the write)
            st.write_candles("KRW-ETH", "1m", R.marked(np.arange(s, e, R.MIN), 2.0), complete=(s, e))
        finally:
            h.env = real
        assert "disk" in st.stats()["degraded"]
        # while degraded: rewrite a range LMDB holds
        st.write_candles("KRW-BTC", "1m", R.marked(np.arange(s, e, R.MIN), 3.0), complete=(s, e))
        monkeypatch.setattr(mds.store.health, "_RETRY_DEGRADED_S", 0.0)  # the tier comes back
        st._health.states["memory"].obj.clear()
        got = st.candles("KRW-BTC", "1m", start=s, end=e)
        assert set(got["volume"].tolist()) == {3.0}
        assert st.check().ok, st.check().problems


def test_lmdb_map_full_at_cap_degrades_and_keeps_answering(tmp_path: Path, monkeypatch) -> None:
    import mds.tiers.disk as L

    monkeypatch.setitem(L.LmdbTier.__init__.__kwdefaults__, "map_size", 1 << 20)
    cap = 1 << 20
    cfg = mds.Config(disk_map_size_cap=cap)
    with mds.open(tmp_path / "s", config=cfg, clock=R.Clock()) as st:
        written = 0
        full = False
        for day in range(18):
            s = R.T0 + day * R.DAY
            rows = R.marked(np.arange(s, s + R.DAY, R.MIN), 1.0 + day)
            st.write_candles("KRW-BTC", "1m", rows, complete=(s, s + R.DAY))  # never raises: SQLite keeps it
            written += len(rows)
            if "disk" in st.stats()["degraded"]:
                full = True
                R.TALLY["faults_lmdb_map_full"] += 1
        assert full, "the LMDB map never filled"
        info = st.stats()["tiers"]["disk"]
        assert "full" in (info["error"] or ""), info
        got = st.candles("KRW-BTC", "1m", start=R.T0, end=R.T0 + 18 * R.DAY)
        assert len(got) == written
        assert np.array_equal(np.unique(got["volume"]), 1.0 + np.arange(18))
        problems = st.check().problems
        assert all(p.startswith("disk: degraded") for p in problems), problems
    with mds.open(tmp_path / "s", config=cfg, clock=R.Clock()) as st:  # reopens over a full map
        assert len(st.candles("KRW-BTC", "1m", start=R.T0, end=R.T0 + 18 * R.DAY)) == written


def test_small_disk_map_size_cap_is_honoured(tmp_path: Path) -> None:
    cap = 4 << 20
    with mds.open(tmp_path / "s", config=mds.Config(disk_map_size_cap=cap), clock=R.Clock()) as st:
        st.write_candles("KRW-BTC", "1m", R.marked(R.T0 + R.MIN * np.arange(10), 1.0))
        assert st.stats()["tiers"]["disk"]["map_size"] <= cap


_LOCKER = """
import sys, apsw
c = apsw.Connection(sys.argv[1])
c.execute("BEGIN EXCLUSIVE")
c.execute("INSERT INTO meta(k, v) VALUES ('locked-by-test', 1)")
print("locked", flush=True)
sys.stdin.readline()
c.execute("ROLLBACK")
"""


def test_sqlite_locked_by_another_process(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(mds.store.health, "_RETRY_DEGRADED_S", 0.0)
    path = tmp_path / "s"
    with mds.open(path, clock=R.Clock()) as st:
        seed_store(st)
        before = sqlite_digest(st)
        st._health.states["sqlite"].obj._conn.set_busy_timeout(200)
        locker = subprocess.Popen(
            [sys.executable, "-c", _LOCKER, str(path / "candles.sqlite3")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=R.child_env(),
        )
        R.TALLY["processes_started"] += 1
        try:
            assert locker.stdout is not None and locker.stdout.readline().strip() == b"locked"
            R.TALLY["faults_sqlite_locked"] += 1
            for sym, rows, cov in new_batch(3):
                with pytest.raises(mds.StorageUnavailableError, match="locked"):
                    st.write_candles(sym, "1m", rows, complete=cov)

            def grouped() -> None:
                with st.batch():
                    for sym, rows, cov in new_batch(4):
                        st.write_candles(sym, "1m", rows, complete=cov)

            with pytest.raises(mds.StorageUnavailableError):
                grouped()
            # reads go on (WAL readers are not blocked by a writer)
            got = st.candles("KRW-BTC", "1m", start=R.T0, end=R.T0 + 2000 * R.MIN)
            assert got.tobytes() == R.marked(R.T0 + R.MIN * np.arange(2000), 1.0).tobytes()
        finally:
            assert locker.stdin is not None
            locker.stdin.write(b"\n")
            locker.stdin.flush()
            locker.wait(30)
        assert sqlite_digest(st) == before
        st._health.states["sqlite"].obj._conn.set_busy_timeout(5000)
        for sym, rows, cov in new_batch(5):  # the lock is gone: writes work again
            st.write_candles(sym, "1m", rows, complete=cov)
        assert st.check().ok, st.check().problems


@pytest.mark.skipif(
    sys.platform == "win32", reason="Windows cannot delete a mapped LMDB file, and has no POSIX modes"
)
def test_lmdb_directory_deleted_while_open(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(mds.store.health, "_RETRY_DEGRADED_S", 0.0)
    path = tmp_path / "s"
    with mds.open(path, clock=R.Clock()) as st:
        seed_store(st)
        for k in range(3):
            shutil.rmtree(path / "lmdb")
            R.TALLY["faults_lmdb_dir_deleted"] += 1
            st._health.states["memory"].obj.clear()
            want = R.marked(R.T0 + R.MIN * np.arange(2000), 1.0)
            if k:
                want = st._health.states["sqlite"].obj.read_range("KRW-BTC", "1m", R.T0, R.T0 + 10 * R.DAY)
            got = st.candles("KRW-BTC", "1m", start=R.T0, end=R.T0 + 10 * R.DAY)
            assert got.tobytes() == want.tobytes()
            for sym, rows, cov in new_batch(k):
                st.write_candles(sym, "1m", rows, complete=cov)
                assert st.candles(sym, "1m", start=cov[0], end=cov[1]).tobytes() == rows.tobytes()
            rep = st.check()
            assert rep.ok, rep.problems
        assert (path / "lmdb").stat().st_mode & 0o777 == 0o700


def test_sqlite_failing_everything_passes_reads_through_to_layer1(tmp_path: Path, monkeypatch) -> None:
    clock = R.Clock()
    truth = R.marked(R.T0 + R.MIN * np.arange(3000), 7.0)
    with FakeUpbit({("KRW-BTC", "1m"): truth}, clock=clock, rate_limit=None) as up:
        l1 = UpbitRouter(up.base_url, rate_limit=1000, backoff_s=0.01, max_backoff_s=0.05, clock=clock)
        cfg = mds.Config(lookup="storage_first")
        with mds.open(tmp_path / "s", layer1=l1, config=cfg, clock=clock) as st:
            db = st._health.states["sqlite"].obj
            real = db._conn
            db._conn = FailingConn(real, 0)
            try:
                got = st.candles("KRW-BTC", "1m", start=R.T0, end=R.T0 + 1000 * R.MIN)
                assert got.tobytes() == truth[:1000].tobytes()
                assert "sqlite" in st.stats()["degraded"]
                with pytest.raises(mds.StorageUnavailableError):
                    st.write_candles("KRW-BTC", "1m", truth[:10])
            finally:
                db._conn = real
            assert len(db.read_range("KRW-BTC", "1m", 0, 1 << 60)) == 0  # nothing stored
            assert db.coverage("KRW-BTC", "1m").size == 0
