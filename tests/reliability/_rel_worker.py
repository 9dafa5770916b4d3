"""Child processes of the reliability suite (run as a script, killed with SIGKILL by the parent).

``crash`` mode: imports everything, then waits for one line on stdin:
``go <store path> <seed> <first batch id> <ack file>``. It opens the store, appends ``ready`` to
the ack file, then applies batches ``first, first + 1, ...`` (see :func:`plan`) forever,
appending each batch id to the ack file (fsync'd) after its write returned.

``writer`` / ``reader`` modes: the concurrency test (see test_rel_concurrency.py).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

import _relutil as R

import mds
from mds.timeframes import parse_timeframe

SERIES = [("KRW-BTC", "1m"), ("KRW-ETH", "1m"), ("KRW-XRP", "5m"), ("BTC-ETH", "1h")]
WINDOW = 10 * R.DAY  # data lives in [T0, T0 + WINDOW)


def _one_write(rng: np.random.Generator, k: int, complete_p: float) -> tuple[str, str, np.ndarray, Any]:
    sym, tfname = SERIES[int(rng.integers(len(SERIES)))]
    tf = parse_timeframe(tfname)
    slots = WINDOW // tf.interval_ms
    big = rng.random() < 0.1
    n = int(rng.integers(1, 3000 if big else 300))
    n = min(n, slots)
    first = int(rng.integers(0, slots - n + 1))
    start = R.T0 + first * tf.interval_ms
    ts = start + tf.interval_ms * np.arange(n, dtype=np.int64)
    keep = rng.random(n) > 0.1  # about one interval in ten without trades
    rows = R.marked(ts[keep], float(k + 1))
    if len(rows) > 1 and rng.random() < 0.3:  # unsorted with duplicates: the store sorts, last wins
        extra = rows[rng.integers(0, len(rows), size=max(1, len(rows) // 10))].copy()
        extra["volume"] = float(k + 1)
        rows = np.concatenate([rows, extra])
        rows = rows[rng.permutation(len(rows))]
    complete = (start, start + n * tf.interval_ms) if rng.random() < complete_p else None
    return sym, tfname, rows, complete


def plan(seed: int, k: int) -> tuple[str, list[tuple[str, ...] | tuple[Any, ...]]]:
    """Batch ``k``: ``("write", [op])``, ``("batch", [op, op, ...])`` or ``("delete", [op])``.

    A write op is ``(sym, tf, rows, complete)``; a delete op ``(sym, tf, start, end)``.
    """
    rng = np.random.default_rng([seed, k])
    u = rng.random()
    if u < 0.05:
        sym, tfname = SERIES[int(rng.integers(len(SERIES)))]
        tf = parse_timeframe(tfname)
        slots = WINDOW // tf.interval_ms
        a = int(rng.integers(0, slots - 1))
        b = int(rng.integers(a + 1, min(slots, a + 200) + 1))
        return "delete", [(sym, tfname, R.T0 + a * tf.interval_ms, R.T0 + b * tf.interval_ms)]
    if u < 0.55:
        return "write", [_one_write(rng, k, 0.8)]
    return "batch", [_one_write(rng, k, 0.5) for _ in range(int(rng.integers(2, 5)))]


def apply(st: mds.Store, kind: str, ops: list[Any]) -> None:
    if kind == "delete":
        sym, tfname, s, e = ops[0]
        st.delete(sym, tfname, start=s, end=e)
    elif kind == "write":
        sym, tfname, rows, complete = ops[0]
        st.write_candles(sym, tfname, rows, complete=complete)
    else:
        with st.batch():
            for sym, tfname, rows, complete in ops:
                st.write_candles(sym, tfname, rows, complete=complete)


def crash_main() -> None:
    line = sys.stdin.readline().split()
    if not line or line[0] != "go":
        return
    path, seed, first, ack = line[1], int(line[2]), int(line[3]), line[4]
    fd = os.open(ack, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    st = mds.open(path, clock=lambda: R.NOW)
    R.fsync_append(fd, "ready\n")
    k = first
    while True:
        kind, ops = plan(seed, k)
        apply(st, kind, ops)
        R.fsync_append(fd, f"{k}\n")
        k += 1


# --- concurrency ---------------------------------------------------------------------------------
CONC_SERIES = ("KRW-BTC", "KRW-ETH")
CONC_REGIONS = 8
CONC_N = 120  # candles per series per batch


def region_span(r: int) -> tuple[int, int]:
    start = R.T0 + r * 200 * R.MIN
    return start, start + CONC_N * R.MIN


def writer_main(path: str, seconds: float, out: str) -> None:
    import json

    problems: list[str] = []
    k = 0
    try:
        st = mds.open(path, clock=lambda: R.NOW)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            k += 1
            s, e = region_span(k % CONC_REGIONS)
            rows = R.marked(np.arange(s, e, R.MIN), float(k))
            with st.batch():
                for sym in CONC_SERIES:
                    st.write_candles(sym, "1m", rows, complete=(s, e))
        st.close()
    except Exception as exc:  # reported to the parent, which fails the test on it
        problems.append(f"batch {k}: {type(exc).__name__}: {exc}")
    Path(out).write_text(json.dumps({"batches": k, "problems": problems}))


def reader_main(path: str, seconds: float, out: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    st = mds.open(path, clock=lambda: R.NOW)
    deadline = time.monotonic() + seconds
    reads = 0
    problems: list[str] = []  # errors and torn batches
    stale: list[str] = []  # data older than what this process already knew was committed
    seen = [0.0] * CONC_REGIONS
    try:
        while time.monotonic() < deadline and len(problems) < 20:
            r = int(rng.integers(CONC_REGIONS))
            s, e = region_span(r)
            markers = []
            for sym in CONC_SERIES:
                if rng.random() < 0.5:
                    got = st.candles(sym, "1m", start=s, end=e)
                else:
                    got = st.candles(sym, "1m", count=CONC_N, end=e)
                    got = got[got["ts"] >= s]
                reads += 1
                vols = set(got["volume"].tolist())
                if len(got) not in (0, CONC_N) or len(vols) > 1:
                    problems.append(f"{sym} region {r}: {len(got)} rows, markers {sorted(vols)[:5]} (half a batch)")
                    continue
                markers.append(vols.pop() if vols else 0.0)
            if len(markers) == 2:
                if markers[1] < markers[0] and len(stale) < 1000:
                    stale.append(f"region {r}: {CONC_SERIES[1]} at {markers[1]} older than {markers[0]}")
                if markers[0] < seen[r] and len(stale) < 1000:
                    stale.append(f"region {r}: went back from {seen[r]} to {markers[0]}")
                seen[r] = max(seen[r], markers[0])
        rep = st.check()
        if not rep.ok:
            problems.append(f"check: {rep.problems}")
    except Exception as exc:  # report every error to the parent, which fails the test on it
        problems.append(f"{type(exc).__name__}: {exc}")
    finally:
        st.close()
    import json

    Path(out).write_text(json.dumps({"reads": reads, "problems": problems, "stale": stale, "seen": seen}))


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "crash":
        crash_main()
    elif mode == "writer":
        writer_main(sys.argv[2], float(sys.argv[3]), sys.argv[4])
    elif mode == "reader":
        reader_main(sys.argv[2], float(sys.argv[3]), sys.argv[4], int(sys.argv[5]))
