"""``--history`` / ``MDS_HISTORY`` and ``mds migrate`` without a server: the copy and verification
logic between two SQLite durable tiers (the interface is the same for PostgreSQL), and the
one-line errors of a bad or unreachable history. With a real server: tests/postgres/test_cli_history_pg.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_cli import assert_clean_error, run

import mds
from mds import _migrate as migration
from mds.testing import generate_market
from mds.tiers.sqlite import SqliteStore
from mds.timeframes import DAY_MS, MINUTE_MS, parse_timeframe

T0 = 1_700_000_000_000 - 1_700_000_000_000 % DAY_MS
M1 = parse_timeframe("1m")
H1 = parse_timeframe("1h")
HOUR_MS = 60 * MINUTE_MS
#: (symbol, timeframe) of every seeded series, and the range each spans.
SERIES = {
    ("KRW-BTC", "1m"): (T0, T0 + 3000 * MINUTE_MS),
    ("KRW-MED", "1m"): (T0, T0 + 2500 * MINUTE_MS),
    ("KRW-ETH", "1h"): (T0, T0 + 400 * HOUR_MS),
    ("KRW-LAMB", "1m"): (T0, T0 + 300 * MINUTE_MS),
}


@pytest.fixture(autouse=True)
def _no_history_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's own MDS_HISTORY must not reach these commands (nor their shared history)."""
    monkeypatch.delenv("MDS_HISTORY", raising=False)


def seed_source(path: Path) -> dict[tuple[str, str], np.ndarray]:
    """A store under ``path`` with four series, through the public API: a liquid market covered in
    two ranges with uncovered candles between them, an illiquid one covered throughout (its absent
    minutes are no-trade holes), an hourly series with candles and no coverage, and a series with
    coverage only (nothing traded). Returns the candles written per series."""
    btc = generate_market("KRW-BTC", "1m", *SERIES[("KRW-BTC", "1m")], liquidity="liquid", seed=11)
    med = generate_market("KRW-MED", "1m", *SERIES[("KRW-MED", "1m")], liquidity="illiquid", seed=12)
    eth = generate_market("KRW-ETH", "1h", *SERIES[("KRW-ETH", "1h")], liquidity="liquid", seed=13)
    cut1, cut2 = T0 + 1000 * MINUTE_MS, T0 + 1500 * MINUTE_MS
    with mds.open(path, config=mds.Config(tiers=("sqlite",))) as store:
        a, b, c = btc[btc["ts"] < cut1], btc[(btc["ts"] >= cut1) & (btc["ts"] < cut2)], btc[btc["ts"] >= cut2]
        store.write_candles("KRW-BTC", "1m", a, complete=(T0, cut1))
        store.write_candles("KRW-BTC", "1m", b)
        store.write_candles("KRW-BTC", "1m", c, complete=(cut2, SERIES[("KRW-BTC", "1m")][1]))
        store.write_candles("KRW-MED", "1m", med, complete=SERIES[("KRW-MED", "1m")])
        store.write_candles("KRW-ETH", "1h", eth)
        store.write_candles("KRW-LAMB", "1m", med[:0], complete=SERIES[("KRW-LAMB", "1m")])
    return {("KRW-BTC", "1m"): btc, ("KRW-MED", "1m"): med, ("KRW-ETH", "1h"): eth, ("KRW-LAMB", "1m"): med[:0]}


def assert_same_history(src: Any, dst: Any) -> None:
    """Every seeded series holds the same candles and coverage in both durable tiers."""
    for (sym, tfname), (lo, hi) in SERIES.items():
        tf = parse_timeframe(tfname)
        assert dst.read_range(sym, tf, lo, hi).tobytes() == src.read_range(sym, tf, lo, hi).tobytes(), sym
        assert np.array_equal(dst.coverage(sym, tf), src.coverage(sym, tf)), sym


@pytest.fixture
def source(tmp_path: Path) -> Any:
    """The seeded history, opened read-only as ``mds migrate`` opens it."""
    seed_source(tmp_path / "src")
    db = SqliteStore(tmp_path / "src" / "candles.sqlite3", readonly=True)
    yield db
    db.close()


@pytest.fixture
def dest(tmp_path: Path) -> Any:
    db = SqliteStore(tmp_path / "dest.sqlite3")
    yield db
    db.close()


# ---------------------------------------------------------------------------------------------
# the copy between two durable tiers


def test_migrate_copies_every_series_with_its_coverage_and_a_rerun_copies_nothing(source: Any, dest: Any) -> None:
    plan = migration.source_series(source)
    # the coverage-only series is found too (DurableTier.series() lists series with candles only)
    assert [(s.symbol, s.tf.name) for s in plan] == sorted(SERIES)
    first = migration.copy(source, dest, plan, window=500)
    total = sum(n for *_, n, _f, _l in source.series())
    assert (first.series, first.candles, first.present) == (4, total, 0)
    assert first.ranges == 4  # BTC's two ranges, MED's one, LAMB's one; ETH has none
    assert first.windows > len(plan)  # several transactions for the longer series
    assert_same_history(source, dest)
    assert migration.verify(source, dest, plan, window=500) == []
    assert dest.integrity_problems() == []

    again = migration.copy(source, dest, plan, window=500)
    assert (again.candles, again.windows, again.ranges, again.present) == (0, 0, 0, total)


