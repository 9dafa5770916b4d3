"""What a store counts: hits and misses per tier, latency percentiles, Layer 1 calls; ``stats()``.

Also the sources an answer can name (``metadata.source``) and their order: an answer assembled
from several tiers names the slowest that contributed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from mds import _kernels as K
from mds.store.health import BACKEND_ERRORS, Tiers

#: Rank of each source; an answer assembled from several names the slowest that contributed.
SOURCE_RANK = {"storage_memory": 0, "layer1_cache": 1, "storage_disk": 2, "sqlite_db": 3, "layer1_api": 4}
TIER_SOURCE = {"memory": "storage_memory", "disk": "storage_disk", "sqlite": "sqlite_db"}
#: How long stats() waits for a writer before it reports the tiers' sizes as busy.
_STATS_WAIT_S = 1.0


def slowest(a: str, b: str) -> str:
    return a if SOURCE_RANK[a] >= SOURCE_RANK[b] else b


def _summary(ring: K.LatencyRing) -> dict[str, float | int]:
    """Count and percentiles of a latency ring."""
    if ring.count == 0:
        return {"count": 0, "p50_ms": 0.0, "p99_ms": 0.0}
    p50, p99 = np.percentile(ring.samples(), [50, 99])
    return {"count": ring.count, "p50_ms": round(float(p50), 4), "p99_ms": round(float(p99), 4)}


class Metrics:
    """The counters of one store. Readers update them outside the store lock (plain ints and
    dicts: a lost increment under a race is acceptable, a crash is not)."""

    def __init__(self) -> None:
        self.hits: dict[str, int] = dict.fromkeys(SOURCE_RANK, 0)
        self.misses: dict[str, int] = dict.fromkeys(("layer1_cache", "memory", "disk", "sqlite"), 0)
        #: a ring of the latest latency samples (ms) per API and per source
        self.latency: dict[str, K.LatencyRing] = {}
        self.layer1_calls = 0
        self.layer1_candles = 0
        self.layer1_errors = 0
        self.requests = 0
        self._memory = K.HitMeter(self._ring("storage_memory"), self._ring("api.candles"))
        #: ``memory_hit(t0)``: ``served("storage_memory", "api.candles", ms)`` of a read that
        #: began at ``t0`` (``time.perf_counter()``), the store's memory hit (its most frequent
        #: read): one compiled call, which takes the end time; :meth:`stats` adds its count
        self.memory_hit = self._memory.hit

    def _ring(self, key: str) -> K.LatencyRing:
        ring = self.latency.get(key)
        if ring is None:
            ring = self.latency[key] = K.LatencyRing()
        return ring

    def lat(self, key: str, ms: float) -> None:
        self._ring(key).add(ms)

    def served(self, source: str, api: str, ms: float) -> None:
        """One request answered from ``source`` by ``api`` in ``ms``."""
        self.requests += 1
        self.hits[source] += 1
        latency = self.latency
        (latency.get(api) or self._ring(api)).add(ms)
        (latency.get(source) or self._ring(source)).add(ms)

    def stats(
        self, tiers: Tiers, lock: Any, realtime: Any, connector_figures: Callable[[], Any] | None
    ) -> dict[str, Any]:
        """The figures of ``Store.stats()`` (see there)."""
        # Readers update the counters outside the store lock: copy each dict in one C-level step
        # (no Python code runs while it is copied, so no other thread can change its size).
        hits, misses, latency = dict(self.hits), dict(self.misses), list(self.latency.items())
        fast = self._memory.count
        hits["storage_memory"] += fast
        served = sum(hits.values())
        from_storage = served - hits["layer1_api"]
        out: dict[str, Any] = {
            "requests": self.requests + fast,
            "hits": hits,
            "misses": misses,
            "hit_rate": round(from_storage / served, 6) if served else None,
            "latency": {k: _summary(v) for k, v in sorted(latency) if v.count},
            "layer1": {
                "calls": self.layer1_calls,
                "candles_fetched": self.layer1_candles,
                "errors": self.layer1_errors,
            },
            "tiers": {},
            "degraded": tiers.degraded(),
            "core": K.IMPLEMENTATION,
        }
        # The tiers' figures come from their connections, which a writer may be using: ask them
        # under the store lock, and say so where a long write holds it instead of waiting for it.
        held = lock.acquire(timeout=_STATS_WAIT_S)
        try:
            for name, state in tiers.states.items():
                info: dict[str, Any] = {"degraded": state.degraded_at is not None, "error": state.error}
                if not held:
                    info["busy"] = True
                elif state.obj is not None and state.degraded_at is None:
                    with contextlib.suppress(*BACKEND_ERRORS):
                        info.update(_jsonable(state.obj.stats()))
                out["tiers"][name] = info
        finally:
            if held:
                lock.release()
        with contextlib.suppress(Exception):
            out["realtime"] = _jsonable(realtime.stats())
        if connector_figures is not None:
            with contextlib.suppress(Exception):
                out["layer1"]["connector"] = _jsonable(connector_figures())
        return out


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)
