"""A pytest plugin: strategy tests and benchmarks on realistic market data, offline.

Installed with mds (entry point ``pytest11``, name ``mds``), it gives every test three fixtures:

``mds_clock``
    A :class:`MarketClock`, the simulated "now" that the fake exchange and the store share:
    ``mds_clock()`` is epoch ms; ``mds_clock.set(t)`` and ``mds_clock.advance(ms)`` move it
    (never backwards). It starts at :data:`ANCHOR_MS` (2025-01-27 00:00 UTC).
``fake_upbit``
    A running :class:`~mds.testing.FakeUpbit` on 127.0.0.1 serving seeded, realistic 1m
    candles (:func:`~mds.testing.generate_market`): by default three markets (``KRW-BTC`` and
    ``KRW-ETH`` liquid, ``KRW-MED`` illiquid) over the 3 days before the clock, and one day after
    it that appears as the clock moves (the candle still forming is served partial, as Upbit
    does). No rate limit. Its clock is ``mds_clock``.
``mds_store``
    An :func:`mds.open` store in ``tmp_path`` over ``fake_upbit`` (through
    :class:`~mds.layer1.UpbitRouter`), with ``lookup="storage_first"`` and the same clock;
    closed after the test. Reads fetch from the fake what the store does not hold yet.

The data is chosen per test (or module, with ``pytestmark``) with a marker::

    @pytest.mark.mds_data(markets={"KRW-BTC": "liquid", "KRW-DOGE": "illiquid"}, days=10, seed=3,
                          timeframes=("1m", "1h"))
    def test_my_strategy(mds_store, mds_clock):
        closes = mds_store.candles("KRW-BTC", "1m", count=200)["close"]
        mds_clock.advance(60_000)  # one minute later: the next candle has closed
        ...

``markets`` is a sequence of codes (liquid) or a mapping code -> ``"liquid"``/``"illiquid"``/
per-minute trade probability; ``timeframes`` are generated independently (each its own seeded
walk). The same seed gives the same data on every machine.

Without the entry point (a source checkout), load it with ``-p mds.testing.pytest_plugin`` or
``pytest_plugins = ["mds.testing.pytest_plugin"]`` in a ``conftest.py``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from mds.testing.clock import ANCHOR_MS, MarketClock

__all__ = ["ANCHOR_MS", "DEFAULT_MARKETS", "MarketClock", "fake_upbit", "mds_clock", "mds_store"]

#: The markets served when no ``mds_data`` marker says otherwise.
DEFAULT_MARKETS: Mapping[str, str] = {"KRW-BTC": "liquid", "KRW-ETH": "liquid", "KRW-MED": "illiquid"}
_DAY_MS = 86_400_000


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "mds_data(markets=..., days=3, seed=7, timeframes=('1m',)): the data the mds fake_upbit fixture serves",
    )


def _data(request: pytest.FixtureRequest, now: int) -> dict[tuple[str, str], Any]:
    from mds.testing.generators import generate_market
    from mds.timeframes import parse_timeframe

    marker = request.node.get_closest_marker("mds_data")
    kw: dict[str, Any] = dict(marker.kwargs) if marker is not None else {}
    unknown = set(kw) - {"markets", "days", "seed", "timeframes"}
    if unknown or (marker is not None and marker.args):
        raise pytest.UsageError(f"mds_data takes markets=, days=, seed=, timeframes= only (not {sorted(unknown)})")
    markets = kw.get("markets", DEFAULT_MARKETS)
    if not isinstance(markets, Mapping):
        markets = {m: "liquid" for m in markets}
    days = float(kw.get("days", 3))
    seed = int(kw.get("seed", 7))
    start = now - int(days * _DAY_MS)
    end = now + _DAY_MS  # revealed as the clock moves
    return {
        (sym, parse_timeframe(tf).name): generate_market(sym, tf, start, end, liquidity=liq, seed=seed)
        for sym, liq in markets.items()
        for tf in kw.get("timeframes", ("1m",))
    }


@pytest.fixture
def mds_clock() -> MarketClock:
    """The simulated now shared by ``fake_upbit`` and ``mds_store`` (see the module docstring)."""
    return MarketClock()


@pytest.fixture
def fake_upbit(request: pytest.FixtureRequest, mds_clock: MarketClock) -> Iterator[Any]:
    """A running FakeUpbit with seeded data and the settable ``mds_clock`` (see the module docstring)."""
    from mds.testing.fake_upbit import FakeUpbit

    with FakeUpbit(_data(request, mds_clock()), clock=mds_clock, rate_limit=None) as fake:
        yield fake


@pytest.fixture
def mds_store(tmp_path: Path, fake_upbit: Any, mds_clock: MarketClock) -> Iterator[Any]:
    """A store in ``tmp_path`` over ``fake_upbit``, on ``mds_clock`` (see the module docstring)."""
    import mds
    from mds.layer1.router import UpbitRouter

    router = UpbitRouter(fake_upbit.base_url, rate_limit=1000, backoff_s=0.01, max_backoff_s=0.05, clock=mds_clock)
    store = mds.open(tmp_path / "mds", layer1=router, config=mds.Config(lookup="storage_first"), clock=mds_clock)
    try:
        yield store
    finally:
        store.close()
