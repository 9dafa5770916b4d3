"""The router's HTTP transport: one paced, retried GET per call, and its statistics.

Owns the ``httpx`` client (bound to one event loop), the per-group rate-limit budgets (one per
machine, shared by every router on it: :mod:`mds.layer1._budget`; corrected by ``Remaining-Req``),
the retry policy (429, 5xx, timeouts, transport
errors and broken payloads with bounded exponential backoff; 418, 400 and 404 at once) and the
request latency and status counts that ``UpbitRouter.get_performance_summary`` reports.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import random
import time
from collections.abc import Callable, Mapping
from typing import Any

import httpx

from mds.errors import Layer1Error
from mds.layer1._budget import SharedBudget, _Pacer, default_dir, open_budget
from mds.layer1._metrics import percentile
from mds.layer1._paging import BadPayload

# The router's logger, not this module's: these lines were the router's before it was cut along
# its roles, and logging configured for "mds.layer1.router" must keep seeing them.
logger = logging.getLogger("mds.layer1.router")


def _parse_remaining(value: str | None) -> int | None:
    """``sec`` of ``Remaining-Req: group=candles; min=600; sec=9`` (None if absent or garbled)."""
    if not value:
        return None
    for part in value.split(";"):
        k, _, v = part.strip().partition("=")
        if k == "sec":
            try:
                return int(v)
            except ValueError:
                return None
    return None


def _error_message(resp: httpx.Response) -> str:
    text = resp.text
    try:
        body = json.loads(text)
        err = body.get("error") if isinstance(body, dict) else None
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
    except ValueError:
        pass
    text = text.strip()
    return text[:300] if text else f"HTTP {resp.status_code}"


def _group(path: str) -> str:
    if path.startswith("/v1/candles"):
        return "candles"
    if path.startswith("/v1/ticker"):
        return "ticker"
    if path.startswith("/v1/orderbook"):
        return "orderbook"
    if path.startswith("/v1/trades"):
        return "trades"
    return "default"


class Transport:
    """Paced, retried GETs against one Upbit-compatible server.

    Parameters
    ----------
    base_url : str
        Scheme and host, without ``/v1``.
    headers : mapping
        Request headers.
    timeout_s, max_retries, backoff_s, max_backoff_s, rate_limit, rate_window_s, budget_dir
        As :class:`~mds.layer1.UpbitRouter`. These attributes (and ``base_url``) are the one home
        of the router's settings of the same names; each is read when it is used.
    counts : collections.Counter
        The router's counters; the transport adds ``requests``, ``retries``, ``timeouts``,
        ``transport_errors``, ``bad_payloads``, ``rate_limited``, ``blocked``, ``server_errors``
        and ``failures`` to it.
    """

    def __init__(
        self,
        base_url: str,
        *,
        headers: Mapping[str, str],
        timeout_s: float,
        max_retries: int,
        backoff_s: float,
        max_backoff_s: float,
        rate_limit: int,
        rate_window_s: float,
        counts: collections.Counter[str],
        budget_dir: str | None = None,
    ) -> None:
        self.base_url = base_url
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.rate_limit = rate_limit
        self.rate_window_s = rate_window_s
        self.budget_dir = budget_dir
        self._headers = dict(headers)
        self._client: httpx.AsyncClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # (budget directory, base_url, group, window) -> its budget: the machine-wide file, or
        # this process's pacer where the file cannot be used. Keyed by the settings that name a
        # budget, so changing one after construction moves the router to another budget.
        self._pacers: dict[tuple[str, str, str, float], SharedBudget | _Pacer] = {}
        self._rng = random.Random(0x5EED)
        self._counts = counts
        self._latency: dict[str, collections.deque[float]] = collections.defaultdict(
            lambda: collections.deque(maxlen=2048)
        )
        self._status: collections.Counter[int] = collections.Counter()

    async def aclose(self) -> None:
        """Close the HTTP connections (a later GET opens new ones)."""
        client, self._client = self._client, None
        self._loop = None
        if client is not None:
            await client.aclose()

    def _http(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            # A client is bound to the loop that opened its connections.
            self._client = httpx.AsyncClient(
                base_url=self.base_url,
                timeout=httpx.Timeout(self.timeout_s),
                headers=self._headers,
                limits=httpx.Limits(max_connections=20, max_keepalive_connections=20),
            )
            self._loop = loop
            # An in-process pacer starts afresh with the new client (as before the budget was
            # shared); the shared budgets' state lives in their files.
            for key in [k for k, p in self._pacers.items() if isinstance(p, _Pacer)]:
                del self._pacers[key]
        return self._client

    def _pacer(self, group: str) -> SharedBudget | _Pacer:
        key = (self.budget_dir or default_dir(), self.base_url, group, self.rate_window_s)
        p = self._pacers.get(key)
        if p is None:
            p = open_budget(key[0], self.base_url, group, self.rate_window_s) or _Pacer(
                self.rate_limit, self.rate_window_s
            )
            self._pacers[key] = p
        p.limit = self.rate_limit
        if isinstance(p, SharedBudget):
            # How long a slot may stay in flight: httpx gives each of pool, connect, write and
            # read ``timeout_s``; past that the holder is gone or stuck, and the slot counts as done.
            p.hold_s = 4 * self.timeout_s + self.rate_window_s
        return p

    def _backoff(self, attempt: int) -> float:
        base = min(self.max_backoff_s, self.backoff_s * (2 ** max(0, attempt - 1)))
        return base * (0.5 + 0.5 * self._rng.random())

    async def get(
        self, path: str, params: dict[str, Any], validate: Callable[[Any], None] | None = None
    ) -> tuple[Any, int]:
        """GET ``path`` with pacing, retries and payload checks; returns (parsed JSON, attempts)."""
        client = self._http()
        group = _group(path)
        pacer = self._pacer(group)
        last = "no attempt made"
        for attempt in range(self.max_retries + 1):
            if attempt:
                self._counts["retries"] += 1
                await asyncio.sleep(self._backoff(attempt))
            token = await pacer.acquire()
            t0 = time.perf_counter()
            left: int | None = None
            try:
                resp = await client.get(path, params=params)
                left = _parse_remaining(resp.headers.get("Remaining-Req"))
                if resp.status_code == 429:
                    left = 0
            except httpx.TimeoutException as exc:
                last = f"timeout after {self.timeout_s:g} s ({type(exc).__name__})"
                self._counts["timeouts"] += 1
                continue
            except httpx.TransportError as exc:
                last = f"transport error: {type(exc).__name__}: {exc}"
                self._counts["transport_errors"] += 1
                continue
            finally:
                pacer.release(left, token)
            self._latency[group].append((time.perf_counter() - t0) * 1000.0)
            self._counts["requests"] += 1
            self._status[resp.status_code] += 1
            status = resp.status_code
            if status == 200:
                try:
                    payload = json.loads(resp.content)
                    if validate is not None:
                        validate(payload)
                except ValueError as exc:
                    last = f"malformed JSON from {path}: {exc}"
                    self._counts["bad_payloads"] += 1
                    continue
                except BadPayload as exc:
                    last = f"unusable answer from {path}: {exc}"
                    self._counts["bad_payloads"] += 1
                    continue
                return payload, attempt + 1
            message = _error_message(resp)
            if status == 429:
                self._counts["rate_limited"] += 1
                last = f"HTTP 429 rate limited: {message}"
                logger.warning("Upbit 429 on %s (attempt %d): backing off", path, attempt + 1)
                continue
            if status == 418:
                self._counts["blocked"] += 1
                raise Layer1Error(
                    f"Upbit blocked this IP (HTTP 418): {message.rstrip('.')}. "
                    "Stop sending requests until the block expires."
                )
            if status >= 500:
                self._counts["server_errors"] += 1
                last = f"HTTP {status}: {message}"
                continue
            raise Layer1Error(f"Upbit rejected GET {path} {params} (HTTP {status}): {message}")
        self._counts["failures"] += 1
        raise Layer1Error(f"GET {path} failed after {self.max_retries + 1} attempts: {last}")

    def summary(self) -> dict[str, Any]:
        """``status`` (responses by HTTP status), ``groups`` (requests and latency percentiles per
        rate-limit group), ``pacing`` (waits for the budget per group) and ``budget`` (whether
        the budgets are machine-wide, their directory, this process's waits in all and each
        budget's figures), JSON-serialisable."""
        groups = {
            g: {
                "requests": len(v),
                "p50_ms": percentile(v, 50),
                "p99_ms": percentile(v, 99),
            }
            for g, v in self._latency.items()
        }
        pacing: dict[str, dict[str, Any]] = {}
        budgets: dict[str, dict[str, Any]] = {}
        for (_, _, group, _), p in self._pacers.items():
            fig = p.summary()
            mine = pacing.setdefault(group, {"waits": 0, "waited_s": 0.0})
            mine["waits"] += fig["waits"]
            mine["waited_s"] = round(mine["waited_s"] + fig["waited_s"], 6)
            budgets[group] = {"shared": False, **fig}
        return {
            "status": {str(k): v for k, v in sorted(self._status.items())},
            "groups": groups,
            "pacing": pacing,
            "budget": {
                "shared": bool(budgets) and all(b["shared"] for b in budgets.values()),
                "dir": self.budget_dir or default_dir(),
                "waits": sum(p["waits"] for p in pacing.values()),
                "waited_s": round(sum(p["waited_s"] for p in pacing.values()), 6),
                "groups": budgets,
            },
        }
