"""UpbitStream against FakeUpbit's WebSocket endpoint (loopback only), and a replay of frames
recorded from Upbit."""

from __future__ import annotations

import ast
import asyncio
import json
from collections import Counter
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from mds import TRADE_DTYPE, candles_from_upbit
from mds.errors import InvalidRequestError
from mds.layer1 import UpbitStream
from mds.layer1._ws_parse import simple_keys
from mds.layer1.stream import (
    CandleMessage,
    Connected,
    Disconnected,
    FrameParser,
    OrderbookMessage,
    StreamEvent,
    TickerMessage,
    TradeMessage,
)
from mds.testing import FakeUpbit, generate_market
from mds.tiers.realtime import RealtimeCache
from mds.timeframes import parse_timeframe
from mds.timeutil import to_ms

DATA = Path(__file__).parent / "data"
T0 = to_ms("2025-01-01T00:00:00Z")
MARKETS = ["KRW-BTC", "KRW-ETH", "KRW-XRP"]
FAST = {"backoff_base_s": 0.02, "backoff_max_s": 0.2, "ping_interval_s": 0.2, "stale_after_s": 5.0}


class Clock:
    """The simulated clock a FakeUpbit and its stream share."""

    def __init__(self, start: int) -> None:
        self.now = start

    def __call__(self) -> int:
        return self.now


def market_data(markets: list[str], hours: int = 2) -> dict[tuple[str, str], np.ndarray]:
    data = {}
    for i, m in enumerate(markets):
        data[(m, "1m")] = generate_market(m, "1m", T0, T0 + hours * 3_600_000, seed=i)
        data[(m, "5m")] = generate_market(m, "5m", T0, T0 + hours * 3_600_000, seed=10 + i)
    return data


