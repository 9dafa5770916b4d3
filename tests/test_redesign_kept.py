"""Behaviour the issue-15 redesign must keep (found by a hostile review of it).

Each test failed on the first cut of the redesign and passes on the code before it (4cd12db) and
after the fixes: settings of the router, the connector, the SQLite tier and the store read where
they live at each use, a bad setting failing before a file is created, the stored schema text,
logger names, and the store's answers through write, batch and delete.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import apsw
import pytest

import mds
from mds import Config, DataType, SmartRouterConnector, StorageRequest
from mds.errors import Layer1Error, StorageUnavailableError
from mds.layer1 import UpbitRouter
from mds.testing import FakeUpbit, dense_candles
from mds.tiers.durable import DamagedChunkError
from mds.tiers.sqlite import SqliteStore

MIN = 60_000
DAY = 86_400_000
NOW = 1_750_000_000_000 // MIN * MIN + 30_000  # half a minute into an interval
SYM = "KRW-BTC"


def _tier(st: mds.Store, name: str) -> Any:
    """The tier object ``name`` of a store (internal)."""
    return st._health.states[name].obj


# ---------------------------------------------------------------------------------------------
# F1. UpbitRouter: settings are copied into Transport / ResponseCache at construction.
#     Old: every call read self.<setting>; new: assigning the public attribute has no effect.
# ---------------------------------------------------------------------------------------------
def test_router_cache_policy_follows_its_settings() -> None:
    r = UpbitRouter("http://127.0.0.1:9", candle_ttl_s=300.0, ticker_ttl_s=5.0)
    r.candle_ttl_s = 0.0
    r.ticker_ttl_s = 0.0
    pol = r.cache_policy()
    assert pol["candle_ttl_s"] == 0.0
    assert pol["ticker_ttl_s"] == 0.0


@pytest.fixture
def upbit() -> Any:
    arr = dense_candles(300, NOW // MIN * MIN - 300 * MIN)
    with FakeUpbit({(SYM, "1m"): arr}, clock=lambda: NOW, rate_limit=None) as up:
        yield up


def test_router_max_retries_set_after_construction_is_honoured(upbit: FakeUpbit) -> None:
    r = UpbitRouter(upbit.base_url, rate_limit=1000, backoff_s=0.001, max_backoff_s=0.001, clock=lambda: NOW)
    r.max_retries = 0  # no retry: one HTTP 500 is the answer
    upbit.inject("status", times=1, status=500)
    with pytest.raises(Layer1Error, match="after 1 attempts"):
        asyncio.run(r.get_candle_data(SYM, "1m", count=5))
    assert upbit.request_count("/v1/candles") == 1


def test_router_candle_cache_disabled_after_construction_is_not_used(upbit: FakeUpbit) -> None:
    r = UpbitRouter(upbit.base_url, rate_limit=1000, clock=lambda: NOW)
    r.candle_ttl_s = 0.0  # "0 disables it"

    async def twice() -> None:
        await r.get_candle_data(SYM, "1m", count=5)
        await r.get_candle_data(SYM, "1m", count=5)

    asyncio.run(twice())
    assert upbit.request_count("/v1/candles") == 2
    assert r.peek_cache("candle", SYM, "1m", count=5) is None


# ---------------------------------------------------------------------------------------------
# F2. SmartRouterConnector: CachePeek copies layer1 / timeout_s / page_size at construction, while
#     _call still reads the connector's own attributes (inconsistent within one object).
# ---------------------------------------------------------------------------------------------
class _SlowPeekLayer1:
    """The Smart Router's shape with an async peek_cache that takes a while (and misses)."""

    async def get_candle_data(self, *a: Any, **k: Any) -> Any:
        return {"success": True, "data": [], "metadata": {}}

    async def get_ticker_data(self, *a: Any, **k: Any) -> Any:
        return {"success": True, "data": [], "metadata": {}}

    async def get_orderbook_data(self, *a: Any, **k: Any) -> Any:
        return {"success": True, "data": [], "metadata": {}}

    async def get_trades(self, *a: Any, **k: Any) -> Any:
        return {"success": True, "data": [], "metadata": {}}

    async def peek_cache(self, *a: Any, **k: Any) -> Any:
        await asyncio.sleep(60.0)  # far past any bound: only the timeout ends it early
        return None


