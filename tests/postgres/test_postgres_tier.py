"""The PostgreSQL durable tier against a real (throwaway) server: the layout's live edge and
chunks, damage and quarantine, two hosts writing one series at once, the change feed between
hosts, connection errors, and a server that stops and comes back."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import psycopg
import pytest
from pg_cluster import Cluster, fresh_database, running_cluster
from test_pg_review import _until

from mds.errors import MdsError, StorageUnavailableError
from mds.testing.generators import dense_candles
from mds.tiers._chunks import CHUNK_SLOTS
from mds.tiers.durable import DamagedChunkError
from mds.tiers.postgres import SCHEMA_VERSION, TAIL_MAX, PostgresTier
from mds.timeframes import DAY_MS, MINUTE_MS, parse_timeframe

M1 = parse_timeframe("1m")
SYM = "KRW-BTC"
T0 = 1_700_000_000_000 - 1_700_000_000_000 % DAY_MS
WAIT_S = 15.0  # bound on waiting for an event that should come at once


@pytest.fixture
def tiers(pg_url: str) -> Iterator[list[PostgresTier]]:
    """Tiers opened by a test on its database (``open_`` below), closed at the end."""
    opened: list[PostgresTier] = []
    yield opened
    for t in opened:
        t.close()


def open_(tiers: list[PostgresTier], url: str, **kw: Any) -> PostgresTier:
    kw.setdefault("compress_after_days", None)
    tiers.append(PostgresTier(url, **kw))
    return tiers[-1]


def sql(url: str, query: str, args: Any = None) -> list[Any]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(query, args)
        return cur.fetchall() if cur.description else []


# ---------------------------------------------------------------------------- layout
def test_live_edge_folds_into_chunks_and_reads_stay_whole(pg_url: str, tiers: list[PostgresTier]) -> None:
    t = open_(tiers, pg_url)
    a = dense_candles(3 * CHUNK_SLOTS, T0, seed=1)
    for i in range(0, 40):  # one candle at a time: the live edge, folded past TAIL_MAX
        assert t.write(SYM, M1, a[i : i + 1]) == (1, 0, 0)
    assert sql(pg_url, "SELECT count(*) FROM mds_tail")[0][0] <= TAIL_MAX
    assert t.write(SYM, M1, a) == (len(a) - 40, 0, 40)
    (chunks,) = sql(pg_url, "SELECT count(*) FROM mds_chunk")[0]
    assert chunks >= 3
    assert t.read_range(SYM, M1, T0, T0 + DAY_MS * 3).tobytes() == a.tobytes()
    assert t.stats()["schema_version"] == SCHEMA_VERSION
    assert t.integrity_problems() == []


def _month_old_history(tiers: list[PostgresTier], url: str, chunks: int) -> tuple[PostgresTier, np.ndarray, list[int]]:
    """A tier whose clock (the returned list, settable) stands 30 days after ``chunks`` chunks of
    stored candles: all older than ``compress_after_days``."""
    now = [T0 + 30 * DAY_MS]
    t = open_(tiers, url, clock=lambda: now[0], compress_after_days=7.0)
    a = dense_candles(chunks * CHUNK_SLOTS, T0, seed=chunks)
    t.write(SYM, M1, a)
    return t, a, now


def test_old_chunks_are_compressed_and_read_the_same(pg_url: str, tiers: list[PostgresTier]) -> None:
    t, a, _ = _month_old_history(tiers, pg_url, 4)
    report = t.maintain()
    assert report["compressed_chunks"] >= 3
    assert t.stats()["chunks_compressed"] == report["compressed_chunks"]
    assert t.read_range(SYM, M1, T0, T0 + 5 * DAY_MS).tobytes() == a.tobytes()
    b = a[100:200].copy()
    b["volume"] += 1  # a merge into a compressed chunk
    assert t.write(SYM, M1, b) == (0, 100, 0)
    assert t.read_range(SYM, M1, T0 + 100 * MINUTE_MS, T0 + 200 * MINUTE_MS).tobytes() == b.tobytes()
    assert t.integrity_problems() == []


def test_scheduled_upkeep_compresses_once_the_interval_passed(pg_url: str, tiers: list[PostgresTier]) -> None:
    t, a, now = _month_old_history(tiers, pg_url, 3)
    assert not t.maybe_maintain()
    now[0] += int((t.maintenance_interval_s or 0) * 1000) + 1
    assert t.maybe_maintain()
    assert t.stats()["chunks_compressed"] >= 2
    assert t.read_range(SYM, M1, T0, T0 + 3 * DAY_MS).tobytes() == a.tobytes()


def test_schema_creation_is_safe_when_hosts_open_at_once(pg_url: str, tiers: list[PostgresTier]) -> None:
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def opener() -> None:
        barrier.wait(WAIT_S)
        try:
            PostgresTier(pg_url).close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=opener) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(WAIT_S * 4)
    assert errors == []
    assert sql(pg_url, "SELECT v FROM mds_meta WHERE k = 'schema_version'") == [(SCHEMA_VERSION,)]


def test_readonly_on_an_empty_database_names_the_problem(pg_url: str) -> None:
    with pytest.raises(StorageUnavailableError, match="no mds tables"):
        PostgresTier(pg_url, readonly=True)


def test_maintain_reports_the_dead_tuple_share_and_vacuums(pg_url: str, tiers: list[PostgresTier]) -> None:
    t = open_(tiers, pg_url, vacuum_threshold=0.15)
    a = dense_candles(20 * CHUNK_SLOTS, T0, seed=3)
    t.write(SYM, M1, a)
    t.delete(SYM, M1, T0, T0 + 15 * CHUNK_SLOTS * MINUTE_MS)
    report = t.maintain()
    assert report["fragmentation_before"] > 0.15
    assert report["vacuumed"] and report["analyzed"]
    assert report["fragmentation_after"] < report["fragmentation_before"]
    with pytest.raises(MdsError), t.transaction():
        t.maintain()


# ---------------------------------------------------------------------------- damage
def test_a_damaged_chunk_is_refused_named_and_quarantined(pg_url: str, tiers: list[PostgresTier]) -> None:
    t = open_(tiers, pg_url)
    a = dense_candles(3 * CHUNK_SLOTS, T0, seed=4)
    end = T0 + 3 * CHUNK_SLOTS * MINUTE_MS
    t.write(SYM, M1, a, covered=np.array([[T0, end]], dtype=np.int64))
    (key,) = sql(pg_url, "SELECT min(key) FROM mds_chunk")[0]
    sql(
        pg_url, "UPDATE mds_chunk SET data = overlay(data placing '\\xff'::bytea from 100 for 1) WHERE key = %s", (key,)
    )
    seq = t.commit_seq()
    with pytest.raises(DamagedChunkError) as info:
        t.read_range(SYM, M1, T0, end)
    assert info.value.symbol == SYM and info.value.start <= T0 < info.value.end
    with pytest.raises(DamagedChunkError):  # a write merging into it changes nothing
        t.write(SYM, M1, a[:5])
    assert t.commit_seq() == seq
    assert any("damaged" in p for p in t.integrity_problems())
    spans = t.quarantine_damaged(SYM, M1)
    assert spans == [info.value.span]
    assert t.commit_seq() == seq + 1
    hi = info.value.end
    rest = a[a["ts"] >= hi]
    assert t.read_range(SYM, M1, T0, end).tobytes() == rest.tobytes()
    assert t.coverage(SYM, M1).tolist() == [[hi, end]]
    assert t.integrity_problems() == []


def test_damaged_tail_and_coverage_rows_are_refused_and_quarantined(pg_url: str, tiers: list[PostgresTier]) -> None:
    t = open_(tiers, pg_url)
    a = dense_candles(5, T0, seed=5)
    t.write(SYM, M1, a, covered=np.array([[T0, T0 + 5 * MINUTE_MS]], dtype=np.int64))
    (ts,) = sql(pg_url, "SELECT max(ts) FROM mds_tail")[0]
    sql(pg_url, "UPDATE mds_tail SET v = overlay(v placing '\\x00'::bytea from 20 for 1) WHERE ts = %s", (ts,))
    sql(pg_url, "UPDATE mds_coverage SET end_ts = end_ts + 60000")
    with pytest.raises(DamagedChunkError):
        t.read_latest(SYM, M1, 5)
    with pytest.raises(DamagedChunkError):
        t.coverage(SYM, M1)
    assert len(t.integrity_problems()) == 2
    spans = t.quarantine_damaged(SYM, M1)
    assert (ts, ts + MINUTE_MS) in spans
    assert t.coverage(SYM, M1).shape == (0, 2)
    assert t.read_latest(SYM, M1, 5).tobytes() == a[a["ts"] != ts].tobytes()
    assert t.integrity_problems() == []


# ---------------------------------------------------------------------------- hosts at once
def test_two_hosts_writing_one_series_lose_no_batch_and_end_last_wins(pg_url: str, tiers: list[PostgresTier]) -> None:
    hosts = [open_(tiers, pg_url, origin="a"), open_(tiers, pg_url, origin="b")]
    shared = dense_candles(3 * CHUNK_SLOTS // 2, T0, seed=6)  # chunks and live edge, rewritten by all
    acked: list[tuple[int, int, int]] = []  # (commit_seq, host, batch)
    lock = threading.Lock()
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def run(h: int) -> None:
        try:
            start.wait(WAIT_S)
            for j in range(12):
                batch = shared.copy()
                batch["volume"] = h * 1000 + j  # which batch wrote a row
                own = dense_candles(3, T0 + (10_000 + 100 * (h * 12 + j)) * MINUTE_MS, seed=j)
                own["volume"] = h * 1000 + j
                tier = hosts[h]
                tier.write(SYM, M1, np.concatenate([batch, own]))
                with lock:
                    acked.append((int(tier.last_commit_seq or 0), h, j))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(h,)) for h in (0, 1)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert errors == []
    assert len(acked) == 24 and len({s for s, _, _ in acked}) == 24  # one commit each
    got = hosts[0].read_range(SYM, M1, T0, T0 + 20_000 * MINUTE_MS)
    for _, h, j in acked:  # every acknowledged batch's own rows are there
        lo = T0 + (10_000 + 100 * (h * 12 + j)) * MINUTE_MS
        mine = got[(got["ts"] >= lo) & (got["ts"] < lo + 3 * MINUTE_MS)]
        assert len(mine) == 3 and bool(np.all(mine["volume"] == h * 1000 + j))
    _, h, j = max(acked)
    rows = got[got["ts"] < T0 + len(shared) * MINUTE_MS]
    assert len(rows) == len(shared) and bool(np.all(rows["volume"] == h * 1000 + j))  # the last commit, whole
    assert hosts[1].integrity_problems() == []


# ---------------------------------------------------------------------------- the change feed
def _subscribed(tier: PostgresTier) -> queue.Queue[tuple[Any, ...]]:
    """What ``tier``'s change feed reports, once its listener is connected (the report that it
    started listening taken off)."""
    got: queue.Queue[tuple[Any, ...]] = queue.Queue()
    tier.subscribe(lambda *args: got.put(args))
    assert got.get(timeout=WAIT_S) == (None, None, 0, 0)  # listening now: earlier changes unknown
    assert tier.listening
    return got


def _change(got: queue.Queue[tuple[Any, ...]]) -> tuple[tuple[Any, ...], int]:
    """The next change reported, and how many reports that the feed stopped or started being
    trusted came before it (a late heartbeat on a loaded machine makes such reports too)."""
    markers = 0
    while True:
        item = got.get(timeout=WAIT_S)
        if item[0] is not None:
            return item, markers
        markers += 1


def test_change_feed_reports_other_hosts_and_reconnects(pg_url: str, tiers: list[PostgresTier]) -> None:
    a, b = open_(tiers, pg_url, origin="host-a"), open_(tiers, pg_url, origin="host-b")
    got = _subscribed(b)
    c = dense_candles(10, T0, seed=7)
    a.write(SYM, M1, c)
    assert _change(got)[0] == (SYM, "1m", T0, T0 + 10 * MINUTE_MS)
    b.write(SYM, M1, c[:2])  # its own change: not reported back
    a.delete(SYM, M1, T0, T0 + 5 * MINUTE_MS)
    assert _change(got)[0] == (SYM, "1m", T0, T0 + 5 * MINUTE_MS)
    assert _until(lambda: b.listening, WAIT_S) and b.stats()["listening"]
    killed = sql(
        pg_url,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE application_name = 'mds-listener' AND datname = current_database()",
    )
    assert killed == [(True,)]
    assert _until(lambda: b.listening and b._listener is not None and b._listener.reconnects >= 1, WAIT_S)
    a.write(SYM, M1, c[5:6])
    # reported: stopped listening (changes may go unreported), listening again (anything may
    # have changed); then the change
    change, markers = _change(got)
    assert change == (SYM, "1m", T0 + 5 * MINUTE_MS, T0 + 6 * MINUTE_MS)
    assert markers >= 2
    b.close()
    assert got.empty()


def _write_then_fail(tier: PostgresTier, batch: np.ndarray) -> None:
    with tier.transaction():
        tier.write(SYM, M1, batch)
        raise RuntimeError("boom")


def test_close_stops_the_listener(pg_url: str, tiers: list[PostgresTier]) -> None:
    t = open_(tiers, pg_url)
    _subscribed(t)
    assert t._listener is not None
    thread = t._listener._thread
    t.close()
    assert not thread.is_alive()
    assert not t.listening
    with pytest.raises(StorageUnavailableError, match="closed"):
        t.read_range(SYM, M1, T0, T0 + DAY_MS)


def test_a_rolled_back_transaction_sends_nothing(pg_url: str, tiers: list[PostgresTier]) -> None:
    a, b = open_(tiers, pg_url, origin="host-a"), open_(tiers, pg_url, origin="host-b")
    got = _subscribed(b)
    c = dense_candles(10, T0, seed=8)
    with pytest.raises(RuntimeError):
        _write_then_fail(a, c)
    a.write("KRW-ETH", M1, c)  # a committed marker after it: the first change b hears
    assert _change(got)[0][0] == "KRW-ETH"


# ---------------------------------------------------------------------------- failures
@pytest.mark.parametrize(
    ("make_url", "needle"),
    [
        (lambda c: c.url("no_such_db"), "does not exist"),
        (lambda c: c.url().replace("postgres@", "nobody_here@"), "credentials"),
        (lambda c: f"postgresql://postgres@:notaport/x?host={c.dir}", "not a valid"),
        (lambda c: "postgresql://postgres@/postgres?host=/nonexistent-dir", "cannot reach"),
        (lambda c: "postgresql://postgres@192.0.2.1:5432/x", "cannot reach|connect timeout"),  # TEST-NET-1
    ],
)
def test_bad_urls_raise_a_typed_error_naming_the_problem(pg_cluster: Cluster, make_url: Any, needle: str) -> None:
    with pytest.raises(StorageUnavailableError, match=needle) as info:
        PostgresTier(make_url(pg_cluster), connect_timeout_s=2)
    assert "PostgreSQL tier" in str(info.value)


def test_password_is_not_in_messages(pg_cluster: Cluster) -> None:
    url = pg_cluster.url("no_such_db").replace("postgres@", "postgres:s3cret@")
    with pytest.raises(StorageUnavailableError) as info:
        PostgresTier(url, connect_timeout_s=2)
    assert "s3cret" not in str(info.value)


def _terminate(url: str, application: str) -> None:
    killed = sql(
        url,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s "
        "AND datname = current_database()",
        (application,),
    )
    assert killed == [(True,)]


def _write_kill_write(tier: PostgresTier, url: str, a: np.ndarray, b: np.ndarray) -> None:
    with tier.transaction():
        tier.write(SYM, M1, a)
        _terminate(url, "mds")
        tier.write(SYM, M1, b)


def test_a_lost_connection_is_replaced_and_a_cut_transaction_stores_nothing(
    pg_url: str, tiers: list[PostgresTier]
) -> None:
    t = open_(tiers, pg_url)
    c = dense_candles(30, T0, seed=9)
    t.write(SYM, M1, c[:10])
    _terminate(pg_url, "mds")  # cut while idle: the next call reconnects and answers
    assert t.read_range(SYM, M1, T0, T0 + DAY_MS).tobytes() == c[:10].tobytes()
    _terminate(pg_url, "mds")
    assert t.write(SYM, M1, c[10:20]) == (10, 0, 0)
    seq = t.commit_seq()
    with pytest.raises(StorageUnavailableError, match="PostgreSQL tier"):
        _write_kill_write(t, pg_url, c[20:25], c[25:])  # cut inside a transaction: it fails whole
    assert t.read_range(SYM, M1, T0, T0 + DAY_MS).tobytes() == c[:20].tobytes()
    assert t.commit_seq() == seq


@pytest.fixture
def own_cluster() -> Iterator[Cluster]:
    with running_cluster() as cluster:
        yield cluster


def test_server_stopped_then_restarted(own_cluster: Cluster, tiers: list[PostgresTier]) -> None:
    with fresh_database(own_cluster) as url:
        t = open_(tiers, url, connect_timeout_s=2)
        c = dense_candles(40, T0, seed=10)
        t.write(SYM, M1, c[:20])
        own_cluster.stop()
        with pytest.raises(StorageUnavailableError):
            t.write(SYM, M1, c[20:])
        with pytest.raises(StorageUnavailableError):
            t.read_range(SYM, M1, T0, T0 + DAY_MS)
        with pytest.raises(StorageUnavailableError, match="cannot reach"):
            PostgresTier(url, connect_timeout_s=2)
        own_cluster.start()
        assert t.read_range(SYM, M1, T0, T0 + DAY_MS).tobytes() == c[:20].tobytes()  # nothing partial
        assert t.write(SYM, M1, c[20:]) == (20, 0, 0)
        assert t.read_range(SYM, M1, T0, T0 + DAY_MS).tobytes() == c.tobytes()
        t.close()