def run(coro: Coroutine[Any, Any, Any], timeout: float = 60.0) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def collect(
    stream: UpbitStream,
    events: list[StreamEvent],
    done: Callable[[list[StreamEvent]], bool],
    timeout: float = 15.0,
    step: Callable[[], None] | None = None,
) -> None:
    """Read events until ``done(events)``; fail after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not done(events):
        assert loop.time() < deadline, f"timed out; stats: {stream.stats()}"
        events.extend(await stream.get_batch(timeout=0.05))
        if step is not None:
            step()


def of(events: list[StreamEvent], kind: type) -> list[Any]:
    return [e for e in events if isinstance(e, kind)]


# -- construction --------------------------------------------------------------------------------------


def test_request_names_every_kind_candle_and_depth() -> None:
    s = UpbitStream(["KRW-BTC", "KRW-ETH"], candles=("1m", "1h"), format="SIMPLE", orderbook_depth=15)
    req = s.request(ticket="t1")
    assert req[0] == {"ticket": "t1"} and req[-1] == {"format": "SIMPLE"}
    assert {"type": "orderbook", "codes": ["KRW-BTC.15", "KRW-ETH.15"]} in req
    assert {"type": "candle.60m", "codes": ["KRW-BTC", "KRW-ETH"]} in req
    assert [o["type"] for o in req[1:-1]] == ["ticker", "trade", "orderbook", "candle.1m", "candle.60m"]
    assert s.request()[0]["ticket"] != s.request()[0]["ticket"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"markets": ["krw-btc"]},
        {"markets": []},
        {"markets": ["KRW-BTC"], "kinds": ("ticker", "candle")},
        {"markets": ["KRW-BTC"], "candles": ("2m",)},
        {"markets": ["KRW-BTC"], "candles": ("1d",)},
        {"markets": ["KRW-BTC"], "format": "JSON_LIST"},
        {"markets": ["KRW-BTC"], "orderbook_depth": 7},
        {"markets": ["KRW-BTC"], "url": "https://api.upbit.com"},
        {"markets": ["KRW-BTC"], "queue_size": 0},
        {"markets": ["KRW-BTC"], "ping_interval_s": 5.0, "stale_after_s": 5.0},
        {"markets": ["KRW-BTC"], "kinds": (), "candles": ()},
    ],
)
def test_bad_settings_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequestError):
        UpbitStream(**kwargs)


# -- the parser --------------------------------------------------------------------------------------


def test_parser_counts_and_skips_bad_frames_without_raising() -> None:
    p = FrameParser(lambda: 1)
    good = {"ty": "trade", "cd": "KRW-BTC", "tp": 100.0, "tv": 1.5, "ab": "ASK", "ttms": 5, "sid": 7, "tms": 6}
    bad: list[Any] = [
        b"{not json",
        b"[1, 2]",
        b'{"ty":"trade","cd":"KRW-BTC","tp":NaN,"tv":1,"ab":"ASK","ttms":5,"sid":7}',
        json.dumps({**good, "tp": "100"}),  # a number as a string
        json.dumps({**good, "tv": True}),  # a boolean for a number
        json.dumps({**good, "ab": "SELL"}),
        json.dumps({**good, "tp": -1.0}),
        json.dumps({k: v for k, v in good.items() if k != "sid"}),
        json.dumps({k: v for k, v in good.items() if k != "cd"}),
        json.dumps({**good, "ty": "fills"}),
        json.dumps({"ty": "orderbook", "cd": "KRW-BTC", "tms": 1, "tas": 1, "tbs": 1, "obu": [{"ap": 1.0}]}),
        json.dumps(
            {
                "ty": "candle.1m",
                "cd": "KRW-BTC",
                "cdttmu": "yesterday",
                "op": 1,
                "hp": 1,
                "lp": 1,
                "tp": 1,
                "catv": 1,
                "catp": 1,
                "tms": 1,
            }
        ),
        b"\xff\xfe",
    ]
    for frame in bad:
        assert p.parse(frame) is None
    assert p.malformed == len(bad)
    assert p.parse(b'{"status":"UP"}') is None and p.keepalives == 1
    assert p.parse(b'{"error":{"name":"NO_TICKET","message":"x"}}') is None and p.errors == 1
    assert p.last_error == "NO_TICKET: x"
    msg = p.parse(json.dumps({**good, "zz": 1, "yy": 2}))
    assert isinstance(msg, TradeMessage) and msg.row == (5, 100.0, 1.5, -1, 7)
    assert p.unknown_fields == 2 and "zz" not in msg.fields and p.malformed == len(bad)
    default = p.parse(
        json.dumps(
            {
                "type": "trade",
                "code": "KRW-BTC",
                "trade_price": 100.0,
                "trade_volume": 1.5,
                "ask_bid": "ASK",
                "trade_timestamp": 5,
                "sequential_id": 7,
                "timestamp": 6,
            }
        )
    )
    assert default == msg._replace(fields=default.fields) and default.fields == msg.fields  # type: ignore[union-attr]


def test_recorded_simple_frames_replay_exactly() -> None:
    """Every trade and orderbook Upbit sent in cryptofeed's recording parses into a message whose
    values are the raw JSON's, under the DEFAULT names, and goes into the realtime cache."""
    lines = (DATA / "ws_trade_orderbook_simple_cryptofeed_2021.txt").read_text().splitlines()
    request = json.loads(lines[1].split(": ", 1)[1])
    assert {"format": "SIMPLE"} in request
    p = FrameParser(lambda: 0)
    names = {k: {v: n for n, v in simple_keys(k).items()} for k in ("trade", "orderbook", "unit")}
    cache = RealtimeCache(clock=lambda: 1_618_678_300_000)
    kinds: Counter[str] = Counter()
    trades: dict[str, list[tuple[int, float, float, int, int]]] = {}
    for line in filter(None, lines[2:]):  # the file ends with blank lines
        frame = ast.literal_eval(line.split(": ", 1)[1])
        assert isinstance(frame, bytes)
        raw = json.loads(frame)
        msg = p.parse(frame)
        kinds[raw["ty"]] += 1
        table = names[raw["ty"]]
        expect = {("market" if k == "cd" else table[k]): v for k, v in raw.items() if k != "ty"}
        if isinstance(msg, TradeMessage):
            assert msg.fields == expect
            assert msg.row == (raw["ttms"], raw["tp"], raw["tv"], 1 if raw["ab"] == "BID" else -1, raw["sid"])
            assert (msg.market, msg.timestamp, msg.stream_type) == (raw["cd"], raw["tms"], raw["st"])
            trades.setdefault(msg.market, []).append(msg.row)
        else:
            assert isinstance(msg, OrderbookMessage)
            expect["orderbook_units"] = [{names["unit"][k]: v for k, v in u.items()} for u in raw["obu"]]
            assert msg.fields == expect and len(expect["orderbook_units"]) == 15
            assert (msg.market, msg.timestamp, msg.total_ask_size, msg.total_bid_size) == (
                raw["cd"],
                raw["tms"],
                raw["tas"],
                raw["tbs"],
            )
            assert cache.put_orderbook(msg.fields) == 1
            assert cache.orderbook(msg.market) == expect
    assert kinds == {"trade": 304, "orderbook": 145}
    assert p.malformed == 0 and p.unknown_fields == 0
    for market, rows in trades.items():
        assert cache.put_trades(market, np.array(rows, dtype=TRADE_DTYPE)) == len({r[4] for r in rows})
    assert sum(len(cache.trades(m)) for m in trades) == 304


