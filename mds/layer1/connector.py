"""``SmartRouterConnector``: how mds talks to a Layer 1 (DESIGN.md section 5).

A Layer 1 is any object with the Smart Router's async shape: ``get_candle_data(symbols,
interval, count=200, to=None, use_cache=True)``, ``get_ticker_data(symbols, use_cache=True)``,
``get_orderbook_data(symbols, use_cache=True)``, ``get_trades(symbols, count=100)``, each
returning ``{"success": bool, "data": ..., "metadata": {...}}`` in Upbit REST field names;
optionally ``peek_cache(...)``, ``cache_policy()`` and ``get_performance_summary()`` (sync or
async). The connector turns its answers into numpy arrays and coverage for the store, paginates
candle requests itself (200 a call, exclusive ``to``), and is the one place where a Layer 1's
``success: false``, exceptions, timeouts and malformed payloads become :class:`Layer1Error`.

This module translates a :class:`~mds.models.StorageRequest` into Layer 1 calls; the guarded
call is :mod:`mds.layer1._foreign`, reading the answers :mod:`mds.layer1._answers`, peeking at
the Layer 1's cache :mod:`mds.layer1._peeking`, the statistics :mod:`mds.layer1._metrics`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from mds._dtypes import CANDLE_DTYPE
from mds.errors import Layer1Error
from mds.layer1._answers import (
    Layer1Answer,
    candle_page,
    candles_array,
    envelope,
    latest_end,
    meta_of,
    snapshots,
    trades,
)
from mds.layer1._foreign import call_foreign
from mds.layer1._metrics import Layer1Stats
from mds.layer1._paging import PAGE_SIZE, paginate_candles
from mds.layer1._peeking import CachePeek
from mds.layer1._settings import Forwarded
from mds.models import Config, DataType, StorageRequest
from mds.timeframes import Timeframe, parse_timeframe
from mds.timeutil import iso_utc_z, now_ms

__all__ = ["Layer1Answer", "SmartRouterConnector"]

logger = logging.getLogger(__name__)

_MAX_FORWARD_ROUNDS = 64


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

    # One home each, read at each use by the calls here and by the cache peeks alike: the peek
    # helper's attribute. Assigning one after construction takes effect at the next call.
    layer1 = Forwarded[Any]("_cache_peek")
    timeout_s = Forwarded[float]("_cache_peek")
    page_size = Forwarded[int]("_cache_peek")

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
        self.config = config or Config()
        self._clock = clock or now_ms
        self._stats = Layer1Stats()
        self._cache_peek = CachePeek(
            layer1, float(timeout_s), int(page_size), self._stats, self._clock, self._note_policy_version
        )
        self.policy: dict[str, Any] | None = None
        # the Layer 1's policy ``version`` the settled policy was read from; an answer dated by
        # another version (``metadata.policy_version``) makes the next call settle it again
        self._policy_version: Any = None
        self._policy_stale = False

    @property
    def policy_stale(self) -> bool:
        """An answer (a call's or a peek's) was dated by another version of the Layer 1's cache
        policy than the settled one: :meth:`sync_cache_policies` should run again."""
        return self._policy_stale

    def _note_policy_version(self, version: Any) -> None:
        if self.policy is not None and version is not None and version != self._policy_version:
            self._policy_stale = True

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
            result = await call_foreign(method, self.timeout_s, getattr(self.layer1, method), *args, **kwargs)
        except asyncio.TimeoutError:
            self._stats.timeouts += 1
            self._stats.failures[kind] += 1
            raise Layer1Error(f"Layer 1 {method} timed out after {self.timeout_s:g} s") from None
        except Layer1Error:
            self._stats.failures[kind] += 1
            raise
        except asyncio.CancelledError:  # only ever our caller's cancellation (see call_foreign)
            raise
        except Exception as exc:  # the Layer 1 is foreign code: any failure of it is a Layer1Error
            self._stats.failures[kind] += 1
            raise Layer1Error(f"Layer 1 {method} failed: {type(exc).__name__}: {exc}") from exc
        finally:
            self._stats.latency[kind].append((time.perf_counter() - t0) * 1000.0)
        try:
            answer = envelope(method, result)
            self._note_policy_version(meta_of(answer).get("policy_version"))
            return answer, check(answer)
        except Layer1Error:
            self._stats.failures[kind] += 1
            raise

    # -- candles -----------------------------------------------------------------------------
    def _candle_fetcher(self, sym: str, tf: Timeframe, state: dict[str, Any]) -> Any:
        what = f"get_candle_data({sym}, {tf.name})"

        async def fetch(count: int, to: int | None) -> list[dict[str, Any]]:
            to_s = None if to is None else -(-to // 1000) * 1000
            answer, rows = await self._call(
                "candle",
                "get_candle_data",
                [sym],
                tf.name,
                count=count,
                to=None if to_s is None else iso_utc_z(to_s),
                use_cache=False,
                check=lambda answer: candle_page(answer, what, tf, sym, to_s),
            )
            state["calls"] += 1
            if to is None:
                state["latest_meta"] = meta_of(answer)
            return list(rows)

        return fetch

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
            hi = end if end is not None else latest_end(tf, state["latest_meta"], pages, asked_at)
            hi = min(hi, forming)  # the forming interval is never covered
            lo = pages.covered_from if pages.covered_from is not None else hi
        return candles_array(sym, pages.rows), (min(lo, hi), hi), pages.exhausted, state["calls"]

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
            arr = candles_array(sym, pages.rows)
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

    # -- public ------------------------------------------------------------------------------
    async def request_data_from_layer1(self, request: StorageRequest) -> Layer1Answer:
        """Fetch what ``request`` asks for through the Layer 1 (its cache bypassed for candles).

        Candles are paginated here, 200 a call with an exclusive ``to``, whatever the Layer 1
        supports: ``count`` (with optional ``end_time``) gives the latest N before the end,
        ``start_time``/``end_time`` the range (to now when ``end_time`` is None), ``start_time``
        with ``count`` the first N from the start. Tickers and orderbooks come in one call for
        all symbols, trades with ``count`` (default 100). An answer dated by another version of
        the Layer 1's cache policy than the one settled (``metadata.policy_version``) settles the
        policy again after the call.

        Raises
        ------
        Layer1Error
            The Layer 1 answered ``success: false``, raised, timed out or returned something
            malformed; the message carries the Layer 1's own.
        """
        answer = await self._request(request)
        if self._policy_stale:
            # the Layer 1 said its policy changed: settle it again (a failure keeps the old one)
            try:
                await self.sync_cache_policies()
            except Layer1Error as exc:
                logger.warning("the Layer 1 changed its cache policy, but reading it failed: %s", exc)
        return answer

    async def _request(self, request: StorageRequest) -> Layer1Answer:
        """The call of :meth:`request_data_from_layer1`, before the policy check."""
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
        if dt is DataType.TICKER or dt is DataType.ORDERBOOK:
            method = "get_ticker_data" if dt is DataType.TICKER else "get_orderbook_data"
            _, arrays = await self._call(
                dt.value, method, syms, use_cache=False, check=lambda a: snapshots(request, a, method)
            )
            records: dict[str, list[dict[str, Any]]] = {}
        else:
            _, (arrays, records) = await self._call(
                "trade", "get_trades", syms, count=request.count or 100, check=lambda a: trades(request, a)
            )
        return Layer1Answer(
            dt, "layer1_api", arrays, records=records, calls=1, latency_ms=(time.perf_counter() - t0) * 1000.0
        )

    async def get_from_layer1_cache(self, request: StorageRequest) -> Layer1Answer | None:
        """Answer ``request`` from the Layer 1's cache only (``peek_cache``), never the network.

        None on a miss, when the Layer 1 has no ``peek_cache``, for a hit older than the Layer
        1's own TTL for its kind (once :meth:`sync_cache_policies` has read it), for trades
        ``since`` a time or fewer than asked, and for candle requests the cache cannot answer in
        full (a range outside its latest candles). Repeating a peek that the Layer 1 answers
        with the same ``data`` list returns the same answer, not converted again.

        Raises
        ------
        Layer1Error
            ``peek_cache`` raised, timed out or returned something malformed.
        """
        return await self._cache_peek.answer(request, self.policy)

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
        return self._cache_peek.answer_now(request, self.policy)

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
        self._policy_stale = False
        fn = getattr(self.layer1, "cache_policy", None)
        layer1_policy: dict[str, Any] | None = None
        if callable(fn):
            try:
                got = await call_foreign("cache_policy", self.timeout_s, fn)
            except asyncio.TimeoutError:
                raise Layer1Error(f"Layer 1 cache_policy timed out after {self.timeout_s:g} s") from None
            except Layer1Error:
                raise
            except Exception as exc:  # foreign code
                raise Layer1Error(f"Layer 1 cache_policy failed: {type(exc).__name__}: {exc}") from exc
            if not isinstance(got, Mapping):
                raise Layer1Error(f"Layer 1 cache_policy returned {type(got).__name__}, not a dict")
            layer1_policy = dict(got)
        self._policy_version = (layer1_policy or {}).get("version")
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
        report = self._stats.report()
        fn = getattr(self.layer1, "get_performance_summary", None)
        if callable(fn):
            try:
                summary = await call_foreign("get_performance_summary", self.timeout_s, fn)
                report["layer1"] = dict(summary) if isinstance(summary, Mapping) else {"value": summary}
            except Exception as exc:  # monitoring of foreign code must not fail the caller
                logger.warning("Layer 1 get_performance_summary failed: %s", exc)
                report["layer1"] = {"error": f"{type(exc).__name__}: {exc}"}
        return report
