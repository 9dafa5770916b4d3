"""The ``mds`` command does what a first-time user expects (issue 21): an import refuses candles of
another interval than ``-t``, reading commands never create a store, a series that is not stored
is named as such, output files are written where and as asked, and the messages say what is
wrong. Each case runs the command as a subprocess."""

from __future__ import annotations

import ast
import datetime as dt
import importlib.util
import json
import os
import re
import stat
from pathlib import Path

import numpy as np
import pytest
from test_cli import RAW_1M, SMTM_3M, assert_clean_error, raw_1m, run, stored

import mds
from mds._importers import infer_timeframe
from mds.convert import candles_from_upbit
from mds.errors import StorageUnavailableError
from mds.testing import generate_market
from mds.timeframes import parse_timeframe
from mds.timeutil import to_ms

DATA = Path(__file__).resolve().parent / "data"
README = Path(__file__).resolve().parent.parent / "README.md"
CRYPTOFEED = DATA / "ws_trade_orderbook_simple_cryptofeed_2021.txt"
KST = 9 * 3_600_000


def write_ccxt(path: Path, arr: np.ndarray, *, scale: int = 1) -> Path:
    lines = ["timestamp,open,high,low,close,volume"]
    for r in arr:
        lines.append(
            ",".join(
                [str(int(r["ts"]) // scale), *(repr(float(r[f])) for f in ("open", "high", "low", "close", "volume"))]
            )
        )
    path.write_text("\n".join(lines) + "\n")
    return path


def write_pyupbit(path: Path, arr: np.ndarray) -> Path:
    """pyupbit's ``get_ohlcv(...).to_csv()``: a naive KST index."""
    lines = [",open,high,low,close,volume,value"]
    for r in arr:
        kst = dt.datetime.fromtimestamp((int(r["ts"]) + KST) / 1000, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        fields = ("open", "high", "low", "close", "volume", "value")
        lines.append(",".join([kst, *(repr(float(r[f])) for f in fields)]))
    path.write_text("\n".join(lines) + "\n")
    return path


def smtm_3m() -> np.ndarray:
    return np.sort(candles_from_upbit(json.loads(SMTM_3M.read_text())), order="ts")


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def two_tf_home(home: Path) -> Path:
    """KRW-BTC in 1m and 3m (the recorded files)."""
    for f, tf in ((RAW_1M, "1m"), (SMTM_3M, "3m")):
        res = run(home, "import", str(f), "-s", "KRW-BTC", "-t", tf)
        assert res.returncode == 0, res.stderr
    return home


# ---------------------------------------------------------------------------------------------
# import: the file's interval


@pytest.mark.parametrize(
    ("tf", "expect"),
    [("1s", "1m"), ("3m", "1m"), ("1h", "1m"), ("1d", "1m")],
)
def test_import_refuses_recorded_1m_candles_given_another_timeframe(
    home: Path, tmp_path: Path, tf: str, expect: str
) -> None:
    path = write_ccxt(tmp_path / "btc_1m.csv", raw_1m())  # no unit column: only the times tell
    res = run(home, "import", str(path), "-s", "KRW-BTC", "-t", tf)
    assert_clean_error(res, 2, f"holds {expect} candles", f"not {tf}", f"give -t {expect}")
    assert not home.exists()  # refused before a store was created


def test_import_refuses_daily_pyupbit_candles_as_1m_and_takes_them_as_1d(home: Path, tmp_path: Path) -> None:
    daily = generate_market("KRW-BTC", "1d", to_ms("2024-01-01"), to_ms("2024-04-01"), seed=2)
    path = write_pyupbit(tmp_path / "btc_day.csv", daily)
    assert_clean_error(run(home, "import", str(path), "-s", "KRW-BTC", "-t", "1m"), 2, "holds 1d candles", "not 1m")
    assert not home.exists()
    shuffled = write_ccxt(tmp_path / "shuffled.csv", daily[np.random.default_rng(1).permutation(len(daily))])
    assert_clean_error(run(home, "import", str(shuffled), "-s", "KRW-BTC", "-t", "1h"), 2, "holds 1d candles")
    assert not home.exists()
    ok = run(home, "import", str(path), "-s", "KRW-BTC", "-t", "1d")
    assert ok.returncode == 0, ok.stderr
    assert len(stored(home, "KRW-BTC", "1d")) == len(daily)


def test_import_tells_calendar_weeks_and_months(home: Path, tmp_path: Path) -> None:
    months = generate_market("KRW-ETH", "1M", to_ms("2020-01-01"), to_ms("2024-01-01"), seed=4)
    weeks = generate_market("KRW-ETH", "1w", to_ms("2023-01-02"), to_ms("2024-01-01"), seed=4)
    mpath = write_ccxt(tmp_path / "m.csv", months)
    wpath = write_ccxt(tmp_path / "w.csv", weeks)
    assert_clean_error(run(home, "import", str(mpath), "-s", "KRW-ETH", "-t", "1d"), 2, "holds 1M candles")
    assert_clean_error(run(home, "import", str(mpath), "-s", "KRW-ETH", "-t", "1w"), 2, "holds 1M candles")
    assert_clean_error(run(home, "import", str(wpath), "-s", "KRW-ETH", "-t", "1d"), 2, "holds 1w candles")
    assert run(home, "import", str(mpath), "-s", "KRW-ETH", "-t", "1M").returncode == 0
    assert run(home, "import", str(wpath), "-s", "KRW-ETH", "-t", "1w").returncode == 0
    assert len(stored(home, "KRW-ETH", "1M")) == len(months)


def test_import_of_30m_upbit_csv_as_1h_names_the_unit_not_an_integer_error(home: Path, tmp_path: Path) -> None:
    rows = json.loads(SMTM_3M.read_text())
    keys = list(rows[0])
    path = tmp_path / "btc_30m.csv"
    lines = [",".join(keys)] + [",".join(str({**r, "unit": 30}[k]) for k in keys) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    res = run(home, "import", str(path), "-s", "KRW-BTC", "-t", "1h")
    assert_clean_error(res, 2, "30-minute candles", "not 1h")
    assert "not an integer" not in res.stderr


def test_a_sparse_illiquid_1m_file_is_still_taken_as_1m(home: Path, tmp_path: Path) -> None:
    """Most neighbours two or more minutes apart (an illiquid market), a few one minute apart:
    1m candles, not a coarser timeframe."""
    arr = raw_1m()
    keep = np.zeros(len(arr), dtype=bool)
    keep[::2] = True
    keep[1:10] = True  # a few neighbours one minute apart
    path = write_ccxt(tmp_path / "sparse.csv", arr[keep])
    res = run(home, "import", str(path), "-s", "KRW-BTC", "-t", "1m")
    assert res.returncode == 0, res.stderr
    assert len(stored(home, "KRW-BTC")) == int(keep.sum())


def test_a_csv_whose_time_column_is_named_ts_imports(home: Path, tmp_path: Path) -> None:
    """``ts`` (CANDLE_DTYPE's own name) as the header of epoch-ms times, not only ccxt's
    ``timestamp``: found by review, it was read as a pyupbit index and refused."""
    arr = raw_1m()[:50]
    path = write_ccxt(tmp_path / "ts.csv", arr)
    path.write_text(path.read_text().replace("timestamp,", "ts,", 1))
    res = run(home, "import", str(path), "-s", "KRW-BTC", "-t", "1m")
    assert res.returncode == 0, res.stderr
    assert "(ccxt-csv)" in res.stdout
    assert [r[0] for r in stored(home, "KRW-BTC")] == arr["ts"].tolist()


def test_infer_timeframe_uses_the_most_common_step_and_calendar_rules() -> None:
    t0 = to_ms("2024-01-01")  # a Monday
    assert infer_timeframe(raw_1m()["ts"]) == parse_timeframe("1m")
    assert infer_timeframe(smtm_3m()["ts"]) == parse_timeframe("3m")
    assert infer_timeframe(np.array([t0, t0 + 7 * 86_400_000, t0 + 14 * 86_400_000])) == parse_timeframe("1w")
    months = np.array([to_ms(f"2024-{m:02d}-01") for m in (1, 2, 3, 4)])  # 31, 29, 31 days
    assert infer_timeframe(months) == parse_timeframe("1M")
    assert infer_timeframe(np.array([t0, t0 + 2 * 60_000])) is None  # 2 minutes: no timeframe
    assert infer_timeframe(np.array([t0])) is None


def test_epoch_seconds_get_a_hint(home: Path, tmp_path: Path) -> None:
    path = write_ccxt(tmp_path / "secs.csv", raw_1m(), scale=1000)
    res = run(home, "import", str(path), "-s", "KRW-BTC", "-t", "1m")
    assert_clean_error(res, 2, "line 2:", "timestamps look like epoch seconds", "expected milliseconds")


# ---------------------------------------------------------------------------------------------
# import: messages


def test_invalid_rows_and_parse_errors_both_name_1_based_file_lines(home: Path, tmp_path: Path) -> None:
    arr = raw_1m()[:6].copy()
    bad = arr.copy()
    bad["high"][2] = bad["low"][2] / 2  # the third candle: file line 4 (after the header)
    path = write_ccxt(tmp_path / "bad_row.csv", bad)
    assert_clean_error(run(home, "import", str(path), "-s", "KRW-BTC", "-t", "1m"), 2, "line 4:", "invalid candle")
    text = write_ccxt(tmp_path / "ok.csv", arr).read_text().splitlines()
    text[4] = text[4].replace(",", ",x", 1)  # file line 5: a time that is no number
    path.write_text("\n".join(text) + "\n")
    assert_clean_error(run(home, "import", str(path), "-s", "KRW-BTC", "-t", "1m"), 2, "line 5:")
    broken = tmp_path / "broken.json"
    broken.write_text('[\n{"market": "KRW-BTC",\n "opening_price": 1,,\n}]\n')
    assert_clean_error(run(home, "import", str(broken), "-s", "KRW-BTC", "-t", "1m"), 2, "line 3, column")
    assert not home.exists()


def test_realtime_messages_are_refused_as_not_persisted(home: Path, tmp_path: Path) -> None:
    # the recorded WebSocket frames (SIMPLE format) as JSON Lines, one message a line
    msgs = []
    for ln in filter(None, CRYPTOFEED.read_text().splitlines()[2:]):
        msgs.append(json.loads(ast.literal_eval(ln.split(": ", 1)[1])))  # <recv time>: b'<json>'
    trades = tmp_path / "trades.jsonl"
    trades.write_text("\n".join(json.dumps(m) for m in msgs if m["ty"] == "trade") + "\n")
    res = run(home, "import", str(trades), "-s", "KRW-LAMB", "-t", "1m")
    assert_clean_error(res, 2, "realtime data (ticker/orderbook/trades) is not persisted")
    # a REST ticker written line by line (what a poller of /v1/ticker stores)
    ticker = {"market": "KRW-BTC", "trade_price": 1.0, "acc_trade_price_24h": 2.0, "signed_change_rate": 0.0}
    tickers = tmp_path / "ticker.jsonl"
    tickers.write_text(json.dumps(ticker) + "\n" + json.dumps(ticker) + "\n")
    res = run(home, "import", str(tickers), "-s", "KRW-BTC", "-t", "1m")
    assert_clean_error(res, 2, "ticker messages", "is not persisted")
    assert "Extra data" not in res.stderr
    assert not home.exists()


def test_import_help_shows_path_once_and_the_file_as_file(tmp_path: Path) -> None:
    res = run(tmp_path, "import", "--help")
    assert res.returncode == 0
    usage = res.stdout.split("\n\n", 1)[0]
    assert usage.count("PATH") == 1, usage  # --path PATH; the candle file is FILE
    assert usage.rstrip().endswith("FILE")


# ---------------------------------------------------------------------------------------------
# stores: only writing commands create one, never where something else lives


def test_reading_commands_never_create_or_chmod(tmp_path: Path) -> None:
    other = tmp_path / "home"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    os.chmod(other, 0o755)
    empty = tmp_path / "empty"
    empty.mkdir()
    os.chmod(empty, 0o755)
    for path in (other, empty, tmp_path / "missing"):
        for args in (
            ("stats",),
            ("get", "KRW-BTC", "-n", "5"),
            ("export", "KRW-BTC", "-t", "1m", "--out", str(tmp_path / "x.csv")),
            ("gaps", "KRW-BTC", "-t", "1m"),
            ("list",),
            ("check",),
            ("maintain",),
        ):
            assert_clean_error(run(tmp_path / "unused", *args, "--path", str(path)), 2, f"no store at {path}")
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]
    assert stat.S_IMODE(other.stat().st_mode) == 0o755
    assert list(empty.iterdir()) == [] and stat.S_IMODE(empty.stat().st_mode) == 0o755
    assert not (tmp_path / "missing").exists() and not (tmp_path / "x.csv").exists()


def test_writing_commands_refuse_a_directory_holding_something_else(tmp_path: Path) -> None:
    other = tmp_path / "home"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    os.chmod(other, 0o755)
    res = run(tmp_path, "import", str(RAW_1M), "-s", "KRW-BTC", "-t", "1m", "--path", str(other))
    assert_clean_error(res, 2, "is not empty and holds no mds store")
    res = run(tmp_path, "demo", "--path", str(other), "--days", "1", "--markets", "1", "--minutes", "1")
    assert_clean_error(res, 2, "is not empty and holds no mds store")
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]
    assert stat.S_IMODE(other.stat().st_mode) == 0o755
    # an empty directory, or a new one, becomes a store
    empty = tmp_path / "empty"
    empty.mkdir()
    res = run(tmp_path, "import", str(RAW_1M), "-s", "KRW-BTC", "-t", "1m", "--path", str(empty))
    assert res.returncode == 0, res.stderr
    assert (empty / "candles.sqlite3").is_file()


def test_the_library_never_chmods_a_directory_it_did_not_create(tmp_path: Path) -> None:
    """mds.open in a directory holding other things keeps its mode; one others can write in is
    refused, untouched."""
    other = tmp_path / "home"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    os.chmod(other, 0o755)
    with mds.open(other):
        pass
    assert stat.S_IMODE(other.stat().st_mode) == 0o755
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "notes.txt").write_text("theirs")
    os.chmod(shared, 0o777)
    with pytest.raises(StorageUnavailableError, match="holds no mds store"):
        mds.open(shared)
    assert stat.S_IMODE(shared.stat().st_mode) == 0o777
    assert sorted(p.name for p in shared.iterdir()) == ["notes.txt"]


# ---------------------------------------------------------------------------------------------
# series that are not stored; -t left out


def test_get_without_timeframe_uses_the_only_one_and_says_so(home: Path) -> None:
    assert run(home, "import", str(RAW_1M), "-s", "KRW-BTC", "-t", "1m").returncode == 0
    res = run(home, "get", "KRW-BTC", "-n", "5")
    assert res.returncode == 0, res.stderr
    assert "using 1m, its only stored timeframe" in res.stderr
    assert "KRW-BTC 1m: 5 candles" in res.stdout


def test_get_without_timeframe_among_several_or_none_lists_what_exists(two_tf_home: Path) -> None:
    assert_clean_error(run(two_tf_home, "get", "KRW-BTC", "-n", "5"), 2, "several timeframes (1m, 3m)", "-t")
    res = run(two_tf_home, "get", "KRW-ETH", "-n", "5")
    assert_clean_error(res, 2, "no such series: KRW-ETH", "stored: KRW-BTC 1m, KRW-BTC 3m")
    for args in (("get", "KRW-BTC", "-t", "5m", "-n", "5"), ("gaps", "KRW-BTC", "-t", "1d")):
        assert_clean_error(run(two_tf_home, *args), 2, "no such series: KRW-BTC", "stored: KRW-BTC 1m, KRW-BTC 3m")


def test_export_of_an_unknown_series_fails_and_writes_nothing(two_tf_home: Path, tmp_path: Path) -> None:
    out = tmp_path / "doge.csv"
    res = run(two_tf_home, "export", "KRW-DOGE", "-t", "1m", "--out", str(out))
    assert_clean_error(res, 2, "no such series: KRW-DOGE 1m", "stored: KRW-BTC 1m")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# output files: format by extension, the real path, no silent overwrite


def test_export_picks_the_format_by_extension_and_refuses_unknown_ones(two_tf_home: Path, tmp_path: Path) -> None:
    assert_clean_error(
        run(two_tf_home, "export", "KRW-BTC", "-t", "1m", "--out", str(tmp_path / "x.xlsx")), 2, "'.xlsx'", ".csv"
    )
    assert not (tmp_path / "x.xlsx").exists()
    ref = raw_1m()
    for ext in (".json", ".jsonl", ".csv"):
        out = tmp_path / f"btc{ext}"
        res = run(two_tf_home, "export", "KRW-BTC", "-t", "1m", "--out", str(out))
        assert res.returncode == 0, res.stderr
        assert f"200 candles written to {out}" in res.stdout
        if ext == ".json":
            rows = json.loads(out.read_text())
        elif ext == ".jsonl":
            rows = [json.loads(ln) for ln in out.read_text().splitlines()]
        if ext != ".csv":
            assert np.array_equal(np.sort(candles_from_upbit(rows), order="ts"), ref)
    # a JSON Lines export imports back as the same candles
    res = run(two_tf_home, "import", str(tmp_path / "btc.jsonl"), "-s", "KRW-BTC", "-t", "1m")
    assert res.returncode == 0 and "200 unchanged" in res.stdout, res.stderr


def test_export_does_not_overwrite_without_force(two_tf_home: Path, tmp_path: Path) -> None:
    out = tmp_path / "btc.csv"
    out.write_text("keep me\n")
    res = run(two_tf_home, "export", "KRW-BTC", "-t", "1m", "--out", str(out))
    assert_clean_error(res, 2, "exists", "--force")
    assert out.read_text() == "keep me\n"
    res = run(two_tf_home, "export", "KRW-BTC", "-t", "1m", "--out", str(out), "--force")
    assert res.returncode == 0 and "overwritten" in res.stdout, res.stderr
    assert out.read_text().startswith("timestamp,time_utc,open")


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is not None, reason="pyarrow is installed")
def test_parquet_without_pyarrow_names_the_extra_and_is_bad_input(two_tf_home: Path, tmp_path: Path) -> None:
    res = run(two_tf_home, "export", "KRW-BTC", "-t", "1m", "--out", str(tmp_path / "b.parquet"))
    assert_clean_error(res, 2, "pip install 'upbit-mds[parquet]'")


