"""Host B of the shared-history tests, run as its own process: opens a store on its own path over
the shared PostgreSQL history, reads the ranges it is given, reports what it got, then waits for
a revision to show (see test_shared_history.py). Lines in and out are JSON."""

from __future__ import annotations

import json
import sys
import time

import numpy as np

import mds
from mds.layer1 import UpbitRouter


def _fast_hits(st: mds.Store) -> int:
    hits = st.stats()["hits"]
    return int(hits["storage_memory"]) + int(hits["storage_disk"])


def main() -> None:
    args = json.loads(sys.argv[1])
    now = int(args["now"])
    router = UpbitRouter(args["layer1"], rate_limit=1000, backoff_s=0.01, max_backoff_s=0.05, clock=lambda: now)
    cfg = mds.Config(lookup="storage_first")
    with mds.open(args["path"], layer1=router, config=cfg, clock=lambda: now, history=args["history"]) as st:
        t0 = time.monotonic()
        while not st._health.feed_live and time.monotonic() - t0 < 20:  # its fast tiers in use
            time.sleep(0.01)
        sums = {}
        for sym in args["symbols"]:
            rows = st.candles(sym, "1m", start=args["start"], end=args["end"])
            sums[sym] = [len(rows), float(np.sum(rows["close"]))]
            # read again until a fast tier answers (bounded): the revision below must reach B's
            # copies, not a server read (a late heartbeat may send one read to the server)
            for _ in range(100):
                before = _fast_hits(st)
                st.candles(sym, "1m", start=args["start"], end=args["end"])
                if _fast_hits(st) > before:
                    break
                time.sleep(0.05)
        print(json.dumps({"ready": True, "sums": sums, "stats": st.stats()["hits"]}), flush=True)
        go = json.loads(sys.stdin.readline())  # the revision is committed when this line arrives
        t0 = time.monotonic()
        seen = None
        while time.monotonic() - t0 < float(go["wait_s"]):
            rows = st.candles(go["symbol"], "1m", start=go["ts"], end=go["ts"] + 60_000)
            if len(rows) and float(rows["close"][0]) == float(go["close"]):
                seen = (time.monotonic() - t0) * 1000
                break
            time.sleep(0.01)
        print(json.dumps({"seen_after_ms": seen}), flush=True)


if __name__ == "__main__":
    main()