# -- against FakeUpbit ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["DEFAULT", "SIMPLE"])
def test_every_kind_arrives_for_every_market_in_both_formats(fmt: str) -> None:
    clock = Clock(T0 + 30 * 60_000 + 10_000)
    with FakeUpbit(market_data(MARKETS), clock=clock) as up:
        up.ws.binary = fmt == "DEFAULT"  # SIMPLE over text frames, DEFAULT over binary ones
        rest_ticker = httpx.get(up.base_url + "/v1/ticker", params={"markets": "KRW-ETH"}).json()[0]

        async def main() -> list[StreamEvent]:
            events: list[StreamEvent] = []
            async with UpbitStream(MARKETS, candles=("1m",), url=up.ws_url, format=fmt, clock=clock, **FAST) as s:

                def seen(evs: list[StreamEvent]) -> bool:
                    got = {(type(e).__name__, getattr(e, "market", None)) for e in evs}
                    kinds = ("TickerMessage", "TradeMessage", "OrderbookMessage", "CandleMessage")
                    return all((k, m) in got for k in kinds for m in MARKETS)

                first = True

                def step() -> None:
                    nonlocal first
                    if not first:
                        clock.now += 3_000
                    first = False

                await collect(s, events, seen, step=step)
                assert s.stats()["malformed"] == 0 and s.stats()["unknown_fields"] == 0
            return events + await s.get_batch()  # the last epoch's end, queued by the close

        events = run(main())
        assert up.ws.requests[0][-1] == {"format": fmt}
    assert isinstance(events[0], Connected) and events[0].epoch == 1
    assert isinstance(events[-1], Disconnected) and events[-1].reason == "stopped"
    # The first ticker of a market is the snapshot, and it is REST's ticker at the same clock.
    eth = [e for e in of(events, TickerMessage) if e.market == "KRW-ETH"]
    assert eth[0].stream_type == "SNAPSHOT" and all(e.stream_type == "REALTIME" for e in eth[1:])
    for k, v in rest_ticker.items():
        if k not in ("trade_date_kst", "trade_time_kst"):
            assert eth[0].fields[k] == v, k
    for e in of(events, TradeMessage):
        assert e.side in (1, -1) and e.price > 0 and e.fields["sequential_id"] == e.sequential_id
    for e in of(events, OrderbookMessage):
        assert len(e.fields["orderbook_units"]) == 30