def test_migrate_in_one_window_or_many_gives_the_same_history(source: Any, dest: Any, tmp_path: Path) -> None:
    plan = migration.source_series(source)
    migration.copy(source, dest, plan, window=97)
    other = SqliteStore(tmp_path / "other.sqlite3")
    try:
        migration.copy(source, other, plan, window=1_000_000)
        assert_same_history(dest, other)
    finally:
        other.close()


class _DiesAfter:
    """A destination that fails (like a killed process) at its ``n``-th write; the writes
    before it committed."""

    def __init__(self, tier: Any, n: int) -> None:
        self.tier, self.left = tier, n

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tier, name)

    def write(self, *args: Any, **kw: Any) -> Any:
        self.left -= 1
        if self.left == 0:
            raise KeyboardInterrupt
        return self.tier.write(*args, **kw)


def test_an_interrupted_migrate_resumes_without_loss_or_repeats(source: Any, dest: Any) -> None:
    plan = migration.source_series(source)
    done = migration.Copied()
    with pytest.raises(KeyboardInterrupt):
        migration.copy(source, _DiesAfter(dest, 4), plan, window=500, done=done)
    assert done.windows == 3
    # what was committed is whole: every stored candle is the source's, and no coverage without
    # its candles (a covered minute without a candle would read as no_trades)
    for (sym, tfname), (lo, hi) in SERIES.items():
        tf = parse_timeframe(tfname)
        held, want = dest.read_range(sym, tf, lo, hi), source.read_range(sym, tf, lo, hi)
        assert migration._holds(want, held)
        for a, b in dest.coverage(sym, tf).tolist():
            assert len(dest.read_range(sym, tf, a, b)) == len(source.read_range(sym, tf, a, b))

    resumed = migration.copy(source, dest, plan, window=500)
    assert resumed.present == done.candles  # the committed windows were not copied again
    assert resumed.present + resumed.candles == sum(n for *_, n, _f, _l in source.series())
    assert_same_history(source, dest)
    assert migration.verify(source, dest, plan, window=500) == []


def test_verify_names_the_series_that_differ(source: Any, dest: Any) -> None:
    plan = migration.source_series(source)
    migration.copy(source, dest, plan, window=500)
    dest.delete("KRW-MED", M1, T0 + 100 * MINUTE_MS, T0 + 200 * MINUTE_MS)  # candles and coverage
    dest.write(
        "KRW-ETH", H1, np.empty(0, dtype=source.read_range("KRW-ETH", H1, 0, 1).dtype), covered=[[T0, T0 + HOUR_MS]]
    )
    problems = migration.verify(source, dest, plan, window=500)
    assert len(problems) == 2, problems
    assert problems[0].startswith("KRW-ETH 1h: coverage differs") and "destination adds" in problems[0]
    assert problems[1].startswith("KRW-MED 1m: in [") and "checksum" in problems[1]


# ---------------------------------------------------------------------------------------------
# the command line without a server


def test_help_names_history_and_migrate(tmp_path: Path) -> None:
    res = run(tmp_path, "get", "--help")
    assert res.returncode == 0 and "--history URL" in res.stdout and "MDS_HISTORY" in res.stdout
    res = run(tmp_path, "migrate", "--help")
    assert res.returncode == 0 and "--to URL" in res.stdout and "resume" in res.stdout


@pytest.mark.parametrize("url", ["mysql://u@h/db", "sqlite:///x.db", "/tmp/history"])
def test_history_that_is_not_a_postgresql_url_is_one_line_exit_2(
    tmp_path: Path, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert_clean_error(run(tmp_path, "stats", "--history", url), 2, "--history must be a postgresql:// URL")
    monkeypatch.setenv("MDS_HISTORY", url)
    assert_clean_error(run(tmp_path, "stats"), 2, "MDS_HISTORY must be a postgresql:// URL")


def test_unreachable_history_is_one_line_exit_1_without_a_hang(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a socket directory that does not exist: refused at once, whatever the machine runs
    url = f"postgresql://mds:secret@/market?host={tmp_path / 'no-server'}"
    res = run(tmp_path, "get", "KRW-BTC", "-n", "5", "--history", url, "--path", str(tmp_path / "local"))
    assert_clean_error(res, 1, "PostgreSQL")
    assert "secret" not in res.stderr
    monkeypatch.setenv("MDS_HISTORY", url)
    assert_clean_error(run(tmp_path, "check", "--path", str(tmp_path / "local")), 1, "PostgreSQL")


def test_empty_mds_history_means_sqlite_under_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seed_source(tmp_path / "src")
    monkeypatch.setenv("MDS_HISTORY", "")
    res = run(tmp_path, "get", "KRW-ETH", "-t", "1h", "-n", "3", "--path", str(tmp_path / "src"))
    assert res.returncode == 0 and res.stdout.endswith("3 candles\n"), res.stderr


def test_migrate_refuses_bad_destinations_and_missing_sources(tmp_path: Path) -> None:
    seed_source(tmp_path / "src")
    src = ("--path", str(tmp_path / "src"))
    assert_clean_error(run(tmp_path, "migrate", *src), 2, "give --to")
    assert_clean_error(run(tmp_path, "migrate", *src, "--to", "sqlite:///x"), 2, "--to must be a postgresql:// URL")
    url = f"postgresql://postgres@/market?host={tmp_path / 'no-server'}"
    assert_clean_error(run(tmp_path, "migrate", "--path", str(tmp_path / "empty"), "--to", url), 2, "no SQLite history")
    assert_clean_error(run(tmp_path, "migrate", *src, "--to", url), 1, "market")