def test_plot_writes_the_path_given_by_extension_and_never_overwrites(two_tf_home: Path, tmp_path: Path) -> None:
    assert_clean_error(
        run(two_tf_home, "plot", "KRW-BTC", "-t", "1m", "--out", str(tmp_path / "b.gif")), 2, "'.gif'", ".png"
    )
    taken = tmp_path / "taken.png"
    taken.write_bytes(b"mine")
    assert_clean_error(run(two_tf_home, "plot", "KRW-BTC", "-t", "1m", "--out", str(taken)), 2, "exists", "--force")
    assert taken.read_bytes() == b"mine"
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    res = run(two_tf_home, "plot", "KRW-BTC", "-t", "1m", "--out", str(out_dir / "btc"))
    if importlib.util.find_spec("matplotlib") is None:
        assert_clean_error(res, 1, "needs matplotlib")
        assert list(out_dir.iterdir()) == []
    else:
        assert res.returncode == 0, res.stderr
        assert f"plot written to {out_dir / 'btc.png'}" in res.stdout
        assert [p.name for p in out_dir.iterdir()] == ["btc.png"]


# ---------------------------------------------------------------------------------------------
# maintain, get --format table


def test_maintain_reports_what_it_did_and_the_sizes(two_tf_home: Path) -> None:
    res = run(two_tf_home, "maintain", "--force")
    assert res.returncode == 0, res.stderr
    m = re.search(
        r"history: (\d+) chunks compressed now \((\d+) compressed, (\d+) raw in all\); size ([\d.]+ \w+) -> "
        r"([\d.]+ \w+); vacuumed: yes",
        res.stdout,
    )
    assert m, res.stdout
    assert int(m.group(1)) >= 2 and int(m.group(2)) >= 2  # the recorded 2020-2021 candles are old: compressed
    again = run(two_tf_home, "maintain")
    assert "history: 0 chunks compressed now" in again.stdout, again.stdout


