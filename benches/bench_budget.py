"""The machine-wide request budget (issue 18): four processes backfill different markets from one
FakeUpbit that enforces Upbit's limits (10 requests a second per group, a block after repeated
429s), each through ``mds backfill``.

Gate: the backfill's total time against the ideal, requests / 10 per second, within 1.3x. The
total time is the span of the server's request log (first arrival to last): n requests at
exactly 10 a second arrive over (n - 1) / 10 s, so that is the ideal it is divided by. Also
reported, ungated: the processes' wall time from start to exit (interpreter start and store
opening included) against n / 10. With benchmarks disabled a smaller backfill runs once and
only its answers are checked (no 429, no 418, every process done). Run::

    python -m pytest benches/bench_budget.py -m gate --benchmark-only
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _gate import gate

import mds
from mds.testing import FakeUpbit, generate_market
from mds.timeutil import to_ms

pytestmark = gate

T0 = to_ms("2025-01-01T00:00:00Z")
M = 60_000
SYMS = ("KRW-BTC", "KRW-ETH", "KRW-XRP", "KRW-SOL")
LIMIT = 1.3
RATE = 10  # requests a second per group, Upbit's quotation limit


def backfill_four(tmp: Path, candles_each: int) -> dict[str, Any]:
    tmp.mkdir(parents=True, exist_ok=True)
    end = T0 + candles_each * M
    data = {(s, "1m"): generate_market(s, "1m", T0, end, seed=i) for i, s in enumerate(SYMS)}
    # `python -m` puts the working directory first on sys.path: run the children away from a
    # source tree (whose mds has no compiled core when the package is installed, as in CI) and
    # point them at the mds this process imported
    here = str(Path(mds.__file__).resolve().parent.parent)
    env = dict(os.environ, MDS_BUDGET_DIR=str(tmp / "budget"), PYTHONPATH=here)
    with FakeUpbit(data, rate_limit=RATE, rate_window_s=1.0) as up:
        t0 = time.monotonic()
        procs = []
        for s in SYMS:
            argv = ["--path", str(tmp / s), "backfill", s, "--since", str(T0), "--until", str(end)]
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "mds.cli", *argv, "--base-url", up.base_url],
                    env=env,
                    cwd=tmp,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        errs = [p.communicate(timeout=300)[1] for p in procs]
        wall = time.monotonic() - t0
        recs = up.requests()
        counts = up.status_counts()
    assert all(p.returncode == 0 for p in procs), errs
    assert counts == {200: len(recs)}, counts  # not one 429 or 418
    n = len(recs)
    span = max(r.received for r in recs) - min(r.received for r in recs)
    return {
        "requests": n,
        "span_s": round(span, 3),
        "ideal_s": round((n - 1) / RATE, 3),
        "ratio": round(span / ((n - 1) / RATE), 3),
        "process_wall_s": round(wall, 3),
        "process_wall_ratio": round(wall / (n / RATE), 3),
    }


def test_gate_four_process_backfill_within_1_3x_of_ideal(benchmark: Any, tmp_path: Path) -> None:
    tries: list[dict[str, Any]] = []
    candles_each = 1_000 if benchmark.disabled else 6_000  # 5 or 30 requests a process

    def subject() -> None:
        tries.append(backfill_four(tmp_path / f"run{len(tries)}", candles_each))

    benchmark.extra_info.update(limit=LIMIT, gate="four-process backfill time vs requests / 10 per second")
    benchmark.pedantic(subject, rounds=1, iterations=1, warmup_rounds=0)
    if benchmark.disabled:
        return
    if tries[-1]["ratio"] > LIMIT:  # one more try, as the other gates get
        subject()
    benchmark.extra_info.update(tries=tries, **tries[-1])
    assert tries[-1]["ratio"] <= LIMIT, f"backfill took {tries[-1]['ratio']}x the ideal (> {LIMIT}); tries: {tries}"
