"""``mds demo`` (an offline run of the store against a local FakeUpbit) and ``mds fake-upbit``
(private).

The backfill runs through a store of its own, closed before the reads start: its Layer 1 calls
wait for Upbit's pacing (10 requests a second), and those waits are the backfill's wall time in
the phase table, not read latency. The gap table covers the backfilled window only; FakeUpbit
holds a day more, which nobody asked for and which the store rightly does not hold.

During the strategy reads the store follows FakeUpbit's WebSocket (``store.follow``), which hands
closed candles to history, so the reads need Layer 1 only where the stream has not yet proved a
minute closed. The clock is simulated: after each step the demo waits until the store holds what
the stream sent at that clock (:class:`_StreamSync`), as a real clock would give it time to.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from mds._cli_output import fmt_bytes, print_table
from mds._importers import BadInput
from mds.timeframes import DAY_MS, MINUTE_MS, TIMEFRAMES, parse_timeframe
from mds.timeutil import iso_utc_z, now_ms, to_ms

__all__ = ["DEMO_MARKETS", "cmd_demo", "cmd_fake_upbit"]

#: Demo markets, liquid and illiquid interleaved so that any ``--markets N`` mixes both.
DEMO_MARKETS = (
    ("KRW-BTC", "liquid"),
    ("KRW-MED", "illiquid"),
    ("KRW-ETH", "liquid"),
    ("KRW-GRS", "illiquid"),
    ("KRW-XRP", "liquid"),
    ("KRW-STRAX", "illiquid"),
    ("KRW-SOL", "liquid"),
    ("KRW-LAMB", "illiquid"),
)
#: The demo's simulated "now" at the end of the backfill (2025-01-27 00:00 UTC): fixed, so the
#: output is the same on every machine for the same seed.
_DEMO_ANCHOR_MS = 1_737_936_000_000
_LABELS = {
    "storage_memory": "memory",
    "layer1_cache": "layer1 cache",
    "storage_disk": "disk (LMDB)",
    "sqlite_db": "SQLite",
    "layer1_api": "Layer 1 API",
}


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100.0 * v:.1f} %"


def _latency_row(label: str, count: int, lat: dict[str, Any] | None) -> list[Any]:
    lat = lat or {"p50_ms": 0.0, "p99_ms": 0.0}
    return [label, count, f"{lat['p50_ms']:.4f}", f"{lat['p99_ms']:.4f}"]


class _StreamSync:
    """Waits, after a step of the demo's clock, until the store holds what FakeUpbit's stream
    sent at that clock and has handed it over to history.

    Why: the clock is simulated and jumps, while the stream needs wall time to send and the
    store to apply. A read made before would fetch over REST what the stream is about to hand
    over (a count that would change from run to run), and a step to a clock ``live_grace_s``
    past a minute's end taken before that minute's final candle arrived would let the store take
    the forming candle it holds as final (DESIGN.md section 8: the grace stands for frames in
    flight on a real clock, and a simulated one outruns them).

    Done when (1) every market's ticker carries the clock (FakeUpbit sends tickers first in each
    send, once per clock second), (2) every ticker, trade and candle FakeUpbit sent was applied,
    and (3) every market's coverage reaches what the stream proved by then: the current minute's
    start where FakeUpbit holds a candle of it (the stream sent that candle, so the minute before
    is final), else ``grace_ms`` before the clock. After ``timeout_s`` without it the demo stops
    waiting (``timed_out``) and reads anyway: REST then answers what the stream did not.
    """

    def __init__(
        self,
        store: Any,
        live: Any,
        ws: Any,
        held: dict[str, np.ndarray],
        clock: Any,
        grace_ms: int,
        timeout_s: float = 5.0,
    ) -> None:
        self.store, self.live, self.ws, self.held, self.clock = store, live, ws, held, clock
        self.grace_ms = grace_ms
        self.timeout_s = timeout_s
        self.waits_ms: list[float] = []
        self.timed_out = False

    def _caught_up(self, t: int) -> bool:
        store = self.store
        for sym in self.held:
            tick = store.ticker(sym)
            if tick is None or tick.get("timestamp", 0) < t:
                return False
        applied = self.live.stats()["applied"]
        sent = self.ws.sent
        if any(applied[k] < sent[k] for k in ("ticker", "trade", "candle")):
            return False
        minute = t - t % MINUTE_MS
        for sym, ts in self.held.items():
            i = int(np.searchsorted(ts, minute))
            forming = i < len(ts) and int(ts[i]) == minute
            want = minute if forming else (t - self.grace_ms) - (t - self.grace_ms) % MINUTE_MS
            cov = store.coverage(sym, "1m")
            if not cov or cov[-1][1] < want:
                return False
        return True

    def __call__(self) -> None:
        if self.timed_out:
            return
        t = self.clock()
        t0 = time.perf_counter()
        deadline = t0 + self.timeout_s
        while not self._caught_up(t):
            if time.perf_counter() > deadline or not self.live.running:
                self.timed_out = True
                return
            time.sleep(0.0005)
        self.waits_ms.append(1000 * (time.perf_counter() - t0))


def cmd_demo(args: argparse.Namespace, demo_path: Path | None) -> int:
    """Backfill and read seeded markets served by a local FakeUpbit, then print what happened.

    ``demo_path`` is the checked ``--path`` (None: a temporary directory).
    """
    import mds
    from mds.layer1 import UpbitStream
    from mds.layer1.router import UpbitRouter
    from mds.testing import FakeUpbit, generate_market

    if args.markets > len(DEMO_MARKETS):
        raise BadInput(f"--markets must be at most {len(DEMO_MARKETS)}")
    if args.days > 30:
        raise BadInput("--days must be at most 30 (FakeUpbit serves 10 requests a second, as Upbit does)")
    if args.reads_per_minute > 60:
        raise BadInput("--reads-per-minute must be at most 60")
    out = sys.stdout
    t_start = time.perf_counter()
    markets = DEMO_MARKETS[: args.markets]
    now = [_DEMO_ANCHOR_MS]

    def clock() -> int:
        return now[0]

    start = _DEMO_ANCHOR_MS - args.days * DAY_MS
    gen_start = start - DAY_MS  # the fake holds one more day than is backfilled
    gen_end = _DEMO_ANCHOR_MS + (args.minutes + 2) * MINUTE_MS
    data = {
        (sym, "1m"): generate_market(sym, "1m", gen_start, gen_end, liquidity=liq, seed=args.seed)
        for sym, liq in markets
    }
    rng = np.random.default_rng(args.seed)
    config = mds.Config(lookup="storage_first")

    with contextlib.ExitStack() as stack:
        path = demo_path or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mds-demo-")))
        fake = stack.enter_context(FakeUpbit(data, clock=clock))
        router = UpbitRouter(base_url=fake.base_url, clock=clock)
        n_liquid = sum(1 for _, liq in markets if liq == "liquid")
        out.write(
            f"mds demo: {len(markets)} markets ({n_liquid} liquid, {len(markets) - n_liquid} illiquid), "
            f"{args.days} days of 1m candles, then {args.minutes} simulated minutes x "
            f"{args.reads_per_minute} reads of latest 200 and 1000 per market, following FakeUpbit's "
            f"WebSocket (seed {args.seed})\n"
        )
        # Each clock step waits for the stream's next send (_StreamSync): FakeUpbit's default
        # 20 ms send loop would make those waits most of the strategy phase's wall time.
        fake.ws.interval_s = 0.001
        out.write(
            f"FakeUpbit at {fake.base_url} (10 requests/s per group, as Upbit) and {fake.ws_url}, store at {path}\n"
        )
        out.write(
            "config: lookup=storage_first; memory keeps 1000 candles a series, disk (LMDB) 31 days, SQLite all; "
            "a second reader opens the same store with SQLite only\n\n"
        )

        phases: list[list[Any]] = []

        def phase(name: str, reads: int, store: Any, fn: Any) -> None:
            req0, l1c0 = fake.request_count(), store.stats()["layer1"]["candles_fetched"]
            t0 = time.perf_counter()
            fn()
            st = store.stats()
            phases.append(
                [
                    name,
                    reads,
                    f"{time.perf_counter() - t0:.2f}",
                    fake.request_count() - req0,
                    st["layer1"]["candles_fetched"] - l1c0,
                ]
            )

        # the backfill: a store of its own, so that its paced Layer 1 calls stay out of the
        # read latencies below
        with mds.open(path, layer1=router, config=config, clock=clock) as filler:

            def backfill() -> None:
                for sym, _ in markets:
                    filler.candles(sym, "1m", start=start, end=_DEMO_ANCHOR_MS)

            phase("backfill (paced: 10 requests/s)", len(markets), filler, backfill)
        # Upbit's limit is a sliding one-second window: reads that start at once would wait for
        # the backfill's last requests to leave it, and that wait would show as read latency
        time.sleep(1.0)

        store = stack.enter_context(mds.open(path, layer1=router, config=config, clock=clock))
        step = MINUTE_MS // args.reads_per_minute
        symbols = [sym for sym, _ in markets]
        live_box: dict[str, Any] = {}

        def workload() -> None:
            feed = UpbitStream(
                symbols, kinds=("ticker", "trade"), candles=("1m",), url=fake.ws_url, format="SIMPLE", clock=clock
            )
            live = store.follow(feed)
            held = {sym: data[(sym, "1m")]["ts"] for sym in symbols}
            grace_ms = round(config.live_grace_s * 1000)
            sync = live_box["sync"] = _StreamSync(store, live, fake.ws, held, clock, grace_ms)
            sync()  # subscribed: the snapshot is in
            for _minute in range(args.minutes):
                for _tick in range(args.reads_per_minute):
                    now[0] += step
                    sync()
                    for sym in symbols:
                        store.candles(sym, "1m", count=200)
                        store.candles(sym, "1m", count=1000)
                # steps land on each minute's end (whatever the step), so that no step passes a
                # minute's end by Config.live_grace_s before its final candle was received
                boundary = _DEMO_ANCHOR_MS + (_minute + 1) * MINUTE_MS
                if now[0] != boundary:
                    now[0] = boundary
                    sync()
            live.close()
            live_box["stats"] = live.stats()

        history_windows = 8
        lo_min = start // MINUTE_MS
        hi_min = max(lo_min + 1, (_DEMO_ANCHOR_MS - 1060 * MINUTE_MS) // MINUTE_MS)
        windows = [
            (sym, int(m) * MINUTE_MS, int(m) * MINUTE_MS + 60 * MINUTE_MS)
            for sym, _ in markets
            for m in rng.integers(lo_min, hi_min, history_windows)
        ]

        def history() -> None:  # older than the memory tier holds: answered by LMDB
            for sym, s, e in windows:
                store.candles(sym, "1m", start=s, end=e)

        reader_stats: dict[str, Any] = {}

        def reader() -> None:  # another reader of the same files, storage only, SQLite only
            with mds.open(path, config=mds.Config(tiers=("sqlite",)), clock=clock) as other:
                for sym, s, e in windows:
                    other.candles(sym, "1m", start=s, end=e)
                for sym, _ in markets:
                    other.candles(sym, "1m", count=1000)
                reader_stats.update(other.stats())

        hits0 = dict(store.stats()["hits"])
        req0 = fake.request_count()
        phase("strategy reads + live feed", 2 * len(markets) * args.minutes * args.reads_per_minute, store, workload)
        # Layer 1 requests for minutes that closed during the reads (the stream's part) apart from
        # older history the latest-1000 reads asked for (with or without a stream alike)
        during = fake.requests()[req0:]
        live_requests = sum(1 for r in during if "to" not in r.params or to_ms(r.params["to"]) > _DEMO_ANCHOR_MS)
        live_box["older"] = len(during) - live_requests
        hits1 = dict(store.stats()["hits"])
        phase("history reads (1 h windows)", len(windows), store, history)
        phase("2nd reader, SQLite only", len(windows) + len(markets), store, reader)

        print_table(["phase", "reads", "wall s", "Layer 1 requests", "candles fetched"], phases, out)
        _report_reads(out, store.stats(), hits0, hits1, reader_stats, fake)
        _report_live(out, live_box, live_requests, args.minutes, len(markets), config.live_grace_s)
        _report_gaps(out, store, markets, start, parse_timeframe("1m").floor(now[0]))
        report = _report_store(out, store)
        out.write(f"core: {store.stats()['core']}, wall time {time.perf_counter() - t_start:.1f} s\n")
        if demo_path is not None:
            out.write(f"store kept at {path}\n")
    return 0 if report.ok else 1


def _report_reads(
    out: Any, st: dict[str, Any], hits0: dict[str, int], hits1: dict[str, int], reader: dict[str, Any], fake: Any
) -> None:
    work_hits = {k: hits1[k] - hits0.get(k, 0) for k in hits1}
    served = sum(work_hits.values())
    work_rate = (served - work_hits.get("layer1_api", 0)) / served if served else 0.0
    out.write(
        f"\nreads after the backfill: {st['requests']}, hit rate {_pct(st['hit_rate'])} overall, "
        f"{_pct(work_rate)} during the strategy reads "
        f"(a Layer 1 fetch only where a closed minute was not yet handed over by the stream)\n\n"
    )
    rows = []
    for key, label in _LABELS.items():
        lat = st["latency"].get(key)
        if st["hits"].get(key) or lat is not None:
            rows.append(_latency_row(label, st["hits"].get(key, 0), lat))
    lat = reader.get("latency", {}).get("sqlite_db")
    if lat:
        rows.append(_latency_row("SQLite (2nd reader)", reader["hits"]["sqlite_db"], lat))
    api = st["latency"].get("api.candles")
    if api:
        rows.append(_latency_row("all reads", api["count"], api))
    print_table(["answered by", "reads", "p50 ms", "p99 ms"], rows, out)
    l1 = st["layer1"]
    out.write(
        f"\nLayer 1: {fake.request_count()} HTTP requests served by FakeUpbit in all; after the backfill "
        f"{l1['calls']} calls, {l1['candles_fetched']} candles fetched, {l1['errors']} errors "
        "(the backfill's time is in the phase table: paced requests, not read latency)\n\n"
    )


def _report_live(out: Any, box: dict[str, Any], requests: int, minutes: int, n_markets: int, grace_s: float) -> None:
    from mds.layer1._ws_parse import lag_percentiles

    st, sync = box["stats"], box["sync"]
    msgs, lag = st["messages"], st["lag_ms"]
    wait = lag_percentiles(sync.waits_ms)
    without = minutes * n_markets

    def ms(v: Any) -> str:
        return "n/a" if v is None else f"{v:g}"

    rows = [
        ["messages received: ticker", msgs.get("ticker", 0)],
        ["messages received: trade", msgs.get("trade", 0)],
        ["messages received: candle (1m)", msgs.get("candle", 0)],
        ["lag p50 / p99, ms of the simulated clock (1)", f"{ms(lag['p50'])} / {ms(lag['p99'])}"],
        [
            "wall ms from a clock step to its messages applied, p50 / p99 (2)",
            f"{wait['p50']:.1f} / {wait['p99']:.1f}" if wait["p50"] is not None and wait["p99"] is not None else "n/a",
        ],
        ["closed candles handed to history by the stream", st["candles_written"]],
        ["closed minutes x markets covered by the stream", st["covered_intervals"]],
        ["Layer 1 requests for minutes closed during the reads (3)", requests],
        [f"the same without the stream: {minutes} min x {n_markets} markets (4)", without],
        ["REST requests saved", without - requests],
        ["Layer 1 requests for older history (with or without the stream)", box["older"]],
        [
            "stream/REST candle differences, reconnects, dropped, malformed",
            f"{st['rest_differences']}, {st['reconnects']}, {st['dropped']}, {st['malformed']}",
        ],
    ]
    out.write(
        "live feed during the strategy reads: UpbitStream(ticker, trade, candle.1m; SIMPLE) followed by "
        f"store.follow, Config.live_grace_s = {grace_s:g} s\n"
    )
    print_table(["live feed", "value"], rows, out)
    out.write(
        "(1) receipt minus Upbit's timestamp, both on the demo's clock: a trade arrives when the clock "
        "passes it, so this is the clock's step, not network time.\n"
        "(2) the demo waits after each clock step until the store holds what FakeUpbit sent at it "
        "(FakeUpbit's send loop looks at the clock every 1 ms).\n"
        "(3) requests ending after the backfill. They are for minutes followed by a minute without a trade: "
        f"the stream proves such a minute final only {grace_s:g} s after its end, and a read at its end "
        "fetches it first.\n"
        "(4) without the stream a latest-N read fetches each newly closed minute of each market once "
        "(the strategy phase made exactly that many before the demo followed the stream).\n"
    )
    if sync.timed_out or st["error"]:
        out.write(f"the stream fell behind or stopped ({st['error'] or 'a wait timed out'}); REST answered the rest\n")
    out.write("\n")


def _report_gaps(out: Any, store: Any, markets: Any, start: int, gap_end: int) -> None:
    grows = []
    for sym, liq in markets:
        gaps = store.gaps(sym, "1m", start=start, end=gap_end)
        miss = [g for g in gaps if g.kind == "missing"]
        notr = [g for g in gaps if g.kind == "no_trades"]
        miss_min = sum((g.end - g.start) // MINUTE_MS for g in miss)
        notr_min = sum((g.end - g.start) // MINUTE_MS for g in notr)
        n = (gap_end - start) // MINUTE_MS - miss_min - notr_min
        grows.append([sym, liq, n, len(notr), notr_min, len(miss), miss_min])
    out.write(
        f"gaps in the backfilled window {iso_utc_z(start)} to {iso_utc_z(gap_end)} "
        "(missing: never fetched; no_trades: fetched, nothing traded). FakeUpbit also holds the "
        "day before, which was not backfilled: 'mds gaps' calls it missing if asked about it.\n"
    )
    print_table(
        ["market", "liquidity", "candles", "no_trades runs", "no_trades min", "missing runs", "missing min"],
        grows,
        out,
    )


def _report_store(out: Any, store: Any) -> Any:
    tiers = store.stats()["tiers"]
    srows = []
    if "sqlite" in tiers:
        t = tiers["sqlite"]
        srows.append(["SQLite", fmt_bytes(t.get("size_bytes", 0)), f"{t.get('series', 0)} series"])
    if "disk" in tiers:
        t = tiers["disk"]
        srows.append(["disk (LMDB)", fmt_bytes(t.get("bytes", 0)), f"{t.get('entries', 0)} chunks"])
    if "memory" in tiers:
        t = tiers["memory"]
        srows.append(["memory", fmt_bytes(t.get("bytes", 0)), f"{t.get('candles', 0)} candles"])
    out.write("\n")
    print_table(["store", "size", "holds"], srows, out)
    report = store.check()
    out.write(f"\ncheck: {'ok' if report.ok else '; '.join(report.problems)}\n")
    return report


#: How far past its start ``mds fake-upbit`` generates its markets: the stream's trades and
#: candles run out after this (a day of 1 s candles takes about 0.02 s a market to generate).
_FAKE_AHEAD_MS = DAY_MS


def cmd_fake_upbit(args: argparse.Namespace) -> int:
    """``mds fake-upbit``: serve FakeUpbit on 127.0.0.1 with the demo's markets, in every timeframe,
    until Ctrl-C (or SIGTERM).

    The markets are generated from ``--days`` back to :data:`_FAKE_AHEAD_MS` past the start: the
    WebSocket stream sends trades and candles as the wall clock reaches them, so it keeps going
    for that long. FakeUpbit follows the wall clock (``clock=now_ms``): REST serves only candles
    that opened by now, the newest one partial, never the generated future.
    """
    from mds.testing import FakeUpbit, generate_market

    if args.markets > len(DEMO_MARKETS):
        raise BadInput(f"--markets must be at most {len(DEMO_MARKETS)}")
    now = now_ms()
    data: dict[tuple[str, str], np.ndarray] = {}
    spans = {"1s": 3_600_000, "1d": 3 * 365 * DAY_MS, "1w": 3 * 365 * DAY_MS, "1M": 3 * 365 * DAY_MS}
    for sym, liq in DEMO_MARKETS[: args.markets]:
        for name, tf in TIMEFRAMES.items():
            back = spans.get(name, int(args.days * DAY_MS))
            data[(sym, name)] = generate_market(
                sym, tf, tf.floor(now - back), tf.add(tf.floor(now + _FAKE_AHEAD_MS), 1), liquidity=liq, seed=args.seed
            )
    try:
        fake = FakeUpbit(data, clock=now_ms, port=args.port).start()
    except OSError as exc:
        raise BadInput(f"cannot listen on 127.0.0.1:{args.port}: {exc.strerror or exc}") from None
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        sys.stdout.write(
            f"FakeUpbit serving {args.markets} markets ({', '.join(s for s, _ in DEMO_MARKETS[: args.markets])}) "
            f"at {fake.base_url}\n"
            f"  WebSocket (Upbit's quotation stream; mds watch KRW-BTC --url URL): {fake.ws_url}\n"
            f"  e.g. {fake.base_url}/v1/market/all  {fake.base_url}/v1/candles/minutes/1?market=KRW-BTC&count=5\n"
            "  10 requests a second per group, as Upbit; candles follow the wall clock (generated for the next "
            f"{_FAKE_AHEAD_MS // 3_600_000} h). Ctrl-C stops it.\n"
        )
        sys.stdout.flush()
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        served = fake.request_count()
        fake.close()
    sys.stdout.write(f"FakeUpbit stopped after {served} requests\n")
    return 0