def test_get_table_uses_one_number_format_per_column(two_tf_home: Path) -> None:
    res = run(two_tf_home, "get", "KRW-BTC", "-t", "1m", "-n", "200")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["time_utc", "open", "high", "low", "close", "volume", "value"]
    assert set(lines[1]) <= {"-", " "}
    rows = [ln.split() for ln in lines[2:-1]]
    assert len(rows) == 200
    for col in range(1, 7):
        cells = [r[col] for r in rows]
        assert not any("e" in c.lower() for c in cells), cells[:5]
        decimals = {len(c.partition(".")[2]) for c in cells}
        assert len(decimals) == 1, (col, decimals)
    ref = raw_1m()
    assert [float(r[6]) for r in rows] == ref["value"].tolist()  # exact, not rounded away


# ---------------------------------------------------------------------------------------------
# the demo, the README


def test_demo_reports_no_missing_in_the_backfilled_window_and_paced_backfill_apart(tmp_path: Path) -> None:
    res = run(tmp_path, "demo", "--days", "1", "--markets", "2", "--minutes", "2", "--reads-per-minute", "2")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "backfill (paced: 10 requests/s)" in out
    assert "gaps in the backfilled window" in out
    rows = [ln.split() for ln in out.splitlines() if ln.startswith(("KRW-BTC ", "KRW-MED "))]
    assert len(rows) == 2
    assert all(r[5] == "0" and r[6] == "0" for r in rows), rows  # missing runs, missing min
    assert int(rows[1][3]) > 0  # the illiquid market has no-trade runs
    assert "not read latency" in out


