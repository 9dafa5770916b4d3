"""``SmartRouterConnector``: how mds talks to a Layer 1 (DESIGN.md section 5).

A Layer 1 is any object with the Smart Router's async shape: ``get_candle_data(symbols,
interval, count=200, to=None, use_cache=True)``, ``get_ticker_data(symbols, use_cache=True)``,
``get_orderbook_data(symbols, use_cache=True)``, ``get_trades(symbols, count=100)``, each
returning ``{"success": bool, "data": ..., "metadata": {...}}`` in Upbit REST field names;
optionally ``peek_cache(...)``, ``cache_policy()`` and ``get_performance_summary()`` (sync or
async). The connector turns its answers into numpy arrays and coverage for the store, paginates
candle requests itself (200 a call, exclusive ``to``), and is the one place where a Layer 1's
``success: false``, exceptions, timeouts and malformed payloads become :class:`Layer1Error`.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mds._dtypes import CANDLE_DTYPE, TRADE_DTYPE
from mds.convert import candles_from_upbit
from mds.errors import InvalidCandleError, Layer1Error, MdsError
from mds.layer1._paging import PAGE_SIZE, BadPayload, CandlePages, newest_first, page_ts, paginate_candles
from mds.models import Config, DataType, StorageRequest
from mds.timeframes import Timeframe, parse_timeframe
from mds.timeutil import iso_utc_z, now_ms

__all__ = ["Layer1Answer", "SmartRouterConnector"]

logger = logging.getLogger(__name__)

_MAX_FORWARD_ROUNDS = 64
_CANDLE_KEYS = frozenset(
    (
        "candle_date_time_utc",
        "opening_price",
        "high_price",
        "low_price",
        "trade_price",
        "candle_acc_trade_volume",
        "candle_acc_trade_price",
    )
)


@dataclass(frozen=True, slots=True)
class Layer1Answer:
    """What the connector got from the Layer 1, in the store's terms.

    Attributes
    ----------
    data_type : DataType
    source : str
        ``"layer1_cache"`` (answered by the Layer 1's cache, no network) or ``"layer1_api"``.
    arrays : dict
        Candles: ``{symbol: CANDLE_DTYPE array}`` ascending, unique ``ts``; it may end with the
        still-forming candle (at or after ``covered[symbol][1]``). Trades: ``{symbol:
        TRADE_DTYPE array}`` ascending. Tickers and orderbooks: ``{symbol: dict}`` in Upbit
        field names.
    records : dict
        Trades only: ``{symbol: [Upbit trade dicts]}``, newest first (the arrays drop fields).
    covered : dict
        Candles only: ``{symbol: (start, end)}``; in ``[start, end)`` the array holds every
        candle the source has, so an absent slot there means no trades.
    exhausted : dict
        Candles only: ``{symbol: bool}``, the source has nothing older than the array's first row.
    calls : int
        Layer 1 calls made for this answer.
    latency_ms : float
    """

    data_type: DataType
    source: str
    arrays: dict[str, Any]
    records: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    covered: dict[str, tuple[int, int]] = field(default_factory=dict)
    exhausted: dict[str, bool] = field(default_factory=dict)
    calls: int = 0
    latency_ms: float = 0.0


def _rows_of(payload: Any, what: str) -> list[dict[str, Any]]:
    """The ``data`` of an answer as a flat list of dicts (a ``{symbol: rows}`` dict is flattened)."""
    data = payload
    if isinstance(data, list):
        if not all(isinstance(r, Mapping) for r in data):
            raise BadPayload(f"{what}: data holds something other than objects")
        return [dict(r) for r in data]
    if isinstance(data, Mapping):
        out: list[dict[str, Any]] = []
        for sym, rows in data.items():
            items = [rows] if isinstance(rows, Mapping) else rows
            if not isinstance(items, list) or not all(isinstance(r, Mapping) for r in items):
                raise BadPayload(f"{what}: data[{sym!r}] is not a list of objects")
            out.extend({"market": sym, **dict(r)} for r in items)
        return out
    raise BadPayload(f"{what}: data is {type(data).__name__}, not a list")


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


def _bad_price(p: Any) -> bool:
    """A number that cannot be a price (<= 0, NaN, infinite). Not a number is left to the
    realtime cache's own checks."""
    if isinstance(p, bool) or not isinstance(p, (int, float, np.integer, np.floating)):
        return False
    return not (math.isfinite(p) and p > 0)


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Done callback of an abandoned child task: read its outcome so asyncio logs no
    "exception was never retrieved" for a call whose caller has gone (timeout, cancellation)."""
    if not task.cancelled():
        task.exception()


def _foreign_abort(what: str, exc: BaseException) -> Layer1Error:
    """The Layer1Error for a BaseException (not an Exception) raised by the Layer 1 itself."""
    detail = str(exc)
    return Layer1Error(f"Layer 1 {what} raised {type(exc).__name__}" + (f": {detail}" if detail else ""))


async def _foreign(what: str, timeout_s: float, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``fn(*args, **kwargs)`` of the Layer 1 (awaiting its result if awaitable) in a child
    task, and wait at most ``timeout_s`` for it.

    The Layer 1 is foreign code, and what it raises must end this one call, not the thread that
    runs Layer 1 calls: ``asyncio.CancelledError`` it raises on its own, ``SystemExit``,
    ``KeyboardInterrupt``, ``GeneratorExit`` and any other ``BaseException`` become a
    :class:`Layer1Error` (asyncio would otherwise re-raise SystemExit and KeyboardInterrupt out of
    the event loop, and a stray CancelledError would pass for a cancellation of the caller).

    Only the cancellation of the CALLER's task propagates as ``CancelledError``. Which
    cancellation is which is decided by construction, so it works alike on Python 3.10 (no
    ``Task.cancelling()``) and later: the call runs in a child task that only this function
    cancels (on a timeout, or passing on the caller's cancellation), and it marks when it does;
    a CancelledError that the child sees unmarked was raised by the Layer 1.

    Raises
    ------
    asyncio.TimeoutError
        No answer within ``timeout_s`` (the child is cancelled and left to finish on its own).
    Layer1Error
        The Layer 1 raised a BaseException that is not an Exception, or cancelled its own call.
    Exception
        Whatever Exception the Layer 1 raised, unchanged (callers wrap it).
    """
    ours = False  # set before this function cancels the child: its CancelledError is ours then
    me: list[asyncio.Task[Any]] = []

    async def call() -> Any:
        try:
            return await _maybe_await(fn(*args, **kwargs))
        except Exception:
            raise
        except asyncio.CancelledError as exc:
            if ours:
                raise
            raise _foreign_abort(what, exc) from None
        except GeneratorExit as exc:
            try:
                stepping = asyncio.current_task() is me[0]
            except RuntimeError:  # no running loop: the coroutine is being closed
                stepping = False
            if not stepping:
                raise  # this coroutine is being closed (the loop is going away): let it close
            raise _foreign_abort(what, exc) from exc
        except BaseException as exc:
            raise _foreign_abort(what, exc) from exc

    child = asyncio.ensure_future(call())
    me.append(child)
    child.add_done_callback(_retrieve)
    try:
        done, _ = await asyncio.wait((child,), timeout=timeout_s)
    except BaseException:  # our own task was cancelled while waiting: pass it on to the child
        ours = True
        child.cancel()
        raise
    if not done:
        ours = True
        child.cancel()
        raise asyncio.TimeoutError
    if child.cancelled():  # the Layer 1 cancelled its own task and returned
        raise Layer1Error(f"Layer 1 {what} cancelled its own call")
    return child.result()


class _Stats:
    def __init__(self) -> None:
        self.latency: dict[str, collections.deque[float]] = collections.defaultdict(
            lambda: collections.deque(maxlen=4096)
        )
        self.calls: collections.Counter[str] = collections.Counter()
        self.failures: collections.Counter[str] = collections.Counter()
        self.timeouts = 0
        self.cache_hits: collections.Counter[str] = collections.Counter()
        self.cache_misses: collections.Counter[str] = collections.Counter()


class SmartRouterConnector:
    """Wrap a Layer 1 with the Smart Router's async shape for the store.

    Parameters
    ----------
    layer1 : object
        The Layer 1 (e.g. :class:`mds.layer1.UpbitRouter`).
    timeout_s : float
        Upper bound of one Layer 1 call; exceeding it is a :class:`Layer1Error`.
    config : mds.Config, optional
        mds's own TTLs, the floor of the policy settled by :meth:`sync_cache_policies`.
    clock : callable, optional
        Epoch ms (default: wall clock); decides which interval is still forming.
    page_size : int
        Candles per Layer 1 call (Upbit's maximum, 200).
    """

    def __init__(
        self,
        layer1: Any,
        *,
        timeout_s: float = 30.0,
        config: Config | None = None,
        clock: Callable[[], int] | None = None,
        page_size: int = PAGE_SIZE,
    ) -> None:
        for name in ("get_candle_data", "get_ticker_data", "get_orderbook_data", "get_trades"):
            if not callable(getattr(layer1, name, None)):
                raise TypeError(f"layer1 lacks {name}(); it must have the Smart Router's async shape")
        self.layer1 = layer1
        self.timeout_s = float(timeout_s)
        self.config = config or Config()
        self._clock = clock or now_ms
        self.page_size = int(page_size)
        self._stats = _Stats()
        self.policy: dict[str, Any] | None = None

    # -- the one call path -------------------------------------------------------------------
    async def _call(
        self, kind: str, method: str, *args: Any, check: Callable[[dict[str, Any]], Any], **kwargs: Any
    ) -> tuple[dict[str, Any], Any]:
        """Call ``layer1.method``; return the answer dict and ``check(answer)``, or raise Layer1Error.

        Every failure, including a malformed answer that ``check`` rejects, counts against the
        success rate.
        """
        t0 = time.perf_counter()
        self._stats.calls[kind] += 1
        try:
            result = await _foreign(method, self.timeout_s, getattr(self.layer1, method), *args, **kwargs)
        except asyncio.TimeoutError:
            self._stats.timeouts += 1
            self._stats.failures[kind] += 1
            raise Layer1Error(f"Layer 1 {method} timed out after {self.timeout_s:g} s") from None
        except Layer1Error:
            self._stats.failures[kind] += 1
            raise
        except asyncio.CancelledError:  # only ever our caller's cancellation (see _foreign)
            raise
        except Exception as exc:  # the Layer 1 is foreign code: any failure of it is a Layer1Error
            self._stats.failures[kind] += 1
            raise Layer1Error(f"Layer 1 {method} failed: {type(exc).__name__}: {exc}") from exc
        finally:
            self._stats.latency[kind].append((time.perf_counter() - t0) * 1000.0)
        if not isinstance(result, Mapping) or "success" not in result:
            self._stats.failures[kind] += 1
            raise Layer1Error(f"Layer 1 {method} returned {type(result).__name__}, not a success/data/metadata dict")
        # Only success=True (the bool) without an error is a success: "false", 1 or an answer
        # that carries an error is a failure, never an (empty) page that could prove anything.
        if result.get("success") is not True or result.get("error"):
            self._stats.failures[kind] += 1
            meta = result.get("metadata") if isinstance(result.get("metadata"), Mapping) else {}
            msg = result.get("error") or result.get("message") or (meta or {}).get("error") or "no message"
            raise Layer1Error(f"Layer 1 {method} did not answer success=True: {result.get('success')!r}, {msg}")
        answer = dict(result)
        try:
            return answer, check(answer)
        except Layer1Error:
            self._stats.failures[kind] += 1
            raise

    def _meta(self, answer: Mapping[str, Any]) -> Mapping[str, Any]:
        meta = answer.get("metadata")
        return meta if isinstance(meta, Mapping) else {}

    # -- candles -----------------------------------------------------------------------------
    def _candle_fetcher(self, sym: str, tf: Timeframe, state: dict[str, Any]) -> Any:
        what = f"get_candle_data({sym}, {tf.name})"

        async def fetch(count: int, to: int | None) -> list[dict[str, Any]]:
            to_s = None if to is None else -(-to // 1000) * 1000

            def check(answer: dict[str, Any]) -> list[dict[str, Any]]:
                rows = _rows_of(answer.get("data"), what)
                page_ts(rows, tf, sym, to_s)
                for r in rows:
                    if not r.keys() >= _CANDLE_KEYS:
                        raise BadPayload(f"{what}: a candle lacks {sorted(_CANDLE_KEYS - r.keys())}")
                return rows

            answer, rows = await self._call(
                "candle",
                "get_candle_data",
                [sym],
                tf.name,
                count=count,
                to=None if to_s is None else iso_utc_z(to_s),
                use_cache=False,
                check=check,
            )
            state["calls"] += 1
            if to is None:
                state["latest_meta"] = self._meta(answer)
            return list(rows)

        return fetch

    def _latest_end(self, tf: Timeframe, meta: Mapping[str, Any] | None, pages: CandlePages, asked_at: int) -> int:
        """End of coverage for a ``to``-less answer: the forming interval's start, as of the answer.

        A Layer 1 that dates its answer (``fetched_at``) is trusted; one that says it answered
        from a cache but does not date it covers only up to its newest candle.
        """
        meta = meta or {}
        at = meta.get("fetched_at")
        if isinstance(at, (int, np.integer)) and not isinstance(at, bool):
            return tf.floor(int(at))
        if meta.get("cache_hit") or meta.get("source") == "cache":
            return int(pages.ts[0]) if len(pages.ts) else tf.floor(asked_at)
        return tf.floor(asked_at)

    def _to_array(self, sym: str, rows: list[Any]) -> np.ndarray:
        try:
            arr = candles_from_upbit(rows, market=sym)
        except InvalidCandleError as exc:
            raise Layer1Error(f"Layer 1 returned unusable candles for {sym}: {exc}") from None
        arr = arr[::-1]
        order = np.argsort(arr["ts"], kind="stable")
        return np.ascontiguousarray(arr[order])

    async def _candles_for(self, req: StorageRequest, sym: str) -> tuple[np.ndarray, tuple[int, int], bool, int]:
        tf = parse_timeframe(req.timeframe or "")
        state: dict[str, Any] = {"calls": 0, "latest_meta": None}
        fetch = self._candle_fetcher(sym, tf, state)
        asked_at = int(self._clock())
        forming = tf.floor(asked_at)
        start, end, count = req.start_time, req.end_time, req.count
        if start is not None and count is not None and end is None:
            return await self._forward(fetch, tf, sym, start, count, forming, state)
        if start is not None:
            stop = end if end is not None else tf.add(forming, 1)
            pages = await paginate_candles(fetch, tf, sym, start=start, end=stop, page_size=self.page_size)
            hi = min(stop, forming)
            lo = pages.covered_from if pages.covered_from is not None else hi
        else:
            pages = await paginate_candles(
                fetch, tf, sym, count=count or self.page_size, end=end, page_size=self.page_size
            )
            hi = end if end is not None else self._latest_end(tf, state["latest_meta"], pages, asked_at)
            hi = min(hi, forming)  # the forming interval is never covered
            lo = pages.covered_from if pages.covered_from is not None else hi
        return self._to_array(sym, pages.rows), (min(lo, hi), hi), pages.exhausted, state["calls"]

    async def _forward(
        self, fetch: Any, tf: Timeframe, sym: str, start: int, count: int, forming: int, state: dict[str, Any]
    ) -> tuple[np.ndarray, tuple[int, int], bool, int]:
        """``count`` candles from ``start`` on: fetch windows forward until enough or now is reached.

        Windows double while they come back short (no-trade intervals); an empty window triggers
        one probe of the latest candle, so a walk past the source's newest data stops at once.
        """
        parts: list[np.ndarray] = []
        got = 0
        lo = tf.ceil(start)
        hi = lo
        limit = tf.add(forming, 1)
        rounds = 0
        probed = False
        while got < count and hi < limit and rounds < _MAX_FORWARD_ROUNDS:
            rounds += 1
            stop = min(tf.add(hi, (count - got) * min(2 ** (rounds - 1), 1024)), limit)
            pages = await paginate_candles(fetch, tf, sym, start=hi, end=stop, page_size=self.page_size)
            arr = self._to_array(sym, pages.rows)
            parts.append(arr)
            got += len(arr)
            hi = stop
            if not len(arr) and not probed and hi < limit:
                probed = True
                latest = await paginate_candles(fetch, tf, sym, count=1, page_size=self.page_size)
                if not len(latest.ts) or int(latest.ts[0]) < hi:
                    hi = limit  # nothing newer anywhere: everything up to now is covered
        arr = np.concatenate(parts) if parts else np.zeros(0, dtype=CANDLE_DTYPE)
        if len(arr) > count:
            arr = arr[:count]
            hi = tf.add(int(arr["ts"][-1]), 1)
        hi = min(hi, forming)
        return np.ascontiguousarray(arr), (min(lo, hi), hi), False, state["calls"]

    # -- realtime ----------------------------------------------------------------------------
    def _snapshots(self, req: StorageRequest, answer: Mapping[str, Any], what: str) -> dict[str, Any]:
        rows = _rows_of(answer.get("data"), what)
        out: dict[str, Any] = {}
        for r in rows:
            m = r.get("market")
            if req.data_type is DataType.TICKER and _bad_price(r.get("trade_price")):
                raise Layer1Error(
                    f"Layer 1 {what} answered a ticker of {m!r} with trade_price {r.get('trade_price')!r}"
                )
            if isinstance(m, str) and m in req.symbols:
                out[m] = r
            else:
                raise Layer1Error(f"Layer 1 {what} answered for {m!r}, asked for {list(req.symbols)}")
        missing = [s for s in req.symbols if s not in out]
        if missing:
            raise Layer1Error(f"Layer 1 {what} gave no answer for {missing}")
        return out

    def _trades(self, req: StorageRequest, answer: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        rows = _rows_of(answer.get("data"), "get_trades")
        per: dict[str, list[dict[str, Any]]] = {s: [] for s in req.symbols}
        for r in rows:
            m = r.get("market")
            if m not in per:
                raise Layer1Error(f"Layer 1 get_trades answered for {m!r}, asked for {list(req.symbols)}")
            per[m].append(r)
        arrays: dict[str, Any] = {}
        for s, rs in per.items():
            arr = np.zeros(len(rs), dtype=TRADE_DTYPE)
            try:
                arr["ts"] = [int(r["timestamp"]) for r in rs]
                arr["price"] = [float(r["trade_price"]) for r in rs]
                arr["volume"] = [float(r["trade_volume"]) for r in rs]
                arr["side"] = [1 if str(r["ask_bid"]).upper() == "BID" else -1 for r in rs]
                arr["sequential_id"] = [int(r["sequential_id"]) for r in rs]
            except (KeyError, TypeError, ValueError) as exc:
                raise Layer1Error(f"Layer 1 returned unusable trades for {s}: {exc!r}") from None
            price, volume = arr["price"], arr["volume"]
            if not (np.isfinite(price).all() and np.isfinite(volume).all()) or (price <= 0).any() or (volume < 0).any():
                raise Layer1Error(f"Layer 1 returned trades for {s} with a price <= 0, a negative or non-finite number")
            # duplicates of a sequential_id: the row delivered later in the answer wins
            _, first_rev = np.unique(arr["sequential_id"][::-1], return_index=True)
            arr = arr[np.sort(len(arr) - 1 - first_rev)]
            arrays[s] = np.ascontiguousarray(arr[np.argsort(arr["ts"], kind="stable")])
            per[s] = rs
        return arrays, per

    # -- public ------------------------------------------------------------------------------
    async def request_data_from_layer1(self, request: StorageRequest) -> Layer1Answer:
        """Fetch what ``request`` asks for through the Layer 1 (its cache bypassed for candles).

        Candles are paginated here, 200 a call with an exclusive ``to``, whatever the Layer 1
        supports: ``count`` (with optional ``end_time``) gives the latest N before the end,
        ``start_time``/``end_time`` the range (to now when ``end_time`` is None), ``start_time``
        with ``count`` the first N from the start. Tickers and orderbooks come in one call for
        all symbols, trades with ``count`` (default 100).

        Raises
        ------
        Layer1Error
            The Layer 1 answered ``success: false``, raised, timed out or returned something
            malformed; the message carries the Layer 1's own.
        """
        t0 = time.perf_counter()
        dt = request.data_type
        if dt is DataType.CANDLE:
            self._stats.cache_misses["candle"] += 1
            results = await asyncio.gather(*(self._candles_for(request, s) for s in request.symbols))
            arrays = {s: r[0] for s, r in zip(request.symbols, results)}
            return Layer1Answer(
                dt,
                "layer1_api",
                arrays,
                covered={s: r[1] for s, r in zip(request.symbols, results)},
                exhausted={s: r[2] for s, r in zip(request.symbols, results)},
                calls=sum(r[3] for r in results),
                latency_ms=(time.perf_counter() - t0) * 1000.0,
            )
        syms = list(request.symbols)
        if dt is DataType.TICKER:
            _, arrays = await self._call(
                "ticker",
                "get_ticker_data",
                syms,
                use_cache=False,
                check=lambda a: self._snapshots(request, a, "get_ticker_data"),
            )
            records: dict[str, list[dict[str, Any]]] = {}
        elif dt is DataType.ORDERBOOK:
            _, arrays = await self._call(
                "orderbook",
                "get_orderbook_data",
                syms,
                use_cache=False,
                check=lambda a: self._snapshots(request, a, "get_orderbook_data"),
            )
            records = {}
        else:
            _, (arrays, records) = await self._call(
                "trade", "get_trades", syms, count=request.count or 100, check=lambda a: self._trades(request, a)
            )
        return Layer1Answer(
            dt, "layer1_api", arrays, records=records, calls=1, latency_ms=(time.perf_counter() - t0) * 1000.0
        )

    async def get_from_layer1_cache(self, request: StorageRequest) -> Layer1Answer | None:
        """Answer ``request`` from the Layer 1's cache only (``peek_cache``), never the network.

        None on a miss, when the Layer 1 has no ``peek_cache``, for trades, and for candle
        requests the cache cannot answer in full (a range outside its latest candles).

        Raises
        ------
        Layer1Error
            ``peek_cache`` raised, timed out or returned something malformed.
        """
        plan = self._peek_plan(request)
        if plan is None:
            return None
        t0 = time.perf_counter()
        answer = await self._peek(*plan)
        return self._peek_answer(request, plan, answer, t0)

    def peek_now(self, request: StorageRequest) -> Layer1Answer | None:
        """:meth:`get_from_layer1_cache` without an event loop, for a Layer 1 whose ``peek_cache``
        is an ordinary function (as :class:`~mds.layer1.UpbitRouter`'s is): a sync reader then
        pays no thread hop. None also when ``peek_cache`` is a coroutine function (use the async
        method).

        Raises
        ------
        Layer1Error
            ``peek_cache`` raised or returned something malformed.
        """
        peek = getattr(self.layer1, "peek_cache", None)
        if inspect.iscoroutinefunction(peek):
            return None
        plan = self._peek_plan(request)
        if plan is None:
            return None
        t0 = time.perf_counter()
        kind, syms, interval, count = plan
        try:
            result = self.layer1.peek_cache(kind, syms, **self._peek_args(interval, count))
        except MdsError as exc:
            raise Layer1Error(f"Layer 1 peek_cache failed: {exc}") from exc
        except Exception as exc:  # foreign code
            raise Layer1Error(f"Layer 1 peek_cache failed: {type(exc).__name__}: {exc}") from exc
        except BaseException as exc:  # foreign code raising SystemExit, CancelledError, ...
            if isinstance(exc, KeyboardInterrupt) and threading.current_thread() is threading.main_thread():
                raise  # in the main thread this may be the user's own Ctrl-C: never swallow it
            raise _foreign_abort("peek_cache", exc) from None
        finally:
            self._stats.latency["peek_" + kind].append((time.perf_counter() - t0) * 1000.0)
        if inspect.isawaitable(result):
            if inspect.iscoroutine(result):
                result.close()
            return None
        return self._peek_answer(request, plan, self._peek_result(result), t0)

    def _peek_plan(self, request: StorageRequest) -> tuple[str, list[str], str | None, int | None] | None:
        """What to ask ``peek_cache`` for (kind, symbols, interval, count), or None if it cannot help."""
        peek = getattr(self.layer1, "peek_cache", None)
        dt = request.data_type
        if not callable(peek) or dt is DataType.TRADE:
            return None
        if dt is not DataType.CANDLE:
            return (dt.value, list(request.symbols), None, None)
        tf = parse_timeframe(request.timeframe or "")
        if request.start_time is not None and request.count is not None:
            return None
        want = request.count or self.page_size
        if request.start_time is not None or request.end_time is not None:
            want = self._cache_count()
        return (dt.value, list(request.symbols), tf.name, want)

    def _peek_answer(
        self,
        request: StorageRequest,
        plan: tuple[str, list[str], str | None, int | None],
        answer: dict[str, Any] | None,
        t0: float,
    ) -> Layer1Answer | None:
        kind, _, interval, want = plan
        dt = request.data_type
        if answer is None:
            self._stats.cache_misses[kind] += 1
            return None
        if interval is None:
            arrays = self._snapshots(request, answer, "peek_cache")
            self._stats.cache_hits[kind] += 1
            return Layer1Answer(dt, "layer1_cache", arrays, calls=1, latency_ms=(time.perf_counter() - t0) * 1000.0)
        assert want is not None
        result = self._cached_candles(request, parse_timeframe(interval), answer, want)
        if result is None:
            self._stats.cache_misses[kind] += 1
            return None
        arrays, covered, exhausted = result
        self._stats.cache_hits[kind] += 1
        return Layer1Answer(
            dt,
            "layer1_cache",
            arrays,
            covered=covered,
            exhausted=exhausted,
            calls=1,
            latency_ms=(time.perf_counter() - t0) * 1000.0,
        )

    def _cache_count(self) -> int:
        pol = self.policy.get("layer1") if self.policy else None
        n = pol.get("candle_cache_count") if isinstance(pol, Mapping) else None
        return int(n) if isinstance(n, int) and n > 0 else self.page_size

    @staticmethod
    def _peek_args(interval: str | None, count: int | None) -> dict[str, Any]:
        return {} if interval is None else {"interval": interval, "count": count}

    async def _peek(self, kind: str, syms: list[str], interval: str | None, count: int | None) -> dict[str, Any] | None:
        t0 = time.perf_counter()
        try:
            result = await _foreign(
                "peek_cache", self.timeout_s, self.layer1.peek_cache, kind, syms, **self._peek_args(interval, count)
            )
        except asyncio.TimeoutError:
            raise Layer1Error(f"Layer 1 peek_cache timed out after {self.timeout_s:g} s") from None
        except MdsError as exc:
            raise Layer1Error(f"Layer 1 peek_cache failed: {exc}") from exc
        except Exception as exc:  # foreign code
            raise Layer1Error(f"Layer 1 peek_cache failed: {type(exc).__name__}: {exc}") from exc
        finally:
            self._stats.latency["peek_" + kind].append((time.perf_counter() - t0) * 1000.0)
        return self._peek_result(result)

    @staticmethod
    def _peek_result(result: Any) -> dict[str, Any] | None:
        if result is None:
            return None
        if not isinstance(result, Mapping) or "success" not in result:
            raise Layer1Error(f"Layer 1 peek_cache returned {type(result).__name__}, not a success/data/metadata dict")
        if result.get("success") is not True or result.get("error"):
            return None
        return dict(result)

    def _cached_candles(
        self, req: StorageRequest, tf: Timeframe, answer: Mapping[str, Any], want: int
    ) -> tuple[dict[str, np.ndarray], dict[str, tuple[int, int]], dict[str, bool]] | None:
        rows = _rows_of(answer.get("data"), "peek_cache")
        meta = self._meta(answer)
        by_sym: dict[str, list[dict[str, Any]]] = {s: [] for s in req.symbols}
        for r in rows:
            m = r.get("market")
            if m not in by_sym:
                raise Layer1Error(f"Layer 1 peek_cache answered for {m!r}, asked for {list(req.symbols)}")
            by_sym[m].append(r)
        arrays: dict[str, np.ndarray] = {}
        covered: dict[str, tuple[int, int]] = {}
        exhausted: dict[str, bool] = {}
        meta_cov = meta.get("covered") if isinstance(meta.get("covered"), Mapping) else {}
        meta_exh = meta.get("exhausted") if isinstance(meta.get("exhausted"), Mapping) else {}
        for s, rs in by_sym.items():
            ts = page_ts(rs, tf, s, None)
            order = newest_first(ts)  # duplicates: the row delivered later wins, as for pages
            rs = [rs[i] for i in order.tolist()]
            ts = ts[order]
            # Only the Layer 1's explicit True claims that its cache holds the market's whole
            # history (UpbitRouter claims it only after an empty page proved it); anything
            # else, a truthy string included, claims nothing.
            ex = (meta_exh or {}).get(s) is True
            cov = (meta_cov or {}).get(s)
            if isinstance(cov, (list, tuple)) and len(cov) == 2 and all(isinstance(v, (int, np.integer)) for v in cov):
                lo, hi = int(cov[0]), int(cov[1])
            else:
                # An undated cache covers only what lies between its oldest and newest candle.
                if len(rs) < want and not ex:
                    return None
                lo = int(ts[-1]) if len(ts) else 0
                hi = int(ts[0]) if len(ts) else 0
            arr = self._to_array(s, rs)
            if req.start_time is not None or req.end_time is not None:
                a = req.start_time if req.start_time is not None else lo
                b = req.end_time if req.end_time is not None else hi
                if (a < lo and not ex) or b > hi:
                    return None
                arr = np.ascontiguousarray(arr[(arr["ts"] >= a) & (arr["ts"] < b)])
                lo, hi = a, b
            elif len(arr) > want:
                arr = np.ascontiguousarray(arr[-want:])
                lo, ex = int(arr["ts"][0]), False
            arrays[s] = arr
            covered[s] = (lo, hi)
            exhausted[s] = ex
        return arrays, covered, exhausted

    async def sync_cache_policies(self) -> dict[str, Any]:
        """Read the Layer 1's TTLs and settle mds's: never shorter-lived than Layer 1's copy.

        Returns
        -------
        dict
            ``{"layer1": the Layer 1's policy or None, "candle_ttl_s", "ticker_ttl_s",
            "orderbook_ttl_s", "trade_ttl_s"}``: for each kind the larger of mds's own TTL
            (from ``config``) and the Layer 1's. Also kept as ``self.policy``.

        Raises
        ------
        Layer1Error
            ``cache_policy()`` raised, timed out or did not return a dict.
        """
        fn = getattr(self.layer1, "cache_policy", None)
        layer1_policy: dict[str, Any] | None = None
        if callable(fn):
            try:
                got = await _foreign("cache_policy", self.timeout_s, fn)
            except asyncio.TimeoutError:
                raise Layer1Error(f"Layer 1 cache_policy timed out after {self.timeout_s:g} s") from None
            except Layer1Error:
                raise
            except Exception as exc:  # foreign code
                raise Layer1Error(f"Layer 1 cache_policy failed: {type(exc).__name__}: {exc}") from exc
            if not isinstance(got, Mapping):
                raise Layer1Error(f"Layer 1 cache_policy returned {type(got).__name__}, not a dict")
            layer1_policy = dict(got)
        own = {
            "candle_ttl_s": self.config.memory_ttl_s,
            "ticker_ttl_s": self.config.realtime_ttl_s,
            "orderbook_ttl_s": self.config.orderbook_ttl_s,
            "trade_ttl_s": self.config.realtime_ttl_s,
        }
        settled: dict[str, Any] = {"layer1": layer1_policy}
        for key, mine in own.items():
            theirs = (layer1_policy or {}).get(key)
            if isinstance(theirs, (int, float)) and not isinstance(theirs, bool) and theirs >= 0:
                settled[key] = max(float(mine), float(theirs))
            else:
                settled[key] = float(mine)
        self.policy = settled
        return settled

    async def monitor_layer1_performance(self) -> dict[str, Any]:
        """Latency percentiles, success rate and calls by data type, measured here, plus the
        Layer 1's own ``get_performance_summary()`` when it has one (under ``"layer1"``).

        An unavailable Layer 1 summary is reported as ``{"error": message}``, not raised:
        monitoring must not fail the caller.
        """
        s = self._stats
        all_lat = [v for d in s.latency.values() for v in d]
        calls = sum(s.calls.values())
        failures = sum(s.failures.values())
        by_type = {}
        for k in sorted(set(s.calls) | set(s.cache_hits) | set(s.cache_misses)):
            lat = list(s.latency.get(k, ()))
            by_type[k] = {
                "calls": s.calls[k],
                "failures": s.failures[k],
                "cache_hits": s.cache_hits[k],
                "cache_misses": s.cache_misses[k],
                "p50_ms": float(np.percentile(lat, 50)) if lat else None,
                "p95_ms": float(np.percentile(lat, 95)) if lat else None,
            }
        report: dict[str, Any] = {
            "calls": calls,
            "failures": failures,
            "timeouts": s.timeouts,
            "success_rate": (calls - failures) / calls if calls else None,
            "p50_ms": float(np.percentile(all_lat, 50)) if all_lat else None,
            "p95_ms": float(np.percentile(all_lat, 95)) if all_lat else None,
            "p99_ms": float(np.percentile(all_lat, 99)) if all_lat else None,
            "by_data_type": by_type,
            "layer1": None,
        }
        fn = getattr(self.layer1, "get_performance_summary", None)
        if callable(fn):
            try:
                summary = await _foreign("get_performance_summary", self.timeout_s, fn)
                report["layer1"] = dict(summary) if isinstance(summary, Mapping) else {"value": summary}
            except Exception as exc:  # monitoring of foreign code must not fail the caller
                logger.warning("Layer 1 get_performance_summary failed: %s", exc)
                report["layer1"] = {"error": f"{type(exc).__name__}: {exc}"}
        return report
