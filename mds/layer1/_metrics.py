"""Call statistics of the Layer 1 path: the connector's counters and latency report.

``SmartRouterConnector.monitor_layer1_performance`` reports :meth:`Layer1Stats.report`;
:func:`percentile` also serves the router's transport.
"""

from __future__ import annotations

import collections
from collections.abc import Collection
from typing import Any

import numpy as np


def percentile(values: Collection[float], q: float) -> float | None:
    """The ``q``-th percentile of ``values`` as a float, None when there are none."""
    return float(np.percentile(np.asarray(values), q)) if values else None


class Layer1Stats:
    """What the connector measured of its Layer 1 calls, keyed by data type (``"candle"``,
    ``"ticker"`` ...; cache peeks record their latency under ``"peek_" + kind``)."""

    def __init__(self) -> None:
        self.latency: dict[str, collections.deque[float]] = collections.defaultdict(
            lambda: collections.deque(maxlen=4096)
        )
        self.calls: collections.Counter[str] = collections.Counter()
        self.failures: collections.Counter[str] = collections.Counter()
        self.timeouts = 0
        self.cache_hits: collections.Counter[str] = collections.Counter()
        self.cache_misses: collections.Counter[str] = collections.Counter()

    def report(self) -> dict[str, Any]:
        """Latency percentiles, success rate and calls by data type, JSON-serialisable; the key
        ``"layer1"`` (the Layer 1's own summary) is left None for the caller to fill."""
        all_lat = [v for d in self.latency.values() for v in d]
        calls = sum(self.calls.values())
        failures = sum(self.failures.values())
        by_type = {}
        for k in sorted(set(self.calls) | set(self.cache_hits) | set(self.cache_misses)):
            lat = list(self.latency.get(k, ()))
            by_type[k] = {
                "calls": self.calls[k],
                "failures": self.failures[k],
                "cache_hits": self.cache_hits[k],
                "cache_misses": self.cache_misses[k],
                "p50_ms": percentile(lat, 50),
                "p95_ms": percentile(lat, 95),
            }
        return {
            "calls": calls,
            "failures": failures,
            "timeouts": self.timeouts,
            "success_rate": (calls - failures) / calls if calls else None,
            "p50_ms": percentile(all_lat, 50),
            "p95_ms": percentile(all_lat, 95),
            "p99_ms": percentile(all_lat, 99),
            "by_data_type": by_type,
            "layer1": None,
        }
