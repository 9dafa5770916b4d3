"""Shared history on PostgreSQL through the public API (DESIGN.md section 7): two hosts, each with
its own store directory (its own memory and LMDB tiers), over one database.

- Host A backfills five markets from FakeUpbit; host B, another process, then reads the same
  ranges without one Layer 1 request; A revises a candle and B, which answered the range from its
  fast tiers before, sees the revision (the change feed moved B's stamps and dropped its LMDB span).
- The server killed in the middle of a batch: nothing of the batch is stored; after the restart
  both hosts carry on by themselves.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import mds
import mds.store.health
from mds import Config, StorageUnavailableError
from mds.layer1 import UpbitRouter
from mds.testing import FakeUpbit, generate_market
from mds.timeutil import to_ms

T0 = to_ms("2025-01-06T00:00:00Z")
MIN = 60_000
DAY = 86_400_000
NOW = T0 + DAY + 30_000
MARKETS = ("KRW-BTC", "KRW-ETH", "KRW-XRP", "KRW-CBK", "KRW-MLK")
HOST = Path(__file__).with_name("_host.py")
#: Bound of every wait for the other host (the design asks for 1 s; the measured figure is printed).
WAIT_S = 20.0


@pytest.fixture
def fake() -> Iterator[FakeUpbit]:
    data = {
        (sym, "1m"): generate_market(sym, "1m", T0, T0 + DAY, liquidity="illiquid" if i > 2 else "liquid", seed=i)
        for i, sym in enumerate(MARKETS)
    }
    with FakeUpbit(data, clock=lambda: NOW, rate_limit=None) as up:
        yield up


def _router(fake: FakeUpbit) -> UpbitRouter:
    return UpbitRouter(fake.base_url, rate_limit=1000, backoff_s=0.01, max_backoff_s=0.05, clock=lambda: NOW)


def _open(path: Path, url: str, fake: FakeUpbit | None = None) -> mds.Store:
    layer1 = None if fake is None else _router(fake)
    return mds.open(path, layer1=layer1, config=Config(lookup="storage_first"), clock=lambda: NOW, history=url)


def test_a_second_host_reads_what_the_first_backfilled_and_sees_its_revision(
    tmp_path: Path, pg_url: str, fake: FakeUpbit
) -> None:
    start, end = T0 + 60 * MIN, T0 + 600 * MIN
    with _open(tmp_path / "a", pg_url, fake) as a:
        want = {}
        for sym in MARKETS:
            rows = a.candles(sym, "1m", start=start, end=end)
            want[sym] = [len(rows), float(np.sum(rows["close"]))]
        fetched = fake.request_count()
        assert fetched > 0

        args = {
            "path": str(tmp_path / "b"),
            "history": pg_url,
            "layer1": fake.base_url,
            "now": NOW,
            "symbols": list(MARKETS),
            "start": start,
            "end": end,
        }
        b = subprocess.Popen(  # PYTHONPATH points it at the package under test (tests/conftest.py)
            [sys.executable, str(HOST), json.dumps(args)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert b.stdout is not None and b.stdin is not None
            ready = json.loads(b.stdout.readline() or "{}")
            assert ready.get("ready"), b.stderr.read() if b.stderr else ""
            assert ready["sums"] == want  # the same candles, from the shared history
            assert fake.request_count() == fetched  # and not one Layer 1 request for them
            assert ready["stats"]["layer1_api"] == 0
            # B's fast tiers hold every range: the revision below must reach B's copies
            assert ready["stats"]["storage_memory"] + ready["stats"]["storage_disk"] >= len(MARKETS)

            # host A revises a candle B holds in its fast tiers
            sym = "KRW-BTC"
            old = a.candles(sym, "1m", start=start + 100 * MIN, end=start + 101 * MIN)
            assert len(old) == 1
            new = old.copy()
            new["close"] = new["open"] = float(old["close"][0]) + 1.0
            new["high"] = max(float(old["high"][0]), float(new["close"][0]))
            a.write_candles(sym, "1m", new)
            b.stdin.write(
                json.dumps({"symbol": sym, "ts": int(new["ts"][0]), "close": float(new["close"][0]), "wait_s": WAIT_S})
                + "\n"
            )
            b.stdin.flush()
            seen = json.loads(b.stdout.readline() or "{}")
            print(f"host B saw host A's revision after {seen.get('seen_after_ms')} ms")
            assert seen.get("seen_after_ms") is not None, "host B never saw the revision"
        finally:
            b.kill()
            b.wait(timeout=30)


def test_server_killed_mid_batch_stores_nothing_and_both_hosts_carry_on(
    tmp_path: Path, pg_url: str, pg_cluster: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mds.store.health, "_RETRY_DEGRADED_S", 0.0)  # retry the tier at once
    base = generate_market("KRW-BTC", "1m", T0, T0 + 300 * MIN, liquidity="liquid", seed=9)
    first, batch_a, batch_b, later = base[:100], base[100:150], base[150:200], base[200:300]
    with _open(tmp_path / "a", pg_url) as a, _open(tmp_path / "b", pg_url) as b:
        a.write_candles("KRW-BTC", "1m", first, complete=(T0, T0 + 100 * MIN))
        assert b.candles("KRW-BTC", "1m", start=T0, end=T0 + 100 * MIN).tobytes() == first.tobytes()

        def batch_across_a_server_crash() -> None:
            with a.batch():
                a.write_candles("KRW-BTC", "1m", batch_a)
                pg_cluster.stop()
                a.write_candles("KRW-BTC", "1m", batch_b)

        try:
            with pytest.raises(StorageUnavailableError):
                batch_across_a_server_crash()
        finally:
            pg_cluster.start()
        # both hosts reconnect by themselves; nothing of the batch was stored
        for st in (a, b):
            got = st.candles("KRW-BTC", "1m", start=T0, end=T0 + 300 * MIN)
            assert got.tobytes() == first.tobytes()
        a.write_candles("KRW-BTC", "1m", later, complete=(T0 + 200 * MIN, T0 + 300 * MIN))
        # B's copies of the range (its read above) are dropped when A's change reaches B's feed:
        # within 1 s by contract (DESIGN.md 7), not at once; until then B answers what it held
        seen: set[bytes] = set()

        def b_sees_later() -> bool:
            seen.add(b.candles("KRW-BTC", "1m", start=T0 + 200 * MIN, end=T0 + 300 * MIN).tobytes())
            return later.tobytes() in seen

        _wait_for(b_sees_later)
        assert seen <= {b"", later.tobytes()}  # what B held before, or A's write: nothing else
        assert a.check().ok, a.check().problems


def test_while_the_change_feed_is_down_no_read_is_answered_from_stale_copies(
    tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    import psycopg

    import mds.tiers.postgres.feed as feed

    rows = generate_market("KRW-BTC", "1m", T0, T0 + 100 * MIN, liquidity="liquid", seed=11)
    with _open(tmp_path / "a", pg_url) as a, _open(tmp_path / "b", pg_url) as b:
        _wait_for(lambda: b._health.feed_live)  # B's feed listens: its fast tiers are in use
        heard = b._remote.received
        a.write_candles("KRW-BTC", "1m", rows, complete=(T0, T0 + 100 * MIN))
        _wait_for(lambda: b._remote.received > heard)  # B heard of A's write (and dropped its copies)
        assert _memory_hit(b).tobytes() == rows[-50:].tobytes()
        memory_hits = b.stats()["hits"]["storage_memory"]

        # B's feed goes down and cannot come back (its reconnects fail)
        down = threading.Event()
        real_connect = feed.connect

        def refuse(*args: Any, **kw: Any) -> Any:
            down.set()
            raise StorageUnavailableError("listener refused by the test")

        monkeypatch.setattr(feed, "connect", refuse)
        btier = b._health.states["sqlite"].obj
        pid = btier._listener.pid
        with psycopg.connect(pg_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        # a connect was refused (the heartbeat's own connect may be the first: then B's
        # listener has not noticed its lost backend yet); wait for the listener itself
        assert down.wait(WAIT_S)
        _wait_for(lambda: not btier.listening)

        # A revises the newest candle; B hears nothing, yet must not answer from its copies
        new = rows[-1:].copy()
        new["close"] = new["open"] = float(rows["close"][-1]) + 1.0
        new["high"] = max(float(rows["high"][-1]), float(new["close"][0]))
        a.write_candles("KRW-BTC", "1m", new)
        got = b.candles("KRW-BTC", "1m", count=50)
        assert float(got["close"][-1]) == float(new["close"][0])
        assert b.stats()["hits"]["storage_memory"] == memory_hits  # not one answer from memory since

        # the feed comes back: B's copies are trusted again
        monkeypatch.setattr(feed, "connect", real_connect)
        btier._listener.wake()
        _wait_for(lambda: b._health.feed_live)
        assert _memory_hit(b).tobytes() == got.tobytes()
        assert b.stats()["hits"]["storage_memory"] > memory_hits


def _memory_hit(st: mds.Store) -> np.ndarray:
    """The latest 50 KRW-BTC, read until memory answers them (bounded): the first read fills
    memory; a late heartbeat on a loaded machine may make a read ask the server instead."""
    got: list[np.ndarray] = []

    def hit() -> bool:
        before = st.stats()["hits"]["storage_memory"]
        got.append(st.candles("KRW-BTC", "1m", count=50))
        return st.stats()["hits"]["storage_memory"] > before

    _wait_for(hit)
    return got[-1]


def _wait_for(cond: Any) -> None:
    """Wait (bounded) until ``cond()`` holds: another thread of the store makes it true."""
    import time

    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < WAIT_S, "timed out"
        time.sleep(0.01)


def test_server_down_reads_the_local_tiers_prove_still_answer(
    tmp_path: Path, pg_url: str, pg_cluster: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = generate_market("KRW-BTC", "1m", T0, T0 + 100 * MIN, liquidity="liquid", seed=12)
    with _open(tmp_path / "b", pg_url) as b:
        _wait_for(lambda: b._health.feed_live)
        b.write_candles("KRW-BTC", "1m", rows, complete=(T0, T0 + 100 * MIN))
        want = b.candles("KRW-BTC", "1m", count=50)
        try:
            pg_cluster.stop()
            _wait_for(lambda: not b._health.feed_live)  # B's feed lost its server too
            # held in memory and proven by coverage: answered without the server
            assert b.candles("KRW-BTC", "1m", count=50).tobytes() == want.tobytes()
            assert "sqlite" in b.stats()["degraded"]
            # not held by any local tier: a typed error (no Layer 1 to pass it through to)
            with pytest.raises(StorageUnavailableError):
                b.candles("KRW-ETH", "1m", count=10)
            with pytest.raises(StorageUnavailableError):
                b.write_candles("KRW-BTC", "1m", rows[-1:])
        finally:
            pg_cluster.start()
        monkeypatch.setattr(mds.store.health, "_RETRY_DEGRADED_S", 0.0)
        _wait_for(lambda: b._health.feed_live)  # the feed is back by itself
        assert b.candles("KRW-BTC", "1m", count=50).tobytes() == want.tobytes()
        assert "sqlite" not in b.stats()["degraded"]


def _read_with_source(st: mds.Store, sym: str, start: int, end: int) -> tuple[np.ndarray, str]:
    """A range read and the one tier the store's hit counters say answered it."""
    before = st.stats()["hits"]
    got = st.candles(sym, "1m", start=start, end=end)
    after = st.stats()["hits"]
    moved = [k for k in after if after[k] != before[k]]
    assert len(moved) == 1, moved
    return got, moved[0]


