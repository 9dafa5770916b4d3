"""A local Upbit for tests, benchmarks and the demo.

:class:`FakeUpbit` is a real HTTP server on 127.0.0.1 (ephemeral port, background thread) that
serves Upbit's quotation endpoints from arrays it is given, with Upbit's field names, number
forms, ordering, ``count``/``to`` semantics, ``Remaining-Req`` headers and 429 rate limiting, plus
injectable faults. What it serves is built by :mod:`mds.testing._quotation`.

Nothing here touches the network beyond the loopback interface.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np

from mds.errors import InvalidRequestError
from mds.testing._quotation import Quotation, _NotFound
from mds.timeframes import Timeframe

__all__ = ["FAULT_KINDS", "FakeUpbit", "Fault", "RequestRecord"]

logger = logging.getLogger(__name__)

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


class FakeUpbit:
    """A local Upbit quotation API on 127.0.0.1 for tests, benchmarks and the demo.

    Serves ``/v1/market/all`` (every market it holds; ``is_details=true`` adds
    ``market_warning`` and ``market_event``), ``/v1/candles/{seconds,minutes/N,days,weeks,months}``,
    ``/v1/ticker``, ``/v1/ticker/all``, ``/v1/orderbook`` and ``/v1/trades/ticks`` from the arrays
    it holds, as Upbit does: Upbit
    field names and number forms, newest first, ``count`` 1..200 (default 1), ``to`` exclusive
    in its three accepted forms (``...Z``, zone-less UTC, ``+09:00``), only the candles it holds
    (no candle for an interval without trades), ``Remaining-Req: group=candles; min=600; sec=N``
    headers and HTTP 429 past ``rate_limit`` requests per ``rate_window_s`` per group (418, a
    block, after repeated 429s).

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
    ban_after, ban_window_s, ban_s : int or None, float, float
        As Upbit, a client that keeps sending after 429s is blocked: after ``ban_after`` 429s
        over the limit (any group) within ``ban_window_s`` seconds, every request gets 418 with
        a message naming the seconds left, for ``ban_s`` seconds. Every client of the fake is one
        IP (127.0.0.1), as every process of a machine is to Upbit. Injected ``rate_limit``
        faults do not count. None disables the block.
    port : int
        The port on 127.0.0.1 (default 0: any free port; :attr:`base_url` tells which).
    ws_connect_limit : int or None
        WebSocket handshakes accepted per second (Upbit: 5 per IP); beyond, HTTP 429.
    ws_idle_close_s : float or None
        The WebSocket endpoint closes a connection silent for this long (Upbit: about 120 s).

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
        ban_after: int | None = 10,
        ban_window_s: float = 10.0,
        ban_s: float = 60.0,
        port: int = 0,
        ws_connect_limit: int | None = 5,
        ws_idle_close_s: float | None = 120.0,
    ) -> None:
        if not 0 <= int(port) <= 65535:
            raise InvalidRequestError(f"port must be 0 (any free port) to 65535, not {port}")
        self.port = int(port)
        self.rate_limit = rate_limit
        self.rate_window_s = float(rate_window_s)
        if ban_after is not None and ban_after < 1:
            raise InvalidRequestError(f"ban_after must be >= 1 or None, not {ban_after}")
        self.ban_after = ban_after
        self.ban_window_s = float(ban_window_s)
        self.ban_s = float(ban_s)
        self._strikes: collections.deque[float] = collections.deque()  # 429s over the limit
        self._blocked_until = 0.0  # time.monotonic() when the block ends
        self._lock = threading.RLock()
        self._quotation = Quotation(candles, clock, tickers, orderbooks, trades)
        self._faults: list[Fault] = list(faults or [])
        self._log_records: list[RequestRecord] = []
        self._windows: dict[str, collections.deque[float]] = collections.defaultdict(collections.deque)
        self._conns: set[socket.socket] = set()
        self._closing = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._shuffle_rng = np.random.default_rng(12345)
        from mds.testing._stream import FakeStream  # it builds on this module's Fault

        #: The WebSocket endpoint (faults, connection log); serving from the first ``ws_url``.
        self.ws = FakeStream(self._quotation, upbit_json, connect_limit=ws_connect_limit, idle_close_s=ws_idle_close_s)

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> FakeUpbit:
        """Start serving (idempotent). Returns self."""
        if self._server is not None:
            return self
        self._closing.clear()
        server = _Server(("127.0.0.1", self.port), _Handler)
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
        self.ws.close()
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

    @property
    def ws_url(self) -> str:
        """``ws://127.0.0.1:PORT/websocket/v1``: Upbit's quotation stream over the same data and
        clock (:mod:`mds.testing._stream`), started on first use and stopped by :meth:`close`."""
        if self._server is None:
            raise RuntimeError("FakeUpbit is not running; use it as a context manager or call start()")
        return self.ws.start().url

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            if add:
                self._conns.add(conn)
            else:
                self._conns.discard(conn)

    # -- data ------------------------------------------------------------------------------
    @property
    def clock(self) -> Callable[[], int] | None:
        """The ``clock`` given (epoch ms), or None for the wall clock; may be replaced."""
        return self._quotation.clock

    @clock.setter
    def clock(self, clock: Callable[[], int] | None) -> None:
        self._quotation.clock = clock

    def set_candles(self, symbol: str, timeframe: str | Timeframe, candles: np.ndarray) -> None:
        """Replace the series ``(symbol, timeframe)`` with ``candles`` (sorted, last duplicate wins)."""
        self._quotation.set_candles(symbol, timeframe, candles)

    def candles(self, symbol: str, timeframe: str | Timeframe) -> np.ndarray:
        """The full series held (ascending ``ts``), regardless of the clock."""
        return self._quotation.candles(symbol, timeframe)

    def now(self) -> int:
        """The fake's time: ``clock()`` or the wall clock."""
        return self._quotation.now()

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

    def _admit(self, group: str) -> int | _Reply:
        """Count a request against its group's window: what is left of it, or the refusal (429
        over the limit; 418 while the IP is blocked after repeated 429s)."""
        if self.rate_limit is None:
            return 10
        now = time.monotonic()
        with self._lock:
            if now < self._blocked_until:
                secs = math.ceil(self._blocked_until - now)
                msg = f"Too many requests. You are blocked for {secs} seconds."
                return _Reply(418, _error_body("too_many_requests", msg))
            win = self._windows[group]
            while win and win[0] <= now - self.rate_window_s:
                win.popleft()
            if len(win) < self.rate_limit:
                win.append(now)
                return self.rate_limit - len(win)
            if self.ban_after is not None:
                strikes = self._strikes
                while strikes and strikes[0] <= now - self.ban_window_s:
                    strikes.popleft()
                strikes.append(now)
                if len(strikes) >= self.ban_after:
                    logger.info("FakeUpbit: %d 429s in %g s; block %g s", len(strikes), self.ban_window_s, self.ban_s)
                    strikes.clear()
                    self._blocked_until = now + self.ban_s
            return _Reply(429, _TOO_MANY, self._remaining(group, 0))

    def _serve(self, path: str, params: dict[str, str]) -> _Reply:
        group = _group(path)
        if group is None:
            return _Reply(404, _error_body(404, f"Not found: {path}"))
        left = self._admit(group)
        if isinstance(left, _Reply):
            return left  # 429 over the limit, or 418 while blocked
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
            status, payload = self._quotation.route(path, params)
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
