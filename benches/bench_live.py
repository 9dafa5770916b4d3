"""Gate (issue 17): the live receive path, WebSocket frame to the store's realtime cache.

A frame server in its own process (so the receiving process has its cores to itself; the
machine has two) speaks just enough of Upbit's protocol on 127.0.0.1: it takes the subscription
request and answers with prebuilt frames, without compression (the same for both sides):

- *burst*: N frames written to the socket at once (the wire bytes are prebuilt, so the server is
  never the bottleneck), to measure throughput;
- *paced*: one frame a millisecond, each stamped with ``time.perf_counter_ns()`` as it is sent
  (CLOCK_MONOTONIC: one clock for both processes), to measure the lag from sent to visible.

The frames: SIMPLE trades (the 304 trades of cryptofeed's Upbit recording, tests/data, with
fresh ``sequential_id`` values) and DEFAULT tickers (one Upbit ticker with a running timestamp).

Subject: ``store.follow(UpbitStream(...))`` with the stream's default decoder (orjson when it is
installed), until ``live.stats()["applied"]`` holds all N. Visible: the moment the store's
realtime cache returned from ``put_trades`` / ``put_ticker`` with the message (the cache's methods
are wrapped for the paced runs only; after them ``store.trades()`` / ``store.ticker()`` show it).
Baseline: a bare ``websockets`` client that only runs ``json.loads`` on every frame.

Gated (``test_gate_live_receive_path``, marked ``gate``): CPU seconds of the receiving process
per message, subject over baseline, ratio of the
lower quartiles of interleaved rounds (as ``_gate.py``, up to three tries), limit 2.0; asserted only with benchmarks
enabled. Reported in ``extra_info``: messages a second (wall: server's first byte to the last
message applied), the same for the stream alone with ``json`` and with ``orjson`` (no store), and
lag p50/p99 in microseconds for subject and baseline. Run::

    python -m pytest benches/bench_live.py --benchmark-only --benchmark-columns=median,rounds -s
"""

from __future__ import annotations

import ast
import asyncio
import json
import multiprocessing as mp
import statistics
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from _gate import gate, q25

import mds
from mds.layer1 import UpbitStream

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"
BURST = 20_000  # messages a throughput round
PACED = 1_000  # messages of a lag run, one a millisecond
ROUNDS = 5
LIMIT = 2.0
#: Tries of the gate, as every gate of benches/_gate.py gets: the DEFAULT-ticker ratio read 1.70-1.79
#: in five runs here and 2.07, then 2.76 and 2.22 (two tries) in clean-clone .ci/runs of the same day.
TRIES = 3
T0 = 1_700_000_000_000
TICKER_MARKETS = [f"KRW-T{i:02d}" for i in range(10)]


# ---------------------------------------------------------------------------------------------
# frames
# ---------------------------------------------------------------------------------------------
def _trade_templates() -> list[dict[str, Any]]:
    lines = (DATA / "ws_trade_orderbook_simple_cryptofeed_2021.txt").read_text().splitlines()
    out = []
    for ln in lines[2:]:
        if ln:
            obj = json.loads(ast.literal_eval(ln.split(": ", 1)[1]))
            if obj["ty"] == "trade":
                out.append(obj)
    return out


def trade_markets() -> list[str]:
    return sorted({t["cd"] for t in _trade_templates()})


_TICKER = {
    "type": "ticker",
    "code": "KRW-BTC",
    "opening_price": 31883000.0,
    "high_price": 32310000.0,
    "low_price": 31855000.0,
    "trade_price": 32287000.0,
    "prev_closing_price": 31883000.0,
    "acc_trade_price": 78039261076.51241,
    "change": "RISE",
    "change_price": 404000.0,
    "signed_change_price": 404000.0,
    "change_rate": 0.0126713295,
    "signed_change_rate": 0.0126713295,
    "ask_bid": "ASK",
    "trade_volume": 0.03103806,
    "acc_trade_volume": 2429.58834336,
    "trade_date": "20230105",
    "trade_time": "073408",
    "trade_timestamp": 1672904048000,
    "acc_ask_volume": 1146.25573608,
    "acc_bid_volume": 1283.33260728,
    "highest_52_week_price": 57678000.0,
    "highest_52_week_date": "2022-03-28",
    "lowest_52_week_price": 20700000.0,
    "lowest_52_week_date": "2022-12-30",
    "market_state": "ACTIVE",
    "is_trading_suspended": False,
    "delisting_date": None,
    "market_warning": "NONE",
    "timestamp": 1672904048000,
    "acc_trade_price_24h": 228827082483.7073,
    "acc_trade_volume_24h": 7158.80283556,
    "stream_type": "REALTIME",
}