def test_closed_candles_from_the_stream_equal_rest_and_trades_agree_with_them() -> None:
    markets = ["KRW-BTC", "KRW-DOGE"]
    data = market_data(markets)
    data[("KRW-DOGE", "1m")] = generate_market("KRW-DOGE", "1m", T0, T0 + 7_200_000, liquidity="illiquid", seed=5)
    start = T0 + 20 * 60_000 + 30_000
    end = T0 + 50 * 60_000 + 5_000
    clock = Clock(start)
    with FakeUpbit(data, clock=clock) as up:

        async def main() -> list[StreamEvent]:
            events: list[StreamEvent] = []
            s = UpbitStream(
                markets, kinds=("trade",), candles=("1m", "5m"), url=up.ws_url, format="SIMPLE", clock=clock, **FAST
            )
            async with s:

                def step() -> None:
                    clock.now = min(end, clock.now + 4_000)

                def finished(evs: list[StreamEvent]) -> bool:
                    # Every market's last closed 1m and 5m candles (minute 49, minutes 45-49) have
                    # arrived in their final form: the next interval's candle came after them (1m
                    # alone is not enough: a tick sends 1m before 5m, and the wait could end between).
                    last = {(e.market, e.timeframe): e.ts for e in of(evs, CandleMessage)}
                    return clock.now == end and all(
                        last.get((m, tf), 0) >= T0 + 50 * 60_000 for m in markets for tf in ("1m", "5m")
                    )

                await collect(s, events, finished, timeout=30, step=step)
            return events

        events = run(main())
        rest = {
            (m, tf): candles_from_upbit(
                httpx.get(up.base_url + f"/v1/candles/minutes/{unit}", params={"market": m, "count": 200}).json()
            )[::-1]
            for m in markets
            for tf, unit in (("1m", 1), ("5m", 5))
        }
    assert of(events, Connected) == [events[0]] and up.ws.sent["candle"] >= 60
    final: dict[tuple[str, str, int], CandleMessage] = {}
    for e in of(events, CandleMessage):
        final[(e.market, e.timeframe, e.ts)] = e  # the latest message of an interval wins
    for (m, tf), arr in rest.items():
        step_ms = parse_timeframe(tf).interval_ms
        first = min(ts for (mm, t, ts) in final if (mm, t) == (m, tf))
        closed = arr[(arr["ts"] >= first) & (arr["ts"] + step_ms <= end)]
        got = [final[(m, tf, int(ts))].row[0] for ts in closed["ts"] if (m, tf, int(ts)) in final]
        assert len(got) == len(closed) > 0, (m, tf)  # every held closed candle arrived
        assert np.array_equal(np.array(got), closed), (m, tf)  # byte for byte the REST candle
        extra = {ts for (mm, t, ts) in final if (mm, t) == (m, tf)} - set(arr["ts"].tolist())
        assert not extra  # no candle for an interval REST has none for
    assert len(rest[("KRW-DOGE", "1m")]) < 120  # the illiquid market has no-trade minutes
    # Trades: unique ids; inside each closed 1m candle's range; its last trade at its close.
    trades = of(events, TradeMessage)
    assert len({(t.market, t.sequential_id) for t in trades}) == len(trades)
    for m in markets:
        arr = rest[(m, "1m")]
        mine = [t for t in trades if t.market == m and t.stream_type == "REALTIME"]
        assert mine
        for row in arr[(arr["ts"] >= start + 60_000) & (arr["ts"] + 60_000 <= end)]:
            inside = [t for t in mine if row["ts"] <= t.ts < row["ts"] + 60_000]
            assert inside and all(row["low"] <= t.price <= row["high"] for t in inside)
            assert inside[-1].price == row["close"]