def test_server_down_with_a_layer1_local_reads_cost_no_request_and_others_pass_through(
    tmp_path: Path, pg_url: str, pg_cluster: Any, fake: FakeUpbit, monkeypatch: pytest.MonkeyPatch
) -> None:
    start, end = T0, T0 + 100 * MIN
    with _open(tmp_path / "b", pg_url, fake) as b:
        _wait_for(lambda: b._health.feed_live)
        want, source = _read_with_source(b, "KRW-BTC", start, end)  # backfilled from Layer 1
        assert source == "layer1_api" and len(want) == 100
        try:
            pg_cluster.stop()
            _wait_for(lambda: not b._health.feed_live)
            # the first read after the server went away, held in memory: no request to Layer 1
            # (before: the read asked the server, failed, and passed through, one request)
            asked = fake.request_count()
            got, source = _read_with_source(b, "KRW-BTC", start, end)
            assert (got.tobytes(), source, fake.request_count()) == (want.tobytes(), "storage_memory", asked)
            assert "sqlite" in b.stats()["degraded"]
            # not held here: passed through to Layer 1, whole, and stored nowhere
            eth, source = _read_with_source(b, "KRW-ETH", start, end)
            assert source == "layer1_api" and fake.request_count() > asked
            assert eth.tobytes() == b.candles("KRW-ETH", "1m", start=start, end=end).tobytes()
            with pytest.raises(StorageUnavailableError):
                b.write_candles("KRW-ETH", "1m", eth[:1])
        finally:
            pg_cluster.start()
        monkeypatch.setattr(mds.store.health, "_RETRY_DEGRADED_S", 0.0)
        _wait_for(lambda: b._health.feed_live)
        b.write_candles("KRW-ETH", "1m", eth)  # reconnected by itself
        assert "sqlite" not in b.stats()["degraded"]


def test_a_directory_used_with_a_shared_history_then_without_it_answers_no_server_rows(
    tmp_path: Path, pg_url: str
) -> None:
    rows = generate_market("KRW-BTC", "1m", T0, T0 + 100 * MIN, liquidity="liquid", seed=13)
    path = tmp_path / "s"
    with _open(path, pg_url) as st:
        st.write_candles("KRW-BTC", "1m", rows, complete=(T0, T0 + 100 * MIN))
        assert len(st.candles("KRW-BTC", "1m", start=T0, end=T0 + 100 * MIN)) == 100  # LMDB holds them
    with mds.open(path, config=Config(lookup="storage_first"), clock=lambda: NOW) as st:  # its SQLite file
        assert len(st.candles("KRW-BTC", "1m", start=T0, end=T0 + 100 * MIN)) == 0
        assert st.coverage("KRW-BTC", "1m") == []
        assert st.check().ok, st.check().problems