def frames(kind: str, n: int, base: int) -> list[bytes]:
    """``n`` frames; message ``i`` carries ``base + i`` (a trade's ``sid``, a ticker's
    ``timestamp`` minus T0), which is how its visibility is matched to its send stamp."""
    out = []
    if kind == "trade":
        tpl = _trade_templates()
        for i in range(n):
            out.append(json.dumps({**tpl[i % len(tpl)], "sid": base + i}, separators=(",", ":")).encode())
    else:
        for i in range(n):
            t = {**_TICKER, "code": TICKER_MARKETS[i % len(TICKER_MARKETS)], "timestamp": T0 + base + i}
            t["trade_price"] = 32287000.0 + (i % 97) * 1000.0
            out.append(json.dumps(t, separators=(",", ":")).encode())
    return out


def index_of(kind: str, obj: dict[str, Any]) -> int:
    return int(obj["sid"]) if kind == "trade" else int(obj["timestamp"]) - T0


def wire(payloads: list[bytes]) -> bytes:
    """The payloads as unmasked binary WebSocket frames (server to client), back to back."""
    parts = []
    for p in payloads:
        n = len(p)
        head = bytes([0x82, n]) if n < 126 else (b"\x82\x7e" + struct.pack("!H", n))
        parts.append(head + p)
    return b"".join(parts)


# ---------------------------------------------------------------------------------------------
# the frame server (a process of its own)
# ---------------------------------------------------------------------------------------------
def _serve(port_q: Any, cmd_q: Any, report_q: Any) -> None:
    asyncio.run(_server_main(port_q, cmd_q, report_q))


async def _server_main(port_q: Any, cmd_q: Any, report_q: Any) -> None:
    from websockets.asyncio.server import serve

    async def handler(ws: Any) -> None:
        req = json.loads(await ws.recv())
        kind = "trade" if any(o.get("type") == "trade" for o in req[1:]) else "ticker"
        mode, n, base = await asyncio.to_thread(cmd_q.get)
        payloads = frames(kind, n, base)
        if mode == "burst":
            data = wire(payloads)
            t0 = time.perf_counter_ns()
            ws.transport.write(data)
            report_q.put(("burst", t0))
        else:
            stamps = []
            for p in payloads:
                stamps.append(time.perf_counter_ns())
                await ws.send(p)
                await asyncio.sleep(0.001)
            report_q.put(("paced", stamps))
        await ws.wait_closed()

    async with serve(handler, "127.0.0.1", 0, compression=None, ping_interval=None, max_size=None) as server:
        port_q.put(next(iter(server.sockets)).getsockname()[1])
        await asyncio.Future()


class FrameServer:
    def __init__(self) -> None:
        ctx = mp.get_context("spawn")
        port_q, self.cmd_q, self.report_q = ctx.Queue(), ctx.Queue(), ctx.Queue()
        self.proc = ctx.Process(target=_serve, args=(port_q, self.cmd_q, self.report_q), daemon=True)
        self.proc.start()
        self.url = f"ws://127.0.0.1:{port_q.get(timeout=60)}/websocket/v1"
        self._base = 0

    def next(self, mode: str, n: int) -> int:
        """The next connection gets ``n`` frames in ``mode``; returns their first index."""
        base = self._base
        self._base += n
        self.cmd_q.put((mode, n, base))
        return base

    def report(self) -> Any:
        return self.report_q.get(timeout=120)[1]

    def close(self) -> None:
        self.proc.terminate()
        self.proc.join(10)


@pytest.fixture(scope="module")
def server() -> Iterator[FrameServer]:
    s = FrameServer()
    yield s
    s.close()


# ---------------------------------------------------------------------------------------------
# receivers: each returns (process CPU seconds, wall seconds from the first byte sent to the
# last message handled (burst), lag p50/p99 in us from sent to visible (paced))
# ---------------------------------------------------------------------------------------------
Result = tuple[float, float, dict[str, float]]