def test_reconnect_after_a_drop_resubscribes_and_reports_the_epochs() -> None:
    clock = Clock(T0 + 10 * 60_000)
    frames: list[bytes | str] = []
    with FakeUpbit(market_data(MARKETS[:2]), clock=clock) as up:

        async def main() -> tuple[list[StreamEvent], dict[str, Any]]:
            events: list[StreamEvent] = []
            stream = UpbitStream(
                MARKETS[:2], candles=("1m",), url=up.ws_url, clock=clock, on_frame=frames.append, **FAST
            )
            async with stream as s:
                await collect(s, events, lambda evs: len(of(evs, TickerMessage)) >= 2)
                clock.now += 1_000
                assert await asyncio.to_thread(up.ws.drop) == 1
                await collect(s, events, lambda evs: len(of(evs, Connected)) == 2 and len(of(evs, TickerMessage)) >= 4)
                clock.now += 5_000
                await collect(s, events, lambda evs: len(of(evs, TickerMessage)) >= 6)
                stats = s.stats()
            return events + await s.get_batch(), stats

        events, stats = run(main())
        requests = up.ws.requests
    marks = [e for e in events if isinstance(e, (Connected, Disconnected))]
    c1, d1, c2, d2 = marks
    assert (c1.epoch, d1.epoch, c2.epoch, d2.epoch) == (1, 1, 2, 2)
    assert d1.reason == "error" and d2.reason == "stopped"
    assert c1.at <= d1.at <= d1.detected and d1.at <= c2.at
    # Resubscribed: the same types and codes under a new ticket, and fresh snapshots.
    assert len(requests) == 2 and requests[0][1:] == requests[1][1:] and requests[0][0] != requests[1][0]
    after = events[events.index(c2) :]
    assert {e.stream_type for e in of(after, TickerMessage)[:2]} == {"SNAPSHOT"}
    assert stats["reconnects"] == 1 and stats["disconnects"]["error"] == 1 and stats["epoch"] == 2
    # The raw frames (a recording) replay into the same messages.
    p = FrameParser(clock)
    replayed = [m for m in map(p.parse, frames) if m is not None]
    delivered = [e for e in events if not isinstance(e, (Connected, Disconnected))]
    assert [m._replace(received=0) for m in replayed] == [m._replace(received=0) for m in delivered]
    assert all(isinstance(f, bytes) for f in frames)


def test_a_silent_server_is_noticed_and_left() -> None:
    clock = Clock(T0 + 10 * 60_000)
    with FakeUpbit(market_data(MARKETS[:1]), clock=clock) as up:

        async def main() -> list[StreamEvent]:
            events: list[StreamEvent] = []
            async with UpbitStream(
                MARKETS[:1],
                kinds=("ticker",),
                url=up.ws_url,
                clock=clock,
                backoff_base_s=0.02,
                ping_interval_s=0.1,
                stale_after_s=0.6,
            ) as s:
                await collect(s, events, lambda evs: len(of(evs, TickerMessage)) >= 1)
                fault = up.ws.inject("idle")
                clock.now += 2_000
                await collect(s, events, lambda evs: len(of(evs, Disconnected)) >= 1)
                up.ws.clear_faults()
                clock.now += 2_000
                await collect(
                    s, events, lambda evs: isinstance(evs[-1], TickerMessage) and len(of(evs, Connected)) >= 2
                )
                assert fault.kind == "idle"
            return events

        events = run(main())
    d = of(events, Disconnected)[0]
    assert d.reason == "stale" and d.detected >= d.at


def test_fake_closes_idle_connections_and_the_stream_keeps_its_own_alive() -> None:
    clock = Clock(T0 + 10 * 60_000)
    with FakeUpbit(market_data(MARKETS[:1]), clock=clock, ws_idle_close_s=0.8) as up:

        async def main() -> tuple[dict[str, Any], str | None]:
            async with connect(up.ws_url, ping_interval=None) as raw:
                await raw.send(json.dumps([{"ticket": "x"}, {"type": "ticker", "codes": ["KRW-BTC"]}]))
                reason = None
                try:
                    async with asyncio.timeout(10):
                        async for _ in raw:
                            pass
                except Exception as exc:  # pragma: no cover - the failure message
                    reason = repr(exc)
                code = raw.close_code
            async with UpbitStream(
                MARKETS[:1], kinds=("ticker",), url=up.ws_url, clock=clock, ping_interval_s=0.1, stale_after_s=1.0
            ) as s:
                for _ in range(20):  # more than two idle periods
                    await s.get_batch(timeout=0.1)
                return s.stats(), reason if code != 1000 else None

        stats, failure = run(main())
    assert failure is None
    assert stats["connects"] == 1 and stats["epoch"] == 1 and sum(stats["disconnects"].values()) == 0


