"""Reading a Layer 1's own cache (``peek_cache``, never its network) for the connector.

What to ask ``peek_cache`` for a request, the call itself (async through the guarded foreign
call, or directly for a Layer 1 whose ``peek_cache`` is an ordinary function), and the
:class:`Layer1Answer` a hit makes.

A hit is trusted only within the Layer 1's own TTL for its kind (``cache_policy()``, as settled
by ``sync_cache_policies``), counted from the answer's ``fetched_at``. Its conversion is kept
with the answer's ``data`` list: while the Layer 1 answers with the same list (same length, same
first and last row objects, same ``fetched_at``), the same :class:`Layer1Answer` is returned
without converting again. A Layer 1 that builds a new list on every peek simply pays the
conversion every time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeAlias

from mds.errors import Layer1Error, MdsError
from mds.layer1._answers import Layer1Answer, cached_candles, meta_of, snapshots, trades
from mds.layer1._foreign import call_foreign, foreign_abort
from mds.layer1._metrics import Layer1Stats
from mds.models import DataType, StorageRequest
from mds.timeframes import parse_timeframe

#: (kind, symbols, interval, count) to pass to ``peek_cache``
_Plan: TypeAlias = tuple[str, list[str], str | None, int | None]

#: Conversions kept at most (the oldest half is dropped when full).
_MEMO_MAX = 4096


class CachePeek:
    """How a :class:`~mds.layer1.SmartRouterConnector` peeks at its Layer 1's cache.

    Parameters
    ----------
    layer1 : object
        The Layer 1; without a callable ``peek_cache`` every peek is a miss.
    timeout_s : float
        Upper bound of one async ``peek_cache`` call.
    page_size : int
        Candles a latest-N request asks for when it names no count.
    stats : Layer1Stats
        The connector's statistics (latency under ``"peek_" + kind``, cache hits and misses).
    clock : callable
        Epoch ms; dates a hit against the Layer 1's TTL.
    on_version : callable
        Called with each hit's ``metadata.policy_version`` (the connector notes a changed policy).

    ``layer1``, ``timeout_s`` and ``page_size`` are the one home of the connector's attributes
    of the same names; each is read when it is used.
    """

    def __init__(
        self,
        layer1: Any,
        timeout_s: float,
        page_size: int,
        stats: Layer1Stats,
        clock: Callable[[], int],
        on_version: Callable[[Any], None],
    ) -> None:
        self.layer1 = layer1
        self.timeout_s = timeout_s
        self.page_size = page_size
        self._stats = stats
        self._clock = clock
        self._on_version = on_version
        # (plan, start, end) -> (data list, its length, first row, last row, fetched_at, answer)
        self._memo: dict[tuple[Any, ...], tuple[Any, int, Any, Any, Any, Layer1Answer]] = {}

    async def answer(self, request: StorageRequest, policy: Mapping[str, Any] | None) -> Layer1Answer | None:
        """``SmartRouterConnector.get_from_layer1_cache``; ``policy`` as settled by
        ``sync_cache_policies`` (it tells how many candles the Layer 1 caches)."""
        plan = self._plan(request, policy)
        if plan is None:
            return None
        t0 = time.perf_counter()
        answer = await self._peek(*plan)
        return self._answer(request, plan, answer, t0, policy)

    def answer_now(self, request: StorageRequest, policy: Mapping[str, Any] | None) -> Layer1Answer | None:
        """``SmartRouterConnector.peek_now``: :meth:`answer` without an event loop."""
        peek = getattr(self.layer1, "peek_cache", None)
        if inspect.iscoroutinefunction(peek):
            return None
        plan = self._plan(request, policy)
        if plan is None:
            return None
        t0 = time.perf_counter()
        kind, syms, interval, count = plan
        try:
            result = self.layer1.peek_cache(kind, syms, **self._peek_args(kind, interval, count))
        except MdsError as exc:
            raise Layer1Error(f"Layer 1 peek_cache failed: {exc}") from exc
        except Exception as exc:  # foreign code
            raise Layer1Error(f"Layer 1 peek_cache failed: {type(exc).__name__}: {exc}") from exc
        except BaseException as exc:  # foreign code raising SystemExit, CancelledError, ...
            if isinstance(exc, KeyboardInterrupt) and threading.current_thread() is threading.main_thread():
                raise  # in the main thread this may be the user's own Ctrl-C: never swallow it
            raise foreign_abort("peek_cache", exc) from None
        finally:
            self._stats.latency["peek_" + kind].append((time.perf_counter() - t0) * 1000.0)
        if inspect.isawaitable(result):
            if inspect.iscoroutine(result):
                result.close()
            return None
        return self._answer(request, plan, self._peek_result(result), t0, policy)

    def _plan(self, request: StorageRequest, policy: Mapping[str, Any] | None) -> _Plan | None:
        """What to ask ``peek_cache`` for (kind, symbols, interval, count), or None if it cannot help."""
        peek = getattr(self.layer1, "peek_cache", None)
        dt = request.data_type
        if not callable(peek):
            return None
        if dt is DataType.TRADE:
            # the latest trades only: a Layer 1's cache cannot prove what came before them
            if request.start_time is not None:
                return None
            return ("trade", list(request.symbols), None, request.count or 100)
        if dt is not DataType.CANDLE:
            return (dt.value, list(request.symbols), None, None)
        tf = parse_timeframe(request.timeframe or "")
        if request.start_time is not None and request.count is not None:
            return None
        want = request.count or self.page_size
        if request.start_time is not None or request.end_time is not None:
            want = self._cache_count(policy)
        return (dt.value, list(request.symbols), tf.name, want)

    def _answer(
        self,
        request: StorageRequest,
        plan: _Plan,
        answer: dict[str, Any] | None,
        t0: float,
        policy: Mapping[str, Any] | None,
    ) -> Layer1Answer | None:
        kind = plan[0]
        if answer is not None:
            self._on_version(meta_of(answer).get("policy_version"))
        if answer is None or not self._trusted(kind, answer, policy):
            self._stats.cache_misses[kind] += 1
            return None
        data = answer.get("data")
        n = len(data) if isinstance(data, list) else -1
        first, last = (data[0], data[-1]) if isinstance(data, list) and n > 0 else (None, None)
        fetched_at = meta_of(answer).get("fetched_at")
        key = (kind, tuple(plan[1]), plan[2], plan[3], request.start_time, request.end_time)
        memo = self._memo.get(key)
        if (
            memo is not None
            and memo[0] is data
            and memo[1] == n
            and memo[2] is first
            and memo[3] is last
            and memo[4] == fetched_at
        ):
            self._stats.cache_hits[kind] += 1
            return memo[5]
        got = self._convert(request, plan, answer, t0)
        if got is None:
            self._stats.cache_misses[kind] += 1
            return None
        self._stats.cache_hits[kind] += 1
        if n >= 0:
            got = dataclasses.replace(got, origin=(data, n, first, last, fetched_at))
            if len(self._memo) >= _MEMO_MAX:
                for k in list(self._memo)[: _MEMO_MAX // 2]:
                    del self._memo[k]
            self._memo[key] = (data, n, first, last, fetched_at, got)
        return got

    def _convert(self, request: StorageRequest, plan: _Plan, answer: dict[str, Any], t0: float) -> Layer1Answer | None:
        """The :class:`Layer1Answer` of a hit, or None when it cannot answer ``request`` in full."""
        kind, _, interval, want = plan
        dt = request.data_type
        ms = (time.perf_counter() - t0) * 1000.0
        if kind == "trade":
            arrays, records = trades(request, answer)
            whole = meta_of(answer).get("exhausted")
            whole = whole if isinstance(whole, Mapping) else {}
            if any(len(a) < (request.count or 100) and whole.get(s) is not True for s, a in arrays.items()):
                return None  # fewer than asked, and the cache does not say that was all there was
            return Layer1Answer(dt, "layer1_cache", arrays, records=records, calls=1, latency_ms=ms)
        if interval is None:
            return Layer1Answer(dt, "layer1_cache", snapshots(request, answer, "peek_cache"), calls=1, latency_ms=ms)
        assert want is not None
        result = cached_candles(request, parse_timeframe(interval), answer, want)
        if result is None:
            return None
        arrays, covered, exhausted = result
        return Layer1Answer(dt, "layer1_cache", arrays, covered=covered, exhausted=exhausted, calls=1, latency_ms=ms)

    def _trusted(self, kind: str, answer: Mapping[str, Any], policy: Mapping[str, Any] | None) -> bool:
        """Whether a hit is within the Layer 1's own TTL for ``kind`` (when both are known)."""
        pol = policy.get("layer1") if policy else None
        ttl = pol.get(f"{kind}_ttl_s") if isinstance(pol, Mapping) else None
        at = meta_of(answer).get("fetched_at")
        if not isinstance(at, int) or isinstance(at, bool):
            return True  # undated: the Layer 1 answers only from live entries
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)):
            return True  # no TTL said: its own expiry decides
        return int(self._clock()) - at <= ttl * 1000.0

    def _cache_count(self, policy: Mapping[str, Any] | None) -> int:
        pol = policy.get("layer1") if policy else None
        n = pol.get("candle_cache_count") if isinstance(pol, Mapping) else None
        return int(n) if isinstance(n, int) and n > 0 else self.page_size

    @staticmethod
    def _peek_args(kind: str, interval: str | None, count: int | None) -> dict[str, Any]:
        if kind == "trade":
            return {"count": count}
        return {} if interval is None else {"interval": interval, "count": count}

    async def _peek(self, kind: str, syms: list[str], interval: str | None, count: int | None) -> dict[str, Any] | None:
        t0 = time.perf_counter()
        try:
            args = self._peek_args(kind, interval, count)
            result = await call_foreign("peek_cache", self.timeout_s, self.layer1.peek_cache, kind, syms, **args)
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
