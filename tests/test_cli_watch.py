"""``mds watch`` as a subprocess against FakeUpbit's WebSocket endpoint on 127.0.0.1: the table,
``--record`` and a replay of what it wrote, Ctrl-C, bad input, and ``mds fake-upbit``'s ws URL."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from _terminal import run_on_terminal
from test_cli import assert_clean_error

import mds
from mds._cli_watch import Recorder, _run_plain, _View, read_recording
from mds.layer1 import ReplayStream
from mds.layer1._ws_parse import simple_keys
from mds.layer1.stream import FrameParser, OrderbookMessage, TickerMessage, TradeMessage, UpbitStream
from mds.testing import FakeUpbit, generate_market
from mds.timeutil import now_ms, to_ms

MARKETS = ("KRW-BTC", "KRW-ETH")
SUMMARY = re.compile(r"^(\d+) messages in [\d.]+ s \(([a-z0-9, ]+)\); (\d+) malformed")


def watch_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "mds.cli", "watch", *args]


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeUpbit]:
    """FakeUpbit on the wall clock, with second candles around now: trades every second."""
    now = now_ms()
    data: dict[tuple[str, str], np.ndarray] = {}
    for i, m in enumerate(MARKETS):
        lo, hi = (now // 60_000 - 30) * 60_000, (now // 60_000 + 30) * 60_000
        data[(m, "1m")] = generate_market(m, "1m", lo, hi, seed=i)
        data[(m, "1s")] = generate_market(m, "1s", now // 1000 * 1000 - 60_000, hi, seed=10 + i)
    with FakeUpbit(data, clock=now_ms, ws_connect_limit=None) as f:
        yield f


def summary(stdout: str) -> dict[str, int]:
    line = stdout.strip().splitlines()[-1]
    m = SUMMARY.match(line)
    assert m, stdout
    counts = {k: int(v) for k, v in (part.split() for part in m.group(2).split(", "))}
    assert int(m.group(1)) == sum(counts.values())
    return {"ticker": 0, "trade": 0, "orderbook": 0, **counts, "malformed": int(m.group(3))}


def replay(path: Path) -> tuple[Counter[str], list[tuple[str, int]]]:
    """Every recorded frame through the stream's parser, each checked against its raw JSON."""
    parser = FrameParser(lambda: 0)
    kinds: Counter[str] = Counter()
    trade_ids = []
    last = 0
    names = {k: {v: n for n, v in simple_keys(k).items()} for k in ("ticker", "trade", "orderbook", "unit")}
    for item in read_recording(path):
        assert item is not None  # no connection was lost
        received, frame = item
        assert isinstance(frame, bytes)  # FakeUpbit sends binary frames, as Upbit does
        assert received >= last
        last = received
        raw = json.loads(frame)
        msg = parser.parse(frame)
        if msg is None:
            assert raw == {"status": "UP"}
            continue
        ty = raw["ty"]  # SIMPLE
        kinds[ty] += 1
        table = names[ty]
        expect = {("market" if k == "cd" else table[k]): v for k, v in raw.items() if k != "ty"}
        if ty == "orderbook":
            assert isinstance(msg, OrderbookMessage)
            expect["orderbook_units"] = [{names["unit"][k]: v for k, v in u.items()} for u in raw["obu"]]
        elif ty == "trade":
            assert isinstance(msg, TradeMessage)
            assert msg.row == (raw["ttms"], raw["tp"], raw["tv"], 1 if raw["ab"] == "BID" else -1, raw["sid"])
            trade_ids.append((msg.market, msg.sequential_id))
        else:
            assert isinstance(msg, TickerMessage) and msg.trade_price == raw["tp"]
        assert msg.fields == expect and msg.market in MARKETS
    assert parser.malformed == 0 and parser.unknown_fields == 0
    return kinds, trade_ids