def test_malformed_frames_are_counted_and_skipped_and_the_connection_stays() -> None:
    clock = Clock(T0 + 10 * 60_000)
    with FakeUpbit(market_data(MARKETS[:2]), clock=clock) as up:

        async def main() -> tuple[list[StreamEvent], dict[str, Any]]:
            events: list[StreamEvent] = []
            async with UpbitStream(
                MARKETS[:2], kinds=("trade", "ticker"), url=up.ws_url, format="SIMPLE", clock=clock, **FAST
            ) as s:
                await collect(s, events, lambda evs: len(of(evs, TickerMessage)) >= 2)
                up.ws.inject("malformed", times=3)
                up.ws.inject("wrong_type", times=2)
                up.ws.inject("unknown_field", times=4)
                up.ws.inject("duplicate", times=1)

                def step() -> None:
                    clock.now += 2_000

                await collect(s, events, lambda evs: not up.ws.faults, step=step)
                n = len(events)
                await collect(s, events, lambda evs: len(of(evs[n:], TradeMessage)) >= 5, step=step)
                stats = s.stats()
            return events, stats

        events, stats = run(main())
        sent = up.ws.sent
    assert sent["malformed"] == 3 and sent["wrong_type"] == 2 and sent["unknown_field"] == 4
    assert stats["malformed"] == 5 and stats["unknown_fields"] == 4
    # A frame that could not be read is a loss: the epoch ends at the last good frame and the
    # next good message opens a new one, on the same connection.
    assert stats["connects"] == 1 and stats["reconnects"] == 0
    marks = [e for e in events if isinstance(e, (Connected, Disconnected))]
    lost = [e for e in marks if isinstance(e, Disconnected)]
    assert lost and all(d.reason == "malformed" for d in lost) and stats["disconnects"]["malformed"] == len(lost)
    assert [type(e) for e in marks] == [Connected, Disconnected] * len(lost) + [Connected]
    for i, e in enumerate(events):
        if isinstance(e, Disconnected):
            before = events[i - 1]
            assert e.at == (before.at if isinstance(before, Connected) else before.received)  # type: ignore[union-attr]
            assert isinstance(events[i + 1], Connected) and events[i + 1].at == events[i + 2].received  # type: ignore[union-attr]
    keys = Counter(
        (type(e).__name__, e.market, e.timestamp, getattr(e, "sequential_id", None))
        for e in events
        if not isinstance(e, (Connected, Disconnected))
    )
    assert sum(n - 1 for n in keys.values()) == 1  # the duplicated frame is delivered twice


