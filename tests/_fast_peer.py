"""Another process on a store directory without a durable tier (``tiers=("memory", "disk")``),
driven one line at a time (run as a script by tests/test_shared_fast_tiers.py).

Commands on stdin, one JSON answer per line on stdout:

- ``latest N``: the newest N candles; ``range S E``: the candles of ``[S, E)``. Answer:
  ``{"ts": [...], "close": [...], "source": <the tier that answered>}``.
- ``set TS CLOSE``: write the candle at ``TS`` with that close (a correction, or a new one).
  Answer: ``{"ok": true}`` or ``{"error": "..."}``.
- ``quit``.
"""

from __future__ import annotations

import json
import sys

import numpy as np

import mds
from mds import CANDLE_DTYPE, Config

NOW = int(sys.argv[2])
SYM, TF = "KRW-BTC", "1m"


def candle(ts: int, close: float) -> np.ndarray:
    a = np.zeros(1, CANDLE_DTYPE)
    a["ts"], a["open"], a["high"], a["low"], a["close"] = ts, close, close, close, close
    a["volume"], a["value"] = 1.0, close
    return a


def main() -> None:
    with mds.open(sys.argv[1], config=Config(tiers=("memory", "disk")), clock=lambda: NOW) as st:
        print(json.dumps({"ready": True}), flush=True)
        for line in sys.stdin:
            cmd, *args = line.split()
            if cmd == "quit":
                return
            if cmd == "set":
                try:
                    st.write_candles(SYM, TF, candle(int(args[0]), float(args[1])))
                    print(json.dumps({"ok": True}), flush=True)
                except mds.MdsError as exc:
                    print(json.dumps({"error": str(exc)}), flush=True)
                continue
            before = dict(st.stats()["hits"])
            if cmd == "latest":
                got = st.candles(SYM, TF, count=int(args[0]))
            else:
                got = st.candles(SYM, TF, start=int(args[0]), end=int(args[1]))
            after = st.stats()["hits"]
            source = [k for k in after if after[k] != before.get(k)]
            out = {"ts": got["ts"].tolist(), "close": got["close"].tolist(), "source": source}
            print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
