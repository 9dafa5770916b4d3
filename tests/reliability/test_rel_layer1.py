"""A misbehaving Layer 1 (FakeUpbit faults): every read is answered correctly or fails with
Layer1Error, and nothing wrong is stored: every stored candle is the market's candle, and every
covered range holds every candle the market has there (no candle dropped and recorded as a
no-trade interval)."""

from __future__ import annotations

from pathlib import Path

import _relutil as R
import numpy as np
import pytest

import mds
from mds.layer1 import UpbitRouter
from mds.testing import FakeUpbit, generate_market

SYM = "KRW-BTC"


@pytest.fixture(scope="module")
def truth() -> np.ndarray:
    return generate_market(SYM, "1m", R.T0, R.T0 + 4 * R.DAY, liquidity="illiquid", seed=11)


def assert_nothing_bad_stored(st: mds.Store, truth: np.ndarray) -> None:
    db = st._health.states["sqlite"].obj
    stored = db.read_range(SYM, "1m", -(1 << 60), 1 << 60)
    pos = np.searchsorted(truth["ts"], stored["ts"])
    assert np.all(pos < len(truth)), "stored a candle the market does not have"
    assert stored.tobytes() == truth[pos].tobytes(), "stored candles differ from the market's"
    for s, e in db.coverage(SYM, "1m").tolist():
        want = truth[(truth["ts"] >= s) & (truth["ts"] < e)]
        got = stored[(stored["ts"] >= s) & (stored["ts"] < e)]
        assert got.tobytes() == want.tobytes(), f"covered range [{s}, {e}) lacks candles of the market"
    for other in ("KRW-XRP", "KRW-ETH"):  # wrong_market rows must not land under another name either
        assert len(db.read_range(other, "1m", -(1 << 60), 1 << 60)) == 0
    rep = st.check()
    assert rep.ok, rep.problems


FAULTS = [
    ("latency", {"seconds": 0.6}),  # beyond the router's timeout
    ("status", {"status": 500}),
    ("status", {"status": 503}),
    ("status", {"status": 502}),
    ("rate_limit", {}),  # a 429 storm
    ("blocked", {"message": "Too many requests. You are blocked for 1 seconds."}),
    ("malformed_json", {}),
    ("truncated", {}),
    ("wrong_market", {}),
    ("duplicate_rows", {}),
    ("unordered_rows", {}),
]


@pytest.mark.parametrize(("kind", "kw"), FAULTS, ids=[f"{k}-{kw.get('status', '')}" for k, kw in FAULTS])
@pytest.mark.parametrize("times", [2, None])
def test_misbehaving_layer1_is_handled_and_nothing_bad_is_stored(
    tmp_path: Path, truth: np.ndarray, kind: str, kw: dict, times: int | None
) -> None:
    clock = R.Clock(R.T0 + 4 * R.DAY + 30_000)
    with FakeUpbit({(SYM, "1m"): truth}, clock=clock, rate_limit=None) as up:
        l1 = UpbitRouter(
            up.base_url,
            timeout_s=0.3,
            max_retries=3,
            rate_limit=1000,
            rate_window_s=0.1,
            backoff_s=0.01,
            max_backoff_s=0.05,
            clock=clock,
        )
        cfg = mds.Config(lookup="storage_first", layer1_timeout_s=10.0)
        with mds.open(tmp_path / "s", layer1=l1, config=cfg, clock=clock) as st:
            fault = up.inject(kind, times=times, path_prefix="/v1/candles", **kw)
            outcomes = []
            reads = [
                {"start": R.T0 + 3600_000, "end": R.T0 + 3600_000 + 500 * R.MIN},  # 3 pages
                {"count": 300},
                {"start": R.T0 + R.DAY, "end": R.T0 + R.DAY + 90 * R.MIN},
            ]
            for args in reads:
                try:
                    got = st.candles(SYM, "1m", **args)
                except mds.Layer1Error:
                    outcomes.append("Layer1Error")
                    continue
                if "count" in args:
                    end = clock() // R.MIN * R.MIN
                    want = truth[truth["ts"] < end][-args["count"] :]
                else:
                    want = truth[(truth["ts"] >= args["start"]) & (truth["ts"] < args["end"])]
                assert got.tobytes() == want.tobytes(), f"{kind}: a wrong answer was returned"
                outcomes.append("ok")
            R.TALLY["layer1_fault_requests_hit"] += fault.hits
            R.TALLY["layer1_fault_scenarios"] += 1
            R.TALLY[f"layer1_outcome_{'error' if 'Layer1Error' in outcomes else 'answered'}"] += 1
            assert fault.hits > 0
            if times is not None and kind not in ("blocked",):
                # a short burst of faults is retried away (or hits a read that then fails cleanly)
                assert "ok" in outcomes, outcomes
            assert_nothing_bad_stored(st, truth)
            up.clear_faults()
            # once Layer 1 behaves, everything can be read and the store is right
            got = st.candles(SYM, "1m", start=R.T0, end=R.T0 + 2 * R.DAY)
            assert got.tobytes() == truth[truth["ts"] < R.T0 + 2 * R.DAY].tobytes()
            assert_nothing_bad_stored(st, truth)
