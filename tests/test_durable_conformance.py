"""The durable-tier interface held equal across its implementations: every test here runs
against the SQLite tier and the PostgreSQL tier (a throwaway cluster; skipped with a reason where
no server can be started, failing instead under MDS_REQUIRE_POSTGRES=1).

Only the semantics of :class:`mds.tiers.durable.DurableTier` are asserted: what the Store
relies on, whatever the backend.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mds.errors import InvalidCandleError, MdsError
from mds.testing.generators import dense_candles
from mds.tiers.durable import DurableTier
from mds.tiers.sqlite import SqliteStore
from mds.timeframes import DAY_MS, MINUTE_MS, parse_timeframe

M1 = parse_timeframe("1m")
D1 = parse_timeframe("1d")
SYM = "KRW-BTC"
T0 = 1_700_000_000_000 - 1_700_000_000_000 % DAY_MS


def _pg_cluster_module() -> Any:
    """``tests/postgres/pg_cluster.py`` (the throwaway-cluster helpers), loaded by path."""
    name = "mds_test_pg_cluster"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).parent / "postgres" / "pg_cluster.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="module")
def conformance_cluster() -> Iterator[Any]:
    with _pg_cluster_module().running_cluster() as cluster:
        yield cluster


@pytest.fixture(params=["sqlite", "postgres"])
def open_tier(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """A function opening the tier under test (the same database each call), closing them all."""
    opened: list[Any] = []
    if request.param == "sqlite":
        path = tmp_path / "candles.sqlite3"

        def opener(**kw: Any) -> Any:
            opened.append(SqliteStore(path, compress_after_days=None, **kw))
            return opened[-1]

        yield opener
    else:
        from mds.tiers.postgres import PostgresTier

        cluster = request.getfixturevalue("conformance_cluster")
        with _pg_cluster_module().fresh_database(cluster) as url:

            def opener(**kw: Any) -> Any:
                opened.append(PostgresTier(url, compress_after_days=None, **kw))
                return opened[-1]

            yield opener
            for t in opened:
                t.close()
            return
    for t in opened:
        t.close()


@pytest.fixture
def tier(open_tier: Any) -> DurableTier:
    t: DurableTier = open_tier()
    return t


def _cov(ranges: list[tuple[int, int]]) -> np.ndarray:
    return np.array(ranges, dtype=np.int64).reshape(-1, 2)


def test_round_trip_and_reads_agree(tier: DurableTier) -> None:
    a = dense_candles(5000, T0, seed=1)
    assert tier.write(SYM, M1, a, covered=_cov([(T0, T0 + 5000 * MINUTE_MS)])) == (5000, 0, 0)
    got = tier.read_range(SYM, M1, T0, T0 + 5000 * MINUTE_MS)
    assert got.tobytes() == a.tobytes()
    assert got.flags.writeable
    mid = T0 + 1234 * MINUTE_MS
    assert tier.read_range(SYM, M1, mid, mid + 1000 * MINUTE_MS).tobytes() == a[1234:2234].tobytes()
    assert tier.read_latest(SYM, M1, 1500).tobytes() == a[-1500:].tobytes()
    assert tier.read_latest(SYM, M1, 10, end=mid).tobytes() == a[1224:1234].tobytes()
    assert tier.read_from(SYM, M1, mid, 3000).tobytes() == a[1234:4234].tobytes()
    assert tier.read_from(SYM, M1, mid, 10**6).tobytes() == a[1234:].tobytes()
    assert tier.last_ts(SYM, M1) == int(a["ts"][-1])
    assert tier.coverage(SYM, M1).tolist() == [[T0, T0 + 5000 * MINUTE_MS]]
    assert tier.series() == [(SYM, "1m", 5000, T0, int(a["ts"][-1]))]
    assert tier.integrity_problems() == []


def test_unknown_series_reads_empty(tier: DurableTier) -> None:
    assert len(tier.read_range("KRW-XRP", M1, T0, T0 + DAY_MS)) == 0
    assert len(tier.read_latest("KRW-XRP", M1, 5)) == 0
    assert tier.last_ts("KRW-XRP", M1) is None
    assert tier.coverage("KRW-XRP", M1).shape == (0, 2)
    assert tier.delete("KRW-XRP", M1) == 0
    assert tier.quarantine_damaged("KRW-XRP", M1) == []


def test_upsert_is_last_wins_with_counts(tier: DurableTier) -> None:
    a = dense_candles(3000, T0, seed=2)
    tier.write(SYM, M1, a)
    b = a[1000:1100].copy()
    b["close"] = b["open"]  # a revision: still valid (low <= open <= high)
    b[:50] = a[1000:1050]  # half unchanged
    c = dense_candles(20, T0 + 3000 * MINUTE_MS, seed=3)  # new, past the end
    both = np.concatenate([b, c])
    assert tier.write(SYM, M1, both) == (20, int((b != a[1000:1100]).sum()), int((b == a[1000:1100]).sum()))
    want = np.concatenate([a[:1000], b, a[1100:], c])
    assert tier.read_range(SYM, M1, T0, T0 + 4000 * MINUTE_MS).tobytes() == want.tobytes()
    edge = want[-3:].copy()
    edge["volume"] += 1.0
    assert tier.write(SYM, M1, edge) == (0, 3, 0)
    assert tier.read_latest(SYM, M1, 3).tobytes() == edge.tobytes()
    assert tier.integrity_problems() == []


def test_invalid_batch_changes_nothing(tier: DurableTier) -> None:
    a = dense_candles(10, T0, seed=4)
    a["low"][3] = a["high"][3] + 1
    before = tier.commit_seq()
    with pytest.raises(InvalidCandleError):
        tier.write(SYM, M1, a)
    assert len(tier.read_range(SYM, M1, T0, T0 + DAY_MS)) == 0
    assert tier.commit_seq() == before


def test_coverage_is_added_in_the_write_and_merged(tier: DurableTier) -> None:
    tier.write(SYM, D1, dense_candles(0, T0), covered=_cov([(T0, T0 + 2 * DAY_MS)]))
    tier.write(
        SYM, D1, dense_candles(1, T0 + 3 * DAY_MS, step=DAY_MS), covered=_cov([(T0 + 2 * DAY_MS, T0 + 4 * DAY_MS)])
    )
    assert tier.coverage(SYM, D1).tolist() == [[T0, T0 + 4 * DAY_MS]]


def _write_then_fail(tier: DurableTier, batch: np.ndarray) -> None:
    with tier.transaction():
        tier.write(SYM, M1, batch)
        raise RuntimeError("boom")


def _write_then_swallow_inner_failure(tier: DurableTier, batch: np.ndarray) -> None:
    with tier.transaction():
        tier.write(SYM, M1, batch)
        with contextlib.suppress(ValueError), tier.transaction():
            raise ValueError("inner")


def test_transaction_groups_all_or_nothing_and_counts_one_commit(tier: DurableTier) -> None:
    a = dense_candles(100, T0, seed=5)
    seq = tier.commit_seq()
    with tier.transaction():
        tier.write(SYM, M1, a[:50])
        with tier.transaction():
            tier.write("KRW-ETH", M1, a[50:])
    assert tier.commit_seq() == seq + 1
    assert tier.last_commit_seq == seq + 1
    with pytest.raises(RuntimeError):
        _write_then_fail(tier, a[50:])
    assert len(tier.read_range(SYM, M1, T0, T0 + DAY_MS)) == 50
    with pytest.raises(MdsError):  # an inner failure swallowed: the outer fails
        _write_then_swallow_inner_failure(tier, a[50:])
    assert len(tier.read_range(SYM, M1, T0, T0 + DAY_MS)) == 50
    assert tier.commit_seq() == seq + 1


def test_reads_inside_a_transaction_see_its_writes(tier: DurableTier) -> None:
    a = dense_candles(2000, T0, seed=10)
    with tier.transaction():
        tier.write(SYM, M1, a)
        assert tier.read_latest(SYM, M1, 5).tobytes() == a[-5:].tobytes()
        assert tier.read_from(SYM, M1, T0, 1500).tobytes() == a[:1500].tobytes()
        assert tier.read_range(SYM, M1, T0, T0 + 2000 * MINUTE_MS).tobytes() == a.tobytes()
        assert tier.last_ts(SYM, M1) == int(a["ts"][-1])


def test_delete_removes_candles_and_coverage(tier: DurableTier) -> None:
    a = dense_candles(3000, T0, seed=6)
    tier.write(SYM, M1, a, covered=_cov([(T0, T0 + 3000 * MINUTE_MS)]))
    lo, hi = T0 + 1000 * MINUTE_MS, T0 + 2500 * MINUTE_MS
    assert tier.delete(SYM, M1, lo, hi) == 1500
    got = tier.read_range(SYM, M1, T0, T0 + 3000 * MINUTE_MS)
    assert got.tobytes() == np.concatenate([a[:1000], a[2500:]]).tobytes()
    assert tier.coverage(SYM, M1).tolist() == [[T0, lo], [hi, T0 + 3000 * MINUTE_MS]]
    assert tier.delete(SYM, M1) == 1500
    assert tier.series() == []
    assert tier.integrity_problems() == []


def test_another_connection_sees_commits(open_tier: Any) -> None:
    w, r = open_tier(), open_tier()
    v = r.data_version()
    w.write(SYM, M1, dense_candles(5, T0, seed=7))
    assert r.data_version() != v
    assert len(r.read_range(SYM, M1, T0, T0 + DAY_MS)) == 5
    assert r.commit_seq() == w.last_commit_seq


def test_maintain_and_stats(tier: DurableTier) -> None:
    tier.write(SYM, M1, dense_candles(3000, T0, seed=8))
    tier.delete(SYM, M1, T0, T0 + 1500 * MINUTE_MS)
    report = tier.maintain(force=True)
    assert {"fragmentation_before", "fragmentation_after", "vacuumed", "analyzed"} <= set(report)
    assert report["vacuumed"] and report["analyzed"]
    assert 0.0 <= report["fragmentation_after"] <= 1.0
    assert tier.stats()["series"] == 1
    want = dense_candles(3000, T0, seed=8)[1500:]
    assert tier.read_range(SYM, M1, T0, T0 + 3000 * MINUTE_MS).tobytes() == want.tobytes()
    tier.maybe_maintain()


def test_readonly_refuses_writes(open_tier: Any) -> None:
    from mds.errors import StorageUnavailableError

    open_tier().write(SYM, M1, dense_candles(5, T0, seed=9))
    ro = open_tier(readonly=True)
    assert len(ro.read_range(SYM, M1, T0, T0 + DAY_MS)) == 5
    with pytest.raises(StorageUnavailableError):
        ro.write(SYM, M1, dense_candles(5, T0, seed=9))
    with pytest.raises(StorageUnavailableError):
        ro.delete(SYM, M1)


def test_known_series_lists_series_with_coverage_alone(tier: DurableTier) -> None:
    # an illiquid span fetched while nothing traded: coverage, no candles (mds migrate needs it)
    tier.write("KRW-CBK", M1, dense_candles(0, T0), covered=np.array([[T0, T0 + 60 * MINUTE_MS]], np.int64))
    tier.write(SYM, M1, dense_candles(5, T0))
    assert [s[:2] for s in tier.series()] == [(SYM, "1m")]
    assert tier.known_series() == [("KRW-BTC", "1m"), ("KRW-CBK", "1m")]
