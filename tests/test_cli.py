"""The ``mds`` command, each run as a subprocess against a temporary store (and FakeUpbit)."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mds.convert import candles_from_upbit
from mds.testing import FakeUpbit, generate_market
from mds.timeutil import to_ms

DATA = Path(__file__).resolve().parent / "data"
RAW_1M = DATA / "krw-btc_1m_smtm_raw200.json"
SMTM_3M = DATA / "krw-btc_3m_smtm_200.json"
MIN = 60_000
KST = 9 * 3_600_000


def run(home: Path, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    # cwd and PYTHONPATH come from tests/conftest.py: the child imports the package under test
    # (the installed wheel in CI), not the source tree
    env = dict(os.environ, MDS_HOME=str(home))
    return subprocess.run(
        [sys.executable, "-m", "mds.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_clean_error(res: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    """A non-zero exit with one clear line on stderr, no traceback."""
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def raw_1m() -> np.ndarray:
    arr = candles_from_upbit(json.loads(RAW_1M.read_text()))
    return np.sort(arr, order="ts")


def get_csv(home: Path, *args: str) -> list[dict[str, str]]:
    res = run(home, "get", *args, "--format", "csv")
    assert res.returncode == 0, res.stderr
    return list(csv.DictReader(io.StringIO(res.stdout)))


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def btc_home(home: Path) -> Path:
    """A store holding the recorded 200 1m candles of KRW-BTC, marked complete."""
    res = run(home, "import", str(RAW_1M), "--symbol", "KRW-BTC", "--timeframe", "1m", "--complete")
    assert res.returncode == 0, res.stderr
    return home


# ---------------------------------------------------------------------------------------------
# demo


def test_demo_small_runs_offline_and_keeps_a_store_that_checks_ok(tmp_path: Path) -> None:
    store = tmp_path / "demo"
    res = run(
        tmp_path / "unused",
        "demo",
        "--path",
        str(store),
        "--days",
        "1",
        "--markets",
        "2",
        "--minutes",
        "2",
        "--reads-per-minute",
        "2",
    )
    assert res.returncode == 0, res.stderr
    out = res.stdout
    for needle in ("hit rate", "p50 ms", "p99 ms", "memory", "Layer 1 API", "no_trades", "missing", "SQLite"):
        assert needle in out, out
    assert "check: ok" in out
    # the illiquid market has no-trade runs; the gap table covers the backfilled window only, so
    # nothing in it is missing (the day before it, which the fake exchange also holds, is not shown)
    med = next(ln for ln in out.splitlines() if ln.startswith("KRW-MED"))
    cols = med.split()
    assert int(cols[3]) > 0 and int(cols[5]) == 0 and int(cols[6]) == 0
    assert (store / "candles.sqlite3").exists()

    chk = run(tmp_path / "unused", "check", "--path", str(store))
    assert chk.returncode == 0 and chk.stdout.strip() == "ok", chk.stderr
    gaps = run(tmp_path / "unused", "--path", str(store), "gaps", "KRW-MED", "--timeframe", "1m")
    assert gaps.returncode == 0, gaps.stderr
    assert "no_trades" in gaps.stdout and "missing runs" in gaps.stdout


def test_demo_follows_the_stream_and_its_candles_equal_fakeupbits(tmp_path: Path) -> None:
    import mds
    from mds._cli_demo import _DEMO_ANCHOR_MS, DEMO_MARKETS

    store = tmp_path / "demo"
    args = ("--days", "1", "--markets", "2", "--minutes", "3", "--reads-per-minute", "3")
    res = run(tmp_path / "unused", "demo", "--path", str(store), *args)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    table = out.split("live feed during the strategy reads", 1)[1].split("\n\n", 1)[0]
    cells = {
        ln.rsplit("  ", 1)[0].strip(): ln.rsplit("  ", 1)[1].strip() for ln in table.splitlines()[3:] if "  " in ln
    }
    for kind in ("ticker", "trade", "candle (1m)"):
        assert int(cells[f"messages received: {kind}"]) > 0, table
    assert int(cells["closed candles handed to history by the stream"]) > 0, table
    assert int(cells["closed minutes x markets covered by the stream"]) > 0, table
    live = int(cells["Layer 1 requests for minutes closed during the reads (3)"])
    without = int(cells["the same without the stream: 3 min x 2 markets (4)"])
    assert without == 6 and live < without and int(cells["REST requests saved"]) == without - live, table
    assert cells["stream/REST candle differences, reconnects, dropped, malformed"] == "0, 0, 0, 0", table
    assert "a wait timed out" not in out and "check: ok" in out
    # every candle the store holds for the live minutes (the stream's, or REST's where it was
    # first) equals the one FakeUpbit generated, and none of them is missing
    end = _DEMO_ANCHOR_MS + 3 * 60_000
    with mds.open(store, config=mds.Config(tiers=("sqlite",))) as s:
        for sym, liq in DEMO_MARKETS[:2]:
            want = generate_market(sym, "1m", _DEMO_ANCHOR_MS - 2 * 86_400_000, end + 2 * 60_000, liquidity=liq, seed=7)
            want = want[(want["ts"] >= _DEMO_ANCHOR_MS) & (want["ts"] < end)]
            got = s.candles(sym, "1m", start=_DEMO_ANCHOR_MS, end=end)
            assert np.array_equal(got, want), sym
            assert all(g.kind == "no_trades" for g in s.gaps(sym, "1m", start=_DEMO_ANCHOR_MS, end=end)), sym


def test_demo_rejects_too_many_markets(tmp_path: Path) -> None:
    assert_clean_error(run(tmp_path, "demo", "--markets", "99"), 2, "--markets")


# ---------------------------------------------------------------------------------------------
# backfill


def test_backfill_from_fakeupbit_then_rerun_skips_covered_ranges(home: Path) -> None:
    t0 = to_ms("2025-01-20T00:00:00Z")
    data = {
        ("KRW-BTC", "1m"): generate_market("KRW-BTC", "1m", t0 - 3_600_000, t0 + 86_400_000, seed=3),
        ("KRW-MED", "1m"): generate_market(
            "KRW-MED", "1m", t0 - 3_600_000, t0 + 86_400_000, liquidity="illiquid", seed=3
        ),
    }
    since, until = "2025-01-20T00:00:00Z", "2025-01-20T12:00:00Z"
    with FakeUpbit(data) as fake:
        args = ("backfill", "KRW-BTC", "KRW-MED", "--timeframe", "1m", "--since", since, "--until", until)
        res = run(home, *args, "--base-url", fake.base_url)
        assert res.returncode == 0, res.stderr
        first = fake.request_count()
        assert first >= 4
        assert "KRW-BTC 1m" in res.stderr and "100.0 %" in res.stderr  # progress on stderr
        assert "0 of 720 intervals were already covered" in res.stdout

        again = run(home, *args, "--base-url", fake.base_url)
        assert again.returncode == 0, again.stderr
        assert fake.request_count() == first  # resumable: nothing left to fetch
        assert "720 of 720 intervals were already covered" in again.stdout
        assert "0 candles fetched in 0 Layer 1 calls" in again.stdout

        # a wider range fetches only the part that is not covered yet
        wider = run(
            home,
            "backfill",
            "KRW-BTC",
            "--since",
            since,
            "--until",
            "2025-01-20T13:00:00Z",
            "--base-url",
            fake.base_url,
        )
        assert wider.returncode == 0, wider.stderr
        assert "720 of 780 intervals were already covered" in wider.stdout
        assert fake.request_count() == first + 1

    rows = get_csv(home, "KRW-BTC", "--timeframe", "1m", "--start", since, "--end", until)
    expect = data[("KRW-BTC", "1m")]
    expect = expect[(expect["ts"] >= t0) & (expect["ts"] < t0 + 720 * MIN)]
    assert [int(r["timestamp"]) for r in rows] == expect["ts"].tolist()
    assert [float(r["close"]) for r in rows] == expect["close"].tolist()

    gaps = run(home, "gaps", "KRW-MED", "--timeframe", "1m", "--start", since, "--end", until)
    assert gaps.returncode == 0, gaps.stderr
    assert "0 missing runs" in gaps.stdout and "no_trades" in gaps.stdout


def test_backfill_blocked_by_upbit_is_one_line_exit_1(home: Path) -> None:
    t0 = to_ms("2025-01-20T00:00:00Z")
    data = {("KRW-BTC", "1m"): generate_market("KRW-BTC", "1m", t0, t0 + 86_400_000, seed=1)}
    with FakeUpbit(data) as fake:
        fake.inject("blocked", message="blocked for 60 s")
        res = run(
            home,
            "backfill",
            "KRW-BTC",
            "--since",
            "2025-01-20",
            "--until",
            "2025-01-20T01:00",
            "--base-url",
            fake.base_url,
        )
    assert res.returncode == 1
    assert "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("mds backfill: error:")


def test_backfill_rejects_days_with_since_and_bad_symbol(home: Path) -> None:
    res = run(home, "backfill", "KRW-BTC", "--days", "1", "--since", "2025-01-01")
    assert_clean_error(res, 2, "not allowed with")
    res = run(home, "backfill", "KRW-BTC", "btc", "--days", "1", "--base-url", "http://127.0.0.1:9")
    assert_clean_error(res, 2, "invalid symbol")


# ---------------------------------------------------------------------------------------------
# get and gaps


def test_get_formats_table_csv_json(btc_home: Path) -> None:
    res = run(btc_home, "get", "KRW-BTC", "--timeframe", "1m", "--count", "5")
    assert res.returncode == 0, res.stderr
    assert "2021-01-30T13:47:00Z" in res.stdout and "5 candles" in res.stdout

    rows = get_csv(btc_home, "KRW-BTC", "--timeframe", "1m", "--count", "5")
    ref = raw_1m()[-5:]
    assert [int(r["timestamp"]) for r in rows] == ref["ts"].tolist()
    assert [float(r["value"]) for r in rows] == ref["value"].tolist()

    res = run(btc_home, "get", "KRW-BTC", "--timeframe", "1m", "--count", "3", "--format", "json")
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    assert [r["candle_date_time_utc"] for r in got] == [
        "2021-01-30T13:45:00",
        "2021-01-30T13:46:00",
        "2021-01-30T13:47:00",
    ]
    assert all(r["market"] == "KRW-BTC" for r in got)


def test_get_range_accepts_iso_with_offset_and_epoch_ms(btc_home: Path) -> None:
    a = get_csv(btc_home, "KRW-BTC", "--start", "2021-01-30T22:40:00+09:00", "--end", "2021-01-30T13:43:00")
    b = get_csv(btc_home, "KRW-BTC", "--start", str(to_ms("2021-01-30T13:40:00Z")), "--end", "1612014180000")
    assert [r["time_utc"] for r in a] == ["2021-01-30T13:40:00Z", "2021-01-30T13:41:00Z", "2021-01-30T13:42:00Z"]
    assert a == b


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("get", "BTC", "--count", "3"), "invalid symbol"),
        (("get", "krw-btc", "--count", "3"), "invalid symbol"),
        (("get", "KRW-BTC", "--timeframe", "7m", "--count", "3"), "timeframe"),
        (("get", "KRW-BTC", "--start", "2021-01-31", "--end", "2021-01-30"), "must be after"),
        (("gaps", "KRW-BTC", "--start", "2021-01-31", "--end", "2021-01-30"), "must be after"),
        (("get", "KRW-BTC", "--start", "yesterday"), "not an ISO-8601 time"),
        (("get", "KRW-BTC", "--count", "0"), "must be positive"),
        (("get", "KRW-BTC"), "--count"),
        (("get", "KRW-BTC", "--count", "3", "--format", "xml"), "invalid choice"),
        (("frobnicate",), "invalid choice"),
    ],
)
def test_bad_arguments_are_one_line_exit_2(btc_home: Path, args: tuple[str, ...], needle: str) -> None:
    assert_clean_error(run(btc_home, *args), 2, needle)


def test_read_commands_without_a_store_say_so(home: Path) -> None:
    for args in (("get", "KRW-BTC", "--count", "1"), ("gaps", "KRW-BTC"), ("stats",), ("check",)):
        assert_clean_error(run(home, *args), 2, "no store at")
    assert not home.exists()


def test_gaps_tell_missing_from_no_trades(home: Path, tmp_path: Path) -> None:
    ref = raw_1m()
    keep = np.ones(len(ref), dtype=bool)
    keep[50:53] = False  # three minutes without trades inside the file's span
    path = tmp_path / "holes.csv"
    write_ccxt(path, ref[keep], value=True)
    assert run(home, "import", str(path), "-s", "KRW-BTC", "-t", "1m").returncode == 0
    assert run(home, "import", str(path), "-s", "KRW-ETH", "-t", "1m", "--complete").returncode == 0

    missing = run(home, "gaps", "KRW-BTC", "-t", "1m")
    notrade = run(home, "gaps", "KRW-ETH", "-t", "1m")
    assert missing.returncode == 0 and notrade.returncode == 0
    start = ref["ts"][50]
    assert "1 missing runs (3 candles), 0 no_trades runs" in missing.stdout
    assert "0 missing runs (0 candles), 1 no_trades runs (3 candles)" in notrade.stdout
    assert f"{np.datetime64(int(start), 'ms').astype('datetime64[s]')}Z" in notrade.stdout


# ---------------------------------------------------------------------------------------------
# import


def write_ccxt(path: Path, arr: np.ndarray, *, value: bool = False, iso: bool = False) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["timestamp", "open", "high", "low", "close", "volume", *(["value"] if value else [])])
        for r in arr:
            t = (
                str(np.datetime64(int(r["ts"]), "ms").astype("datetime64[s]")).replace("T", " ")
                if iso
                else int(r["ts"])
            )
            w.writerow(
                [t, *(repr(float(r[f])) for f in ("open", "high", "low", "close", "volume"))]
                + ([repr(float(r["value"]))] if value else [])
            )


def write_pyupbit(path: Path, arr: np.ndarray) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["", "open", "high", "low", "close", "volume", "value"])
        for r in arr:
            kst = str(np.datetime64(int(r["ts"]) + KST, "ms").astype("datetime64[s]")).replace("T", " ")
            w.writerow([kst, *(repr(float(r[f])) for f in ("open", "high", "low", "close", "volume", "value"))])


def write_upbit_csv(path: Path, rows: list[dict[str, object]]) -> None:
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def stored(home: Path, symbol: str, tf: str = "1m") -> list[tuple[float, ...]]:
    rows = get_csv(home, symbol, "--timeframe", tf, "--start", "2020-01-01")
    return [
        (int(r["timestamp"]), *(float(r[f]) for f in ("open", "high", "low", "close", "volume", "value"))) for r in rows
    ]


def as_tuples(arr: np.ndarray) -> list[tuple[float, ...]]:
    return [(int(r["ts"]), *(float(r[f]) for f in ("open", "high", "low", "close", "volume", "value"))) for r in arr]


def test_import_every_format_gives_the_same_candles(home: Path, tmp_path: Path) -> None:
    ref = raw_1m()
    raw_rows = json.loads(RAW_1M.read_text())
    pages = tmp_path / "pages.json"
    pages.write_text(json.dumps([raw_rows[:120], raw_rows[120:]]))  # a list of pages
    upb = tmp_path / "upbit.csv"
    write_upbit_csv(upb, raw_rows)
    pyu = tmp_path / "pyupbit.csv"
    write_pyupbit(pyu, ref)
    ccxt = tmp_path / "ccxt.csv"
    write_ccxt(ccxt, ref, value=True)

    cases = [
        ("KRW-BTC", RAW_1M, "upbit-json"),
        ("KRW-ETH", pages, "upbit-json"),
        ("KRW-XRP", upb, "upbit-csv"),
        ("KRW-SOL", pyu, "pyupbit-csv"),
        ("KRW-ADA", ccxt, "ccxt-csv"),
    ]
    for sym, path, fmt in cases:
        if path in (pages, upb):
            rows = [dict(r, market=sym) for r in raw_rows]
            if path is pages:
                pages.write_text(json.dumps([rows[:120], rows[120:]]))
            else:
                write_upbit_csv(upb, rows)
        res = run(home, "import", str(path), "--symbol", sym, "--timeframe", "1m")
        assert res.returncode == 0, (fmt, res.stderr)
        assert f"({fmt})" in res.stdout, res.stdout  # auto-detected
        assert "200 inserted" in res.stdout
        assert "not marked covered" in res.stdout
        assert stored(home, sym) == as_tuples(ref), fmt

    explicit = run(home, "import", str(pyu), "-s", "KRW-SOL", "-t", "1m", "--format", "pyupbit-csv")
    assert explicit.returncode == 0 and "200 unchanged" in explicit.stdout

    chk = run(home, "check")
    assert chk.returncode == 0 and chk.stdout.strip() == "ok"


def test_import_ccxt_without_value_estimates_it_and_reads_naive_utc(home: Path, tmp_path: Path) -> None:
    ref = raw_1m()[:20]
    path = tmp_path / "ohlcv.csv"
    write_ccxt(path, ref, iso=True)
    res = run(home, "import", str(path), "-s", "KRW-BTC", "-t", "1m", "--format", "ccxt-csv")
    assert res.returncode == 0, res.stderr
    assert "value estimated as close * volume" in res.stdout
    got = stored(home, "KRW-BTC")
    assert [g[0] for g in got] == ref["ts"].tolist()
    assert [g[6] for g in got] == pytest.approx((ref["close"] * ref["volume"]).tolist())


def test_import_headerless_ccxt_and_duplicates_last_wins(home: Path, tmp_path: Path) -> None:
    ref = raw_1m()[:10]
    lines = [
        ",".join([str(int(r["ts"]))] + [repr(float(r[f])) for f in ("open", "high", "low", "close", "volume")])
        for r in ref
    ]
    dup = ref[3]
    lines.append(
        ",".join([str(int(dup["ts"]))] + [repr(float(dup[f])) for f in ("open", "high", "low", "close")] + ["42.0"])
    )
    path = tmp_path / "bare.csv"
    path.write_text("\n".join(lines) + "\n")
    res = run(home, "import", str(path), "-s", "KRW-BTC", "-t", "1m")
    assert res.returncode == 0, res.stderr
    assert "10 candles" in res.stdout and "1 duplicate rows dropped (last wins)" in res.stdout
    got = stored(home, "KRW-BTC")
    assert len(got) == 10 and got[3][5] == 42.0


def test_import_complete_marks_the_span_covered(home: Path) -> None:
    res = run(home, "import", str(SMTM_3M), "-s", "KRW-BTC", "-t", "3m", "--complete")
    assert res.returncode == 0, res.stderr
    assert "span marked covered" in res.stdout
    gaps = run(home, "gaps", "KRW-BTC", "-t", "3m", "--start", "2020-02-19T14:00", "--end", "2020-02-20T01:00")
    # an hour before the file's span was never given: missing; the span itself has no holes
    assert "1 missing runs (20 candles), 0 no_trades runs" in gaps.stdout, gaps.stdout


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe garbage \x00", "not UTF-8"),
        (b"", "is empty"),
        (b'[{"market": "KRW-BTC", ', "not valid JSON"),
        (b'{"error": {"name": 404}}', "lacks the field"),
        (b"[1, 2, 3]", "candle objects"),
        (b"a,b,c\n1,2,3\n", "cannot tell the format"),
        (b"timestamp,open,high,low,close,volume\n1612000000000,1,2,0.5,1.5,abc\n", "line 2: volume 'abc'"),
        (b"timestamp,open,high,low,close,volume\nnoon,1,2,0.5,1.5,3\n", "'noon' is not a time"),
        (b"timestamp,open,high,low,close\n1612000000000,1,2,0.5,1.5\n", "lacks the column 'volume'"),
        (b"timestamp,open,high,low,close,volume\n1612000000000,1,2,3,1.5,3\n", "invalid candle"),
        (b"timestamp,open,high,low,close,volume\n1612000000001,1,2,0.5,1.5,3\n", "misaligned"),
        (b"timestamp,open,high,low,close,volume\n1612000000000,1,2,0.5\n", "too few columns"),
    ],
)
def test_import_garbage_is_rejected_and_nothing_is_stored(
    home: Path, tmp_path: Path, content: bytes, needle: str
) -> None:
    path = tmp_path / "bad.dat"
    path.write_bytes(content)
    res = run(home, "import", str(path), "-s", "KRW-BTC", "-t", "1m")
    assert_clean_error(res, 2, needle)
    if home.exists():
        assert stored(home, "KRW-BTC") == []


def test_import_unreadable_wrong_market_and_wrong_timeframe(btc_home: Path, tmp_path: Path) -> None:
    assert_clean_error(
        run(btc_home, "import", str(tmp_path / "nope.json"), "-s", "KRW-BTC", "-t", "1m"), 2, "cannot read"
    )
    assert_clean_error(run(btc_home, "import", str(tmp_path), "-s", "KRW-BTC", "-t", "1m"), 2, "cannot read")
    assert_clean_error(run(btc_home, "import", str(RAW_1M), "-s", "KRW-ETH", "-t", "1m"), 2, "another market")
    assert_clean_error(run(btc_home, "import", str(SMTM_3M), "-s", "KRW-BTC", "-t", "1m"), 2, "3-minute candles")
    assert_clean_error(run(btc_home, "import", str(RAW_1M), "-s", "KRW-BTC", "-t", "1m", "-f", "ccxt-csv"), 2)
    assert_clean_error(run(btc_home, "import", str(RAW_1M), "-s", "KRW-BTC"), 2, "--timeframe")
    assert len(stored(btc_home, "KRW-BTC")) == 200


# ---------------------------------------------------------------------------------------------
# export, stats, maintain, check, plot


def test_export_csv_round_trips_through_import(btc_home: Path, tmp_path: Path) -> None:
    out = tmp_path / "btc.csv"
    res = run(btc_home, "export", "KRW-BTC", "--timeframe", "1m", "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert "200 candles written" in res.stdout
    back = run(btc_home, "import", str(out), "-s", "KRW-ETH", "-t", "1m")
    assert back.returncode == 0, back.stderr
    assert "estimated" not in back.stdout  # the value column is kept
    assert stored(btc_home, "KRW-ETH") == stored(btc_home, "KRW-BTC")


def test_export_parquet_needs_pyarrow(btc_home: Path, tmp_path: Path) -> None:
    out = tmp_path / "btc.parquet"
    res = run(btc_home, "export", "KRW-BTC", "-t", "1m", "--out", str(out))
    if importlib.util.find_spec("pyarrow") is None:
        assert_clean_error(res, 2, "upbit-mds[parquet]")
        assert not out.exists()
    else:
        assert res.returncode == 0, res.stderr
        assert out.read_bytes()[:4] == b"PAR1"


def test_export_to_unwritable_place_is_one_line(btc_home: Path, tmp_path: Path) -> None:
    res = run(btc_home, "export", "KRW-BTC", "-t", "1m", "--out", str(tmp_path / "no" / "such" / "dir.csv"))
    assert_clean_error(res, 1, "cannot write")


def test_stats_maintain_check_on_a_store(btc_home: Path) -> None:
    st = run(btc_home, "stats")
    assert st.returncode == 0, st.stderr
    figures = json.loads(st.stdout)
    assert figures["tiers"]["sqlite"]["series"] == 1
    mt = run(btc_home, "maintain", "--force")
    assert mt.returncode == 0 and "vacuumed: yes" in mt.stdout
    ck = run(btc_home, "check")
    assert ck.returncode == 0 and ck.stdout.strip() == "ok"


def test_check_reports_a_damaged_database_with_exit_1(btc_home: Path) -> None:
    db = btc_home / "candles.sqlite3"
    for p in btc_home.glob("candles.sqlite3*"):
        p.unlink()
    db.write_bytes(b"this is not a database" * 200)
    res = run(btc_home, "check")
    assert res.returncode == 1, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    assert "problem: sqlite" in res.stdout


def test_plot_draws_a_png_or_says_matplotlib_is_missing(btc_home: Path, tmp_path: Path) -> None:
    out = tmp_path / "btc.png"
    res = run(btc_home, "plot", "KRW-BTC", "--timeframe", "1m", "--out", str(out))
    if importlib.util.find_spec("matplotlib") is None:
        assert_clean_error(res, 1, "needs matplotlib")
    else:
        assert res.returncode == 0, res.stderr
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "200 candles" in res.stdout
    assert_clean_error(run(btc_home, "plot", "KRW-DOGE", "-t", "1m", "--out", str(out)), 2, "no stored candles")