def _finish(
    server: FrameServer, mode: str, end: int, base: int, n: int, seen: dict[int, int]
) -> tuple[float, dict[str, float]]:
    sent = server.report()
    if mode == "burst":
        return (end - sent) / 1e9, {}
    assert sorted(seen) == list(range(base, base + n))
    return float("nan"), lag_us(sent, {i - base: t for i, t in seen.items()})


def _request(kind: str) -> str:
    fmt = "SIMPLE" if kind == "trade" else "DEFAULT"
    markets = trade_markets() if kind == "trade" else TICKER_MARKETS
    return json.dumps([{"ticket": "bench"}, {"type": kind, "codes": markets}, {"format": fmt}])


def bare(server: FrameServer, kind: str, mode: str, n: int) -> Result:
    """The baseline: a bare websockets client that runs json.loads on every frame."""
    from websockets.asyncio.client import connect

    base = server.next(mode, n)
    seen: dict[int, int] = {}

    async def main() -> None:
        async with connect(server.url, compression=None, max_size=None, ping_interval=None) as ws:
            await ws.send(_request(kind))
            got = 0
            loads = json.loads
            if mode == "paced":
                async for frame in ws:
                    obj = loads(frame)
                    seen[index_of(kind, obj)] = time.perf_counter_ns()
                    got += 1
                    if got == n:
                        break
            else:
                async for frame in ws:
                    loads(frame)
                    got += 1
                    if got == n:
                        break

    c0 = time.process_time()
    asyncio.run(main())
    cpu = time.process_time() - c0
    end = time.perf_counter_ns()
    return (cpu, *_finish(server, mode, end, base, n, seen))


def _stream(kind: str, url: str, loads: Callable[[bytes | str], Any] | None = None) -> UpbitStream:
    fmt = "SIMPLE" if kind == "trade" else "DEFAULT"
    markets = trade_markets() if kind == "trade" else TICKER_MARKETS
    return UpbitStream(markets, kinds=(kind,), url=url, format=fmt, compression=False, loads=loads)


def stream_alone(server: FrameServer, kind: str, n: int, loads: Callable[[bytes | str], Any] | None) -> Result:
    """UpbitStream without a store: receive and parse, the events read and dropped."""
    server.next("burst", n)
    feed = _stream(kind, server.url, loads)

    async def main() -> None:
        got = 0
        async with feed:
            while got < n:
                got += sum(1 for ev in await feed.get_batch() if hasattr(ev, "market"))

    c0 = time.process_time()
    asyncio.run(main())
    cpu = time.process_time() - c0
    end = time.perf_counter_ns()
    return cpu, (end - server.report()) / 1e9, {}


def followed(store: mds.Store, server: FrameServer, kind: str, mode: str, n: int) -> Result:
    """The subject: ``store.follow(UpbitStream(...))`` until all ``n`` are applied."""
    base = server.next(mode, n)
    seen: dict[int, int] = {}
    rt = store._realtime  # wrapped for the lag runs only: the moment a message became visible
    unwrap: list[str] = []
    if mode == "paced":
        put_trades, put_ticker = rt.put_trades, rt.put_ticker

        def trades_seen(symbol: str, arr: Any) -> int:
            r = put_trades(symbol, arr)
            t = time.perf_counter_ns()
            for sid in arr["sequential_id"].tolist():
                seen[sid] = t
            return r

        def ticker_seen(msg: Any) -> int:
            r = put_ticker(msg)
            seen[int(msg["timestamp"]) - T0] = time.perf_counter_ns()
            return r

        rt.put_trades, rt.put_ticker = trades_seen, ticker_seen  # type: ignore[method-assign]
        unwrap = ["put_trades", "put_ticker"]
    c0 = time.process_time()
    live = store.follow(_stream(kind, server.url))
    try:
        while live.stats()["applied"][kind] < n:
            assert live.running, live.stats()
            time.sleep(0.02)
        end = time.perf_counter_ns()
        cpu = time.process_time() - c0
    finally:
        live.close()
        for name in unwrap:
            delattr(rt, name)
    st = live.stats()
    assert st["malformed"] == 0 and st["dropped"] == 0 and st["rejected"] == 0, st
    return (cpu, *_finish(server, mode, end, base, n, seen))


