"""The seed-compatible async API: ``StorageRequest`` in, ``StorageResponse`` out (DESIGN.md section 3).

Reads a memory hit can answer run in the caller's event loop without waiting for the store lock;
anything that needs the lock held by another thread, or a Layer 1 call, goes to a worker thread.
Errors become ``success=False`` here and nowhere else.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from mds._dtypes import TRADE_DTYPE
from mds.convert import candles_to_upbit
from mds.errors import InvalidRequestError, Layer1Error
from mds.models import Config, DataType, StorageMetadata, StorageRequest, StorageResponse
from mds.store import derived
from mds.store.fetch import Fetcher
from mds.store.health import StorageDown
from mds.store.metrics import Metrics, slowest
from mds.store.peeks import CachePeeks
from mds.store.reads import NeedsLayer1, Reader
from mds.tiers.realtime import RealtimeCache
from mds.timeframes import Timeframe, parse_timeframe


@dataclass(eq=False)
class AsyncApi:
    """``Store.get`` and what it needs."""

    reader: Reader
    fetcher: Fetcher | None
    realtime: RealtimeCache
    metrics: Metrics
    config: Config
    lock: Any
    check_open: Callable[[], None]
    peeks: CachePeeks | None = None

    async def get(self, request: StorageRequest) -> StorageResponse:
        t0 = time.perf_counter()
        meta = StorageMetadata()
        calls_before = self.metrics.layer1_calls
        try:
            if not isinstance(request, StorageRequest):
                raise InvalidRequestError("request must be an mds.StorageRequest")
            self.check_open()
            dt = request.data_type
            if dt is DataType.CANDLE:
                arrays, source = await self._candles(request)
                factory = _candle_factory(request.timeframe or "1m")
            else:
                arrays, source = await self._realtime(request)
                factory = _realtime_factory(dt)
            meta.source = source
            meta.cache_hit = source != "layer1_api"
            meta.layer1_calls = self.metrics.layer1_calls - calls_before  # other threads' too, if any
            meta.data_count = sum(len(v) if isinstance(v, np.ndarray) else (v is not None) for v in arrays.values())
            ms = (time.perf_counter() - t0) * 1000
            meta.processing_time_ms = ms
            self.metrics.lat("api.get", ms)
            return StorageResponse(True, arrays, meta, None, factory)
        except Exception as exc:  # the one place errors become success=False (DESIGN.md section 3)
            meta.processing_time_ms = (time.perf_counter() - t0) * 1000
            meta.cache_hit = False
            meta.source = "layer1_api" if isinstance(exc, Layer1Error) else meta.source
            return StorageResponse(False, {}, meta, f"{type(exc).__name__}: {exc}")

    async def _candles(self, req: StorageRequest) -> tuple[dict[str, Any], str]:
        tf = parse_timeframe(req.timeframe or "", derived=True)
        if tf.derived:  # "2h", "3d" ...: resampled from a native series; Layer 1 holds none of them
            return await asyncio.to_thread(self._derived, req, tf)
        peeked = None
        if self.peeks is not None and self.config.lookup == "layer1_first":
            peeked = await self.peeks.latest_async(req, tf)
        if peeked is not None:
            self.metrics.hits["layer1_cache"] += len(peeked)
            self.metrics.requests += 1
            return peeked, "layer1_cache"
        out: dict[str, Any] = {}
        source = "storage_memory"
        pending: list[str] = []
        lock = self.lock
        for sym in req.symbols:
            # Never wait for the store lock in the caller's event loop: while another thread holds
            # it (a batch, maintain(), a fetch), the read goes to a worker thread below.
            if not lock.acquire(blocking=False):
                pending.append(sym)
                continue
            try:
                arr, src = self.reader.read(sym, tf, req.count, req.start_time, req.end_time, False, allow_layer1=False)
            except (NeedsLayer1, StorageDown):
                pending.append(sym)
                continue
            finally:
                lock.release()
            self.metrics.hits[src] += 1
            out[sym] = arr
            source = slowest(source, src)
        if pending:
            results = await asyncio.gather(
                *(
                    asyncio.to_thread(self._locked_read, sym, tf, req.count, req.start_time, req.end_time)
                    for sym in pending
                )
            )
            for sym, (arr, src) in zip(pending, results):
                self.metrics.hits[src] += 1
                out[sym] = arr
                source = slowest(source, src)
        self.metrics.requests += 1
        return {s: out[s] for s in req.symbols}, source

    def _derived(self, req: StorageRequest, tf: Timeframe) -> tuple[dict[str, Any], str]:
        out: dict[str, Any] = {}
        source = "storage_memory"
        with self.lock:
            for sym in req.symbols:
                arr, src = derived.read(self.reader, sym, tf, req.count, req.start_time, req.end_time, False)
                self.metrics.hits[src] += 1
                out[sym] = arr
                source = slowest(source, src)
        self.metrics.requests += 1
        return out, source

    def _locked_read(self, sym: str, tf: Timeframe, count: Any, start: Any, end: Any) -> tuple[np.ndarray, str]:
        with self.lock:
            return self.reader.read(sym, tf, count, start, end, False, allow_layer1=True)

    async def _realtime(self, req: StorageRequest) -> tuple[dict[str, Any], str]:
        if self.peeks is not None and self.config.lookup == "layer1_first":
            peeked = await self.peeks.realtime_async(req)
            if peeked is not None:
                self.metrics.hits["layer1_cache"] += len(peeked)
                self.metrics.requests += 1
                return peeked, "layer1_cache"
        out: dict[str, Any] = {}
        missing: list[str] = []
        cache = self.realtime
        for sym in req.symbols:
            if req.data_type is DataType.TICKER:
                val: Any = cache.ticker(sym)
            elif req.data_type is DataType.ORDERBOOK:
                val = cache.orderbook(sym)
            else:
                val = cache.trades(sym, count=req.count, since=req.start_time)
                if not len(val):
                    val = None
            out[sym] = val
            if val is None:
                missing.append(sym)
        source = "storage_memory"
        if missing and self.fetcher is not None:
            fetched = await asyncio.to_thread(self.fetcher.realtime, req, missing, cache)
            out.update(fetched)
            source = "layer1_api"
        return out, source


@functools.cache
def _candle_factory(tfname: str) -> Callable[[dict[str, Any]], list[dict[str, Any]]]:
    def build(arrays: dict[str, Any]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for sym, arr in arrays.items():
            out.extend(candles_to_upbit(arr, sym, tfname))
        return out

    return build


def _realtime_factory(dt: DataType) -> Callable[[dict[str, Any]], list[dict[str, Any]]]:
    def build(arrays: dict[str, Any]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for sym, val in arrays.items():
            if val is None:
                continue
            if isinstance(val, np.ndarray) and val.dtype == TRADE_DTYPE:
                out.extend(
                    {
                        "market": sym,
                        "timestamp": int(r["ts"]),
                        "trade_price": float(r["price"]),
                        "trade_volume": float(r["volume"]),
                        "ask_bid": "BID" if int(r["side"]) > 0 else "ASK",
                        "sequential_id": int(r["sequential_id"]),
                    }
                    for r in val
                )
            else:
                out.append(dict(val))
        return out

    return build
