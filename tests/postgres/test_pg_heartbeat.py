"""The change feed's heartbeat tells its failures apart (mds/tiers/postgres/feed.py; a send
that hangs is cut without replacing a listening connection that works: test_pg_review.py): a
heartbeat that cannot be sent keeps the feed untrusted, warns once, backs off, and recovers
when a connection can be had; a bug in the heartbeat thread does not end the heartbeats.

Hosts are stores on separate paths over one throwaway database (fixtures in conftest.py).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from test_pg_review import NOW, _until

import mds
import mds.tiers.postgres.feed as feed
from mds import Config, StorageUnavailableError

FEED = "mds.tiers.postgres.feed"


def _open(path: Path, url: str) -> mds.Store:
    return mds.open(path, config=Config(lookup="storage_first"), clock=lambda: NOW, history=url)


def _listener(store: mds.Store) -> Any:
    listener = store._health.states["sqlite"].obj._listener
    assert _until(lambda: listener._pinger is not None and not listener._pinger.closed), "no heartbeat connection"
    return listener


def _messages(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == FEED and text in r.getMessage()]


def test_a_heartbeat_that_cannot_be_sent_warns_once_backs_off_and_recovers(
    tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """No connection for the heartbeat (a connection limit): untrusted, one warning, attempts
    backed off (not one per HEARTBEAT_S), and trusted again once a connection can be had."""
    caplog.set_level(logging.INFO, logger=FEED)
    real = feed.connect
    attempts: list[float] = []
    refuse = [True]

    def limited(url: str, **kw: Any) -> Any:
        if kw.get("application") == "mds-ping":
            attempts.append(time.monotonic())
            if refuse[0]:
                raise StorageUnavailableError("FATAL: sorry, too many clients already (the test)")
        return real(url, **kw)

    with _open(tmp_path / "b", pg_url) as b:
        listener = _listener(b)
        assert _until(lambda: b._health.feed_live)
        monkeypatch.setattr(feed, "connect", limited)
        with psycopg.connect(pg_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (listener._pinger.info.backend_pid,))
        assert _until(lambda: not b._health.feed_live), "B kept trusting a feed it could not check"
        t0 = time.monotonic()
        assert _until(lambda: len(attempts) >= 3, 10.0), f"the heartbeat stopped trying: {attempts}"
        time.sleep(max(0.0, t0 + 3.0 - time.monotonic()))
        window = [t for t in attempts if t >= t0]
        # unbacked: one attempt per HEARTBEAT_S (30 in 3 s); backed off: 0.2 + 0.4 + 0.8 + 1 + 1 ...
        assert len(window) <= 8, f"{len(window)} connection attempts in 3 s"
        assert len(_messages(caplog, "cannot be sent")) == 1, "warned more than once for one outage"
        assert not b._health.feed_live and listener.reconnects == 0
        refuse[0] = False
        assert _until(lambda: b._health.feed_live, 5.0), "never trusted again once a connection could be had"
        assert _messages(caplog, "sent again")
        assert listener.reconnects == 0


def test_a_bug_in_the_heartbeat_does_not_end_the_heartbeats(
    tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An unexpected exception in a heartbeat is logged; the heartbeats go on (had the thread
    ended, nothing would check the feed any more)."""
    with _open(tmp_path / "b", pg_url) as b:
        listener = _listener(b)
        real = listener._ping
        raised: list[int] = []

        def buggy() -> bool:
            if len(raised) < 3:
                raised.append(1)
                raise RuntimeError("a bug (the test)")
            return bool(real())

        monkeypatch.setattr(listener, "_ping", buggy)
        assert _until(lambda: len(raised) == 3)
        assert listener._pinger_thread.is_alive()
        beats = listener._beats
        assert _until(lambda: listener._beats > beats + 2), "no heartbeat after the bug"
        assert _until(lambda: b._health.feed_live, 5.0)
        assert any("heartbeat failed" in r.getMessage() and r.exc_info for r in caplog.records if r.name == FEED)
