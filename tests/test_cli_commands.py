"""The ``mds`` commands added or reworked for issue 21, as subprocesses: ``list``, ``delete``,
``fake-upbit`` (talked to as Upbit clients do), Ctrl-C during ``backfill``, and rich output on a
terminal (a pseudo-terminal here; without one the output is plain, as the other CLI tests see)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from _terminal import run_on_terminal
from test_cli import RAW_1M, SMTM_3M, assert_clean_error, run

from mds.testing import FakeUpbit, generate_market
from mds.timeutil import to_ms

DAY = 86_400_000
#: pyupbit's parse of the Remaining-Req header (request_api.py).
REMAINING = re.compile(r"group=([a-z\-]+); min=([0-9]+); sec=([0-9]+)")


def mds_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "mds.cli", *args]


@pytest.fixture
def home(tmp_path: Path) -> Path:
    home = tmp_path / "store"
    for f, tf in ((RAW_1M, "1m"), (SMTM_3M, "3m")):
        res = run(home, "import", str(f), "-s", "KRW-BTC", "-t", tf)
        assert res.returncode == 0, res.stderr
    return home


# ---------------------------------------------------------------------------------------------
# list, delete


def test_list_shows_every_series_with_its_span_and_count(home: Path) -> None:
    res = run(home, "list")
    assert res.returncode == 0, res.stderr
    rows = [ln.split() for ln in res.stdout.splitlines()[2:-1]]
    assert rows == [
        ["KRW-BTC", "1m", "2021-01-30T10:28:00Z", "2021-01-30T13:47:00Z", "200", "0.0%"],
        ["KRW-BTC", "3m", "2020-02-19T15:00:00Z", "2020-02-20T00:57:00Z", "200", "0.0%"],
    ]
    assert res.stdout.splitlines()[-1] == "2 series, 400 candles"
    assert run(home, "list", "KRW-ETH").stdout.strip() == "0 series, 0 candles"


def test_delete_asks_or_needs_yes_and_removes_the_series(home: Path) -> None:
    env = dict(os.environ, MDS_HOME=str(home))
    res = subprocess.run(
        mds_cmd("delete", "KRW-BTC", "-t", "3m"),
        env=env,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=60,
    )
    assert_clean_error(res, 2, "would delete KRW-BTC 3m (200 candles)", "--yes")
    assert "2 series" in run(home, "list").stdout  # nothing deleted
    assert_clean_error(run(home, "delete", "KRW-ETH", "--yes"), 2, "no such series: KRW-ETH", "KRW-BTC 1m")
    res = run(home, "delete", "KRW-BTC", "-t", "3m", "--yes")
    assert res.returncode == 0, res.stderr
    assert "KRW-BTC 3m: 200 candles deleted" in res.stdout
    listed = run(home, "list").stdout
    assert "3m" not in listed and listed.splitlines()[-1] == "1 series, 200 candles"
    assert_clean_error(run(home, "get", "KRW-BTC", "-t", "3m", "-n", "5"), 2, "no such series: KRW-BTC 3m")
    # without -t: every timeframe of the symbol
    assert run(home, "delete", "KRW-BTC", "--yes").returncode == 0
    assert run(home, "list").stdout.strip() == "0 series, 0 candles"


# ---------------------------------------------------------------------------------------------
# backfill: Ctrl-C


def test_ctrl_c_during_backfill_ends_the_line_says_interrupted_once_and_resumes(tmp_path: Path) -> None:
    t0 = to_ms("2025-01-01T00:00:00Z")
    data = {("KRW-BTC", "1m"): generate_market("KRW-BTC", "1m", t0, t0 + 10 * DAY, seed=5)}
    home = tmp_path / "store"
    args = ("backfill", "KRW-BTC", "-t", "1m", "--since", "2025-01-01", "--until", "2025-01-10")
    env = dict(os.environ, MDS_HOME=str(home))
    with FakeUpbit(data) as fake:
        proc = subprocess.Popen(
            mds_cmd(*args, "--base-url", fake.base_url),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 60
        while fake.request_count("/v1/candles") < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "the backfill ended before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, (out, err)
        assert err.count("interrupted") == 1, err
        assert "Task was destroyed" not in err and "Traceback" not in err and "Exception ignored" not in err, err
        assert err.endswith("\n")
        line = next(ln for ln in err.splitlines() if "interrupted" in ln)
        assert line.startswith("mds backfill: interrupted"), err  # on a line of its own
        assert "run the same command again to resume" in line
        fetched = fake.request_count("/v1/candles")
        assert fetched < 65  # stopped early: the whole range is 65 requests

        again = subprocess.run(
            mds_cmd(*args, "--base-url", fake.base_url), env=env, capture_output=True, text=True, timeout=120
        )
        assert again.returncode == 0, again.stderr
        covered = int(re.search(r"(\d+) of 12960 intervals were already covered", again.stdout).group(1))
        assert covered > 0  # what the first run stored was kept
        assert fake.request_count("/v1/candles") - fetched < 65


# ---------------------------------------------------------------------------------------------
# fake-upbit


def _serve(*extra: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        mds_cmd("fake-upbit", "--markets", "2", "--days", "1", *extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()
    m = re.search(r"at (http://127\.0\.0\.1:\d+)$", first.strip())
    assert m, (first, proc.stderr.read() if proc.poll() is not None and proc.stderr else "")
    return proc, m.group(1)


def _stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    return out


def test_fake_upbit_answers_what_pyupbit_and_ccxt_ask_first() -> None:
    proc, url = _serve()
    try:
        with httpx.Client(base_url=url, timeout=10) as http:
            # pyupbit.get_tickers(): GET /v1/market/all?isDetails=false
            r = http.get("/v1/market/all", params={"isDetails": "false"})
            assert r.status_code == 200
            g = REMAINING.search(r.headers["Remaining-Req"])
            assert g and g.group(1) == "market"
            markets = r.json()
            assert {m["market"] for m in markets} == {"KRW-BTC", "KRW-MED"}
            assert all(set(m) == {"market", "korean_name", "english_name"} for m in markets)
            assert next(m for m in markets if m["market"] == "KRW-BTC")["english_name"] == "Bitcoin"
            # ccxt upbit.fetch_markets(): the details (market_event: warning, caution by kind)
            detailed = http.get("/v1/market/all", params={"is_details": "true"}).json()
            event = detailed[0]["market_event"]
            assert event["warning"] is False and event["caution"]["PRICE_FLUCTUATIONS"] is False
            assert detailed[0]["market_warning"] == "NONE"
            # candles as pyupbit (to: zone-less) and ccxt (to: ISO with Z) page them
            now = http.get("/v1/candles/minutes/1", params={"market": "KRW-BTC", "count": 1}).json()[0]
            for to in (now["candle_date_time_utc"].replace("T", " "), now["candle_date_time_utc"] + "Z"):
                r = http.get("/v1/candles/minutes/1", params={"market": "KRW-BTC", "count": 200, "to": to})
                assert r.status_code == 200 and REMAINING.search(r.headers["Remaining-Req"]).group(1) == "candles"
                page = r.json()
                assert len(page) == 200 and page[0]["candle_date_time_utc"] < now["candle_date_time_utc"]
                assert page[0]["candle_date_time_utc"] > page[-1]["candle_date_time_utc"]  # newest first
                assert page[0]["unit"] == 1
            days = http.get("/v1/candles/days", params={"market": "KRW-BTC", "count": 5}).json()
            assert len(days) == 5 and {"prev_closing_price", "change_rate", "trade_price"} <= set(days[0])
            for path in ("weeks", "months", "seconds", "minutes/240"):
                assert http.get(f"/v1/candles/{path}", params={"market": "KRW-MED", "count": 3}).status_code == 200
            tickers = http.get("/v1/ticker", params={"markets": "KRW-BTC,KRW-MED"}).json()
            assert [t["market"] for t in tickers] == ["KRW-BTC", "KRW-MED"] and tickers[0]["trade_price"] > 0
            every = http.get("/v1/ticker/all", params={"quote_currencies": "KRW"}).json()
            assert {t["market"] for t in every} == {"KRW-BTC", "KRW-MED"}
            book = http.get("/v1/orderbook", params={"markets": "KRW-BTC"}).json()[0]
            assert book["market"] == "KRW-BTC" and book["orderbook_units"][0]["ask_price"] > 0
            ticks = http.get("/v1/trades/ticks", params={"market": "KRW-BTC", "count": 5}).json()
            assert len(ticks) == 5 and "sequential_id" in ticks[0]
            assert http.get("/v1/ticker", params={"markets": "KRW-NOPE"}).status_code == 404
    finally:
        out = _stop(proc)
    assert "FakeUpbit stopped after" in out


def test_fake_upbit_listens_on_the_port_given() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc, url = _serve("--port", str(port))
    try:
        assert url == f"http://127.0.0.1:{port}"
        assert httpx.get(url + "/v1/market/all", timeout=10).status_code == 200
        # a second one on the same port: one line, exit 2
        busy = subprocess.run(mds_cmd("fake-upbit", "--port", str(port)), capture_output=True, text=True, timeout=60)
        assert_clean_error(busy, 2, f"cannot listen on 127.0.0.1:{port}")
    finally:
        _stop(proc)


# ---------------------------------------------------------------------------------------------
# rich on a terminal


def test_tables_are_drawn_by_rich_on_a_terminal(home: Path) -> None:
    rc, text = run_on_terminal(mds_cmd("list"), dict(os.environ, MDS_HOME=str(home), COLUMNS="120", TERM="xterm"))
    assert rc == 0
    assert "KRW-BTC" in text and "2021-01-30T13:47:00Z" in text
    assert any(c in text for c in "┃━┏│─"), text  # a rich box, not the plain dashed rule
    assert "-------" not in text