def test_demo_path_help_matches_the_readme(tmp_path: Path) -> None:
    res = run(tmp_path, "demo", "--help")
    assert res.returncode == 0
    assert "default: a temporary directory" in " ".join(res.stdout.split())
    assert "a temporary directory unless --path" in " ".join(README.read_text().split())


def _readme_cli_lines() -> list[str]:
    section = README.read_text(encoding="utf-8").split("## The `mds` command", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block
    return [ln.split("#", 1)[0].strip() for ln in block.group(1).splitlines() if ln.startswith("mds ")]


@pytest.mark.skipif(not README.exists(), reason="README.md is not shipped with an installed wheel")
def test_readme_cli_section_matches_help(tmp_path: Path) -> None:
    top = run(tmp_path, "--help").stdout
    commands = set(re.findall(r"^    ([a-z][a-z-]+)\s", top, re.M))
    assert {"list", "delete", "fake-upbit", "import", "export"} <= commands
    named = set()
    for line in _readme_cli_lines():
        for part in line.split("|"):
            words = part.strip().split()
            cmd = words[1]
            named.add(cmd)
            assert cmd in commands, line
            helptext = run(tmp_path, cmd, "--help").stdout
            for opt in re.findall(r"(--[a-z][a-z-]*)", part):
                assert re.search(rf"{opt}\b", helptext), (cmd, opt)
    assert commands <= named, commands - named  # every command is in the README


def test_a_parquet_file_to_import_is_refused_as_bad_input(home: Path, tmp_path: Path) -> None:
    path = tmp_path / "btc.parquet"
    path.write_bytes(b"PAR1" + b"\0" * 16 + b"PAR1")
    assert_clean_error(run(home, "import", str(path), "-s", "KRW-BTC", "-t", "1m"), 2, "not Parquet")
    assert not home.exists()
