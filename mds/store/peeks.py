"""Layer 1's cache first (``lookup="layer1_first"``): what a store asks ``peek_cache`` before its
own tiers, and the policy it settled with the Layer 1 (DESIGN.md section 5).

Every kind of read asks here first: latest-N candles, candle ranges the cache covers, tickers,
orderbooks and the latest trades. A hit is validated as a fetch is, trusted only within the
Layer 1's own TTL, and never stored again (the Layer 1 holds it; no duplicate caching). What the
cache cannot prove goes on to the store's tiers and then to Layer 1's API.

Repeating an answer from the same cache entry costs about a memory hit: the connector keeps its
conversion with the entry's ``data`` list, and for latest-N reads, the store's most frequent,
:meth:`CachePeeks.fast_latest` keeps the final array too, so a repeat is one ``peek_cache`` call
and a few identity checks.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mds import _kernels as K
from mds._dtypes import read_only
from mds.errors import InvalidRequestError, Layer1Error, MdsError
from mds.models import Config, DataType, StorageRequest
from mds.store.fetch import Fetcher
from mds.store.metrics import Metrics
from mds.tiers.realtime import RealtimeCache
from mds.timeframes import Timeframe

logger = logging.getLogger(__name__)

#: Candles a Layer 1 cache keeps per series when it does not say (Upbit's page size).
_PAGE = 200
#: Fast latest-N answers kept at most (all are dropped when full: they rebuild on the next read).
_FAST_MAX = 4096


@dataclass(frozen=True, slots=True)
class _Fast:
    """A latest-N answer from Layer 1's cache and what makes it still the answer."""

    origin: tuple[Any, int, Any, Any, Any]  # the peek's (data, len, first row, last row, fetched_at)
    end: int  # the last closed interval's end when it was made ...
    next_end: int  # ... and when that changes
    trust_until: float  # fetched_at + the Layer 1's TTL (epoch ms)
    arr: np.ndarray