def lag_us(stamps: list[int], seen: dict[int, int]) -> dict[str, float]:
    lags = sorted((seen[i] - s) / 1e3 for i, s in enumerate(stamps))
    return {"p50": round(lags[len(lags) // 2], 1), "p99": round(lags[len(lags) * 99 // 100], 1)}


# ---------------------------------------------------------------------------------------------
# the gate
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def store(tmp_path: Path) -> Iterator[mds.Store]:
    st = mds.open(tmp_path / "store")
    yield st
    st.close()


@gate
@pytest.mark.parametrize("kind", ["trade", "ticker"])
def test_gate_live_receive_path(benchmark: Any, server: FrameServer, store: mds.Store, kind: str) -> None:
    what = "SIMPLE trades" if kind == "trade" else "DEFAULT tickers"
    benchmark.extra_info.update(limit=LIMIT, gate=f"store.follow(UpbitStream) vs bare websockets + json.loads, {what}")
    n = BURST if not benchmark.disabled else 2_000
    benchmark.pedantic(lambda: followed(store, server, kind, "burst", n), rounds=1, iterations=1)
    # correctness, benchmarks or not: every message of the last round is in the store
    if kind == "trade":
        held = sum(len(store.trades(m)) for m in trade_markets())
        assert held >= min(n, 304)  # the cache keeps the newest trades of each market
    else:
        assert all(store.ticker(m) is not None for m in TICKER_MARKETS)
    if benchmark.disabled:
        bare(server, kind, "burst", n)
        return
    tries = []
    for _ in range(TRIES):
        s: list[Result] = []
        b: list[Result] = []
        for r in range(ROUNDS):
            pair = (("b", b), ("s", s)) if r % 2 else (("s", s), ("b", b))
            for who, out in pair:
                out.append(followed(store, server, kind, "burst", n) if who == "s" else bare(server, kind, "burst", n))
        sc, bc = [x[0] / n for x in s], [x[0] / n for x in b]
        tries.append(
            {
                "ratio": round(q25(sc) / q25(bc), 3),
                "median_ratio": round(statistics.median(sc) / statistics.median(bc), 3),
                "subject_cpu_us_per_msg": round(statistics.median(sc) * 1e6, 2),
                "baseline_cpu_us_per_msg": round(statistics.median(bc) * 1e6, 2),
                "subject_msgs_per_s": round(n / statistics.median([x[1] for x in s])),
                "baseline_msgs_per_s": round(n / statistics.median([x[1] for x in b])),
            }
        )
        if tries[-1]["ratio"] <= LIMIT:
            break
    # lag, sent to visible, one message a millisecond
    benchmark.extra_info.update(tries=tries, **tries[-1])
    benchmark.extra_info["subject_lag_us"] = followed(store, server, kind, "paced", PACED)[2]
    benchmark.extra_info["baseline_lag_us"] = bare(server, kind, "paced", PACED)[2]
    print(f"\n{kind}: {json.dumps(benchmark.extra_info)}")
    assert tries[-1]["ratio"] <= LIMIT, f"live receive path {what}: {tries}"


@pytest.mark.parametrize("kind", ["trade", "ticker"])
def test_stream_decoders(benchmark: Any, server: FrameServer, kind: str) -> None:
    """UpbitStream alone (no store), ``loads=json.loads`` against the default (orjson when
    installed): reported, not gated."""
    n = BURST if not benchmark.disabled else 2_000
    benchmark.pedantic(lambda: stream_alone(server, kind, n, None), rounds=1, iterations=1)
    if benchmark.disabled:
        stream_alone(server, kind, n, json.loads)
        return
    for name, loads in (("json", json.loads), ("default", None)):
        alone = [stream_alone(server, kind, n, loads) for _ in range(3)]
        benchmark.extra_info[f"{name}_msgs_per_s"] = round(n / statistics.median(x[1] for x in alone))
        benchmark.extra_info[f"{name}_cpu_us_per_msg"] = round(statistics.median(x[0] / n for x in alone) * 1e6, 2)
    print(f"\n{kind} stream alone: {json.dumps(benchmark.extra_info)}")
