"""A local Upbit for tests, benchmarks and the demo, and seeded market generators.

- :mod:`mds.testing.fake_upbit`: :class:`FakeUpbit`, a real HTTP server on 127.0.0.1 serving
  Upbit's quotation endpoints from arrays it is given, with injectable faults (:class:`Fault`,
  :data:`FAULT_KINDS`); what it serves is built in :mod:`mds.testing._quotation`.
- :mod:`mds.testing.clock`: :class:`MarketClock`, a settable simulated clock to share between a
  store, its FakeUpbit and a test.
- :mod:`mds.testing.generators`: :func:`generate_market` (seeded, valid, realistic candle
  series), :func:`dense_candles`, :func:`krw_tick_size`, and :func:`kernel_params` to run a test
  over both kernel implementations.

Nothing here touches the network beyond the loopback interface.
"""

from __future__ import annotations

from mds.testing.clock import MarketClock
from mds.testing.fake_upbit import FAULT_KINDS, FakeUpbit, Fault, RequestRecord, upbit_json as upbit_json
from mds.testing.generators import dense_candles, generate_market, kernel_modules, kernel_params, krw_tick_size

__all__ = [
    "FAULT_KINDS",
    "FakeUpbit",
    "Fault",
    "MarketClock",
    "RequestRecord",
    "dense_candles",
    "generate_market",
    "kernel_modules",
    "kernel_params",
    "krw_tick_size",
]