def test_connector_timeout_set_after_construction_bounds_cache_peeks() -> None:
    c = SmartRouterConnector(_SlowPeekLayer1(), timeout_s=30.0)
    c.timeout_s = 0.05
    req = StorageRequest(DataType.CANDLE, [SYM], timeframe="1m", count=5)
    t0 = time.monotonic()
    with pytest.raises(Layer1Error, match="timed out"):
        asyncio.run(c.get_from_layer1_cache(req))
    assert time.monotonic() - t0 < 30.0  # cut by the 0.05 s bound, not by the peek's end


def test_connector_layer1_replaced_after_construction_is_peeked() -> None:
    class Peeks(_SlowPeekLayer1):
        def peek_cache(self, *a: Any, **k: Any) -> Any:  # sync, instant, raises
            raise RuntimeError("the replacement's peek_cache was called")

    c = SmartRouterConnector(_SlowPeekLayer1(), timeout_s=30.0)
    c.layer1 = Peeks()
    req = StorageRequest(DataType.CANDLE, [SYM], timeframe="1m", count=5)
    with pytest.raises(Layer1Error, match="replacement"):
        c.peek_now(req)


# ---------------------------------------------------------------------------------------------
# F3. SqliteStore: vacuum_threshold / maintenance_interval_s / compress_after_days became
#     read-only properties (old: plain attributes, read at each use).
# ---------------------------------------------------------------------------------------------
def test_sqlite_upkeep_settings_can_be_changed_on_an_open_tier(tmp_path: Path) -> None:
    db = SqliteStore(tmp_path / "c.sqlite3", clock=lambda: NOW, compress_after_days=7.0)
    try:
        old = dense_candles(2000, NOW // MIN * MIN - 30 * DAY)
        db.write(SYM, mds.parse_timeframe("1m"), old)
        db.compress_after_days = None  # keep everything raw from now on
        db.maintenance_interval_s = None
        assert db.maintain()["compressed_chunks"] == 0
        assert db.maybe_maintain() is False
    finally:
        db.close()


# ---------------------------------------------------------------------------------------------
# F4. SqliteStore.__init__: a bad setting used to fail before anything was created; now the file
#     is created (schema written) and its connection left open before the setting is checked.
# ---------------------------------------------------------------------------------------------
def test_sqlite_bad_setting_fails_before_the_file_is_created(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite3"
    with pytest.raises(ValueError):
        SqliteStore(path, vacuum_threshold="not a number")  # type: ignore[arg-type]
    assert not path.exists()


# ---------------------------------------------------------------------------------------------
# F5. Store: writable has one home (the tiers); config is fixed at open.
# ---------------------------------------------------------------------------------------------
def test_store_writable_flag_changed_after_open_is_honoured(tmp_path: Path) -> None:
    with mds.open(tmp_path / "s", clock=lambda: NOW) as st:
        st.writable = False
        with pytest.raises(StorageUnavailableError, match="read-only"):
            st.write_candles(SYM, "1m", dense_candles(10, NOW // MIN * MIN - 20 * MIN))
        assert st.coverage(SYM, "1m") == []


def test_store_config_cannot_be_replaced_on_an_open_store(tmp_path: Path) -> None:
    # Before the redesign an assignment was taken up by some parts of an open store and not by
    # others (the tiers were opened with the old one): now it is refused outright.
    cfg = Config(tiers=("memory", "sqlite"))
    with mds.open(tmp_path / "s", config=cfg, clock=lambda: NOW) as st:
        with pytest.raises(AttributeError):
            st.config = dataclasses.replace(cfg, memory_candles=10)  # type: ignore[misc]
        assert st.config is cfg
        rows = dense_candles(100, NOW // MIN * MIN - 100 * MIN)
        st.write_candles(SYM, "1m", rows)
        held = _tier(st, "memory").held(SYM, mds.parse_timeframe("1m"))
        assert held is not None
        assert (held[1] - held[0]) // MIN == 100  # the configuration it was opened with


# ---------------------------------------------------------------------------------------------
# F6. On-disk: the text of the coverage table's DDL (kept in sqlite_schema) changed (a comment
#     renamed _coverage_crc -> coverage_crc), so new files differ from old ones byte-wise.
# ---------------------------------------------------------------------------------------------
def test_new_database_file_has_the_same_schema_text(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite3"
    SqliteStore(path).close()
    conn = apsw.Connection(str(path))
    try:
        sql = str(conn.execute("SELECT sql FROM sqlite_schema WHERE name = 'coverage'").fetchall()[0][0])
    finally:
        conn.close()
    assert "-- _coverage_crc(sid, start_ts, end_ts)" in sql


# ---------------------------------------------------------------------------------------------
# F7. Logger names moved with the code; the router's 429 warning left the "mds.layer1.router"
#     hierarchy (now "mds.layer1._transport"), so logging configured for the router misses it.
# ---------------------------------------------------------------------------------------------
def test_router_429_warning_is_logged_under_the_router_logger(
    upbit: FakeUpbit, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    r = UpbitRouter(upbit.base_url, rate_limit=1000, backoff_s=0.001, max_backoff_s=0.001, clock=lambda: NOW)
    upbit.inject("rate_limit", times=1)
    with caplog.at_level(logging.WARNING, logger="mds.layer1.router"):
        asyncio.run(r.get_candle_data(SYM, "1m", count=5))
    assert any("429" in rec.getMessage() and rec.name.startswith("mds.layer1.router") for rec in caplog.records)


# ---------------------------------------------------------------------------------------------
# Checks that hold in both trees (guards, not findings).
# ---------------------------------------------------------------------------------------------
def test_damaged_chunk_error_pickles_with_its_attributes() -> None:
    import pickle

    assert issubclass(DamagedChunkError, StorageUnavailableError)
    e = DamagedChunkError("damaged", SYM, "1m", 5, 9)
    for proto in range(pickle.HIGHEST_PROTOCOL + 1):
        d = pickle.loads(pickle.dumps(e, proto))
        assert type(d) is DamagedChunkError
        assert (str(d), d.symbol, d.timeframe, d.span) == ("damaged", SYM, "1m", (5, 9))


def test_import_mds_does_not_import_httpx() -> None:
    import subprocess
    import sys

    code = "import sys, mds; print('httpx' in sys.modules, 'mds.layer1.router' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_store_answers_identically_through_write_batch_delete(tmp_path: Path) -> None:
    tf = "1m"
    base = NOW // MIN * MIN - 500 * MIN
    rows = dense_candles(400, base, seed=3)
    with mds.open(tmp_path / "s", clock=lambda: NOW) as st:
        st.write_candles(SYM, tf, rows[:200], complete=(base, base + 200 * MIN))
        try:
            with st.batch():
                st.write_candles(SYM, tf, rows[200:], complete=(base + 200 * MIN, base + 400 * MIN))
                raise RuntimeError("roll back")
        except RuntimeError:
            pass
        assert st.coverage(SYM, tf) == [(base, base + 200 * MIN)]
        assert st.candles(SYM, tf, count=300).tobytes() == rows[:200].tobytes()
        assert st.delete(SYM, tf, start=base, end=base + 50 * MIN) == 50
        assert st.coverage(SYM, tf) == [(base + 50 * MIN, base + 200 * MIN)]
        assert st.check().ok
