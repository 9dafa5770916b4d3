"""The ``mds`` command: demo, backfill, get, gaps, import, export, stats, maintain, check, plot,
migrate.

Every command takes ``--path`` (default ``$MDS_HOME``, else ``~/.mds``). Every command that opens a
store also takes ``--history URL`` (default ``$MDS_HISTORY``): a ``postgresql://`` URL puts the
history there instead of the SQLite file under ``--path`` (memory and LMDB stay under ``--path``).
The demo never does (its candles are generated, they have no place in a shared history). ``migrate``
copies the SQLite history under ``--path`` into a PostgreSQL database. Times on the command line
are ISO-8601 dates or times (UTC unless an offset is given) or epoch milliseconds. Errors are one
line on stderr: exit 2 for bad input (arguments, symbols, timeframes, ranges, unreadable or
invalid import files, a history that is not a postgresql:// URL), 1 for everything else (storage,
server or Layer 1 failures, ``check`` problems, a ``migrate`` whose verification found differences).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import itertools
import json
import logging
import math
import os
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

import numpy as np

from mds import _importers, _kernels as K
from mds._dtypes import CANDLE_DTYPE
from mds._importers import IMPORT_FORMATS, BadInput, CandleFile
from mds._migrate import WINDOW as MIGRATE_WINDOW
from mds.convert import candles_to_upbit
from mds.errors import InvalidCandleError, InvalidRequestError, MdsError, StorageUnavailableError
from mds.symbols import validate_symbol
from mds.tiers.durable import is_server_url, shown_url
from mds.timeframes import DAY_MS, MINUTE_MS, Timeframe, parse_timeframe
from mds.timeutil import iso_utc_z, now_ms, to_ms

if TYPE_CHECKING:
    pass

__all__ = ["main"]

logger = logging.getLogger(__name__)

_PAGE = 200
_PRICE_FIELDS = ("open", "high", "low", "close", "volume", "value")
_NO_CANDLES = np.empty(0, dtype=CANDLE_DTYPE)

#: Demo markets, liquid and illiquid interleaved so that any ``--markets N`` mixes both.
_DEMO_MARKETS = (
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


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2) instead of usage + error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ---------------------------------------------------------------------------------------------
# argument helpers
# ---------------------------------------------------------------------------------------------


def parse_time(text: str) -> int:
    """A command-line time: epoch ms (digits) or ISO-8601 (UTC unless an offset is given)."""
    t = text.strip()
    if t.lstrip("-").isdigit():
        return to_ms(int(t), name="time")
    return to_ms(t, name="time")


def _time_arg(text: str) -> int:
    try:
        return parse_time(text)
    except InvalidRequestError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return v


def _series(symbol: str, timeframe: str) -> tuple[str, Timeframe]:
    """Validate a series named on the command line before any store is opened."""
    return validate_symbol(symbol), parse_timeframe(timeframe)


def _check_range(start: int | None, end: int | None) -> None:
    if start is not None and end is not None and end <= start:
        raise InvalidRequestError(f"--end ({_fmt_time(end)}) must be after --start ({_fmt_time(start)})")


def _store_path(args: argparse.Namespace) -> Path:
    if getattr(args, "path", None):
        return Path(args.path).expanduser()
    from mds.store import default_path

    return default_path()


def _history(args: argparse.Namespace) -> str | None:
    """The history URL: ``--history``, else ``$MDS_HISTORY``; None (SQLite under --path) without."""
    given = getattr(args, "history", None)
    url = given if given is not None else os.environ.get("MDS_HISTORY", "")
    url = url.strip()
    if not url:
        if given is not None:
            raise BadInput("--history is empty (give a postgresql:// URL, or leave it out for SQLite under --path)")
        return None
    if not is_server_url(url):
        origin = "--history" if given is not None else "MDS_HISTORY"
        raise BadInput(f"{origin} must be a postgresql:// URL, not {shown_url(url)}")
    return url


def _open_store(args: argparse.Namespace, *, must_exist: bool = True, layer1: Any = None, **kw: Any) -> Any:
    """The one place the commands open a store: ``--path`` and ``--history`` (or ``$MDS_HISTORY``).

    With a history on a server, ``--path`` holds only the local tiers (created when missing), and
    a server that cannot be reached fails here, with one line, rather than leaving the command a
    store whose history tier is degraded.
    """
    import mds

    path = _store_path(args)
    history = _history(args)
    if history is None and must_exist and not path.is_dir():
        raise BadInput(f"no store at {path} (create one with 'mds backfill' or 'mds import', or give --path)")
    store = mds.open(path, layer1=layer1, history=history, **kw)
    if history is not None:
        state = store.stats()["tiers"].get("sqlite", {})
        if state.get("degraded"):
            store.close()
            error = str(state.get("error") or "unavailable").removeprefix("StorageUnavailableError: ")
            raise _history_error(history, error)
    return store


def _history_error(url: str, error: str) -> StorageUnavailableError:
    """The error of a history that cannot be used, naming it (without its password) once."""
    shown = shown_url(url)
    return StorageUnavailableError(error if shown in error else f"history at {shown}: {error}")


def _fmt_time(ms: int) -> str:
    return iso_utc_z(ms)


def _fmt_num(v: float) -> str:
    return f"{v:.10g}"


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], out: TextIO) -> None:
    """A plain text table: first column left-aligned, the others right-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for n, r in enumerate(cells):
        parts = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
        out.write("  ".join(parts).rstrip() + "\n")
        if n == 0:
            out.write("  ".join("-" * w for w in widths) + "\n")


