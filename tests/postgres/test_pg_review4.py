"""Fourth hostile review of the shared history: the fixes of 83620af (a read whose series was
written while the store's lock was free for a server read starts over on the lock: Moved; the
reads check the cached series id: StaleCatalog; panel in one hold; the counting lock of 3.10).

Each test shows one defect on the code it was written against (83620af); both are fixed: a read
that gives an attempt up after calling Layer 1 still answers ``layer1_api`` (``reading.fetched``),
and a range read whose covered part was deleted while Layer 1 answered starts over (Moved).
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest
from test_pg_review import MIN, SYM, T0, WAIT_S, _rows, _until
from test_pg_review3 import _pause_once, _with_layer1

import mds
from mds import DataType, StorageRequest, StorageUnavailableError
from mds.store.health import Moved


def _moves(monkeypatch: pytest.MonkeyPatch, store: mds.Store) -> list[str]:
    """The methods whose server read raised Moved (the read then started over)."""
    moved: list[str] = []
    tiers = store._health
    real = tiers.read_db

    def read_db(method: str, *a: Any, **kw: Any) -> Any:
        try:
            return real(method, *a, **kw)
        except Moved:
            moved.append(method)
            raise

    monkeypatch.setattr(tiers, "read_db", read_db)
    return moved


# ---------------------------------------------------------------------------- Moved: what the restart forgets
def test_a_read_that_fetched_from_layer1_says_so_after_a_moved_restart(
    tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing stored. store.get() asks the latest 10: the read fetches them from Layer 1 and
    stores them, then reads them back from the server off the lock. Meanwhile another thread
    writes to the series (the same candles again: the stamp moves), so the read starts over on
    the lock (Moved); the restart finds everything covered and reads the server only. Before
    83620af the server read was made again inside the same attempt and the answer said
    layer1_api; now the first attempt's fetch is forgotten."""
    rows = _rows()
    with _with_layer1(tmp_path / "b", pg_url, rows) as b:
        assert _until(lambda: b._health.feed_live)
        moved = _moves(monkeypatch, b)
        state = _pause_once(monkeypatch, b, "read_latest", lambda: b.write_candles(SYM, "1m", rows[-10:]))
        req = StorageRequest(DataType.CANDLE, [SYM], timeframe="1m", count=10, end_time=T0 + 100 * MIN)
        resp = asyncio.run(b.get(req))
        assert state["done"].is_set() and not state["error"], state["error"]
        assert resp.success, resp.error
        assert resp.arrays[SYM].tobytes() == rows[-10:].tobytes()
        assert b._fetcher is not None and b._metrics.layer1_calls >= 1, "Layer 1 was called"
        assert moved == ["read_latest"], "the read was not started over (no Moved): the test did not reach its case"
        assert (resp.metadata.source, resp.metadata.cache_hit) == ("layer1_api", False)


# ---------------------------------------------------------------------------- the other lock-free window
def test_a_range_is_not_answered_short_when_a_delete_comes_during_the_layer1_fetch(
    tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Candles [T0, T0+50m) stored and covered. A read of [T0, T0+100m) subtracts the coverage,
    fetches [T0+50m, T0+100m) from Layer 1 (the store's lock is free while it waits: Fetcher.run)
    and meanwhile another thread deletes [T0, T0+25m). The read stores the fetched half and
    reads [T0, T0+100m) from the server with a guard taken after the fetch, so nothing tells it
    that the first quarter it decided was covered is gone: 75 of 100 candles, as complete. The
    same defect test_pg_review3.py fixed for the server read's window (review 3, second test)."""
    rows = _rows()
    with _with_layer1(tmp_path / "b", pg_url, rows) as b:
        assert _until(lambda: b._health.feed_live)
        b.write_candles(SYM, "1m", rows[:50], complete=(T0, T0 + 50 * MIN))
        assert b._fetcher is not None
        connector = b._fetcher.connector
        real = connector.request_data_from_layer1
        done = threading.Event()
        errors: list[BaseException] = []

        def delete() -> None:
            try:
                b.delete(SYM, "1m", start=T0, end=T0 + 25 * MIN)
            except BaseException as exc:  # reported by the test
                errors.append(exc)

        async def request(req: Any) -> Any:
            if not done.is_set():  # the store's thread waits for this answer, its lock free
                th = threading.Thread(target=delete, daemon=True)
                th.start()
                await asyncio.to_thread(th.join, WAIT_S)
                assert not th.is_alive(), "the delete could not take the store's lock"
                done.set()
            return await real(req)

        monkeypatch.setattr(connector, "request_data_from_layer1", request)
        try:
            got = b.candles(SYM, "1m", start=T0, end=T0 + 100 * MIN)
        except StorageUnavailableError:
            got = None  # a typed error is a fine answer
        assert done.is_set() and not errors, errors
        assert got is None or len(got) == 100, f"{len(got)} of 100 candles: the deleted quarter read as no trades"
