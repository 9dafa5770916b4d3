"""A local Upbit for tests, benchmarks and the demo, and seeded market generators.

:class:`FakeUpbit` is a real HTTP server on 127.0.0.1 (ephemeral port, background thread) that
serves Upbit's quotation endpoints from arrays it is given, with Upbit's field names, number
forms, ordering, ``count``/``to`` semantics, ``Remaining-Req`` headers and 429 rate limiting, plus
injectable faults. :func:`generate_market` makes seeded, valid, realistic candle series (a liquid
market and an illiquid one with many no-trade intervals).

Nothing here touches the network beyond the loopback interface.
"""

from __future__ import annotations

import collections
import contextlib
import datetime as _dt
import json
import logging
import math
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np

from mds._dtypes import CANDLE_DTYPE, TRADE_DTYPE
from mds.errors import InvalidRequestError
from mds.symbols import validate_symbol
from mds.timeframes import DAY_MS, MINUTE_MS, Timeframe, parse_timeframe
from mds.timeutil import iso_utc, now_ms, to_ms

__all__ = [
    "FAULT_KINDS",
    "FakeUpbit",
    "Fault",
    "RequestRecord",
    "dense_candles",
    "generate_market",
    "kernel_modules",
    "kernel_params",
    "krw_tick_size",
]

logger = logging.getLogger(__name__)

_KST_MS = 9 * 3_600_000
_MINUTE_UNITS = (1, 3, 5, 10, 15, 30, 60, 240)
_PATH_TIMEFRAME = {"seconds": "1s", "days": "1d", "weeks": "1w", "months": "1M"}
_GROUPS = (
    ("/v1/candles/", "candles"),
    ("/v1/ticker", "ticker"),
    ("/v1/orderbook", "orderbook"),
    ("/v1/trades/", "trades"),
    ("/v1/market/", "market"),
)
_TOO_MANY = b"Too many API requests."

#: Fault kinds accepted by :meth:`FakeUpbit.inject`.
FAULT_KINDS = (
    "latency",  # sleep ``seconds`` before answering (combines with one other fault)
    "status",  # answer with HTTP ``status`` (default 500) and an Upbit error body
    "rate_limit",  # answer 429 "Too many API requests." (a 429 storm with ``times=N``)
    "blocked",  # answer 418 with a block message naming the duration
    "malformed_json",  # 200 with a body that is not valid JSON
    "truncated",  # 200 announcing the full Content-Length, sending half, closing the connection
    "wrong_market",  # rows name another market (``market``, default KRW-XRP or KRW-ETH)
    "duplicate_rows",  # the first and last rows appear twice
    "unordered_rows",  # rows shuffled (seeded) instead of newest first
    "short_page",  # only the newest half of the rows (at least one): a capped or flaky page
)
_TERMINAL = frozenset(FAULT_KINDS) - {"latency"}


# ---------------------------------------------------------------------------------------------
# Market generators
# ---------------------------------------------------------------------------------------------

_LIQUIDITY = {"liquid": 0.9999, "illiquid": 0.6}
_VOLATILITY = {"liquid": 0.0007, "illiquid": 0.0018}  # log-return sigma per minute
_VALUE_PER_MINUTE = {"liquid": 8e7, "illiquid": 2e5}  # quote currency traded per minute


def krw_tick_size(price: np.ndarray | float) -> np.ndarray:
    """Upbit's KRW-market price unit for each price (vectorised).

    Follows Upbit's KRW tick table (1,000 KRW at 2,000,000 and above down to 0.0001 below 1).
    """
    p = np.asarray(price, dtype=np.float64)
    conds = [
        p >= 2_000_000,
        p >= 1_000_000,
        p >= 500_000,
        p >= 100_000,
        p >= 10_000,
        p >= 1_000,
        p >= 100,
        p >= 10,
        p >= 1,
    ]
    ticks = [1000.0, 500.0, 100.0, 50.0, 10.0, 1.0, 0.1, 0.01, 0.001]
    return np.select(conds, ticks, 0.0001)


def _slots(tf: Timeframe, start: int, end: int) -> np.ndarray:
    first = tf.ceil(start)
    if tf.is_month:
        out = []
        t = first
        while t < end:
            out.append(t)
            t = tf.add(t, 1)
        return np.asarray(out, dtype=np.int64)
    return np.arange(first, end, tf.interval_ms, dtype=np.int64)


def _round_price(p: np.ndarray, quote: str) -> np.ndarray:
    if quote == "KRW":
        tick = krw_tick_size(p)
        return np.maximum(np.round(p / tick) * tick, tick)
    return np.maximum(np.round(p, 8), 1e-8)


