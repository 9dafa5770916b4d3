"""What a store asks Layer 1 for, and how: the Layer 1 thread, validated fetches, cache peeks.

:class:`Fetcher` runs the connector's coroutines on the store's own event-loop thread (so the
synchronous API can call an async Layer 1), validates every candle it returns before anything is
stored, and turns what Layer 1 proved (an empty page before the oldest candle) into coverage.
Peeking into Layer 1's cache is :mod:`mds.store.peeks`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from mds import _kernels as K
from mds.errors import InvalidCandleError, InvalidRequestError, Layer1Error
from mds.models import Config, DataType, StorageRequest
from mds.store.coverage import EMPTY_RANGES, HISTORY_START
from mds.store.metrics import Metrics
from mds.tiers.realtime import RealtimeCache
from mds.timeframes import Timeframe

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(eq=False)
class Fetcher:
    """The Layer 1 side of one store.

    Attributes
    ----------
    connector
        The :class:`~mds.layer1.connector.SmartRouterConnector` over the user's Layer 1.
    lock
        The store lock; released while this thread waits for the network (outside a batch).
    in_batch
        Whether a batch is open (its transaction is this thread's: the lock stays held).
    first_stored
        Open time of the oldest candle the durable tier holds (to catch a lying empty page).
    """

    connector: Any
    config: Config
    metrics: Metrics
    lock: Any
    clock: Callable[[], int]
    in_batch: Callable[[], bool]
    first_stored: Callable[[str, Timeframe], int | None]
    loop_thread: threading.Thread | None = field(default=None, init=False)
    _loop: asyncio.AbstractEventLoop | None = field(default=None, init=False)

    # ------------------------------------------------------------------ the Layer 1 thread
    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a Layer 1 coroutine on the store's own event loop thread and wait for it.

        Whatever the Layer 1 raises (also ``SystemExit``, ``KeyboardInterrupt`` or a
        ``CancelledError`` of its own) ends this call as a :class:`Layer1Error` and leaves the
        loop thread serving the next call.
        """
        th = self.loop_thread
        if self._loop is None or th is None or not th.is_alive():
            with self.lock:
                th = self.loop_thread
                if self._loop is None or th is None or not th.is_alive():
                    if self._loop is not None:
                        logger.warning("the Layer 1 event loop thread had stopped; starting a new one")
                    loop = asyncio.new_event_loop()
                    th = threading.Thread(target=_serve_loop, args=(loop,), name="mds-layer1", daemon=True)
                    th.start()
                    self._loop, self.loop_thread = loop, th
        assert self._loop is not None
        fut = asyncio.run_coroutine_threadsafe(_contained(coro), self._loop)
        # Other threads may use the store while this one waits for the network (a memory hit
        # must not queue behind a fetch), except inside a batch, whose transaction is this
        # thread's alone. Callers re-read what they need after the wait.
        lock: Any = self.lock
        held = None
        if not self.in_batch() and lock._is_owned():
            held = lock._release_save()
        try:
            return fut.result(timeout=self.config.layer1_timeout_s)
        except concurrent.futures.TimeoutError:  # not the builtin TimeoutError before Python 3.11
            fut.cancel()
            raise Layer1Error(f"Layer 1 did not answer within {self.config.layer1_timeout_s} s") from None
        except (concurrent.futures.CancelledError, asyncio.CancelledError):
            raise Layer1Error("the Layer 1 call was cancelled by the Layer 1") from None
        except BaseException:
            fut.cancel()  # Ctrl-C while waiting: the call must not go on unseen on the loop thread
            raise
        finally:
            if held is not None:
                lock._acquire_restore(held)

    def close(self) -> None:
        """Close the user's Layer 1 (if it has ``aclose``) and stop the loop thread."""
        if self._loop is None:
            return
        loop = self._loop
        if hasattr(self.connector.layer1, "aclose"):
            try:
                asyncio.run_coroutine_threadsafe(self.connector.layer1.aclose(), loop).result(timeout=5)
            except Exception:  # foreign code at close: nothing left to report it to
                logger.debug("the Layer 1's aclose() failed", exc_info=True)
        try:  # what is still running (a call given up on by Ctrl-C) ends before the loop does
            asyncio.run_coroutine_threadsafe(_wind_down(), loop).result(timeout=5)
        except Exception:
            logger.debug("Layer 1 tasks did not wind down", exc_info=True)
        loop.call_soon_threadsafe(loop.stop)
        if self.loop_thread is not None:
            self.loop_thread.join(timeout=5)
        loop.close()
        self._loop = None

    # ------------------------------------------------------------------ candles
    def candles(
        self, sym: str, tf: Timeframe, *, count: int | None = None, start: int | None = None, end: int | None = None
    ) -> tuple[np.ndarray, int, int, bool]:
        """Fetch candles through the connector: (rows ascending, covered start, covered end, exhausted)."""
        req = StorageRequest(DataType.CANDLE, [sym], timeframe=tf.name, start_time=start, end_time=end, count=count)
        t0 = time.perf_counter()
        try:
            ans = self.run(self.connector.request_data_from_layer1(req))
        except Layer1Error:
            self.metrics.layer1_errors += 1
            raise
        finally:
            self.metrics.lat("layer1_call", (time.perf_counter() - t0) * 1000)
        arr = np.ascontiguousarray(ans.arrays[sym])
        self.metrics.layer1_calls += int(ans.calls)
        self.metrics.layer1_candles += len(arr)
        lo, hi = ans.covered.get(sym, (0, 0))
        return arr, int(lo), int(hi), bool(ans.exhausted.get(sym, False))

    def checked(
        self, sym: str, tf: Timeframe, *, count: int | None = None, start: int | None = None, end: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Fetch closed candles before ``end`` and validate them: (rows, covered ranges)."""
        arr, lo, hi, exhausted = self.candles(sym, tf, count=count, start=start, end=end)
        arr = K.sort_dedup(arr[arr["ts"] < end])
        idx, reasons = K.validate(arr, *tf.kernel_args, int(self.clock()))
        if len(idx):
            self.metrics.layer1_errors += 1
            why = K.REASONS.get(int(reasons[0]), "?")
            raise Layer1Error(
                f"Layer 1 returned {len(idx)} invalid candle(s) for {sym} {tf.name} (first: {why}); nothing stored"
            )
        # An empty page before the oldest candle (``exhausted``) proves the market's history ran
        # out, except for seconds candles, which Upbit keeps for three months only: there it
        # says nothing about older intervals.
        if exhausted and tf.name != "1s":
            # ... unless the store holds a candle before where the empty page was asked: then
            # the page lies (a flaky Layer 1), and believing it would label real candles no_trades
            bound = int(arr["ts"][0]) if len(arr) else hi
            first = self.first_stored(sym, tf)
            if first is not None and first < bound:
                self.metrics.layer1_errors += 1
                raise Layer1Error(
                    f"Layer 1 answered {sym} {tf.name} has no candle before {bound}, but the store holds one "
                    f"at {first}: the answer is wrong; nothing stored"
                )
            lo = HISTORY_START
        hi = min(hi, end)
        covered = np.array([[lo, hi]], dtype=np.int64) if hi > lo else EMPTY_RANGES
        return arr, covered

    def range(self, sym: str, tf: Timeframe, s: int, e: int) -> np.ndarray:
        """The candles of ``[s, e)`` from Layer 1 alone (validated, not stored)."""
        arr, _ = self.checked(sym, tf, start=s, end=e)
        return arr[arr["ts"] >= s]

    # ------------------------------------------------------------------ realtime
    def realtime(self, req: StorageRequest, symbols: list[str], cache: RealtimeCache) -> dict[str, Any]:
        """Fetch tickers, orderbooks or trades the realtime cache lacks, keep them, answer them."""
        sub = StorageRequest(req.data_type, symbols, count=req.count)
        t0 = time.perf_counter()
        try:
            ans = self.run(self.connector.request_data_from_layer1(sub))
        finally:
            self.metrics.lat("layer1_call", (time.perf_counter() - t0) * 1000)
        self.metrics.layer1_calls += int(ans.calls)
        out: dict[str, Any] = {}
        with self.lock:
            for sym in symbols:
                val = ans.arrays.get(sym)
                try:
                    if val is None:
                        out[sym] = None
                    elif req.data_type is DataType.TICKER:
                        cache.put_ticker(val)
                        out[sym] = cache.ticker(sym)
                    elif req.data_type is DataType.ORDERBOOK:
                        cache.put_orderbook(val)
                        out[sym] = cache.orderbook(sym)
                    else:
                        cache.put_trades(sym, val)
                        out[sym] = cache.trades(sym, count=req.count, since=req.start_time)
                except (InvalidRequestError, InvalidCandleError) as exc:  # the Layer 1's answer, not the caller's
                    raise Layer1Error(f"Layer 1 answered an unusable {req.data_type.value} for {sym}: {exc}") from exc
        return out

    def monitor(self) -> Any:
        """The connector's own figures (for ``stats()``)."""
        return self.run(self.connector.monitor_layer1_performance())


async def _wind_down() -> None:
    """Cancel every other task of the loop and wait for them, then close async generators: a
    loop closed with tasks pending prints "Task was destroyed but it is pending!"."""
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.get_running_loop().shutdown_asyncgens()


def _serve_loop(loop: asyncio.AbstractEventLoop) -> None:
    """The Layer 1 thread: run the loop until close() stops it. A BaseException raised by foreign
    code inside a task the loop created (``asyncio.wait_for`` wraps its awaitable in one) leaves
    ``run_forever``; the task holds it as its result, so the loop serves on and the waiting call
    gets the error."""
    while True:
        try:
            loop.run_forever()
            return
        except BaseException as exc:
            logger.warning("a Layer 1 call raised %s on the store's loop thread; serving on", type(exc).__name__)


async def _contained(coro: Coroutine[Any, Any, T]) -> T:
    """Await foreign code on the store's loop thread; a BaseException that would stop the loop
    (``SystemExit``, ``KeyboardInterrupt``, ``GeneratorExit``) becomes a Layer1Error instead."""
    try:
        return await coro
    except (Exception, asyncio.CancelledError):
        raise
    except BaseException as exc:
        raise Layer1Error(f"the Layer 1 raised {type(exc).__name__}: {exc}") from exc
