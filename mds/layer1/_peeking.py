"""Reading a Layer 1's own cache (``peek_cache``, never its network) for the connector.

What to ask ``peek_cache`` for a request, the call itself (async through the guarded foreign
call, or directly for a Layer 1 whose ``peek_cache`` is an ordinary function), and the
:class:`Layer1Answer` a hit makes.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from collections.abc import Mapping
from typing import Any, TypeAlias

from mds.errors import Layer1Error, MdsError
from mds.layer1._answers import Layer1Answer, cached_candles, snapshots
from mds.layer1._foreign import call_foreign, foreign_abort
from mds.layer1._metrics import Layer1Stats
from mds.models import DataType, StorageRequest
from mds.timeframes import parse_timeframe

#: (kind, symbols, interval, count) to pass to ``peek_cache``
_Plan: TypeAlias = tuple[str, list[str], str | None, int | None]


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

    ``layer1``, ``timeout_s`` and ``page_size`` are the one home of the connector's attributes
    of the same names; each is read when it is used.
    """

    def __init__(self, layer1: Any, timeout_s: float, page_size: int, stats: Layer1Stats) -> None:
        self.layer1 = layer1
        self.timeout_s = timeout_s
        self.page_size = page_size
        self._stats = stats

    async def answer(self, request: StorageRequest, policy: Mapping[str, Any] | None) -> Layer1Answer | None:
        """``SmartRouterConnector.get_from_layer1_cache``; ``policy`` as settled by
        ``sync_cache_policies`` (it tells how many candles the Layer 1 caches)."""
        plan = self._plan(request, policy)
        if plan is None:
            return None
        t0 = time.perf_counter()
        answer = await self._peek(*plan)
        return self._answer(request, plan, answer, t0)

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
            result = self.layer1.peek_cache(kind, syms, **self._peek_args(interval, count))
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
        return self._answer(request, plan, self._peek_result(result), t0)

    def _plan(self, request: StorageRequest, policy: Mapping[str, Any] | None) -> _Plan | None:
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
            want = self._cache_count(policy)
        return (dt.value, list(request.symbols), tf.name, want)

    def _answer(
        self,
        request: StorageRequest,
        plan: _Plan,
        answer: dict[str, Any] | None,
        t0: float,
    ) -> Layer1Answer | None:
        kind, _, interval, want = plan
        dt = request.data_type
        if answer is None:
            self._stats.cache_misses[kind] += 1
            return None
        if interval is None:
            arrays = snapshots(request, answer, "peek_cache")
            self._stats.cache_hits[kind] += 1
            return Layer1Answer(dt, "layer1_cache", arrays, calls=1, latency_ms=(time.perf_counter() - t0) * 1000.0)
        assert want is not None
        result = cached_candles(request, parse_timeframe(interval), answer, want)
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

    def _cache_count(self, policy: Mapping[str, Any] | None) -> int:
        pol = policy.get("layer1") if policy else None
        n = pol.get("candle_cache_count") if isinstance(pol, Mapping) else None
        return int(n) if isinstance(n, int) and n > 0 else self.page_size

    @staticmethod
    def _peek_args(interval: str | None, count: int | None) -> dict[str, Any]:
        return {} if interval is None else {"interval": interval, "count": count}

    async def _peek(self, kind: str, syms: list[str], interval: str | None, count: int | None) -> dict[str, Any] | None:
        t0 = time.perf_counter()
        try:
            result = await call_foreign(
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