@dataclass(eq=False)
class CachePeeks:
    """The layer1_first steps of one store with a Layer 1.

    Attributes
    ----------
    fetcher
        The store's Layer 1 side (its connector, its event loop thread).
    realtime
        The realtime cache, whose TTLs the settled policy sets.
    """

    fetcher: Fetcher
    config: Config
    metrics: Metrics
    clock: Callable[[], int]
    realtime: RealtimeCache
    _limit: int | None = field(default=None, init=False)
    _sync: bool = field(default=False, init=False)
    _fast: dict[tuple[str, str, int], _Fast] = field(default_factory=dict, init=False)
    _applied: Any = field(default=None, init=False)
    _policy_error: str | None = field(default=None, init=False)

    @property
    def layer1(self) -> Any:
        return self.fetcher.connector.layer1

    # ------------------------------------------------------------------ the policy
    def sync_policy(self) -> None:
        """Settle the cache policy with the Layer 1 (``sync_cache_policies``) and apply it; a
        Layer 1 that cannot tell is logged and leaves mds's own TTLs in force."""
        try:
            self.fetcher.run(self.fetcher.connector.sync_cache_policies())
            self._policy_error = None
        except Layer1Error as exc:
            self._policy_error = str(exc)
            logger.warning("could not settle the cache policy with the Layer 1: %s", exc)
        self.apply_policy()

    def apply_policy(self) -> None:
        """Apply the connector's settled policy if it changed since the last call: the realtime
        cache keeps each kind at least as long as the Layer 1 does, and the latest-N peek asks
        only for what the Layer 1's cache can hold."""
        connector = self.fetcher.connector
        if connector.policy_stale:  # the Layer 1 announced another policy: settle it first
            self.sync_policy()
            return
        policy = connector.policy
        if policy is self._applied:
            return
        self._applied = policy
        self._limit = None
        self._fast.clear()
        if not isinstance(policy, Mapping):
            return
        self.realtime.set_ttls(
            ticker_ms=int(float(policy["ticker_ttl_s"]) * 1000),
            orderbook_ms=int(float(policy["orderbook_ttl_s"]) * 1000),
            trades_ms=int(float(policy["trade_ttl_s"]) * 1000),
        )

    async def _settle_async(self) -> None:
        """:meth:`apply_policy` for the async API, in the caller's event loop."""
        connector = self.fetcher.connector
        if connector.policy_stale:
            try:
                await connector.sync_cache_policies()
                self._policy_error = None
            except Layer1Error as exc:
                self._policy_error = str(exc)
                logger.warning("could not settle the cache policy with the Layer 1: %s", exc)
        self.apply_policy()

    def report(self) -> dict[str, Any]:
        """``stats()["layer1"]["policy"]``: the settled TTLs and the Layer 1's own policy."""
        policy = self.fetcher.connector.policy
        out: dict[str, Any] = dict(policy) if isinstance(policy, Mapping) else {}
        out["lookup"] = self.config.lookup
        out["peek_limit"] = self._peek_limit()
        if self._policy_error is not None:
            out["error"] = self._policy_error
        return out

    def _ttl_ms(self, kind: str) -> float:
        """The Layer 1's own TTL of ``kind`` in ms, or infinity when it did not say."""
        policy = self.fetcher.connector.policy
        pol = policy.get("layer1") if isinstance(policy, Mapping) else None
        ttl = pol.get(f"{kind}_ttl_s") if isinstance(pol, Mapping) else None
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)):
            return float("inf")
        return float(ttl) * 1000.0

    def _peek_limit(self) -> int:
        """Candles the Layer 1's cache holds per series (0: it has no ``peek_cache``)."""
        if self._limit is None:
            l1 = self.layer1
            peek = getattr(l1, "peek_cache", None)
            limit = 0
            if callable(peek):
                limit = _PAGE
                policy = self.fetcher.connector.policy
                pol = policy.get("layer1") if isinstance(policy, Mapping) else None
                n = pol.get("candle_cache_count") if isinstance(pol, Mapping) else None
                if isinstance(n, int) and not isinstance(n, bool):
                    limit = n
                elif pol is None:
                    limit = _policy_count(l1)
            self._limit = limit
            self._sync = limit > 0 and not inspect.iscoroutinefunction(peek)
        return self._limit

    def _behind(self, tf: Timeframe, end: int) -> int:
        """Intervals between ``end`` and the last closed one: a latest-N read ending there needs
        that many more of the newest candles the cache holds."""
        last_end = tf.floor(int(self.clock()))
        return tf.count(end, last_end) if end < last_end else 0

    def can_peek(self, n: int) -> bool:
        """Whether Layer 1's cache could hold a latest-n answer (it has a peek and keeps n + 1)."""
        return n + 1 <= self._peek_limit()

    # ------------------------------------------------------------------ candles
    def fast_latest(self, sym: str, tf: Timeframe, n: int) -> np.ndarray | None:
        """Repeat a latest-N answer of Layer 1's cache made by :meth:`latest` while the Layer 1
        answers from the same entry, within its TTL and the same closed interval; else None."""
        memo = self._fast.get((sym, tf.name, n))
        if memo is None or self.fetcher.connector.policy is not self._applied:
            return None
        now = self.clock()
        if not memo.end <= now < memo.next_end or now > memo.trust_until:
            return None
        try:
            result = self.layer1.peek_cache("candle", [sym], interval=tf.name, count=n + 1)
        except Exception:  # foreign code: the general path asks again and says what failed
            return None
        if result.__class__ is not dict:
            return None
        data = result.get("data")
        origin = memo.origin
        if data is not origin[0] or len(data) != origin[1] or data[0] is not origin[2] or data[-1] is not origin[3]:
            return None
        meta = result.get("metadata")
        if meta.__class__ is not dict or meta.get("fetched_at") != origin[4]:
            return None
        return memo.arr

    def latest(self, sym: str, tf: Timeframe, n: int, end: int) -> np.ndarray | None:
        """Answer a latest-N read from Layer 1's cache when it holds it fresh (never the network)."""
        self.apply_policy()
        want = n + self._behind(tf, end)
        if not self.can_peek(want):
            return None
        # one more than asked: the cache's newest candle may be the forming one
        ans = self._ask(StorageRequest(DataType.CANDLE, [sym], timeframe=tf.name, count=want + 1))
        got = self._check(ans, sym, tf, n, end)
        if got is not None and self._sync and ans.origin is not None:
            now = self.clock()
            if end == tf.floor(now):  # the end a count-only read asks for: the fast path's
                if len(self._fast) >= _FAST_MAX:
                    self._fast.clear()
                at = ans.origin[4]
                trust = float(at) + self._ttl_ms("candle") if isinstance(at, int) else float("inf")
                self._fast[(sym, tf.name, n)] = _Fast(ans.origin, end, tf.add(end, 1), trust, got)
        return got

    def range(self, sym: str, tf: Timeframe, s: int, e: int) -> np.ndarray | None:
        """The candles of ``[s, e)`` from Layer 1's cache when it covers all of it (``e`` at most
        the last closed interval's end); None when it cannot prove the whole range."""
        self.apply_policy()
        now = int(self.clock())
        if not self._may_cover(tf, s, e, tf.floor(now)):
            return None
        ans = self._ask(StorageRequest(DataType.CANDLE, [sym], timeframe=tf.name, start_time=s, end_time=e))
        return self._range_rows(ans, sym, tf, now)

    def _ask(self, req: StorageRequest) -> Any:
        """Layer 1's cache answer to ``req`` (a Layer1Answer or None; a failing peek is a miss)."""
        try:
            if self._sync:  # an ordinary function: ask it here, no hop to the Layer 1 thread
                return self.fetcher.connector.peek_now(req)
            return self.fetcher.run(self.fetcher.connector.get_from_layer1_cache(req))
        except MdsError:
            return None

    def _may_cover(self, tf: Timeframe, s: int, e: int, last_end: int) -> bool:
        """Whether the cache could hold all of ``[s, e)``: not empty, and not older than the
        latest candles it keeps (no peek is made otherwise)."""
        limit = self._peek_limit()
        return limit > 0 and e > s and s >= tf.add(last_end, -limit)

    def _range_rows(self, ans: Any, sym: str, tf: Timeframe, now: int) -> np.ndarray | None:
        """The validated candles of a range answer for ``sym`` (a copy), or None (a miss)."""
        if ans is None or sym not in ans.arrays or len(K.validate(ans.arrays[sym], *tf.kernel_args, now)[0]):
            self.metrics.misses["layer1_cache"] += 1
            return None
        return read_only(ans.arrays[sym].copy())

    def _check(self, ans: Any, sym: str, tf: Timeframe, n: int, end: int) -> np.ndarray | None:
        if ans is None or sym not in ans.arrays:
            self.metrics.misses["layer1_cache"] += 1
            return None
        lo, hi = ans.covered.get(sym, (0, 0))
        arr = np.ascontiguousarray(ans.arrays[sym])
        arr = arr[arr["ts"] < end]
        idx, _ = K.validate(arr, *tf.kernel_args, int(self.clock()))
        # fresh only when the cache reaches the last closed interval and proves n candles
        if len(idx) or hi < end or len(arr) < n or int(arr["ts"][-n]) < lo:
            self.metrics.misses["layer1_cache"] += 1
            return None
        return read_only(arr[-n:].copy())

    async def latest_async(self, req: StorageRequest, tf: Timeframe) -> dict[str, np.ndarray] | None:
        """The layer1_first step of the async API for candles: one peek for all symbols, in the
        caller's loop; latest-N reads and ranges (``start_time`` without ``count``)."""
        if self.config.lookup != "layer1_first":
            return None
        await self._settle_async()
        now = int(self.clock())
        last_end = tf.floor(now)
        want = req.count
        if want is not None and req.start_time is None:
            end = last_end if req.end_time is None else min(tf.ceil(req.end_time), last_end)
            ask_n = want + self._behind(tf, end)
            if not self.can_peek(ask_n):
                return None
            ask = StorageRequest(DataType.CANDLE, req.symbols, timeframe=tf.name, count=ask_n + 1)
        elif want is None and req.start_time is not None:
            s = tf.ceil(req.start_time)
            e = last_end if req.end_time is None else min(req.end_time, last_end)
            if not self._may_cover(tf, s, e, last_end):
                return None
            ask = StorageRequest(DataType.CANDLE, req.symbols, timeframe=tf.name, start_time=s, end_time=e)
        else:
            return None
        try:
            ans = await self.fetcher.connector.get_from_layer1_cache(ask)
        except MdsError:
            return None
        out: dict[str, np.ndarray] = {}
        for sym in req.symbols:
            got = self._check(ans, sym, tf, want, end) if want is not None else self._range_rows(ans, sym, tf, now)
            if got is None:
                return None
            out[sym] = got
        return out

    # ------------------------------------------------------------------ realtime
    async def realtime_async(self, req: StorageRequest) -> dict[str, Any] | None:
        """Tickers, orderbooks or the latest trades of every symbol of ``req`` from Layer 1's
        cache, in the caller's loop; None unless it holds them all (trades ``since`` a time
        are never answered here: the cache holds only the latest)."""
        if self.config.lookup != "layer1_first" or not callable(getattr(self.layer1, "peek_cache", None)):
            return None
        await self._settle_async()
        try:
            ans = await self.fetcher.connector.get_from_layer1_cache(req)
        except MdsError:
            ans = None
        if ans is None or any(s not in ans.arrays for s in req.symbols):
            self.metrics.misses["layer1_cache"] += 1
            return None
        if req.data_type is DataType.TRADE:
            return {s: read_only(np.ascontiguousarray(ans.arrays[s])[-(req.count or 100) :]) for s in req.symbols}
        kind = req.data_type.value
        try:  # checked as a fetched one is when it is put, and a copy that shares nothing with the cache
            return {s: self.realtime.checked(kind, ans.arrays[s]) for s in req.symbols}
        except InvalidRequestError as exc:
            logger.warning("Layer 1's cache holds an unusable %s (%s); asking further", kind, exc)
            self.metrics.misses["layer1_cache"] += 1
            return None


def _policy_count(layer1: Any) -> int:
    """``candle_cache_count`` of a Layer 1's ordinary-function ``cache_policy()``, before (or
    without) a settled policy; Upbit's page size when it does not say."""
    try:
        fn = getattr(layer1, "cache_policy", None)
        pol = fn() if callable(fn) else None
        if asyncio.iscoroutine(pol):
            pol.close()  # an async policy is read by sync_cache_policies, not here
            pol = None
        n = pol.get("candle_cache_count") if isinstance(pol, Mapping) else None
        return n if isinstance(n, int) and not isinstance(n, bool) else _PAGE
    except Exception:  # foreign code; a policy we cannot read is no policy
        return _PAGE
    except BaseException as exc:  # SystemExit and the like from foreign code, not the user's Ctrl-C
        if isinstance(exc, KeyboardInterrupt) and threading.current_thread() is threading.main_thread():
            raise
        return _PAGE