def test_watch_shows_every_market_and_records_frames_that_replay(fake: FakeUpbit, tmp_path: Path) -> None:
    rec = tmp_path / "frames.jsonl"
    res = subprocess.run(
        watch_cmd(*MARKETS, "--url", fake.ws_url, "--format", "SIMPLE", "--seconds", "3", "--record", str(rec)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["time_utc", "market", "last", "change", "spread", "trades/s", "lag", "ms"]
    rows = [ln.split() for ln in lines[1:-1]]
    assert rows and {r[1] for r in rows} == set(MARKETS)
    row = re.compile(r"Z  KRW-(BTC|ETH) +[\d,.]+ +[+-]\d+\.\d\d% +[\d,.]+ \(\d+\.\d bp\) +\d+\.\d +\d+$")
    for line in lines[-3:-1]:  # the final figures: a price, a change, the spread of the orderbook
        assert row.search(line), line
    counts = summary(res.stdout)
    assert counts["trade"] > 0 and counts["ticker"] >= 2 and counts["orderbook"] >= 2
    assert counts["malformed"] == 0
    n = sum(counts[k] for k in ("ticker", "trade", "orderbook"))
    assert lines[-1].endswith(f"frames recorded to {rec}")
    assert int(lines[-1].rsplit(";", 1)[1].split()[0]) >= n

    kinds, trade_ids = replay(rec)
    # the file holds exactly the frames the stream counted, every one parsing as it did live
    assert dict(kinds) == {k: counts[k] for k in ("ticker", "trade", "orderbook")}
    assert len(set(trade_ids)) == len(trade_ids)
    assert fake.ws.requests[-1][-1] == {"format": "SIMPLE"}

    # an existing file is refused without --force (and kept), overwritten with it
    before = rec.read_bytes()
    res = subprocess.run(
        watch_cmd("KRW-BTC", "--url", fake.ws_url, "--seconds", "1", "--record", str(rec)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert_clean_error(res, 2, f"{rec} exists", "--force")
    assert rec.read_bytes() == before
    res = subprocess.run(
        watch_cmd("KRW-BTC", "--url", fake.ws_url, "--seconds", "1.5", "--record", str(rec), "--force"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert rec.read_bytes() != before
    assert {json.loads(it[1])["type"] for it in read_recording(rec) if it} >= {"ticker", "orderbook"}  # DEFAULT


def test_ctrl_c_stops_cleanly_with_130_and_a_complete_recording(fake: FakeUpbit, tmp_path: Path) -> None:
    rec = tmp_path / "frames.jsonl"
    sent_before = fake.ws.sent["ticker"]
    proc = subprocess.Popen(
        watch_cmd(*MARKETS, "--url", fake.ws_url, "--format", "SIMPLE", "--record", str(rec)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while fake.ws.sent["ticker"] < sent_before + 4 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, (out, err)
    assert err.count("interrupted") == 1 and err.strip() == "mds watch: interrupted", err
    counts = summary(out)
    assert counts["ticker"] >= 2
    kinds, _ = replay(rec)  # flushed and closed: every line whole
    assert dict(kinds) == {k: counts[k] for k in ("ticker", "trade", "orderbook") if counts[k]}


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("btc",), "btc"),
        (("KRW-BTC", "--kinds", "ticker,candle"), "--kinds"),
        (("KRW-BTC", "--url", "http://127.0.0.1:9/websocket/v1"), "ws://"),
        (("KRW-BTC", "--seconds", "0"), "--seconds"),
        (("KRW-BTC", "--force"), "--force goes with --record"),
    ],
)
def test_bad_input_is_one_line_and_exit_2_before_any_connection(args: tuple[str, ...], needle: str) -> None:
    res = subprocess.run(watch_cmd(*args), capture_output=True, text=True, timeout=60)
    assert_clean_error(res, 2, needle)


def test_an_endpoint_that_never_answers_is_exit_1(tmp_path: Path) -> None:
    rec = tmp_path / "none.jsonl"
    res = subprocess.run(
        watch_cmd("KRW-BTC", "--url", "ws://127.0.0.1:9/websocket/v1", "--seconds", "1", "--record", str(rec)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 1, (res.stdout, res.stderr)
    assert res.stderr.startswith("mds watch: error: could not connect to ws://127.0.0.1:9/websocket/v1")
    assert "Traceback" not in res.stderr
    assert rec.read_text() == ""


def test_a_terminal_gets_a_rich_table(fake: FakeUpbit) -> None:
    rc, text = run_on_terminal(
        watch_cmd(*MARKETS, "--url", fake.ws_url, "--seconds", "1.5"), dict(os.environ, COLUMNS="140", TERM="xterm")
    )
    assert rc == 0
    assert "KRW-BTC" in text and "KRW-ETH" in text and "trades/s" in text and "connected" in text
    assert any(c in text for c in "┃━┏│─"), text  # a rich box, not the plain lines
    assert "time_utc" not in text


def test_fake_upbit_prints_a_ws_url_that_watch_follows() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "mds.cli", "fake-upbit", "--markets", "2", "--days", "0.1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        first, second = proc.stdout.readline(), proc.stdout.readline()
        assert re.search(r"at http://127\.0\.0\.1:\d+$", first.strip()), first
        m = re.search(r"(ws://127\.0\.0\.1:\d+/websocket/v1)$", second.strip())
        assert m, second
        res = subprocess.run(
            watch_cmd("KRW-BTC", "--url", m.group(1), "--kinds", "ticker,orderbook", "--seconds", "2"),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert res.returncode == 0, res.stderr
        counts = summary(res.stdout)
        assert counts["ticker"] >= 1 and counts["orderbook"] >= 1
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
    assert proc.returncode == 0


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_a_recording_across_a_lost_connection_replays_with_the_lost_span_uncovered(
    fake: FakeUpbit, tmp_path: Path
) -> None:
    """The watch loop marks the loss in the recording; a store following its replay leaves the
    lost span uncovered (without the marker the replay is one epoch, covering the loss)."""
    rec = tmp_path / "frames.jsonl"
    fh = open(rec, "w", encoding="utf-8")  # noqa: SIM115 -- closed below, after the loop
    recorder = Recorder(fh)
    # what `mds watch --record` runs, with a 1 s candle subscription so that a store records coverage
    stream = UpbitStream(["KRW-BTC"], kinds=("trade",), candles=("1s",), url=fake.ws_url, on_frame=recorder)
    stop = threading.Event()
    loop = threading.Thread(
        target=_run_plain, args=(stream, _View(stream.markets), stop, None, recorder, io.StringIO())
    )
    loop.start()
    try:
        # long enough epochs for the frames to prove whole seconds (the store covers only what
        # later messages prove sent in full, plus live_grace_s)
        wait_for(lambda: stream.stats()["messages"]["candle"] >= 6, "1 s candles")
        fake.ws.inject("refuse")  # the reconnects fail until cleared
        fake.ws.inject("drop", times=1)
        wait_for(lambda: stream.stats()["refused"] >= 2, "two refused reconnects")
        lost_for = time.monotonic() + 2.5  # at least two whole seconds unwatched
        wait_for(lambda: time.monotonic() > lost_for, "the lost span")
        fake.ws.clear_faults("refuse")
        wait_for(lambda: stream.stats()["connects"] >= 2, "the reconnect")
        after = stream.stats()["messages"]["candle"]
        wait_for(lambda: stream.stats()["messages"]["candle"] >= after + 6, "candles after the reconnect")
    finally:
        fake.ws.clear_faults()
        stop.set()
        loop.join(timeout=30)
        fh.close()
    assert not loop.is_alive()
    assert recorder.error is None and recorder.losses == 1

    items = list(read_recording(rec))
    assert items.count(None) == 1
    cut = items.index(None)
    marker = json.loads(rec.read_text().splitlines()[cut])
    assert marker == {"received": marker["received"], "lost": True}
    before, after_items = items[:cut], items[cut + 1 :]
    assert before and after_items
    lost_from = marker["received"]
    # the last frame before the loss (the stream and the recorder read the clock apart: 1 ms)
    assert 0 <= lost_from - max(it[0] for it in before if it) <= 5
    back_at = min(it[0] for it in after_items if it)
    assert back_at - lost_from >= 2000

    store = mds.open(tmp_path / "store", config=mds.Config(live_grace_s=0.5))
    try:
        live = store.follow(ReplayStream(items, candles=("1s",)))
        wait_for(lambda: not live.stats()["running"], "the replay")
        spans = live.stats()["watched"]
        # the first span ends where its frames prove (at the last frame before the loss at most)
        assert len(spans) == 2 and spans[0][1] <= lost_from and spans[1][0] == back_at
        cov = store.coverage("KRW-BTC", "1s")
        assert cov, "the replay records coverage"
        # nothing covered inside the lost span: the next read fetches it over REST
        hole_lo, hole_hi = (lost_from // 1000 + 1) * 1000, back_at // 1000 * 1000
        assert hole_hi > hole_lo
        assert all(b <= hole_lo or a >= hole_hi for a, b in cov), (cov, hole_lo, hole_hi)
        assert any(a < hole_lo for a, _ in cov)  # what was watched before the loss is covered
    finally:
        store.close()


def test_the_loss_marker_sits_at_the_last_frame_recorded_even_after_a_keepalive() -> None:
    """A keepalive answer is recorded when it arrives, but the stream's ``Disconnected.at`` after
    it is what the answer proves (earlier): the marker still says when the last frame arrived."""
    from mds.layer1.stream import Disconnected

    ticks = iter([1_000, 2_000, 3_009])
    fh = io.StringIO()
    recorder = Recorder(fh, clock=lambda: next(ticks))
    recorder('{"ty":"trade"}')
    recorder('{"status":"UP"}')
    recorder.events([Disconnected(1, 1_400, 3_500, "closed")])  # the answer proved 1,400 only
    recorder('{"ty":"trade"}')
    recorder.events([Disconnected(2, 3_010, 3_600, "error")])  # the stream read its clock later
    recorder.events([Disconnected(3, 3_020, 3_700, "overflow")])  # no loss of the recording
    lines = [json.loads(line) for line in fh.getvalue().splitlines()]
    assert [ln["received"] for ln in lines] == [1_000, 2_000, 2_000, 3_009, 3_010]
    assert [ln.get("lost", False) for ln in lines] == [False, False, True, False, True]
    assert recorder.losses == 2 and recorder.frames == 3


def test_an_unwritable_recording_is_one_error_line_and_no_reconnects(fake: FakeUpbit) -> None:
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full")
    res = subprocess.run(
        watch_cmd(*MARKETS, "--url", fake.ws_url, "--seconds", "5", "--record", "/dev/full", "--force"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert_clean_error(res, 1, "cannot write /dev/full", "No space left on device")
    assert res.stderr.count("\n") == 1, res.stderr
    line = res.stdout.strip().splitlines()[-1]
    assert line.endswith("0 reconnects") and "frames recorded" not in line, res.stdout


def test_markets_that_got_no_message_are_named(fake: FakeUpbit) -> None:
    # no market at all got a message: exit 1, naming it
    res = subprocess.run(
        watch_cmd("KRW-NOPE", "--url", fake.ws_url, "--kinds", "ticker", "--seconds", "2"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert_clean_error(res, 1, "no message for KRW-NOPE")
    assert summary(res.stdout)["ticker"] == 0
    # one of two did: a warning naming the other, exit 0
    res = subprocess.run(
        watch_cmd("KRW-BTC", "KRW-NOPE", "--url", fake.ws_url, "--kinds", "ticker", "--seconds", "2"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert res.stderr == "mds watch: warning: no message for KRW-NOPE\n"
    assert summary(res.stdout)["ticker"] >= 1


def test_fake_upbit_keeps_streaming_trades_and_serves_no_future_candles(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "mds.cli", "fake-upbit", "--markets", "3", "--days", "0.1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    watch = None
    try:
        assert proc.stdout is not None
        first, second = proc.stdout.readline(), proc.stdout.readline()
        started = now_ms()  # the fake generated its markets before this
        base = re.search(r"at (http://127\.0\.0\.1:\d+)$", first.strip())
        ws = re.search(r"(ws://127\.0\.0\.1:\d+/websocket/v1)$", second.strip())
        assert base and ws, (first, second)
        # REST serves what opened by now, not the generated future
        for path in ("seconds", "minutes/1", "days"):
            row = httpx.get(f"{base.group(1)}/v1/candles/{path}", params={"market": "KRW-BTC", "count": 1}, timeout=10)
            assert row.status_code == 200
            opened = to_ms(row.json()[0]["candle_date_time_utc"] + "Z")
            assert opened <= now_ms()
        rec = tmp_path / "trades.jsonl"
        watch = subprocess.Popen(
            watch_cmd(
                "KRW-BTC",
                "KRW-MED",
                "KRW-ETH",
                "--url",
                ws.group(1),
                "--kinds",
                "trade",
                "--record",
                str(rec),
                "--force",
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

        def late_trade() -> bool:
            # trades keep coming: one made well after the fake's start (its data used to end there)
            if not rec.exists():
                return False
            for line in rec.read_text().splitlines():
                frame = json.loads(line).get("frame", "{}") if line.endswith("}") else "{}"
                msg = json.loads(frame)
                if msg.get("type") == "trade" and msg["trade_timestamp"] > started + 3000:
                    return True
            return False

        wait_for(late_trade, "a trade made 3 s after the fake started", timeout=60)
        watch.send_signal(signal.SIGINT)
        _, err = watch.communicate(timeout=30)
        assert watch.returncode == 130, err
    finally:
        if watch is not None and watch.poll() is None:
            watch.kill()
            watch.communicate()
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
    assert proc.returncode == 0