# ---------------------------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    """Backfill and read seeded markets served by a local FakeUpbit, then print what happened."""
    import mds
    from mds.layer1.router import UpbitRouter
    from mds.testing import FakeUpbit, generate_market

    if args.markets > len(_DEMO_MARKETS):
        raise BadInput(f"--markets must be at most {len(_DEMO_MARKETS)}")
    if args.days > 30:
        raise BadInput("--days must be at most 30 (FakeUpbit serves 10 requests a second, as Upbit does)")
    if args.reads_per_minute > 60:
        raise BadInput("--reads-per-minute must be at most 60")
    out = sys.stdout
    t_start = time.perf_counter()
    markets = _DEMO_MARKETS[: args.markets]
    now = [_DEMO_ANCHOR_MS]

    def clock() -> int:
        return now[0]

    start = _DEMO_ANCHOR_MS - args.days * DAY_MS
    gen_start = start - DAY_MS  # the fake holds one more day than is backfilled: "missing" in the store
    gen_end = _DEMO_ANCHOR_MS + (args.minutes + 2) * MINUTE_MS
    data = {
        (sym, "1m"): generate_market(sym, "1m", gen_start, gen_end, liquidity=liq, seed=args.seed)
        for sym, liq in markets
    }
    rng = np.random.default_rng(args.seed)
    config = mds.Config(lookup="storage_first")

    with contextlib.ExitStack() as stack:
        if args.path:
            path = Path(args.path).expanduser()
        else:
            path = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mds-demo-")))
        fake = stack.enter_context(FakeUpbit(data, clock=clock))
        router = UpbitRouter(base_url=fake.base_url, clock=clock)
        store = stack.enter_context(mds.open(path, layer1=router, config=config, clock=clock))
        n_liquid = sum(1 for _, liq in markets if liq == "liquid")
        out.write(
            f"mds demo: {len(markets)} markets ({n_liquid} liquid, {len(markets) - n_liquid} illiquid), "
            f"{args.days} days of 1m candles, then {args.minutes} simulated minutes x "
            f"{args.reads_per_minute} reads of latest 200 and 1000 per market (seed {args.seed})\n"
        )
        out.write(f"FakeUpbit at {fake.base_url} (10 requests/s per group), store at {path}\n")
        out.write(
            "config: lookup=storage_first; memory keeps 1000 candles a series, disk (LMDB) 31 days, SQLite all; "
            "a second reader opens the same store with SQLite only\n\n"
        )

        phases: list[list[Any]] = []

        def phase(name: str, reads: int, fn: Any) -> None:
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

        def backfill() -> None:
            for sym, _ in markets:
                store.candles(sym, "1m", start=start, end=_DEMO_ANCHOR_MS)

        step = MINUTE_MS // args.reads_per_minute

        def workload() -> None:
            for _minute in range(args.minutes):
                for _tick in range(args.reads_per_minute):
                    now[0] += step
                    for sym, _ in markets:
                        store.candles(sym, "1m", count=200)
                        store.candles(sym, "1m", count=1000)
                now[0] = _DEMO_ANCHOR_MS + (_minute + 1) * MINUTE_MS

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

        phase("backfill", len(markets), backfill)
        hits0 = dict(store.stats()["hits"])
        phase("strategy reads", 2 * len(markets) * args.minutes * args.reads_per_minute, workload)
        hits1 = dict(store.stats()["hits"])
        phase("history reads (1 h windows)", len(windows), history)
        phase("2nd reader, SQLite only", len(windows) + len(markets), reader)

        _table(["phase", "reads", "wall s", "Layer 1 requests", "candles fetched"], phases, out)

        st = store.stats()
        work_hits = {k: hits1[k] - hits0.get(k, 0) for k in hits1}
        served = sum(work_hits.values())
        work_rate = (served - work_hits.get("layer1_api", 0)) / served if served else 0.0
        out.write(
            f"\nrequests {st['requests']}, hit rate {_pct(st['hit_rate'])} overall, "
            f"{_pct(work_rate)} during the strategy reads "
            f"(a Layer 1 fetch only when a new minute has closed)\n\n"
        )
        rows = []
        labels = {
            "storage_memory": "memory",
            "layer1_cache": "layer1 cache",
            "storage_disk": "disk (LMDB)",
            "sqlite_db": "SQLite",
            "layer1_api": "Layer 1 API",
        }
        for key, label in labels.items():
            lat = st["latency"].get(key)
            if not st["hits"].get(key) and lat is None:
                continue
            lat = lat or {"p50_ms": 0.0, "p99_ms": 0.0}
            rows.append([label, st["hits"].get(key, 0), f"{lat['p50_ms']:.4f}", f"{lat['p99_ms']:.4f}"])
        lat = reader_stats.get("latency", {}).get("sqlite_db")
        if lat:
            rows.append(
                [
                    "SQLite (2nd reader)",
                    reader_stats["hits"]["sqlite_db"],
                    f"{lat['p50_ms']:.4f}",
                    f"{lat['p99_ms']:.4f}",
                ]
            )
        api = st["latency"].get("api.candles")
        if api:
            rows.append(["all reads", api["count"], f"{api['p50_ms']:.4f}", f"{api['p99_ms']:.4f}"])
        _table(["answered by", "reads", "p50 ms", "p99 ms"], rows, out)
        l1 = st["layer1"]
        out.write(
            f"\nLayer 1: {fake.request_count()} HTTP requests served by FakeUpbit, {l1['calls']} calls, "
            f"{l1['candles_fetched']} candles fetched, {l1['errors']} errors\n\n"
        )

        gap_end = parse_timeframe("1m").floor(now[0])
        grows = []
        for sym, liq in markets:
            gaps = store.gaps(sym, "1m", start=gen_start, end=gap_end)
            miss = [g for g in gaps if g.kind == "missing"]
            notr = [g for g in gaps if g.kind == "no_trades"]
            miss_min = sum((g.end - g.start) // MINUTE_MS for g in miss)
            notr_min = sum((g.end - g.start) // MINUTE_MS for g in notr)
            n = (gap_end - gen_start) // MINUTE_MS - miss_min - notr_min
            grows.append([sym, liq, n, len(notr), notr_min, len(miss), miss_min])
        out.write(
            f"gaps from {_fmt_time(gen_start)} to {_fmt_time(gap_end)} "
            "(missing: never fetched; no_trades: fetched, nothing traded)\n"
        )
        _table(
            ["market", "liquidity", "candles", "no_trades runs", "no_trades min", "missing runs", "missing min"],
            grows,
            out,
        )
        st = store.stats()
        tiers = st["tiers"]
        srows = []
        if "sqlite" in tiers:
            t = tiers["sqlite"]
            srows.append(["SQLite", _fmt_bytes(t.get("size_bytes", 0)), f"{t.get('series', 0)} series"])
        if "disk" in tiers:
            t = tiers["disk"]
            srows.append(["disk (LMDB)", _fmt_bytes(t.get("bytes", 0)), f"{t.get('entries', 0)} chunks"])
        if "memory" in tiers:
            t = tiers["memory"]
            srows.append(["memory", _fmt_bytes(t.get("bytes", 0)), f"{t.get('candles', 0)} candles"])
        out.write("\n")
        _table(["store", "size", "holds"], srows, out)
        report = store.check()
        out.write(f"\ncheck: {'ok' if report.ok else '; '.join(report.problems)}\n")
        out.write(f"core: {st['core']}, wall time {time.perf_counter() - t_start:.1f} s\n")
        if args.path:
            out.write(f"store kept at {path}\n")
    return 0 if report.ok else 1


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100.0 * v:.1f} %"


# ---------------------------------------------------------------------------------------------
# backfill
# ---------------------------------------------------------------------------------------------


class _Progress:
    """A progress bar on a terminal; otherwise plain lines: one per series, and one every
    ``_PLAIN_EVERY_S`` seconds while a long one runs."""

    _PLAIN_EVERY_S = 30.0

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self._last_line = time.monotonic()

    def update(self, label: str, done: int, total: int, candles: int, final: bool = False, extra: str = "") -> None:
        share = min(1.0, done / total) if total else 1.0
        bar = "#" * int(share * 30)
        line = f"{label} [{bar:<30}] {100 * share:5.1f} % {candles} candles{extra}"
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K" + ("\n" if final else ""))  # erase a longer line's rest
            self.stream.flush()
        elif final or time.monotonic() - self._last_line >= self._PLAIN_EVERY_S:
            self.stream.write(line + "\n")
            self.stream.flush()
            self._last_line = time.monotonic()


def cmd_backfill(args: argparse.Namespace) -> int:
    """Fetch and store a time range for each symbol; covered parts are skipped (resumable)."""
    from mds.layer1.router import UpbitRouter
    from mds.models import Config

    tf = parse_timeframe(args.timeframe)
    symbols = [validate_symbol(s) for s in args.symbols]
    now = now_ms()
    if args.days is not None:
        if args.until is not None:
            raise BadInput("--until goes with --since, not with --days")
        end = tf.floor(now)
        start = end - int(args.days * DAY_MS)
    else:
        start = args.since
        end = tf.floor(now) if args.until is None else min(args.until, tf.floor(now))
    _check_range(start, args.until if args.until is not None else end)
    start = tf.ceil(start)
    if end <= start:
        raise BadInput("the range holds no closed candle yet")
    router = UpbitRouter(base_url=args.base_url)
    progress = _Progress(sys.stderr)
    chunk = _PAGE * 10  # ten requests between progress updates
    with _open_store(args, must_exist=False, layer1=router, config=Config(lookup="storage_first")) as store:
        for sym in symbols:
            cov = np.asarray(store.coverage(sym, tf), dtype=np.int64).reshape(-1, 2)
            todo = K.interval_subtract(np.array([[start, end]], dtype=np.int64), cov)
            todo_n = sum(tf.count(int(a), int(b)) for a, b in todo.tolist())
            span = tf.count(start, end)
            st0 = store.stats()["layer1"]
            label = f"{sym} {tf.name}"
            done = got = 0
            progress.update(label, 0, span, 0)
            t = end
            while t > start:  # newest first, as Upbit pages; covered chunks cost no request
                s = max(start, tf.add(t, -chunk))
                got += len(store.candles(sym, tf, start=s, end=t))
                done += tf.count(s, t)
                progress.update(label, done, span, got)
                t = s
            progress.update(label, span, span, got, final=True)
            st1 = store.stats()["layer1"]
            sys.stdout.write(
                f"{sym} {tf.name}: {got} candles in [{_fmt_time(start)}, {_fmt_time(end)}); "
                f"{span - todo_n} of {span} intervals were already covered; "
                f"{st1['candles_fetched'] - st0['candles_fetched']} candles fetched in "
                f"{st1['calls'] - st0['calls']} Layer 1 calls\n"
            )
    return 0


# ---------------------------------------------------------------------------------------------
# get, gaps
# ---------------------------------------------------------------------------------------------


def _read(store: Any, sym: str, tf: Timeframe, args: argparse.Namespace, default_count: int | None = None) -> Any:
    start, end, count = args.start, args.end, getattr(args, "count", None)
    _check_range(start, end)
    if count is None and start is None:
        if default_count is None:
            raise BadInput("give --count N or --start (with an optional --end)")
        count = default_count
    return store.candles(sym, tf, count=count, start=start, end=end)


def cmd_get(args: argparse.Namespace) -> int:
    """Print stored candles as a table, CSV or JSON (Upbit field names)."""
    sym, tf = _series(args.symbol, args.timeframe)
    _check_range(args.start, args.end)
    with _open_store(args) as store:
        arr = _read(store, sym, tf, args)
    out = sys.stdout
    if args.format == "json":
        json.dump(candles_to_upbit(arr, sym, tf), out, indent=1)
        out.write("\n")
    elif args.format == "csv":
        _write_csv(arr, out)
    else:
        rows = [[_fmt_time(int(r["ts"]))] + [_fmt_num(float(r[f])) for f in _PRICE_FIELDS] for r in arr]
        _table(["time_utc", *_PRICE_FIELDS], rows, out)
        out.write(f"{len(arr)} candles\n")
    return 0


def cmd_gaps(args: argparse.Namespace) -> int:
    """List runs of absent candles: missing (never fetched) or no_trades (fetched, nothing traded)."""
    sym, tf = _series(args.symbol, args.timeframe)
    _check_range(args.start, args.end)
    with _open_store(args) as store:
        gaps = store.gaps(sym, tf, start=args.start, end=args.end)
    rows = [[_fmt_time(g.start), _fmt_time(g.end), g.kind, tf.count(g.start, g.end)] for g in gaps]
    out = sys.stdout
    if rows:
        _table(["start", "end", "kind", "candles"], rows, out)
    totals = {k: sum(r[3] for r in rows if r[2] == k) for k in ("missing", "no_trades")}
    runs = {k: sum(1 for r in rows if r[2] == k) for k in ("missing", "no_trades")}
    out.write(
        f"{sym} {tf.name}: {runs['missing']} missing runs ({totals['missing']} candles), "
        f"{runs['no_trades']} no_trades runs ({totals['no_trades']} candles)\n"
    )
    return 0


# ---------------------------------------------------------------------------------------------
# import
# ---------------------------------------------------------------------------------------------


def cmd_import(args: argparse.Namespace) -> int:
    """Validate, deduplicate and store candles from a file, streamed in batches.

    The file is read in batches of at most ``_importers.BATCH_ROWS`` rows, so memory does not
    grow with the file. Every batch is written inside one ``store.batch()`` (one SQLite
    transaction): a bad row anywhere leaves every tier as it was. The first batch is read before
    the store is opened, so a file refused at once creates no store.
    """
    sym, tf = _series(args.symbol, args.timeframe)
    with CandleFile(args.file, args.format, sym, tf) as src:
        batches = src.batches()
        first = next(batches, None)
        if first is None:
            raise BadInput(f"{args.file} holds no candles")
        ins = upd = unch = candles = dups = 0
        lo = hi = None
        spans = np.empty((0, 2), dtype=np.int64)  # [first, last + 1 interval) of every batch written
        overlap = False
        todo = itertools.chain([first], batches)
        del first  # the chain holds it only until it has been written
        with _open_store(args, must_exist=False) as store, store.batch():
            for arr, where in todo:
                ts = arr["ts"]
                b_lo, b_hi = int(ts.min()), int(ts.max())
                span = np.array([[b_lo, tf.add(b_hi, 1)]], dtype=np.int64)
                if len(spans) and bool(np.any((spans[:, 0] < span[0, 1]) & (span[0, 0] < spans[:, 1]))):
                    overlap = True  # a time may repeat across batches: the store resolves it (last wins)
                try:
                    res = store.write_candles(sym, tf, arr, complete=(b_lo, tf.add(b_hi, 1)) if args.complete else None)
                except InvalidCandleError as exc:
                    raise BadInput(_invalid_rows(args.file, src.where, exc, where)) from None
                n = len(np.unique(ts))
                candles += n
                dups += len(arr) - n
                ins, upd, unch = ins + res.inserted, upd + res.updated, unch + res.unchanged
                lo = b_lo if lo is None else min(lo, b_lo)
                hi = b_hi if hi is None else max(hi, b_hi)
                spans = K.interval_normalize(np.concatenate([spans, span]))
            assert lo is not None and hi is not None
            if args.complete:
                # the file holds every candle of [lo, hi]: the stretches between batches too
                holes = K.interval_subtract(np.array([[lo, tf.add(hi, 1)]], dtype=np.int64), spans)
                for s, e in holes.tolist():
                    store.write_candles(sym, tf, _NO_CANDLES, complete=(s, e))
        dups += src.superseded
    out = sys.stdout
    out.write(
        f"{sym} {tf.name}: {candles} candles from {args.file} ({src.fmt}), "
        f"{_fmt_time(lo)} to {_fmt_time(hi)}: "
        f"{ins} inserted, {upd} updated, {unch} unchanged"
        + (f", {dups} duplicate rows dropped (last wins)" if dups else "")
        + "\n"
    )
    if overlap:
        out.write(
            f"note: the file is not in time order: a time that repeats in another batch of {src.batch_rows} "
            "rows is counted above twice (inserted, then updated or unchanged); the last row wins\n"
        )
    if src.value_estimated:
        out.write("note: the file has no quote volume; value estimated as close * volume\n")
    out.write(
        "span marked covered (absent minutes count as no_trades)\n"
        if args.complete
        else "span not marked covered (use --complete if the file holds every candle of its span)\n"
    )
    return 0


def _invalid_rows(path: str, what: str, exc: InvalidCandleError, where: np.ndarray) -> str:
    """The store refused a batch: say which line (or candle) of the file, and why."""
    if exc.rows and 0 <= exc.rows[0] < len(where):
        reason = exc.reasons[0] if exc.reasons else "invalid"
        more = f" (and {len(exc.rows) - 1} more in this batch)" if len(exc.rows) > 1 else ""
        return f"{path}: {what} {int(where[exc.rows[0]])}: invalid candle: {reason}{more}; nothing was stored"
    return f"{path}: {exc}"


# ---------------------------------------------------------------------------------------------
# export, stats, maintain, check, plot
# ---------------------------------------------------------------------------------------------


def _write_csv(arr: np.ndarray, out: TextIO) -> None:
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["timestamp", "time_utc", *_PRICE_FIELDS])
    ts = arr["ts"].tolist()
    cols = [arr[f].tolist() for f in _PRICE_FIELDS]
    for i, t in enumerate(ts):
        w.writerow([t, _fmt_time(t), *(repr(c[i]) for c in cols)])