def generate_market(
    symbol: str,
    timeframe: str | Timeframe,
    start_ms: int,
    end_ms: int,
    *,
    liquidity: str | float = "liquid",
    seed: int = 0,
    start_price: float | None = None,
    volatility: float | None = None,
) -> np.ndarray:
    """Generate a seeded, realistic candle series for ``[start_ms, end_ms)``.

    The hidden price is a geometric random walk sampled at every slot of the timeframe; a candle
    exists only when trades happened in its interval (as on Upbit, no candle for no-trade
    intervals). Prices are rounded to Upbit's KRW tick sizes (8 decimals for other quotes),
    volumes and values to 8 decimals, so the numbers look and serialise like Upbit's.

    Parameters
    ----------
    symbol : str
        Upbit market code; the quote (``KRW`` ...) picks the price rounding.
    timeframe : str or Timeframe
    start_ms, end_ms : int
        Half-open range (epoch ms); ``start_ms`` is rounded up to the timeframe grid.
    liquidity : {"liquid", "illiquid"} or float
        ``"liquid"``: a trade in 99.99 % of minutes (a few single-minute gaps a month, like
        KRW-BTC); ``"illiquid"``: 60 %, lower still between 16:00 and 22:00 UTC (the Korean
        night), like a thin altcoin. A float is the per-minute trade probability. Longer
        timeframes have a candle when any of their minutes traded.
    seed : int
        Same seed, symbol and timeframe give the same array.
    start_price : float, optional
        Default: derived from the seed and symbol (BTC-like for ``KRW-BTC``).
    volatility : float, optional
        Log-return standard deviation per minute.

    Returns
    -------
    numpy.ndarray
        CANDLE_DTYPE, ascending ``ts``, every row valid and aligned.

    Raises
    ------
    InvalidRequestError
        Bad symbol, timeframe, range or liquidity.
    """
    validate_symbol(symbol)
    tf = parse_timeframe(timeframe)
    start, end = to_ms(start_ms, name="start_ms"), to_ms(end_ms, name="end_ms")
    if end < start:
        raise InvalidRequestError("end_ms must not be before start_ms")
    if isinstance(liquidity, str):
        if liquidity not in _LIQUIDITY:
            raise InvalidRequestError(f"liquidity must be 'liquid', 'illiquid' or a probability, not {liquidity!r}")
        p_minute = _LIQUIDITY[liquidity]
        kind = liquidity
    else:
        p_minute = float(liquidity)
        if not 0.0 < p_minute <= 1.0:
            raise InvalidRequestError("liquidity as a probability must be in (0, 1]")
        kind = "liquid" if p_minute >= 0.9 else "illiquid"
    quote = symbol.split("-", 1)[0]
    rng = np.random.default_rng(
        np.random.SeedSequence([int(seed) & 0xFFFFFFFF, zlib.crc32(symbol.encode()), zlib.crc32(tf.name.encode())])
    )
    ts = _slots(tf, start, end)
    n = len(ts)
    if n == 0:
        return np.zeros(0, dtype=CANDLE_DTYPE)

    if tf.is_month:
        nxt = np.asarray([tf.add(int(t), 1) for t in ts], dtype=np.int64)
        minutes = (nxt - ts) / MINUTE_MS
    else:
        minutes = np.full(n, tf.interval_ms / MINUTE_MS)

    # Trade probability per slot: quieter during the Korean night (16:00-22:00 UTC).
    hour = (ts // 3_600_000) % 24
    quiet = (hour >= 16) & (hour < 22)
    p_quiet = p_minute * 0.55 if kind == "illiquid" else 1.0 - (1.0 - p_minute) * 5.0
    p = np.where(quiet, p_quiet, p_minute)
    p = np.clip(p, 1e-9, 1.0)
    p_candle = 1.0 - np.power(1.0 - p, minutes)
    traded = rng.random(n) < p_candle
    if not traded.any():
        traded[n // 2] = True

    if start_price is None:
        if symbol == "KRW-BTC":
            start_price = 50_000_000.0 * float(np.exp(rng.normal(0, 0.1)))
        elif quote == "KRW":
            start_price = float(10 ** rng.uniform(1.5, 6.0))
        elif quote == "BTC":
            start_price = float(10 ** rng.uniform(-7.0, -2.0))
        else:
            start_price = float(10 ** rng.uniform(-2.0, 4.0))
    sigma_min = volatility if volatility is not None else _VOLATILITY[kind]
    sigma = sigma_min * np.sqrt(minutes)
    log_path = np.log(start_price) + np.cumsum(rng.normal(0.0, 1.0, n) * sigma)
    fair = np.exp(log_path)

    idx = np.flatnonzero(traded)
    m = len(idx)
    close = _round_price(fair[idx], quote)
    prev_close = np.empty(m)
    prev_close[0] = _round_price(np.asarray([start_price]), quote)[0]
    prev_close[1:] = close[:-1]
    # The first trade of an interval happens close to the last trade of the previous one.
    open_ = _round_price(prev_close * np.exp(rng.normal(0.0, 0.15, m) * sigma[idx]), quote)
    body_hi = np.maximum(open_, close)
    body_lo = np.minimum(open_, close)
    high = _round_price(body_hi * np.exp(np.abs(rng.normal(0.0, 0.6, m)) * sigma[idx]), quote)
    low = _round_price(body_lo * np.exp(-np.abs(rng.normal(0.0, 0.6, m)) * sigma[idx]), quote)
    if kind == "illiquid":
        # A thin market's candle is often a single trade: open = high = low = close.
        single = rng.random(m) < 0.35
        open_ = np.where(single, close, open_)
        high = np.where(single, close, high)
        low = np.where(single, close, low)
    high = np.maximum(high, np.maximum(open_, close))
    low = np.minimum(low, np.minimum(open_, close))

    value_target = _VALUE_PER_MINUTE[kind] * minutes[idx] * rng.lognormal(0.0, 0.8, m)
    volume = np.maximum(np.round(value_target / close, 8), 1e-8)
    vwap = low + (high - low) * rng.random(m)
    value = np.round(volume * vwap, 8)

    out = np.zeros(m, dtype=CANDLE_DTYPE)
    out["ts"] = ts[idx]
    out["open"] = open_
    out["high"] = high
    out["low"] = low
    out["close"] = close
    out["volume"] = volume
    out["value"] = value
    return out


# ---------------------------------------------------------------------------------------------
# Faults and the request log
# ---------------------------------------------------------------------------------------------


def dense_candles(n: int, start: int, step: int = 60_000, seed: int = 0) -> np.ndarray:
    """``n`` valid candles every ``step`` ms from ``start``, no gaps: a seeded random walk with
    KRW-BTC-like prices on a 1,000-won tick (for benchmarks and bulk tests; see
    :func:`generate_market` for markets with no-trade intervals)."""
    rng = np.random.default_rng(seed)
    a = np.zeros(n, CANDLE_DTYPE)
    a["ts"] = start + np.arange(n, dtype=np.int64) * step
    p = np.round(5e7 * np.exp(np.cumsum(rng.normal(0, 8e-4, n))), -3)
    a["open"] = p
    a["close"] = np.round(p * (1 + rng.normal(0, 6e-4, n)), -3)
    a["high"] = np.maximum(a["open"], a["close"]) + 1000 * rng.integers(0, 20, n)
    a["low"] = np.minimum(a["open"], a["close"]) - 1000 * rng.integers(0, 20, n)
    a["volume"] = np.round(rng.exponential(3, n), 8)
    a["value"] = a["volume"] * p
    return a


def kernel_modules() -> dict[str, Any]:
    """Both kernel implementations by name, for tests and benchmarks that compare them:
    ``"numpy"`` (the twin, always there) and ``"cython"`` (None when the core is not built)."""
    from mds import _pycore

    try:
        from mds import _core
    except ImportError:
        return {"numpy": _pycore, "cython": None}
    return {"numpy": _pycore, "cython": _core}


def kernel_params() -> list[Any]:
    """:func:`kernel_modules` as ``pytest.param`` values (ids ``numpy``, ``cython``), the compiled
    one skipped when it is not built: parametrise a test or benchmark over both kernels."""
    import pytest

    return [
        pytest.param(mod, id=name, marks=() if mod is not None else pytest.mark.skip(reason="compiled core not built"))
        for name, mod in kernel_modules().items()
    ]


@dataclass
class Fault:
    """One injected misbehaviour of :class:`FakeUpbit` (see :data:`FAULT_KINDS`).

    Attributes
    ----------
    kind : str
    times : int or None
        How many matching requests it still applies to; None means until cleared.
    path_prefix : str or None
        Only requests whose path starts with this (``"/v1/candles"``); None matches all.
    seconds : float
        Latency to add (``latency``).
    status : int
        HTTP status for ``status`` faults.
    message : str
        Error message for ``status`` and ``blocked`` faults.
    market : str or None
        Market code used by ``wrong_market``.
    hits : int
        How many requests it has applied to so far.
    """

    kind: str
    times: int | None = None
    path_prefix: str | None = None
    seconds: float = 0.0
    status: int = 500
    message: str = ""
    market: str | None = None
    hits: int = 0

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise InvalidRequestError(f"unknown fault kind {self.kind!r}; use one of {', '.join(FAULT_KINDS)}")
        if self.times is not None and self.times < 0:
            raise InvalidRequestError("Fault.times must be >= 0 or None")

    @property
    def active(self) -> bool:
        """Whether it still applies to future requests."""
        return self.times is None or self.times > 0

    def matches(self, path: str) -> bool:
        return self.active and (self.path_prefix is None or path.startswith(self.path_prefix))

    def consume(self) -> None:
        self.hits += 1
        if self.times is not None:
            self.times -= 1


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One request served by :class:`FakeUpbit`, whatever its status."""

    path: str
    params: dict[str, str]
    status: int
    group: str | None
    received: float  # time.monotonic() when it arrived
    faults: tuple[str, ...] = ()


@dataclass
class _Reply:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    truncate: bool = False
    faults: tuple[str, ...] = ()
    delay: float = 0.0


# ---------------------------------------------------------------------------------------------
# JSON in Upbit's number forms
# ---------------------------------------------------------------------------------------------


def _num(x: float) -> str:
    if not math.isfinite(x):
        return "null"
    s = f"{x:.8f}"
    # Upbit prints 8 decimals; keep the exact value when 8 decimals would round it.
    return s if float(s) == x else repr(float(x))


def _prepare(obj: Any) -> Any:
    # Floats become marked strings that upbit_json unquotes after the C encoder has run.
    t = type(obj)
    if t is float or isinstance(obj, np.floating):
        return "\x00" + _num(float(obj)) + "\x01"
    if t is dict:
        return {k: _prepare(v) for k, v in obj.items()}
    if t is list:
        return [_prepare(v) for v in obj]
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def upbit_json(obj: Any) -> bytes:
    """Serialise like Upbit: minified, floats with 8 decimals (``37270000.00000000``)."""
    text = json.dumps(_prepare(obj), separators=(",", ":"))
    return text.replace('"\\u0000', "").replace('\\u0001"', "").encode()


def _error_body(name: str | int, message: str) -> bytes:
    return json.dumps({"error": {"name": name, "message": message}}).encode()


# ---------------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    fake: FakeUpbit


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    server_version = "FakeUpbit/1.0"

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in two writes; without TCP_NODELAY, Nagle plus delayed ACKs
        # add ~40 ms to every keep-alive response.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.fake._track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.fake._track(self.connection, False)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("fake upbit: " + format, *args)

    def do_GET(self) -> None:
        fake = self.server.fake
        received = time.monotonic()
        parts = urlsplit(self.path)
        params = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        reply = fake._serve(parts.path, params)
        # Logged before any injected latency, so a client that timed out still sees it counted.
        fake._log(RequestRecord(parts.path, params, reply.status, _group(parts.path), received, reply.faults))
        if reply.delay:
            fake._closing.wait(reply.delay)
        try:
            self.send_response(reply.status)
            ctype = "application/json; charset=utf-8" if reply.body[:1] in (b"[", b"{") else "text/plain"
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(reply.body)))
            for k, v in reply.headers.items():
                self.send_header(k, v)
            if reply.truncate:
                self.send_header("Connection", "close")
            self.end_headers()
            if reply.truncate:
                self.wfile.write(reply.body[: len(reply.body) // 2])
                self.wfile.flush()
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)
            else:
                self.wfile.write(reply.body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True


def _group(path: str) -> str | None:
    for prefix, name in _GROUPS:
        if path.startswith(prefix) or path == prefix.rstrip("/"):
            return name
    return None


def _parse_to(value: str) -> int:
    """Upbit's ``to``: ``...Z``, ``YYYY-MM-DD HH:MM:SS`` (UTC) or with an offset (``+09:00``)."""
    text = value.strip()
    if not text:
        raise InvalidRequestError("empty to")
    return to_ms(text, name="to")


class FakeUpbit:
    """A local Upbit quotation API on 127.0.0.1 for tests, benchmarks and the demo.

    Serves ``/v1/candles/{seconds,minutes/N,days,weeks,months}``, ``/v1/ticker``,
    ``/v1/orderbook`` and ``/v1/trades/ticks`` from the arrays it holds, as Upbit does: Upbit
    field names and number forms, newest first, ``count`` 1..200 (default 1), ``to`` exclusive
    in its three accepted forms (``...Z``, zone-less UTC, ``+09:00``), only the candles it holds
    (no candle for an interval without trades), ``Remaining-Req: group=candles; min=600; sec=N``
    headers and HTTP 429 past ``rate_limit`` requests per ``rate_window_s`` per group.

    Parameters
    ----------
    candles : mapping, optional
        ``{(symbol, timeframe): CANDLE_DTYPE array}``; any order, duplicates: last wins.
    clock : callable, optional
        Returns epoch ms. When given, only candles that opened by then are served and the newest
        one, if its interval is still running, is served partial: its volume and value scaled by
        the elapsed share of the interval and its close moved towards the final close by the
        same share (high and low stay consistent). Tickers, orderbooks and trades follow it too.
    tickers, orderbooks : mapping, optional
        ``{symbol: dict}`` in Upbit field names, served as given. Otherwise they are derived from
        the newest candle of the symbol's finest held series.
    trades : mapping, optional
        ``{symbol: TRADE_DTYPE array}``. Otherwise derived from the newest candle.
    faults : iterable of Fault, optional
        Faults active from the start (see :meth:`inject`).
    rate_limit : int or None
        Requests allowed per group in any ``rate_window_s`` window (Upbit: 10 per second).
        None disables rate limiting.
    rate_window_s : float
        The sliding window. Tests may shrink it (with the router's matching setting) to keep
        bursts fast while exercising the same logic.

    Notes
    -----
    Use it as a context manager (``with FakeUpbit(...) as up: up.base_url``); the server runs
    in a daemon thread and is stopped on exit. Thread-safe: data and faults may be changed while
    it serves. Trades ignore ``to``/``cursor``/``days_ago``; ``/v1/candles/years`` is not served.
    """

    def __init__(
        self,
        candles: Mapping[tuple[str, str], np.ndarray] | None = None,
        clock: Callable[[], int] | None = None,
        *,
        tickers: Mapping[str, Mapping[str, Any]] | None = None,
        orderbooks: Mapping[str, Mapping[str, Any]] | None = None,
        trades: Mapping[str, np.ndarray] | None = None,
        faults: Iterable[Fault] | None = None,
        rate_limit: int | None = 10,
        rate_window_s: float = 1.0,
    ) -> None:
        self.clock = clock
        self.rate_limit = rate_limit
        self.rate_window_s = float(rate_window_s)
        self._lock = threading.RLock()
        self._candles: dict[tuple[str, str], np.ndarray] = {}
        for (sym, tf), arr in (candles or {}).items():
            self.set_candles(sym, tf, arr)
        self._tickers = {validate_symbol(k): dict(v) for k, v in (tickers or {}).items()}
        self._orderbooks = {validate_symbol(k): dict(v) for k, v in (orderbooks or {}).items()}
        self._trades: dict[str, np.ndarray] = {}
        for sym, arr in (trades or {}).items():
            a = np.asarray(arr)
            if a.dtype != TRADE_DTYPE:
                raise InvalidRequestError("trades must be TRADE_DTYPE arrays")
            self._trades[validate_symbol(sym)] = np.sort(a.copy(), order="ts", kind="stable")
        self._faults: list[Fault] = list(faults or [])
        self._log_records: list[RequestRecord] = []
        self._windows: dict[str, collections.deque[float]] = collections.defaultdict(collections.deque)
        self._conns: set[socket.socket] = set()
        self._closing = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._shuffle_rng = np.random.default_rng(12345)

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> FakeUpbit:
        """Start serving (idempotent). Returns self."""
        if self._server is not None:
            return self
        self._closing.clear()
        server = _Server(("127.0.0.1", 0), _Handler)
        server.fake = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="FakeUpbit", daemon=True
        )
        self._thread.start()
        logger.debug("FakeUpbit serving on %s", self.base_url)
        return self

    def close(self) -> None:
        """Stop the server and drop open connections (idempotent)."""
        server, self._server = self._server, None
        if server is None:
            return
        self._closing.set()
        server.shutdown()
        server.server_close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FakeUpbit:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT`` (no trailing slash, no ``/v1``)."""
        if self._server is None:
            raise RuntimeError("FakeUpbit is not running; use it as a context manager or call start()")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            if add:
                self._conns.add(conn)
            else:
                self._conns.discard(conn)

    # -- data ------------------------------------------------------------------------------
    def set_candles(self, symbol: str, timeframe: str | Timeframe, candles: np.ndarray) -> None:
        """Replace the series ``(symbol, timeframe)`` with ``candles`` (sorted, last duplicate wins)."""
        sym = validate_symbol(symbol)
        tf = parse_timeframe(timeframe)
        arr = np.asarray(candles)
        if arr.dtype != CANDLE_DTYPE:
            raise InvalidRequestError("candles must be a CANDLE_DTYPE array")
        arr = arr[::-1]
        _, first = np.unique(arr["ts"], return_index=True)  # first in reversed = last given
        clean = np.ascontiguousarray(arr[first])
        with self._lock:
            self._candles[(sym, tf.name)] = clean

    def candles(self, symbol: str, timeframe: str | Timeframe) -> np.ndarray:
        """The full series held (ascending ``ts``), regardless of the clock."""
        tf = parse_timeframe(timeframe)
        with self._lock:
            return self._candles.get((symbol, tf.name), np.zeros(0, dtype=CANDLE_DTYPE)).copy()

    def now(self) -> int:
        """The fake's time: ``clock()`` or the wall clock."""
        return int(self.clock()) if self.clock is not None else now_ms()

    # -- faults ----------------------------------------------------------------------------
    def inject(
        self,
        kind: str,
        *,
        times: int | None = None,
        path_prefix: str | None = None,
        seconds: float = 0.0,
        status: int = 500,
        message: str = "",
        market: str | None = None,
    ) -> Fault:
        """Make the next ``times`` matching requests (all while active if None) misbehave.

        ``kind`` is one of :data:`FAULT_KINDS`. A request can get one ``latency`` fault plus one
        other fault; faults apply in the order injected. Returns the :class:`Fault`, whose
        ``hits`` counts how often it applied.
        """
        f = Fault(kind, times, path_prefix, seconds, status, message, market)
        with self._lock:
            self._faults.append(f)
        return f

    def clear_faults(self, kind: str | None = None) -> None:
        """Remove every fault, or only those of ``kind``."""
        with self._lock:
            self._faults = [f for f in self._faults if kind is not None and f.kind != kind]

    @property
    def faults(self) -> list[Fault]:
        """The faults still active."""
        with self._lock:
            return [f for f in self._faults if f.active]

    # -- request log -------------------------------------------------------------------------
    def _log(self, rec: RequestRecord) -> None:
        with self._lock:
            self._log_records.append(rec)

    def requests(self, path_prefix: str | None = None) -> list[RequestRecord]:
        """Requests served so far (whatever their status), optionally those under ``path_prefix``."""
        with self._lock:
            recs = list(self._log_records)
        return recs if path_prefix is None else [r for r in recs if r.path.startswith(path_prefix)]

    def request_count(self, path_prefix: str | None = None) -> int:
        """How many requests were served (whatever their status), optionally under ``path_prefix``."""
        return len(self.requests(path_prefix))

    def status_counts(self, path_prefix: str | None = None) -> dict[int, int]:
        """``{status: count}`` over the request log."""
        return dict(collections.Counter(r.status for r in self.requests(path_prefix)))

    def reset_log(self) -> None:
        """Forget the request log (the rate-limit windows are kept)."""
        with self._lock:
            self._log_records.clear()

    # -- dispatch ----------------------------------------------------------------------------
    def _remaining(self, group: str, left: int) -> dict[str, str]:
        if self.rate_limit is None:
            return {}  # unlimited: a budget header would make a fast client wait for nothing
        return {"Remaining-Req": f"group={group}; min=600; sec={max(0, left)}", "Limit-By-Ip": "Yes"}

    def _admit(self, group: str) -> int | None:
        """Count a request against its group's window; None when over the limit (429)."""
        if self.rate_limit is None:
            return 10
        now = time.monotonic()
        with self._lock:
            win = self._windows[group]
            while win and win[0] <= now - self.rate_window_s:
                win.popleft()
            if len(win) >= self.rate_limit:
                return None
            win.append(now)
            return self.rate_limit - len(win)

    def _serve(self, path: str, params: dict[str, str]) -> _Reply:
        group = _group(path)
        if group is None:
            return _Reply(404, _error_body(404, f"Not found: {path}"))
        left = self._admit(group)
        if left is None:
            return _Reply(429, _TOO_MANY, self._remaining(group, 0))
        headers = self._remaining(group, left)
        latency = 0.0
        terminal: Fault | None = None
        with self._lock:
            for f in self._faults:
                if not f.matches(path):
                    continue
                if f.kind == "latency":
                    latency += f.seconds
                    f.consume()
                elif terminal is None:
                    terminal = f
                    f.consume()
        applied = tuple(k for k in (("latency",) if latency else ()) + ((terminal.kind,) if terminal else ()))
        reply = self._reply(path, params, group, headers, terminal, applied)
        reply.delay = latency
        return reply

    def _reply(
        self,
        path: str,
        params: dict[str, str],
        group: str,
        headers: dict[str, str],
        terminal: Fault | None,
        applied: tuple[str, ...],
    ) -> _Reply:
        if terminal is not None:
            if terminal.kind == "rate_limit":
                return _Reply(429, _TOO_MANY, self._remaining(group, 0), faults=applied)
            if terminal.kind == "blocked":
                msg = terminal.message or "Too many requests. You are blocked for 60 seconds."
                return _Reply(418, _error_body("too_many_requests", msg), headers, faults=applied)
            if terminal.kind == "status":
                msg = terminal.message or f"Injected HTTP {terminal.status}"
                return _Reply(terminal.status, _error_body(terminal.status, msg), headers, faults=applied)
        try:
            status, payload = self._route(path, params)
        except _NotFound as exc:
            return _Reply(404, _error_body(404, str(exc)), headers, faults=applied)
        except InvalidRequestError as exc:
            return _Reply(400, _error_body(400, str(exc)), headers, faults=applied)
        if status != 200:
            return _Reply(status, _error_body(status, str(payload)), headers, faults=applied)
        if terminal is not None and isinstance(payload, list):
            payload = self._mangle(terminal, payload)
        body = upbit_json(payload)
        if terminal is not None and terminal.kind == "malformed_json":
            body = body[: max(1, len(body) // 2)] + b"<html>"
        return _Reply(
            200, body, headers, truncate=terminal is not None and terminal.kind == "truncated", faults=applied
        )

    def _mangle(self, f: Fault, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if not rows:
            return rows
        if f.kind == "wrong_market":
            own = rows[0].get("market")
            other = f.market or ("KRW-XRP" if own != "KRW-XRP" else "KRW-ETH")
            return [{**r, "market": other} for r in rows]
        if f.kind == "duplicate_rows":
            return [rows[0], *rows, rows[-1]] if len(rows) > 1 else [rows[0], rows[0]]
        if f.kind == "short_page":
            return rows[: max(1, len(rows) // 2)]
        if f.kind == "unordered_rows":
            order = self._shuffle_rng.permutation(len(rows))
            if len(rows) > 1 and (order == np.arange(len(rows))).all():
                order = order[::-1]
            return [rows[i] for i in order]
        return rows

    def _route(self, path: str, params: dict[str, str]) -> tuple[int, Any]:
        if path.startswith("/v1/candles/"):
            return self._candles_endpoint(path[len("/v1/candles/") :], params)
        if path == "/v1/ticker":
            return 200, [self._ticker(s) for s in self._markets_param(params)]
        if path == "/v1/orderbook":
            count = _int_param(params, "count", 30, 1, 30)
            return 200, [self._orderbook(s, count) for s in self._markets_param(params)]
        if path == "/v1/trades/ticks":
            sym = self._market_param(params)
            count = _int_param(params, "count", 1, 1, 500)
            return 200, self._trades_for(sym, count)
        return 404, f"Not found: {path}"

    def _known(self, sym: str) -> bool:
        with self._lock:
            return (
                any(k[0] == sym for k in self._candles)
                or sym in self._tickers
                or sym in self._orderbooks
                or sym in self._trades
            )

    def _market_param(self, params: dict[str, str]) -> str:
        sym = params.get("market")
        if not sym:
            raise InvalidRequestError("market is required")
        if not self._known(sym):
            raise _NotFound("Code not found")
        return sym

    def _markets_param(self, params: dict[str, str]) -> list[str]:
        raw = params.get("markets")
        if not raw:
            raise InvalidRequestError("markets is required")
        syms = [s.strip() for s in raw.split(",") if s.strip()]
        if not syms or any(not self._known(s) for s in syms):
            raise _NotFound("Code not found")
        return syms

    # -- candles -------------------------------------------------------------------------------
    def _visible(self, sym: str, tf: Timeframe, to: int | None) -> tuple[np.ndarray, int | None]:
        """Candles with ts < to that opened by now; and the forming candle's index (or None)."""
        with self._lock:
            arr = self._candles.get((sym, tf.name))
        if arr is None or len(arr) == 0:
            return np.zeros(0, dtype=CANDLE_DTYPE), None
        bound = to if to is not None else None
        now = self.now() if self.clock is not None else None
        if now is not None:
            bound = now + 1 if bound is None else min(bound, now + 1)
        hi = len(arr) if bound is None else int(np.searchsorted(arr["ts"], bound, side="left"))
        vis = arr[:hi]
        forming = None
        if now is not None and hi > 0 and now < tf.add(int(vis["ts"][-1]), 1):
            forming = hi - 1
        return vis, forming

    def _partial(self, row: np.void, tf: Timeframe, now: int) -> np.ndarray:
        ts = int(row["ts"])
        span = tf.add(ts, 1) - ts
        share = min(1.0, max(0.0, (now - ts + 1) / span))
        out = np.array([row], dtype=CANDLE_DTYPE)[0]
        o, c = float(row["open"]), float(row["close"])
        c2 = o + (c - o) * share
        out["close"] = c2
        out["high"] = max(o, c2) + (float(row["high"]) - max(o, c)) * share
        out["low"] = min(o, c2) - (min(o, c) - float(row["low"])) * share
        out["volume"] = float(row["volume"]) * share
        out["value"] = float(row["value"]) * share
        return out

    def _candles_endpoint(self, sub: str, params: dict[str, str]) -> tuple[int, Any]:
        if sub.startswith("minutes/"):
            try:
                unit = int(sub[len("minutes/") :])
            except ValueError:
                return 404, f"Not found: minutes unit {sub!r}"
            if unit not in _MINUTE_UNITS:
                raise InvalidRequestError(f"unit must be one of {_MINUTE_UNITS}")
            tf = parse_timeframe(f"{unit}m")
        elif sub in _PATH_TIMEFRAME:
            tf = parse_timeframe(_PATH_TIMEFRAME[sub])
        else:
            return 404, f"Not found: /v1/candles/{sub}"
        sym = self._market_param(params)
        count = _int_param(params, "count", 1, 1, 200)
        to = _parse_to(params["to"]) if "to" in params else None
        vis, forming = self._visible(sym, tf, to)
        if len(vis) == 0:
            return 200, []
        lo = max(0, len(vis) - count)
        page = vis[lo:][::-1].copy()
        now = self.now()
        if forming is not None and forming >= lo:
            page[0] = self._partial(page[0], tf, now)
        return 200, self._candle_rows(sym, tf, page, vis, lo, now if forming is not None else None)

    def _candle_rows(
        self, sym: str, tf: Timeframe, page: np.ndarray, vis: np.ndarray, lo: int, now: int | None
    ) -> list[dict[str, Any]]:
        ts = page["ts"].astype(np.int64)
        nxt = np.asarray([tf.add(int(t), 1) for t in ts], dtype=np.int64) if tf.is_month else ts + tf.interval_ms
        last_tick = ts + (nxt - ts) * 9 // 10
        if now is not None and len(ts):
            last_tick[0] = min(int(last_tick[0]), now)
        utc = np.datetime_as_string(ts.astype("datetime64[ms]").astype("datetime64[s]")).tolist()
        kst = np.datetime_as_string((ts + _KST_MS).astype("datetime64[ms]").astype("datetime64[s]")).tolist()
        rows: list[dict[str, Any]] = []
        # Previous closes for day candles: the candle before each row in the held series.
        prev = None
        if tf.name == "1d":
            closes = vis["close"]
            pos = np.arange(len(vis) - 1, lo - 1, -1)
            prev = np.where(pos > 0, closes[np.maximum(pos - 1, 0)], vis["open"][pos])
        for i in range(len(page)):
            r = page[i]
            row: dict[str, Any] = {
                "market": sym,
                "candle_date_time_utc": utc[i],
                "candle_date_time_kst": kst[i],
                "opening_price": float(r["open"]),
                "high_price": float(r["high"]),
                "low_price": float(r["low"]),
                "trade_price": float(r["close"]),
                "timestamp": int(last_tick[i]),
                "candle_acc_trade_price": float(r["value"]),
                "candle_acc_trade_volume": float(r["volume"]),
            }
            if tf.minutes_unit is not None:
                row["unit"] = tf.minutes_unit
            elif prev is not None:
                pc = float(prev[i])
                row["prev_closing_price"] = pc
                row["change_price"] = float(r["close"]) - pc
                row["change_rate"] = (float(r["close"]) - pc) / pc if pc else 0.0
            elif tf.name in ("1w", "1M"):
                row["first_day_of_period"] = utc[i][:10]
            rows.append(row)
        return rows

    # -- realtime --------------------------------------------------------------------------------
    def _finest(self, sym: str) -> tuple[np.ndarray, Timeframe] | None:
        with self._lock:
            keys = [k for k in self._candles if k[0] == sym and len(self._candles[k])]
        if not keys:
            return None
        tfs = sorted((parse_timeframe(k[1]) for k in keys), key=lambda t: t.interval_ms)
        for tf in tfs:
            vis, forming = self._visible(sym, tf, None)
            if len(vis):
                if forming is not None:
                    vis = vis.copy()
                    vis[-1] = self._partial(vis[-1], tf, self.now())
                return vis, tf
        return None

    def _ticker(self, sym: str) -> dict[str, Any]:
        if sym in self._tickers:
            return dict(self._tickers[sym])
        now = self.now()
        found = self._finest(sym)
        if found is None:
            raise _NotFound("Code not found")
        vis, tf = found
        last = vis[-1]
        day0 = int(last["ts"]) - int(last["ts"]) % DAY_MS
        today = vis[vis["ts"] >= day0]
        before = vis[vis["ts"] < day0]
        day24 = vis[vis["ts"] >= int(last["ts"]) - DAY_MS + tf.interval_ms]
        year = vis[vis["ts"] >= int(last["ts"]) - 364 * DAY_MS]
        price = float(last["close"])
        prev_close = float(before["close"][-1]) if len(before) else float(today["open"][0])
        change = price - prev_close
        trade_ts = min(now, tf.add(int(last["ts"]), 1) - 1)
        tdt = _dt.datetime.fromtimestamp(trade_ts / 1000, tz=_dt.timezone.utc)
        kdt = tdt + _dt.timedelta(hours=9)
        hi_i, lo_i = int(np.argmax(year["high"])), int(np.argmin(year["low"]))
        return {
            "market": sym,
            "trade_date": tdt.strftime("%Y%m%d"),
            "trade_time": tdt.strftime("%H%M%S"),
            "trade_date_kst": kdt.strftime("%Y%m%d"),
            "trade_time_kst": kdt.strftime("%H%M%S"),
            "trade_timestamp": trade_ts,
            "opening_price": float(today["open"][0]),
            "high_price": float(today["high"].max()),
            "low_price": float(today["low"].min()),
            "trade_price": price,
            "prev_closing_price": prev_close,
            "change": "RISE" if change > 0 else ("FALL" if change < 0 else "EVEN"),
            "change_price": abs(change),
            "change_rate": abs(change) / prev_close if prev_close else 0.0,
            "signed_change_price": change,
            "signed_change_rate": change / prev_close if prev_close else 0.0,
            "trade_volume": round(float(last["volume"]) / 7.0, 8),
            "acc_trade_price": float(today["value"].sum()),
            "acc_trade_price_24h": float(day24["value"].sum()),
            "acc_trade_volume": float(today["volume"].sum()),
            "acc_trade_volume_24h": float(day24["volume"].sum()),
            "highest_52_week_price": float(year["high"][hi_i]),
            "highest_52_week_date": iso_utc(int(year["ts"][hi_i]))[:10],
            "lowest_52_week_price": float(year["low"][lo_i]),
            "lowest_52_week_date": iso_utc(int(year["ts"][lo_i]))[:10],
            "timestamp": now,
        }

    def _orderbook(self, sym: str, count: int) -> dict[str, Any]:
        if sym in self._orderbooks:
            return dict(self._orderbooks[sym])
        now = self.now()
        found = self._finest(sym)
        if found is None:
            raise _NotFound("Code not found")
        price = float(found[0]["close"][-1])
        quote = sym.split("-", 1)[0]
        tick = float(krw_tick_size(price)) if quote == "KRW" else max(1e-8, round(price * 1e-4, 8))
        best_bid = math.floor(price / tick) * tick
        rng = np.random.default_rng([zlib.crc32(sym.encode()), now // 1000 & 0xFFFFFFFF])
        asks = np.round(rng.lognormal(-1.0, 1.0, count), 8)
        bids = np.round(rng.lognormal(-1.0, 1.0, count), 8)
        units = [
            {
                "ask_price": round(best_bid + tick * (i + 1), 8),
                "bid_price": round(best_bid - tick * i, 8),
                "ask_size": float(asks[i]),
                "bid_size": float(bids[i]),
            }
            for i in range(count)
        ]
        return {
            "market": sym,
            "timestamp": now,
            "total_ask_size": round(float(asks.sum()), 8),
            "total_bid_size": round(float(bids.sum()), 8),
            "orderbook_units": units,
            "level": 0,
        }

    def _trades_for(self, sym: str, count: int) -> list[dict[str, Any]]:
        now = self.now()
        with self._lock:
            arr = self._trades.get(sym)
        if arr is None:
            found = self._finest(sym)
            if found is None:
                return []
            arr = _trades_from_candle(found[0][-1], found[1], now)
        elif self.clock is not None:
            arr = arr[arr["ts"] <= now]
        rows = arr[::-1][:count]
        prev_close = float(rows["price"][-1]) if len(rows) else 0.0
        out = []
        for t in rows:
            tdt = _dt.datetime.fromtimestamp(int(t["ts"]) / 1000, tz=_dt.timezone.utc)
            out.append(
                {
                    "market": sym,
                    "trade_date_utc": tdt.strftime("%Y-%m-%d"),
                    "trade_time_utc": tdt.strftime("%H:%M:%S"),
                    "timestamp": int(t["ts"]),
                    "trade_price": float(t["price"]),
                    "trade_volume": float(t["volume"]),
                    "prev_closing_price": prev_close,
                    "change_price": float(t["price"]) - prev_close,
                    "ask_bid": "BID" if int(t["side"]) > 0 else "ASK",
                    "sequential_id": int(t["sequential_id"]),
                }
            )
        return out


def _trades_from_candle(row: np.void, tf: Timeframe, now: int) -> np.ndarray:
    ts = int(row["ts"])
    end = min(now, tf.add(ts, 1) - 1)
    n = 20
    rng = np.random.default_rng([ts & 0xFFFFFFFF, 7])
    out = np.zeros(n, dtype=TRADE_DTYPE)
    out["ts"] = np.sort(rng.integers(ts, max(ts + 1, end + 1), n))
    lo, hi = float(row["low"]), float(row["high"])
    prices = lo + (hi - lo) * rng.random(n)
    out["price"] = np.clip(np.round(prices / krw_tick_size(prices)) * krw_tick_size(prices), lo, hi)
    out["price"][-1] = float(row["close"])
    out["volume"] = np.round(max(float(row["volume"]), 1e-8) / n * rng.random(n) * 2, 8)
    out["side"] = np.where(rng.random(n) < 0.5, 1, -1)
    out["sequential_id"] = out["ts"] * 1000 + np.arange(n)
    return out


class _NotFound(InvalidRequestError):
    pass


def _int_param(params: dict[str, str], name: str, default: int, lo: int, hi: int) -> int:
    raw = params.get(name)
    if raw is None or raw == "":
        return default
    try:
        v = int(raw)
    except ValueError:
        raise InvalidRequestError(f"{name} must be an integer") from None
    if not lo <= v <= hi:
        raise InvalidRequestError(f"{name} must be in {lo}..{hi}")
    return v
