"""Shared pieces of the reliability suite: a fixed clock, marked batches, store digests, the tally.

Imported by the test modules, by conftest.py and by the child-process scripts (``_rel_worker.py``),
so it must not import pytest.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from mds import CANDLE_DTYPE
from mds.timeutil import to_ms

T0 = to_ms("2025-01-06T00:00:00Z")
MIN = 60_000
DAY = 86_400_000
#: The store clock of the suite: far enough after the data that every candle is closed, close
#: enough that the LMDB tier (31-day window) holds it.
NOW = T0 + 20 * DAY + 30_000

#: What the suite covered in this run (printed by conftest's terminal summary).
TALLY: collections.Counter[str] = collections.Counter()


class Clock:
    """A settable epoch-ms clock."""

    def __init__(self, t: int = NOW) -> None:
        self.t = t

    def __call__(self) -> int:
        return self.t


def marked(ts: Iterable[int] | np.ndarray, marker: float) -> np.ndarray:
    """Valid candles at ``ts`` whose ``volume`` is ``marker`` (so a reader can tell batches apart)."""
    t = np.asarray(ts, dtype=np.int64)
    a = np.zeros(len(t), CANDLE_DTYPE)
    a["ts"] = t
    price = 100.0 + (t // MIN % 977).astype(np.float64)
    a["open"] = price
    a["close"] = price + 0.5
    a["high"] = price + 1.0
    a["low"] = price - 1.0
    a["volume"] = float(marker)
    a["value"] = float(marker) * price
    return a


def store_digest(st: Any) -> str:
    """A digest of everything a store holds: every series' candles and coverage in SQLite, the raw
    LMDB chunks and held ranges, and the memory tier's windows and partial candles. Two equal
    digests mean the store holds byte-for-byte what it held."""
    h = hashlib.sha256()
    db = st._health.states["sqlite"].obj if "sqlite" in st._health.states else None
    series: list[tuple[str, str]] = []
    if db is not None:
        for sym, tfname, *_ in db.series():
            series.append((sym, tfname))
        conn = db._conn_()
        for sid, sym, tfname, seal in conn.execute("SELECT sid, symbol, timeframe, seal_ts FROM series ORDER BY sid"):
            h.update(f"S{sid}|{sym}|{tfname}|{seal}".encode())
            h.update(db.read_range(sym, tfname, -(1 << 60), 1 << 60).tobytes())
            h.update(db.coverage(sym, tfname).tobytes())
        # Not total_changes(): it also counts statements that a rolled-back batch ran, while the
        # content hashed above is what a rejected call must leave exactly as it was.
    disk = st._health.states["disk"].obj if "disk" in st._health.states else None
    if disk is not None and disk._env is not None:
        env = disk._env
        with env.lock:
            e = env.ensure_open()
            with e.begin() as txn:
                for dbh, tag in ((env.chunks, b"C"), (env.held, b"H")):
                    for k, v in txn.cursor(db=dbh):
                        h.update(tag + bytes(k) + b"=" + hashlib.sha256(bytes(v)).digest())
    mem = st._health.states["memory"].obj if "memory" in st._health.states else None
    if mem is not None:
        for sym, tfname in series:
            held = mem.held(sym, tfname)
            h.update(f"M{sym}|{tfname}|{held}".encode())
            if held is not None:
                got = mem.range(sym, tfname, held[0], held[1])
                if got is not None:
                    h.update(got.tobytes())
            part = mem.partial(sym, tfname)
            if part is not None:
                h.update(b"P" + part.tobytes())
    return h.hexdigest()


def write_report(path: Path) -> dict[str, int]:
    data = dict(sorted(TALLY.items()))
    path.write_text(json.dumps(data, indent=2) + "\n")
    return data


def fsync_append(fd: int, line: str) -> None:
    os.write(fd, line.encode())
    os.fsync(fd)


def child_env() -> dict[str, str]:
    """The environment for a child script: it imports mds exactly as this process does."""
    import sys

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return env


_LOCKER = """
import sys, apsw
c = apsw.Connection(sys.argv[1])
c.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
sys.stdin.readline()
c.execute("ROLLBACK")
"""


@contextlib.contextmanager
def sqlite_write_locked(db_file: Path) -> Iterator[None]:
    """Another process holds SQLite's write lock on ``db_file`` (an open write transaction)
    while the block runs."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _LOCKER, str(db_file)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=child_env()
    )
    TALLY["processes_started"] += 1
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != b"locked":
            raise RuntimeError("the locking process did not take the lock")
        yield
    finally:
        assert proc.stdin is not None
        proc.stdin.write(b"\n")
        proc.stdin.flush()
        proc.wait(30)
