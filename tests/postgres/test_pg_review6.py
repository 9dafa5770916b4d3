"""Hostile review of the change feed's heartbeat bookkeeping (commit e6231fa: sent, hung and
unsendable heartbeats told apart; awaited heartbeats outlive a reconnect, timed from it). Each
test shows one way the feed still flapped, stayed unchecked or grew without bound; each failed
on that code. Fixed by the commit after it: heartbeats committed before a reconnect collapse
into one lost heartbeat (not evidence of deafness), a deaf listener's reconnect keeps a working
heartbeat connection, and a hang is timed and cut on the connection the send actually uses.

Hosts are stores on separate paths over one throwaway database (fixtures in conftest.py).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pg_cluster import Cluster
from test_pg_review import NOW, SYM, _a_writes_b_hears, _revised, _rows, _until

import mds
import mds.tiers.postgres.feed as feed
from mds import Config, StorageUnavailableError


def _open(path: Path, url: str, **config: Any) -> mds.Store:
    return mds.open(path, config=Config(lookup="storage_first", **config), clock=lambda: NOW, history=url)


def _listener(store: mds.Store) -> Any:
    listener = store._health.states["sqlite"].obj._listener
    assert _until(lambda: listener._pinger is not None and not listener._pinger.closed), "no heartbeat connection"
    return listener


# ---------------------------------------------------------------------------- heartbeats sent before a reconnect
def test_heartbeats_sent_before_a_reconnect_make_a_working_listener_reconnect_again_and_again(
    tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch, stopped: list[int]
) -> None:
    """B's listening backend stops (deaf): heartbeats are sent and not heard, and after
    DEAF_AFTER_S B rightly replaces its listening connection, cutting its heartbeat's too. The
    heartbeat's connection then cannot be had again (a connection limit: the listener got a slot,
    the heartbeat did not), the case e6231fa says keeps the feed untrusted but connected. But
    the heartbeats sent to the deaf connection stay awaited as 'sent' and are timed from the new
    connection: DEAF_AFTER_S later they make the new, working, listener count itself deaf; it
    reconnects, is trusted at once, drops every copy (memory, LMDB), warns, and so on every 2 s
    for as long as the limit lasts (the flapping review 5 reported, entered through a deaf
    episode)."""
    real = feed.connect
    refuse = [False]

    def limited(url: str, **kw: Any) -> Any:
        if refuse[0] and kw.get("application") == "mds-ping":
            raise StorageUnavailableError("FATAL: sorry, too many clients already (the test)")
        return real(url, **kw)

    rows = _rows()
    with _open(tmp_path / "a", pg_url) as a, _open(tmp_path / "b", pg_url) as b:
        _a_writes_b_hears(a, b, rows)
        listener = _listener(b)
        monkeypatch.setattr(feed, "connect", limited)
        drops: list[int] = []  # every copy dropped: the listener's reconnect count at the time
        forget = b._remote._forget_all

        def counted() -> None:
            drops.append(listener.reconnects)
            forget()

        monkeypatch.setattr(b._remote, "_forget_all", counted)
        pid = listener.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)  # the listening connection goes deaf
        stopped.append(pid)
        assert _until(lambda: sum(beat.state == feed._SENT for beat in list(listener._awaited)) >= 3)
        refuse[0] = True  # from now on no heartbeat connection can be had
        # the deaf listener is replaced (right), and its heartbeat's connection cut with it
        assert _until(lambda: listener.reconnects >= 1, 3 * feed.DEAF_AFTER_S), "the deaf listener was never replaced"
        assert _until(lambda: listener.pid not in (None, pid))
        # (since the fix a deaf listener's reconnect keeps a heartbeat connection that works:
        # this one is lost too, as on a path that dropped both)
        if listener._pinger is not None and not listener._pinger.closed:
            with psycopg.connect(pg_url, autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (listener._pinger.info.backend_pid,))
        first = listener.reconnects
        assert _until(lambda: not b._health.feed_live), "trusted with no heartbeat to check it"
        # the new listening connection works: it hears A
        heard = b._remote.received
        a.write_candles(SYM, "1m", _revised(rows[-1:]))
        assert _until(lambda: b._remote.received > heard, 1.0), "the new listening connection does not hear A"
        time.sleep(3 * feed.DEAF_AFTER_S + 1.0)
        again = [d for d in drops if d > first]
        assert listener.reconnects == first and not again, (
            f"{listener.reconnects - first} reconnects of a working listener and {len(again)} drops of every "
            f"copy in {3 * feed.DEAF_AFTER_S + 1.0:.0f} s; awaited: "
            f"{[beat.state for beat in list(listener._awaited)][:3]}..."
        )


# ---------------------------------------------------------------------------- a cut that reaches no connection
def test_a_heartbeat_cut_while_it_connects_is_never_cut_again_and_the_feed_never_recovers(
    tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch, stopped: list[int]
) -> None:
    """B's heartbeat connection is lost; the next one takes longer than DEAF_AFTER_S to open (a
    loaded server) and its server process then stops answering. The listener marks the
    heartbeat cut after DEAF_AFTER_S, but ``shut(self._pinger)`` found no connection (the
    heartbeat thread was still in ``connect``), and a beat is cut only once: the send that then
    hangs on the new connection is never cut (no statement_timeout on it, and TCP keepalives
    are answered by the server's kernel). No heartbeat is ever sent again; B's working feed is
    never trusted again (every read asks the server) until the store is closed."""
    real = feed.connect
    slow = [False]
    done: list[float] = []

    def slow_then_hung(url: str, **kw: Any) -> Any:
        if slow[0] and kw.get("application") == "mds-ping":
            slow[0] = False
            time.sleep(feed.DEAF_AFTER_S + 0.5)  # the connect takes longer than DEAF_AFTER_S
            conn = real(url, **kw)
            os.kill(conn.info.backend_pid, signal.SIGSTOP)  # ... and its server process then hangs
            stopped.append(conn.info.backend_pid)
            done.append(time.monotonic())
            return conn
        return real(url, **kw)

    rows = _rows()
    with _open(tmp_path / "a", pg_url) as a, _open(tmp_path / "b", pg_url) as b:
        _a_writes_b_hears(a, b, rows)
        listener = _listener(b)
        listening = listener.pid
        monkeypatch.setattr(feed, "connect", slow_then_hung)
        slow[0] = True
        with psycopg.connect(pg_url, autocommit=True) as admin:  # the heartbeat's connection is lost
            admin.execute("SELECT pg_terminate_backend(%s)", (listener._pinger.info.backend_pid,))
        assert _until(lambda: not b._health.feed_live), "B kept trusting a feed it could not check"
        assert _until(lambda: bool(done), 3 * feed.DEAF_AFTER_S), "the heartbeat never connected"
        # the listening connection works throughout: it hears A
        heard = b._remote.received
        a.write_candles(SYM, "1m", _revised(rows[-1:]))
        assert _until(lambda: b._remote.received > heard, 1.0)
        # a hang on the new connection is cut within DEAF_AFTER_S like any other, and the next
        # heartbeat (on a connection that works) is heard
        recovered = _until(lambda: b._health.feed_live, 3 * feed.DEAF_AFTER_S)
        assert recovered, (
            f"feed untrusted {time.monotonic() - done[0]:.1f} s after the hung connection opened; "
            f"awaited: {[beat.state for beat in list(listener._awaited)]}, "
            f"heartbeat thread alive: {listener._pinger_thread.is_alive()}"
        )
        assert listener.pid == listening


# ---------------------------------------------------------------------------- awaited heartbeats grow without bound
def test_a_listener_that_never_hears_keeps_every_heartbeat_for_ever(
    tmp_path: Path, pg_url: str, pg_cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """B's listening connection never hears anything (simulated by sending it to another database
    of the server, as a transaction-pooling proxy loses LISTEN): it is rightly counted deaf and
    reconnected every DEAF_AFTER_S. Each heartbeat sent meanwhile stays awaited across every
    reconnect (e6231fa dropped the clear): ``_awaited`` grows by 10 a second without bound
    (860 000 a day), and every 50 ms poll copies and scans all of it under the lock the heartbeat
    thread needs."""
    real = feed.connect
    elsewhere = pg_cluster.url()

    def misrouted(url: str, **kw: Any) -> Any:
        if kw.get("application") == "mds-listener":
            return real(elsewhere, **kw)
        return real(url, **kw)

    monkeypatch.setattr(feed, "connect", misrouted)
    with _open(tmp_path / "b", pg_url) as b:
        listener = b._health.states["sqlite"].obj._listener
        assert _until(lambda: listener.reconnects >= 4, 6 * feed.DEAF_AFTER_S), "the deaf listener is not replaced"
        # what one deaf period can hold (the old clear at a reconnect kept it there), twice over
        bound = 2 * feed.DEAF_AFTER_S / feed.HEARTBEAT_S
        assert len(listener._awaited) <= bound, (
            f"{len(listener._awaited)} heartbeats awaited after {listener.reconnects} reconnects"
        )
