"""Stores without a durable tier against a model of what was acknowledged: two stores on one
directory (``tiers=("disk",)``, ``("memory", "disk")``, and memory's window shorter than the data;
and with SQLite, as a check of the same invariants)
take seeded random writes (sparse, unsorted, some with ``complete=``), deletes and reads, each
store in turn. Every range and latest-N read must equal the model, and no ``no_trades`` gap may
hold a stored candle. (Two stores in one process share LMDB and changes.bin as two processes do;
tests/test_shared_fast_tiers.py has the real second process.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import mds
from mds import CANDLE_DTYPE, Config
from mds.timeutil import to_ms

SYM, TF = "KRW-BTC", "1m"
MIN = 60_000
T = to_ms("2025-01-06T00:00:00Z")  # the data end here (exclusive)
NOW = T + 30_000
SLOTS = 400
T0 = T - SLOTS * MIN
CONFIGS = {
    "disk": Config(tiers=("disk",)),
    "memory+disk": Config(tiers=("memory", "disk")),
    "short-memory+disk": Config(tiers=("memory", "disk"), memory_candles=50),
    # the same with SQLite: the fast tiers then copy it, under the same invariants
    "short-memory+disk+sqlite": Config(tiers=("memory", "disk", "sqlite"), memory_candles=50),
}


def rows(ts: np.ndarray, k: int) -> np.ndarray:
    a = np.zeros(len(ts), CANDLE_DTYPE)
    price = 1_000_000.0 + 1000.0 * k
    a["ts"] = ts
    a["open"] = a["high"] = a["low"] = a["close"] = price
    a["volume"], a["value"] = 1.0, price
    return a


def expected(model: dict[int, np.ndarray], a: int, b: int) -> bytes:
    got = [model[t] for t in sorted(model) if a <= t < b]
    return np.concatenate(got).tobytes() if got else b""


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("name", list(CONFIGS))
def test_two_stores_without_a_durable_tier_answer_what_was_acknowledged(tmp_path: Path, name: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    cfg = CONFIGS[name]
    model: dict[int, np.ndarray] = {}
    with mds.open(tmp_path, config=cfg, clock=lambda: NOW) as a, mds.open(tmp_path, config=cfg, clock=lambda: NOW) as b:
        for k in range(40):
            st = (a, b)[int(rng.integers(2))]
            op = rng.random()
            lo = int(rng.integers(0, SLOTS))
            hi = int(rng.integers(lo + 1, SLOTS + 1))
            if op < 0.45:  # a write: a sparse, shuffled part of [lo, hi)
                slots = np.arange(lo, hi)[rng.random(hi - lo) < 0.7]
                if not len(slots):
                    continue
                batch = rows(T0 + slots.astype(np.int64) * MIN, k)
                complete = (T0 + lo * MIN, T0 + hi * MIN) if rng.random() < 0.3 else None
                st.write_candles(SYM, TF, batch[rng.permutation(len(batch))], complete=complete)
                for r in batch:
                    model[int(r["ts"])] = np.array([r])
            elif op < 0.6:  # a delete
                s, e = T0 + lo * MIN, T0 + hi * MIN
                want = sum(1 for t in model if s <= t < e)
                assert st.delete(SYM, TF, start=s, end=e) == want, (k, "delete count")
                for t in [t for t in model if s <= t < e]:
                    del model[t]
            elif op < 0.8:  # a range
                s, e = T0 + lo * MIN, T0 + hi * MIN
                assert st.candles(SYM, TF, start=s, end=e).tobytes() == expected(model, s, e), (k, "range")
            else:  # the latest n
                n = int(rng.integers(1, 300))
                want = expected(model, T0, T)
                want = want[-n * CANDLE_DTYPE.itemsize :] if n * CANDLE_DTYPE.itemsize < len(want) else want
                if model:
                    assert st.candles(SYM, TF, count=n).tobytes() == want, (k, "latest", n)
            if model:
                for g in st.gaps(SYM, TF, start=T0, end=T):
                    if g.kind == "no_trades":
                        assert not any(g.start <= t < g.end for t in model), (k, "no_trades over a stored candle", g)
