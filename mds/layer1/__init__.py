"""Layer 1: the exchange router mds sits on (DESIGN.md section 5).

- :class:`SmartRouterConnector` wraps any object with the Smart Router's async shape.
- :class:`UpbitRouter` is a real Layer 1 over Upbit's public REST API. It is imported on first
  use, so ``import mds`` does not pay for the HTTP client (httpx takes ~85 ms to import).

Modules: ``connector.py`` (requests into Layer 1 calls) with ``_foreign.py`` (the guarded call
into foreign code), ``_answers.py`` (checking answers, :class:`Layer1Answer`), ``_peeking.py``
(the Layer 1's cache) and ``_metrics.py``; ``router.py`` (Upbit's endpoints) with
``_transport.py`` (HTTP, pacing, retries), ``_response_cache.py`` and ``_budget.py`` (the
machine-wide request budget); ``_paging.py`` (candle pagination, used by both); ``stream.py``
(:class:`UpbitStream`, the WebSocket feed) with ``_ws_parse.py`` (frames into messages) and
``_replay.py`` (:class:`ReplayStream`, recorded frames with the same consumer API).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mds.layer1.connector import Layer1Answer, SmartRouterConnector

if TYPE_CHECKING:
    from mds.layer1._replay import ReplayStream
    from mds.layer1.router import DEFAULT_BASE_URL, UpbitRouter
    from mds.layer1.stream import UpbitStream

__all__ = ["DEFAULT_BASE_URL", "Layer1Answer", "ReplayStream", "SmartRouterConnector", "UpbitRouter", "UpbitStream"]


def __getattr__(name: str) -> Any:
    if name in ("UpbitRouter", "DEFAULT_BASE_URL"):
        from mds.layer1 import router

        return getattr(router, name)
    if name == "UpbitStream":
        from mds.layer1.stream import UpbitStream

        return UpbitStream
    if name == "ReplayStream":
        from mds.layer1._replay import ReplayStream

        return ReplayStream
    raise AttributeError(f"module 'mds.layer1' has no attribute {name!r}")
