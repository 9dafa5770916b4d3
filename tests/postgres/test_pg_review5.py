"""Hostile review of the change feed's heartbeat (commit 14cdda1: numbered heartbeats from a
thread of their own; a heartbeat 0.5 s late makes the feed untrusted, the next one heard trusts
it again, 2 s reconnects). Each test shows one way a host could still answer another host's
overwritten candle; each failed on that code (the first was fixed in 6b6945a, the other two by
the heartbeat bookkeeping that followed: sent, hung and unsendable heartbeats told apart).

Hosts are stores on separate paths over one throwaway database (fixtures in conftest.py).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pg_cluster import Cluster, hang
from test_pg_review import NOW, SYM, _a_writes_b_hears, _from_memory, _revised, _rows, _until

import mds
from mds import Config, StorageUnavailableError


def _open(path: Path, url: str, **config: Any) -> mds.Store:
    return mds.open(path, config=Config(lookup="storage_first", **config), clock=lambda: NOW, history=url)


def _continue(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGCONT)


# ---------------------------------------------------------------------------- a deaf feed, then a hung server
def test_a_deaf_feed_then_a_hung_server_answers_the_copy_the_feed_never_corrected(
    tmp_path: Path, pg_url: str, pg_cluster: Cluster, stopped: list[int]
) -> None:
    """B's listening backend stops (the feed is deaf: A's revision is never delivered); B notices
    the late heartbeat and stops trusting its feed, but keeps ``copies_trusted`` as if the feed
    had heard everything until then. The server then hangs (B cannot reach it: a partition, a
    stalled server) before B asked it anything: B answers from its memory copy the candle A
    overwrote before, acknowledged (DESIGN.md 6: a typed error, or A's candle). Fixed: a feed
    untrusted while still connected clears ``copies_trusted``."""
    rows = _rows()
    with _open(tmp_path / "a", pg_url) as a, _open(tmp_path / "b", pg_url, history_timeout_s=2.0) as b:
        try:
            _a_writes_b_hears(a, b, rows)
            assert _until(lambda: _from_memory(b)), "B never answered from memory"
            pid = b._health.states["sqlite"].obj._listener.pid
            os.kill(pid, signal.SIGSTOP)  # B's feed hears nothing more, with no error
            stopped.append(pid)
            new = _revised(rows[-1:])
            a.write_candles(SYM, "1m", new)  # committed; B's feed never delivers it
            assert _until(lambda: not b._health.feed_live), "B never noticed its feed went silent"
            assert not b._health.copies_trusted  # fixed: a deaf feed vouches for no copy
            hang(pg_cluster, pg_url, stopped)  # the server stops answering B (within DEAF_AFTER_S)
            try:
                got = b.candles(SYM, "1m", count=50)
            except StorageUnavailableError:
                got = None  # right: B cannot prove what it holds is current
            assert got is None or float(got["close"][-1]) == float(new["close"][0]), "B answers A's overwritten candle"
        finally:
            _continue(stopped)


# ---------------------------------------------------------------------------- a hung heartbeat outlives a reconnect
def test_a_reconnect_while_the_heartbeat_hangs_trusts_a_feed_nothing_checks_any_more(
    tmp_path: Path, pg_url: str, stopped: list[int]
) -> None:
    """B's heartbeat connection hangs (its server process stops; a path dropped silently) and its
    send waits; before the feed counts itself deaf (which would cut the heartbeat), its listening
    connection is lost with an error (terminated, reset). The reconnect forgot the awaited
    heartbeat, the hung send was never cut, and no heartbeat was sent again: when the new
    listening connection went deaf too, B answered A's overwritten candle from memory for ever.
    Fixed: awaited heartbeats outlive a reconnect (timed from it), and a hung send is cut."""
    rows = _rows()
    with _open(tmp_path / "a", pg_url) as a, _open(tmp_path / "b", pg_url) as b:
        try:
            _a_writes_b_hears(a, b, rows)
            listener = b._health.states["sqlite"].obj._listener
            assert _until(lambda: listener._pinger is not None and not listener._pinger.closed)
            pinger = listener._pinger.info.backend_pid
            os.kill(pinger, signal.SIGSTOP)  # the next heartbeat's send hangs
            stopped.append(pinger)
            assert _until(lambda: not b._health.feed_live), "B kept trusting a feed it could not check"
            with psycopg.connect(pg_url, autocommit=True) as admin:  # the listening connection drops
                admin.execute("SELECT pg_terminate_backend(%s)", (listener.pid,))
            assert _until(lambda: listener.reconnects >= 1 and b._health.feed_live)
            assert _until(lambda: _from_memory(b)), "B never answered from memory"

            pid = listener.pid  # the new listening backend goes deaf too
            assert pid is not None
            os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)
            new = _revised(rows[-1:])
            a.write_candles(SYM, "1m", new)
            seen = _until(lambda: float(b.candles(SYM, "1m", count=50)["close"][-1]) == float(new["close"][0]), 6.0)
            assert seen, (
                f"B still answers A's overwritten candle 6 s later; trusted={listener.trusted.is_set()} "
                f"awaited={len(listener._awaited)} heartbeat thread alive={listener._pinger_thread.is_alive()}"
            )
        finally:
            _continue(stopped)


# ---------------------------------------------------------------------------- a heartbeat that cannot be sent
def test_a_heartbeat_connection_refused_drops_every_copy_again_and_again(
    tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The heartbeat's connection is lost and cannot be had again (max_connections or a role's
    connection limit reached; the listening connection is fine and hears A's writes). B rightly
    stops trusting its feed; but every 2 s it also drops the working listening connection,
    trusts the new one at once (no heartbeat heard on it), drops every copy it holds (memory,
    LMDB: a full refill from the server), logs a warning and stops trusting it again 0.5 s later,
    for as long as the connection limit lasts. Fixed: a heartbeat that cannot be sent keeps the
    feed untrusted but connected, and retries with a backoff."""
    import mds.tiers.postgres.feed as feed

    real = feed.connect

    def no_heartbeat_slot(url: str, **kw: Any) -> Any:
        if kw.get("application") == "mds-ping":
            raise StorageUnavailableError("FATAL: sorry, too many clients already (the test)")
        return real(url, **kw)

    rows = _rows()
    with _open(tmp_path / "a", pg_url) as a, _open(tmp_path / "b", pg_url) as b:
        _a_writes_b_hears(a, b, rows)
        listener = b._health.states["sqlite"].obj._listener
        assert _until(lambda: listener._pinger is not None and not listener._pinger.closed)
        drops: list[float] = []
        forget = b._remote._forget_all

        def counted() -> None:
            drops.append(time.monotonic())
            forget()

        monkeypatch.setattr(b._remote, "_forget_all", counted)
        monkeypatch.setattr(feed, "connect", no_heartbeat_slot)
        with psycopg.connect(pg_url, autocommit=True) as admin:  # the heartbeat's connection is lost
            admin.execute("SELECT pg_terminate_backend(%s)", (listener._pinger.info.backend_pid,))
        assert _until(lambda: not b._health.feed_live), "B kept trusting a feed it could not check"
        # B's feed still hears A: 3 * DEAF_AFTER_S later, nothing should have been dropped again
        _until(lambda: len(drops) >= 3, 3 * feed.DEAF_AFTER_S + 1.0)
        assert len(drops) == 0 and listener.reconnects == 0, (
            f"{len(drops)} drops of every copy, {listener.reconnects} reconnects of a working listener"
        )