def cmd_export(args: argparse.Namespace) -> int:
    """Write a series (or a range of it) to CSV or Parquet."""
    sym, tf = _series(args.symbol, args.timeframe)
    _check_range(args.start, args.end)
    parquet = args.out.lower().endswith(".parquet")
    if parquet:
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise MdsError("Parquet export needs pyarrow (pip install pyarrow); or export to a .csv file") from None
    with _open_store(args) as store:
        start = args.start if args.start is not None else 0
        arr = store.candles(sym, tf, start=start, end=args.end)
    if parquet:
        table = pa.table({"ts": arr["ts"], **{f: arr[f] for f in _PRICE_FIELDS}})
        pq.write_table(table, args.out)
    else:
        try:
            with open(args.out, "w", newline="", encoding="utf-8") as fh:
                _write_csv(arr, fh)
        except OSError as exc:
            raise MdsError(f"cannot write {args.out}: {exc.strerror or exc}") from None
    sys.stdout.write(f"{sym} {tf.name}: {len(arr)} candles written to {args.out}\n")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    """Print the store's figures (sizes per tier) as JSON."""
    with _open_store(args) as store:
        st = store.stats()
    json.dump(st, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
    return 0


def cmd_maintain(args: argparse.Namespace) -> int:
    """Run maintenance now (VACUUM past the threshold, or always with --force)."""
    with _open_store(args) as store:
        rep = store.maintain(force=args.force)
    sys.stdout.write(
        f"fragmentation {100 * rep.fragmentation_before:.1f} % -> {100 * rep.fragmentation_after:.1f} %, "
        f"vacuumed: {'yes' if rep.vacuumed else 'no'}, analyzed: {'yes' if rep.analyzed else 'no'}, "
        f"disk entries purged: {rep.disk_entries_purged}\n"
    )
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Check the integrity of every tier; exit 1 when there are problems."""
    with _open_store(args) as store:
        rep = store.check()
    if rep.ok:
        sys.stdout.write("ok\n")
        return 0
    for p in rep.problems:
        sys.stdout.write(f"problem: {p}\n")
    sys.stderr.write(f"mds check: {len(rep.problems)} problem(s)\n")
    return 1


def cmd_plot(args: argparse.Namespace) -> int:
    """Draw candles with missing and no-trade intervals shaded."""
    sym, tf = _series(args.symbol, args.timeframe)
    _check_range(args.start, args.end)
    with _open_store(args) as store:
        arr = _read(store, sym, tf, args, default_count=300)
        if not len(arr):
            raise BadInput(f"no stored candles of {sym} {tf.name} in that range")
        lo = int(arr["ts"][0]) if args.start is None else tf.ceil(args.start)
        hi = tf.add(int(arr["ts"][-1]), 1) if args.end is None else args.end
        gaps = store.gaps(sym, tf, start=lo, end=hi)
    try:  # after the input checks: bad input is exit 2 whether or not matplotlib is there
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MdsError("mds plot needs matplotlib (pip install 'upbit-mds[plot]' or pip install matplotlib)") from None
    day = 86_400_000.0
    x = arr["ts"] / day  # matplotlib date numbers: days since 1970-01-01
    width = (tf.interval_ms / day) * 0.7
    up = arr["close"] >= arr["open"]
    fig, ax = plt.subplots(figsize=(12, 5), dpi=100)
    shade = {"missing": ("tab:red", 0.25), "no_trades": ("0.6", 0.25)}
    seen: set[str] = set()
    for g in gaps:
        color, alpha = shade[g.kind]
        ax.axvspan(g.start / day, g.end / day, color=color, alpha=alpha, lw=0, label=None if g.kind in seen else g.kind)
        seen.add(g.kind)
    for mask, color in ((up, "tab:green"), (~up, "tab:red")):
        ax.vlines(x[mask], arr["low"][mask], arr["high"][mask], color=color, linewidth=0.6)
        body_lo = np.minimum(arr["open"][mask], arr["close"][mask])
        body_h = np.abs(arr["close"][mask] - arr["open"][mask])
        ax.bar(x[mask], np.maximum(body_h, 1e-12), width, bottom=body_lo, color=color, linewidth=0)
    ax.xaxis_date()
    ax.set_title(f"{sym} {tf.name}: {len(arr)} candles, {len(gaps)} gaps (UTC)")
    ax.set_ylabel(sym.split("-", 1)[0])
    if seen:
        ax.legend(loc="upper left")
    fig.autofmt_xdate()
    fig.tight_layout()
    try:
        fig.savefig(args.out)
    except (OSError, ValueError) as exc:
        raise MdsError(f"cannot write {args.out}: {exc}") from None
    finally:
        plt.close(fig)
    sys.stdout.write(f"{sym} {tf.name}: {len(arr)} candles, {len(gaps)} gaps, plot written to {args.out}\n")
    return 0


# ---------------------------------------------------------------------------------------------
# migrate
# ---------------------------------------------------------------------------------------------

#: Tests only: after this many committed windows, ``migrate`` says so on stderr and waits for its
#: stdin to close, so that a test can kill it at a known point (a real interruption).
_MIGRATE_PAUSE_ENV = "MDS_MIGRATE_TEST_PAUSE_AFTER"


def cmd_migrate(args: argparse.Namespace) -> int:
    """Copy the SQLite history under --path into PostgreSQL, resumably; then verify it."""
    from mds import _migrate as migration
    from mds.models import Config
    from mds.tiers.durable import open_durable
    from mds.tiers.sqlite import SqliteStore

    env = os.environ.get("MDS_HISTORY", "").strip()
    url = args.to.strip() if args.to is not None else env
    if not url:
        raise BadInput("give --to postgresql://... (or set MDS_HISTORY)")
    if not is_server_url(url):
        raise BadInput(f"--to must be a postgresql:// URL, not {shown_url(url)}")
    path = _store_path(args)
    db = path / "candles.sqlite3"
    if not db.is_file():
        raise BadInput(f"no SQLite history at {db} (give --path)")
    shown = shown_url(url)
    pause_after = int(os.environ.get(_MIGRATE_PAUSE_ENV, "0") or 0)
    progress = _Progress(sys.stderr)
    done = migration.Copied()
    t0 = time.perf_counter()

    def show(i: int, s: migration.SeriesSpan, seen: int, totals: migration.Copied, final: bool = False) -> None:
        rate = totals.candles / max(time.perf_counter() - t0, 1e-9)
        label = f"series {i}/{len(plan)} {s.symbol} {s.tf.name}"
        extra = f"; in all {totals.candles} copied, {totals.present} already there, {rate:,.0f} candles/s"
        progress.update(label, seen, s.candles, seen, final=final, extra=extra)

    def on_window(i: int, s: migration.SeriesSpan, seen: int, totals: migration.Copied) -> None:
        show(i, s, seen, totals)
        if pause_after and totals.windows == pause_after:
            sys.stderr.write(f"mds migrate: paused after {totals.windows} windows ({_MIGRATE_PAUSE_ENV})\n")
            sys.stderr.flush()
            sys.stdin.read()  # until the test kills this process (or closes stdin: then go on)

    with contextlib.ExitStack() as stack:
        src = SqliteStore(db, readonly=True)
        stack.callback(src.close)
        origin = f"{socket.gethostname()}:mds-migrate:{os.getpid()}"
        try:
            dst = open_durable(path, Config(), readonly=False, clock=now_ms, history=url, origin=origin)
        except StorageUnavailableError as exc:
            raise _history_error(url, str(exc)) from exc
        stack.callback(dst.close)
        plan = migration.source_series(src)
        if not plan:
            sys.stdout.write(f"nothing to copy: {db} holds no series\n")
            return 0
        try:
            migration.copy(
                src,
                dst,
                plan,
                window=args.window,
                done=done,
                on_window=on_window,
                on_series=lambda i, s, totals: show(i, s, s.candles, totals, final=True),
            )
        except KeyboardInterrupt:
            sys.stderr.write(
                f"mds migrate: interrupted after {done.candles} candles copied; run the same command again to resume\n"
            )
            return 130
        secs = time.perf_counter() - t0
        out = sys.stdout
        if done.windows == 0:
            out.write(
                f"nothing to copy: {shown} already holds all {len(plan)} series of {db} ({done.present} candles)\n"
            )
        else:
            out.write(
                f"migrated {len(plan)} series from {db} to {shown}: {done.candles} candles copied"
                f" ({done.present} already there), {done.ranges} coverage ranges, "
                f"{done.windows} transactions, {secs:.1f} s\n"
            )
        problems = migration.verify(
            src,
            dst,
            plan,
            window=args.window,
            on_series=lambda i, s: progress.update(
                f"verify {i}/{len(plan)} {s.symbol} {s.tf.name}", s.candles, s.candles, s.candles, final=True
            ),
        )
    if problems:
        for p in problems:
            out.write(f"problem: {p}\n")
        sys.stderr.write(f"mds migrate: verification found {len(problems)} series that differ\n")
        return 1
    out.write(f"verified: {len(plan)} series equal (candle counts, checksums, coverage)\n")
    return 0


# ---------------------------------------------------------------------------------------------
# parser and entry point
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The ``mds`` argument parser."""
    common = _Parser(add_help=False)
    common.add_argument("--path", default=argparse.SUPPRESS, help="store directory (default: $MDS_HOME, else ~/.mds)")
    p = _Parser(
        prog="mds",
        description="mds: embedded market-data storage for Upbit candles. Times: ISO-8601 "
        "(UTC unless an offset is given) or epoch ms.",
    )
    p.add_argument("--path", default=None, help="store directory (default: $MDS_HOME, else ~/.mds)")
    p.add_argument("-v", "--verbose", action="store_true", help="log what the store does (to stderr)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    history = _Parser(add_help=False)
    history.add_argument(
        "--history",
        metavar="URL",
        default=None,
        help="keep the history (candles, coverage) in this PostgreSQL database, postgresql://user@host/db, "
        "instead of the SQLite file under --path; memory and LMDB stay under --path "
        "(default: $MDS_HISTORY, else SQLite)",
    )

    def add(
        name: str, help_: str, description: str | None = None, *, opens_store: bool = True
    ) -> argparse.ArgumentParser:
        parents = [common, history] if opens_store else [common]
        return sub.add_parser(name, parents=parents, help=help_, description=description or help_)

    def series(sp: argparse.ArgumentParser, ranged: bool = True) -> None:
        sp.add_argument("symbol", metavar="SYMBOL", help="Upbit market code, e.g. KRW-BTC")
        sp.add_argument("--timeframe", "-t", default="1m", help="1s, 1m 3m 5m 10m 15m 30m, 1h, 4h, 1d, 1w, 1M")
        if ranged:
            sp.add_argument("--start", type=_time_arg, help="range start (inclusive)")
            sp.add_argument("--end", type=_time_arg, help="range end (exclusive)")

    d = add(
        "demo",
        "offline demo: FakeUpbit, backfill, strategy-like reads, gaps, statistics",
        "Runs offline: a local FakeUpbit with seeded liquid and illiquid markets, a store in a temporary "
        "directory (or --path), a backfill of 1m candles through UpbitRouter, strategy-like reads while a "
        "simulated clock moves on, then a table of hit rates, latencies, Layer 1 requests, gaps and sizes. "
        "Its history is always SQLite (generated candles never go to a shared history: MDS_HISTORY is ignored).",
        opens_store=False,
    )
    d.add_argument("--days", type=_positive_int, default=3, help="days of 1m candles to backfill (default 3)")
    d.add_argument("--markets", type=_positive_int, default=5, help="number of markets (default 5, at most 8)")
    d.add_argument("--seed", type=int, default=7, help="seed of the generated markets (default 7)")
    d.add_argument("--minutes", type=_positive_int, default=20, help="simulated minutes of reads (default 20)")
    d.add_argument(
        "--reads-per-minute", type=_positive_int, default=60, help="strategy ticks a minute (default 60: every second)"
    )
    d.set_defaults(func=cmd_demo, demo=True)

    b = add("backfill", "fetch and store history from Upbit (resumable)")
    b.add_argument("symbols", nargs="+", metavar="SYMBOL", help="Upbit market codes")
    b.add_argument("--timeframe", "-t", default="1m", help="timeframe (default 1m)")
    g = b.add_mutually_exclusive_group(required=True)
    g.add_argument("--days", type=_positive_float, help="the last N days")
    g.add_argument("--since", type=_time_arg, help="range start")
    b.add_argument("--until", type=_time_arg, help="range end (exclusive; default now)")
    b.add_argument("--base-url", default="https://api.upbit.com", help="Upbit REST base URL")
    b.set_defaults(func=cmd_backfill)

    gt = add("get", "print stored candles")
    series(gt)
    gt.add_argument("--count", "-n", type=_positive_int, help="latest N closed candles (with --start: first N)")
    gt.add_argument("--format", "-f", choices=("table", "csv", "json"), default="table")
    gt.set_defaults(func=cmd_get)

    gp = add("gaps", "list missing and no-trade intervals")
    series(gp)
    gp.set_defaults(func=cmd_gaps)

    im = add(
        "import",
        "import candles from a file",
        "Import candles from a file, validated and deduplicated (last row wins). Formats: upbit-json "
        "(Upbit REST pages: a candle object, a list of them or a list of lists), upbit-csv (CSV with Upbit "
        "field names), pyupbit-csv (naive KST index; open,high,low,close,volume,value), ccxt-csv (timestamp "
        "as epoch ms or naive UTC; open,high,low,close,volume; the quote volume 'value' is estimated as "
        "close * volume unless a value column is present). The file is streamed in batches of "
        f"{_importers.BATCH_ROWS:,} rows, all written in one transaction: a bad row anywhere stores nothing. "
        f"Lines and JSON values longer than {_importers.MAX_LINE // 1024} KiB, NUL bytes and text that is not UTF-8 "
        "are refused. The "
        "file's span is marked covered only with --complete.",
    )
    im.add_argument("file", metavar="PATH")
    im.add_argument("--symbol", "-s", required=True, help="Upbit market code")
    im.add_argument("--timeframe", "-t", required=True, help="timeframe of the candles in the file")
    im.add_argument("--format", "-f", choices=IMPORT_FORMATS, default="auto")
    im.add_argument(
        "--complete", action="store_true", help="the file holds every candle of its span (absent = no trades)"
    )
    im.set_defaults(func=cmd_import)

    ex = add("export", "write a series to CSV (or Parquet when FILE ends .parquet and pyarrow is installed)")
    series(ex)
    ex.add_argument("--out", "-o", required=True, metavar="FILE")
    ex.set_defaults(func=cmd_export)

    add("stats", "print store figures as JSON").set_defaults(func=cmd_stats)
    mt = add("maintain", "run maintenance (VACUUM, ANALYZE, purge)")
    mt.add_argument("--force", action="store_true", help="VACUUM whatever the fragmentation")
    mt.set_defaults(func=cmd_maintain)
    add("check", "check the integrity of every tier (exit 1 on problems)").set_defaults(func=cmd_check)

    pl = add("plot", "draw candles with gaps shaded to a PNG (needs matplotlib)")
    series(pl)
    pl.add_argument("--count", "-n", type=_positive_int, help="latest N closed candles (default 300)")
    pl.add_argument("--out", "-o", required=True, metavar="FILE.png")
    pl.set_defaults(func=cmd_plot)

    mg = add(
        "migrate",
        "copy the SQLite history under --path into PostgreSQL (resumable)",
        "Copy the SQLite history under --path (candles and coverage, every series) into the PostgreSQL "
        "database at --to, series by series in windows of --window candles: each window's candles and "
        "coverage are one transaction, so an interrupted run leaves no candles without their coverage. "
        "Run it again to resume: windows the database already holds are skipped, nothing is copied twice. "
        "Where the database already holds a candle of the same time, the SQLite one replaces it. "
        "Then every series is verified (candle counts, checksums, coverage); exit 1 on a difference. "
        "The SQLite file is only read.",
        opens_store=False,
    )
    mg.add_argument(
        "--to", metavar="URL", default=None, help="the PostgreSQL database, postgresql://... (default: $MDS_HISTORY)"
    )
    mg.add_argument(
        "--window",
        type=_positive_int,
        default=MIGRATE_WINDOW,
        metavar="N",
        help=f"candles per transaction (default {MIGRATE_WINDOW:,})",
    )
    mg.set_defaults(func=cmd_migrate)
    return p


def _one_line(exc: BaseException) -> str:
    """An error message on one line (a driver's message may span several)."""
    return " ".join(ln.strip() for ln in str(exc).splitlines() if ln.strip()) or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``mds`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.ERROR, format="mds: %(name)s: %(message)s", stream=sys.stderr
    )
    prog = f"mds {args.command}"
    try:
        return int(args.func(args))
    except BrokenPipeError:  # e.g. piped into head: stop quietly, as other tools do
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 0
    except (BadInput, InvalidRequestError, InvalidCandleError) as exc:
        sys.stderr.write(f"{prog}: error: {_one_line(exc)}\n")
        return 2
    except MdsError as exc:
        sys.stderr.write(f"{prog}: error: {_one_line(exc)}\n")
        return 1
    except OSError as exc:
        sys.stderr.write(f"{prog}: error: {_one_line(exc)}\n")
        return 1
    except ValueError as exc:
        sys.stderr.write(f"{prog}: error: {_one_line(exc)}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog}: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
