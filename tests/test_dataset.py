"""Parquet datasets (issue 19): ``Store.export_dataset`` / ``Store.import_dataset`` and the
``mds export --dataset``, ``mds import DIR`` and ``mds archive`` commands.

A round trip restores every series exactly, candles and gap kinds (missing vs no_trades); the
dataset is read as it is by pyarrow.dataset, DuckDB and Polars; a series that crosses a year is
split into two year partitions; a bad dataset (damaged, incomplete, foreign or invalid candles)
raises a typed error and stores nothing; an export that fails leaves no dataset.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import mds
from mds import _dataset
from mds.cli import main
from mds.testing import generate_market
from mds.timeutil import to_ms

MIN = 60_000
DAY = 86_400_000
T0 = to_ms("2024-12-30T00:00:00Z")
T1 = to_ms("2025-01-03T00:00:00Z")
NOW = T1 + DAY
COVERED_TO = to_ms("2025-01-01T12:00:00Z")


def _clock() -> int:
    return NOW


def _filled(path: Path) -> mds.Store:
    """A store with both gap kinds, a year boundary, coverage from the start of history, and a
    series holding coverage alone."""
    store = mds.open(path, clock=_clock)
    btc = generate_market("KRW-BTC", "1m", T0, T1, liquidity=0.97, seed=1)
    med = generate_market("KRW-MED", "1m", T0, T1, liquidity="illiquid", seed=2)
    cut = int(np.searchsorted(btc["ts"], COVERED_TO))
    store.write_candles("KRW-BTC", "1m", btc[:cut], complete=(T0, COVERED_TO))  # covered: no_trades holes
    store.write_candles("KRW-BTC", "1m", btc[cut + 30 :])  # not covered: missing holes
    store.write_candles("KRW-MED", "1m", med, complete=(T0, T1))
    day = generate_market("KRW-BTC", "1d", T0 - 40 * DAY, T1, seed=3)
    store.write_candles("KRW-BTC", "1d", day, complete=(0, T1))  # coverage from the start of history
    store.write_candles("KRW-XRP", "1m", np.zeros(0, dtype=mds.CANDLE_DTYPE), complete=(T0, T0 + DAY))
    return store


def _snapshot(store: mds.Store) -> dict[tuple[str, str], tuple[bytes, list[tuple[int, int]], list[mds.Gap]]]:
    out = {}
    for i in store.series():
        arr = store.candles(i.symbol, i.timeframe, start=0, end=NOW)
        out[(i.symbol, i.timeframe)] = (
            arr.tobytes(),
            store.coverage(i.symbol, i.timeframe),
            store.gaps(i.symbol, i.timeframe),
        )
    return out


@pytest.fixture
def store(tmp_path: Path) -> mds.Store:
    s = _filled(tmp_path / "src")
    yield s
    s.close()


@pytest.fixture
def exported(store: mds.Store, tmp_path: Path) -> Path:
    ds = tmp_path / "ds"
    store.export_dataset(ds)
    return ds


def test_round_trip_restores_every_series_and_its_gap_kinds_exactly(
    store: mds.Store, exported: Path, tmp_path: Path
) -> None:
    before = _snapshot(store)
    kinds = {g.kind for g in before[("KRW-BTC", "1m")][2]}
    assert kinds == {"missing", "no_trades"}  # the fixture holds both kinds
    assert before[("KRW-BTC", "1d")][1][0][0] == 0  # and coverage from the start of history
    with mds.open(tmp_path / "dst", clock=_clock) as dst:
        infos = dst.import_dataset(exported)
        assert _snapshot(dst) == before
        assert dst.series() == store.series()
        assert infos == store.series()


def test_a_series_across_new_year_is_split_into_two_year_partitions(store: mds.Store, exported: Path) -> None:
    folder = exported / "symbol=KRW-BTC" / "timeframe=1m"
    assert sorted(p.name for p in folder.iterdir()) == ["year=2024", "year=2025"]
    old = pq.read_table(folder / "year=2024" / "part-0.parquet")
    new = pq.read_table(folder / "year=2025" / "part-0.parquet")
    boundary = to_ms("2025-01-01T00:00:00Z")
    assert old["ts"].cast(pa.int64()).to_numpy().max() < boundary <= new["ts"].cast(pa.int64()).to_numpy().min()
    assert old.num_rows + new.num_rows == len(store.candles("KRW-BTC", "1m", start=T0, end=T1))


def test_pyarrow_dataset_reads_it_as_it_is(store: mds.Store, exported: Path) -> None:
    import pyarrow.dataset as pads

    table = pads.dataset(exported, format="parquet", partitioning="hive").to_table()
    assert table.schema.field("ts").type == pa.timestamp("ms", tz="UTC")
    btc = table.filter((pa.compute.field("symbol") == "KRW-BTC") & (pa.compute.field("timeframe") == "1m"))
    btc = btc.sort_by("ts")
    want = store.candles("KRW-BTC", "1m", start=T0, end=T1)
    assert np.array_equal(btc["ts"].cast(pa.int64()).to_numpy(), want["ts"])
    assert np.array_equal(btc["close"].to_numpy(), want["close"])
    assert sorted(set(btc["year"].to_pylist())) == [2024, 2025]
    assert table.num_rows == sum(i.count for i in store.series())


def test_duckdb_reads_it_as_it_is(store: mds.Store, exported: Path) -> None:
    import duckdb

    rows = duckdb.sql(
        f"select symbol, timeframe, count(*), sum(volume), min(epoch_ms(ts)) "
        f"from read_parquet('{exported}/**/*.parquet', hive_partitioning=true) "
        "group by symbol, timeframe order by symbol, timeframe"
    ).fetchall()
    want = []
    for i in store.series():
        if i.count:
            arr = store.candles(i.symbol, i.timeframe, start=0, end=NOW)
            want.append((i.symbol, i.timeframe, i.count, pytest.approx(float(arr["volume"].sum())), i.first))
    assert rows == sorted(want, key=lambda r: (r[0], r[1]))


def test_polars_reads_it_as_it_is(store: mds.Store, exported: Path) -> None:
    import polars as pl

    df = (
        pl.scan_parquet(str(exported / "**" / "*.parquet"), hive_partitioning=True)
        .filter((pl.col("symbol") == "KRW-MED") & (pl.col("timeframe") == "1m"))
        .sort("ts")
        .collect()
    )
    want = store.candles("KRW-MED", "1m", start=T0, end=T1)
    assert df.height == len(want)
    assert np.array_equal(df["ts"].dt.epoch("ms").to_numpy(), want["ts"])
    assert np.array_equal(df["high"].to_numpy(), want["high"])
    assert sorted(df["year"].unique().to_list()) == [2024, 2025]


def test_filters_pick_series_and_a_time_range(store: mds.Store, tmp_path: Path) -> None:
    lo, hi = to_ms("2024-12-31T06:00:00Z"), to_ms("2025-01-02T00:00:00Z")
    infos = store.export_dataset(tmp_path / "part", symbols="KRW-BTC", timeframes=["1m"], start=lo, end=hi)
    assert [(i.symbol, i.timeframe) for i in infos] == [("KRW-BTC", "1m")]
    assert infos[0].count == len(store.candles("KRW-BTC", "1m", start=lo, end=hi))
    with mds.open(tmp_path / "dst", clock=_clock) as dst:
        dst.import_dataset(tmp_path / "part")
        assert dst.coverage("KRW-BTC", "1m") == [(lo, COVERED_TO)]
        assert dst.gaps("KRW-BTC", "1m", start=lo, end=hi) == store.gaps("KRW-BTC", "1m", start=lo, end=hi)


def test_export_needs_a_new_or_empty_directory(store: mds.Store, tmp_path: Path) -> None:
    full = tmp_path / "full"
    full.mkdir()
    (full / "x.txt").write_text("mine")
    with pytest.raises(mds.InvalidRequestError, match="new or empty"):
        store.export_dataset(full)
    assert [p.name for p in full.iterdir()] == ["x.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert store.export_dataset(empty)  # an empty directory is taken
    assert (empty / _dataset.MANIFEST).is_file()


def test_an_export_that_fails_leaves_no_dataset_behind(
    store: mds.Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(*a: object) -> None:
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(_dataset, "_write_manifest", crash)
    with pytest.raises(OSError, match="simulated"):
        store.export_dataset(tmp_path / "ds")
    assert list(tmp_path.iterdir()) == [tmp_path / "src"]  # neither the dataset nor a partial one


def test_a_dataset_without_its_manifest_does_not_import(exported: Path, tmp_path: Path) -> None:
    # what a copy that stopped before the manifest looks like
    (exported / _dataset.MANIFEST).unlink()
    with mds.open(tmp_path / "dst", clock=_clock) as dst:
        with pytest.raises(mds.InvalidRequestError, match=r"no _mds_dataset\.json"):
            dst.import_dataset(exported)
        assert dst.series() == []


def _rewrite(exported: Path, rel: str, table: pa.Table) -> None:
    """Replace one file and make the manifest agree with it (a dataset that is consistent but bad)."""
    path = exported / rel
    pq.write_table(table, path)
    doc = json.loads((exported / _dataset.MANIFEST).read_text())
    for s in doc["series"]:
        for f in s["files"]:
            if f["path"] == rel:
                f["bytes"], f["sha256"] = _dataset._sha256(path)
    (exported / _dataset.MANIFEST).write_text(json.dumps(doc))


REL = "symbol=KRW-MED/timeframe=1m/year=2025/part-0.parquet"


@pytest.mark.parametrize("damage", ["flipped_byte", "extra_file", "missing_file", "bad_candle", "duplicate"])
def test_a_bad_dataset_raises_a_typed_error_and_leaves_the_store_unchanged(
    exported: Path, tmp_path: Path, damage: str
) -> None:
    path = exported / REL
    if damage == "flipped_byte":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
        err: type[mds.MdsError] = mds.InvalidRequestError
        match = "SHA-256"
    elif damage == "extra_file":
        shutil.copy(path, path.with_name("part-1.parquet"))
        err, match = mds.InvalidRequestError, "not in _mds_dataset.json"
    elif damage == "missing_file":
        path.unlink()
        err, match = mds.InvalidRequestError, "missing"
    elif damage == "bad_candle":
        t = pq.read_table(path)
        high = t["high"].to_numpy().copy()
        high[5] = t["low"].to_numpy()[5] / 2  # high below the body
        _rewrite(exported, REL, t.set_column(t.schema.get_field_index("high"), "high", pa.array(high)))
        err, match = mds.InvalidCandleError, "high_below_body"
    else:
        t = pq.read_table(path)
        _rewrite(exported, REL, pa.concat_tables([t.slice(0, 10), t.slice(9, t.num_rows - 9)]))
        doc = json.loads((exported / _dataset.MANIFEST).read_text())
        for s in doc["series"]:
            for f in s["files"]:
                if f["path"] == REL:
                    f["rows"] += 1
                    s["count"] += 1
        (exported / _dataset.MANIFEST).write_text(json.dumps(doc))
        err, match = mds.InvalidRequestError, "strictly ascending"
    with mds.open(tmp_path / "dst", clock=_clock) as dst:
        kept = generate_market("KRW-SOL", "1m", T0, T0 + DAY, seed=9)
        dst.write_candles("KRW-SOL", "1m", kept, complete=(T0, T0 + DAY))
        before = _snapshot(dst)
        with pytest.raises(err, match=match):
            dst.import_dataset(exported)
        assert _snapshot(dst) == before  # nothing of the dataset, the store's own series as it was
        assert [i.symbol for i in dst.series()] == ["KRW-SOL"]


def test_without_pyarrow_the_error_names_the_extra(
    store: mds.Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match=r"upbit-mds\[parquet\]"):
        store.export_dataset(tmp_path / "ds")
    assert not (tmp_path / "ds").exists()


def test_a_memory_only_store_exports_and_imports(tmp_path: Path) -> None:
    cfg = mds.Config(tiers=("memory",))
    arr = generate_market("KRW-BTC", "1m", T1 - 500 * MIN, T1, seed=4)
    with mds.open(tmp_path / "m", config=cfg, clock=_clock) as mem:
        mem.write_candles("KRW-BTC", "1m", arr, complete=(T1 - 500 * MIN, T1))
        mem.export_dataset(tmp_path / "ds")
        want = _snapshot(mem)
    with mds.open(tmp_path / "m2", config=cfg, clock=_clock) as mem2:
        mem2.import_dataset(tmp_path / "ds")
        assert _snapshot(mem2) == want


# ---------------------------------------------------------------------------------------------
# the commands


def test_cli_export_dataset_then_import_dir(
    store: mds.Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    want = _snapshot(store)
    store.close()
    assert main(["export", "--path", str(tmp_path / "src"), "--dataset", str(tmp_path / "ds")]) == 0
    assert "4 series" in capsys.readouterr().out
    assert main(["import", str(tmp_path / "ds"), "--path", str(tmp_path / "dst")]) == 0
    assert "imported 4 series" in capsys.readouterr().out
    with mds.open(tmp_path / "dst", clock=_clock) as dst:
        assert _snapshot(dst) == want
    # a dataset directory takes no file options; a file still needs them
    assert main(["import", str(tmp_path / "ds"), "--path", str(tmp_path / "dst"), "-s", "KRW-BTC"]) == 2
    assert "dataset directory" in capsys.readouterr().err
    (tmp_path / "plain").mkdir()
    assert main(["import", str(tmp_path / "plain"), "--path", str(tmp_path / "dst")]) == 2
    assert "no _mds_dataset.json" in capsys.readouterr().err
    assert main(["export", "KRW-BTC", "KRW-MED", "--path", str(tmp_path / "src"), "--out", "x.csv"]) == 2
    assert "one SYMBOL" in capsys.readouterr().err


def test_cli_archive_exports_verifies_then_deletes_the_old_span(
    store: mds.Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = to_ms("2025-01-01T00:00:00Z")
    old = len(store.candles("KRW-MED", "1m", start=T0, end=before))
    full = _snapshot(store)
    store.close()
    src = str(tmp_path / "src")
    args = ["archive", "--path", src, "--before", "2025-01-01", "--to", str(tmp_path / "arch"), "KRW-MED", "--yes"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"1 series, {old} candles before 2025-01-01T00:00:00Z archived" in out and "deleted" in out
    with mds.open(tmp_path / "src", clock=_clock) as s:
        assert len(s.candles("KRW-MED", "1m", start=T0, end=before)) == 0
        assert s.coverage("KRW-MED", "1m") == [(before, T1)]
        s.import_dataset(tmp_path / "arch")  # the recipe's way back
        assert _snapshot(s) == full


def test_cli_archive_deletes_nothing_when_the_archive_does_not_read_back(
    store: mds.Store, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    full = _snapshot(store)
    store.close()

    def lying(directory: object, now: int) -> list[mds.SeriesInfo]:
        return []  # as if the files had been lost after the export

    monkeypatch.setattr(_dataset, "verify_dataset", lying)
    args = ["archive", "--path", str(tmp_path / "src"), "--before", "2025-01-01", "--to", str(tmp_path / "a"), "-y"]
    assert main(args) == 1
    assert "nothing was deleted" in capsys.readouterr().err
    with mds.open(tmp_path / "src", clock=_clock) as s:
        assert _snapshot(s) == full


def test_a_manifest_naming_a_file_outside_its_partition_is_refused_before_it_is_opened(
    exported: Path, tmp_path: Path
) -> None:
    doc = json.loads((exported / _dataset.MANIFEST).read_text())
    doc["series"][0]["files"][0]["path"] = "../../outside.parquet"
    (exported / _dataset.MANIFEST).write_text(json.dumps(doc))
    with mds.open(tmp_path / "dst", clock=_clock) as dst:
        with pytest.raises(mds.InvalidRequestError, match="the path must be symbol="):
            dst.import_dataset(exported)
        assert dst.series() == []