def test_a_slow_consumer_loses_messages_not_memory_and_the_epoch_says_so() -> None:
    clock = Clock(T0 + 10 * 60_000)
    with FakeUpbit(market_data(MARKETS), clock=clock) as up:

        async def main() -> tuple[list[StreamEvent], dict[str, Any]]:
            s = UpbitStream(
                MARKETS, kinds=("trade", "ticker", "orderbook"), url=up.ws_url, clock=clock, queue_size=20, **FAST
            )
            async with s:
                # Nobody reads while ten minutes of trades arrive.
                for _ in range(40):
                    clock.now += 15_000
                    await asyncio.sleep(0.03)
                    if s.stats()["dropped"] > 0 and s.stats()["queued"] <= 21:
                        break
                queued = s.stats()["queued"]
                assert queued <= 21  # the queue plus the overflow marker
                events = await s.get_batch(max_items=1000)
                clock.now += 5_000
                await collect(s, events, lambda evs: len(of(evs, Connected)) >= 2)
                stats = s.stats()
                events += await s.get_batch(max_items=1000, timeout=0.2)
                stats = s.stats()
            return events, stats

        events, stats = run(main())
    assert stats["dropped"] > 0 and stats["disconnects"]["overflow"] >= 1 and stats["connects"] == 1
    c1, d1, c2 = [e for e in events if isinstance(e, (Connected, Disconnected))][:3]
    assert d1.reason == "overflow" and (c1.epoch, d1.epoch, c2.epoch) == (1, 1, 2)
    delivered = [e for e in events if not isinstance(e, (Connected, Disconnected))]
    assert sum(stats["messages"].values()) == len(delivered) + stats["queued"] + stats["dropped"]
    i = events.index(d1)
    assert d1.at == max(e.received for e in events[:i] if not isinstance(e, (Connected, Disconnected)))


def test_connects_over_the_limit_are_refused_and_the_stream_stays_within_it() -> None:
    clock = Clock(T0 + 10 * 60_000)
    with FakeUpbit(market_data(MARKETS[:1]), clock=clock, ws_connect_limit=5) as up:
        url = up.ws_url

        async def main() -> dict[str, Any]:
            # Five connects in a second are accepted, the sixth refused with HTTP 429.
            raws = [await connect(url) for _ in range(5)]
            with pytest.raises(InvalidStatus) as err:
                await connect(url)
            assert err.value.response.status_code == 429
            for r in raws:
                await r.close()
            # The stream starts into the exhausted window: refused, it backs off and gets in.
            events: list[StreamEvent] = []
            async with UpbitStream(MARKETS[:1], kinds=("ticker",), url=url, clock=clock, **FAST) as s:
                await collect(s, events, lambda evs: len(of(evs, TickerMessage)) >= 1)
                refused = s.stats()["refused"]
            # A server that drops every connection at once: the stream retries as fast as its
            # backoff allows (almost no delay here), and only the connect limit holds it back.
            await asyncio.sleep(1.2)  # let the attempts above leave the fake's window
            up.ws.inject("drop")
            t0 = len(up.ws.connects)
            async with UpbitStream(
                MARKETS[:1],
                kinds=("ticker",),
                url=url,
                clock=clock,
                backoff_base_s=0.001,
                backoff_max_s=0.002,
                ping_interval_s=0.2,
                stale_after_s=2.0,
            ) as s:
                for _ in range(25):
                    clock.now += 1_000
                    await s.get_batch(timeout=0.1)
                stats = s.stats()
            return {"refused": refused, "storm": up.ws.connects[t0:], "stats": stats}

        out = run(main())
    assert out["refused"] >= 1
    storm = out["storm"]
    assert len(storm) >= 6 and all(r.accepted for r in storm)  # kept retrying, never refused
    times = [r.received for r in storm]
    assert max(sum(1 for t in times if a <= t < a + 1.0) for a in times) <= 5
    assert out["stats"]["reconnects"] >= 5


def test_fake_answers_protocol_errors_and_text_ping() -> None:
    with FakeUpbit(market_data(MARKETS[:1]), clock=Clock(T0 + 600_000)) as up:

        async def main() -> list[Any]:
            async with connect(up.ws_url) as raw:
                out = []
                for req in (
                    '[{"type":"ticker","codes":["KRW-BTC"]}]',
                    '[{"ticket":"a"}]',
                    '[{"ticket":"a"},{"type":"ticker"}]',
                    "nonsense",
                    "PING",
                ):
                    await raw.send(req)
                    out.append(json.loads(await asyncio.wait_for(raw.recv(), 5)))
                return out

        answers = run(main())
    assert [a.get("error", {}).get("name") for a in answers[:4]] == ["NO_TICKET", "NO_TYPE", "NO_CODES", "WRONG_FORMAT"]
    assert answers[4] == {"status": "UP"}
