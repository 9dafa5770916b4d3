"""Pieces of the model-based property test (test_rel_model.py): the model of what a store has
acknowledged, a fake Layer 1 serving a fixed "exchange truth", and the fault injectors.

The model is deliberately independent of mds: plain dicts and sorted lists of intervals, no
kernels, so a bug in the store's interval or merge code cannot hide in the model too.
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _relutil as R
import apsw
import lmdb
import numpy as np

from mds import CANDLE_DTYPE, MdsError, candles_to_upbit
from mds.timeutil import to_ms

HOUR = 60 * R.MIN


@dataclass(frozen=True)
class Series:
    """One series of the test and the grid of slots the operations draw from."""

    symbol: str
    tf: str
    interval: int
    origin: int  # slot 0 opens here
    slots: int  # slot k opens at origin + k * interval

    def ts(self, slot: int) -> int:
        return self.origin + slot * self.interval


#: btc: 3000 1m slots ending 100 minutes before R.NOW: three SQLite chunks (1024 slots each), three
#: LMDB periods (one day each), more than the memory tier's 1000 candles. eth: 400 1h slots ending
#: 60 days before R.NOW, older than the LMDB tier's 31 days: only memory and SQLite hold them.
SERIES: dict[str, Series] = {
    "btc": Series("KRW-BTC", "1m", R.MIN, R.T0 + 20 * R.DAY - 3100 * R.MIN, 3000),
    "eth": Series("KRW-ETH", "1h", HOUR, R.T0 - 60 * R.DAY, 400),
}


def typed_error_names() -> frozenset[str]:
    """Names of MdsError and all its subclasses (``get`` reports errors as ``"Name: message"``)."""
    out: set[str] = set()
    todo: list[type] = [MdsError]
    while todo:
        cls = todo.pop()
        out.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    return frozenset(out)


# ------------------------------------------------------------------------------ intervals
def iv_union(ivs: list[tuple[int, int]], add: tuple[int, int]) -> list[tuple[int, int]]:
    """Sorted, merged half-open intervals ``ivs`` plus ``add`` (touching intervals merge)."""
    out: list[tuple[int, int]] = []
    for s, e in sorted([*ivs, add]):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def iv_subtract(ivs: list[tuple[int, int]], cut: tuple[int, int]) -> list[tuple[int, int]]:
    lo, hi = cut
    out: list[tuple[int, int]] = []
    for s, e in ivs:
        if e <= lo or s >= hi:
            out.append((s, e))
            continue
        if s < lo:
            out.append((s, lo))
        if e > hi:
            out.append((hi, e))
    return out


def iv_contains(ivs: list[tuple[int, int]], t: int) -> bool:
    return any(s <= t < e for s, e in ivs)


# ------------------------------------------------------------------------------ the model
@dataclass
class SeriesModel:
    """What the store acknowledged for one series: rows by ts (last write wins) and coverage."""

    series: Series
    rows: dict[int, bytes] = field(default_factory=dict)
    cov: list[tuple[int, int]] = field(default_factory=list)

    def array(self) -> np.ndarray:
        if not self.rows:
            return np.zeros(0, CANDLE_DTYPE)
        return np.frombuffer(b"".join(self.rows[t] for t in sorted(self.rows)), dtype=CANDLE_DTYPE)

    # -- acknowledged changes
    def write(self, batch: np.ndarray, complete: tuple[int, int] | None) -> tuple[int, int, int]:
        """Apply an acknowledged batch (given order, last wins); returns the expected WriteResult."""
        last: dict[int, bytes] = {}
        for row in batch:
            last[int(row["ts"])] = row.tobytes()
        ins = upd = same = 0
        for t, b in last.items():
            old = self.rows.get(t)
            ins += old is None
            upd += old is not None and old != b
            same += old == b
            self.rows[t] = b
        if complete is not None:
            self.cov = iv_union(self.cov, complete)
        return ins, upd, same

    def delete(self, lo: int | None, hi: int | None) -> int:
        lo = -(1 << 62) if lo is None else lo
        hi = 1 << 62 if hi is None else hi
        gone = [t for t in self.rows if lo <= t < hi]
        for t in gone:
            del self.rows[t]
        self.cov = iv_subtract(self.cov, (lo, hi))
        return len(gone)

    # -- expected answers (DESIGN.md section 2; Store.candles docstring)
    def latest(self, n: int, end: int | None, last_end: int) -> np.ndarray:
        """``candles(count=n[, end=])``: the newest n closed candles before ``end`` (default: the
        end of the last closed interval, ``last_end``)."""
        a = self.array()
        hi = last_end if end is None else min(end, last_end)
        return a[a["ts"] < hi][-n:]

    def range(self, s: int, e: int) -> np.ndarray:
        a = self.array()
        return a[(a["ts"] >= s) & (a["ts"] < e)]

    def first(self, s: int, n: int, last_end: int) -> np.ndarray:
        a = self.array()
        return a[(a["ts"] >= s) & (a["ts"] < last_end)][:n]

    def gaps(self, s: int | None, e: int | None) -> list[tuple[int, int, str]]:
        """``gaps()`` as the contract defines it: runs of grid slots without a candle in the range
        (default: the span of coverage and data), ``no_trades`` inside coverage, else
        ``missing``. ``s``/``e`` are aligned."""
        ts = sorted(self.rows)
        inside = [t for t in ts if (s is None or t >= s) and (e is None or t < e)]
        step = self.series.interval
        if s is None:
            firsts = [inside[0]] if inside else []
            if self.cov:
                firsts.append(self.cov[0][0] if self.cov[0][0] > 0 or not inside else inside[0])
            if not firsts:
                return []
            s = min(firsts)
        if e is None:
            lasts = [inside[-1] + step] if inside else []
            if self.cov:
                lasts.append(self.cov[-1][1])
            if not lasts:
                return []
            e = max(lasts)
        have = set(inside)
        out: list[tuple[int, int, str]] = []
        t = s + (-s) % step  # first aligned slot >= s (1m and 1h align to the epoch)
        while t < e:
            if t not in have:
                kind = "no_trades" if iv_contains(self.cov, t) else "missing"
                if out and out[-1][1] == t and out[-1][2] == kind:
                    out[-1] = (out[-1][0], t + step, kind)
                else:
                    out.append((t, t + step, kind))
            t += step
        return out


def truth_market(series: Series, seed: int) -> np.ndarray:
    """The exchange's candles of a series: about 4 slots in 5 traded, valid, varied prices."""
    rng = np.random.default_rng(seed)
    slots = np.flatnonzero(rng.random(series.slots) < 0.8)
    a = R.marked(series.ts(0) + slots * series.interval, 1.0)
    a["volume"] = rng.uniform(0.1, 5.0, len(a)).round(6)
    a["value"] = a["volume"] * a["close"]
    return a


# ------------------------------------------------------------------------------ a fake Layer 1
#: What a misbehaving Layer 1 does with one candle call. Not among them: an empty page where the
#: exchange has candles. That is exactly what the exchange answers before the start of a market's
#: history, so a store cannot tell the lie from the truth (issue 14 item 1: an empty page asked for
#: before the oldest candle received may be taken as that proof).
L1_MODES = (
    "short",  # half of the rows it has, at least one (a flaky half page)
    "raise",  # an exception (connection reset)
    "success_false",  # {"success": False}
    "not_a_dict",  # the rows without the envelope
    "zero_price",  # one candle with price 0 (invalid: prices are > 0)
    "high_below_low",  # one candle whose high is below its low
    "cancelled",  # asyncio.CancelledError out of the coroutine
)


class FakeLayer1:
    """The Smart Router's async shape over fixed arrays (the exchange truth), with faults.

    Serves at most ``cap`` (200 by default) candles a call, newest first, before the exclusive
    ``to``, like Upbit (an interval without trades has no candle). ``queue`` holds modes for the
    next candle calls (one each); ``cap`` below 200 is a Layer 1 that caps its pages (a short page
    every time, never an empty one while it has candles).
    """

    def __init__(self, truth: dict[tuple[str, str], np.ndarray]) -> None:
        self.truth = truth
        self.queue: list[str] = []
        self.cap = 200
        self.calls = 0
        self.misbehaved: dict[str, int] = {}

    async def get_candle_data(
        self, symbols: list[str], interval: str, count: int = 200, to: Any = None, use_cache: bool = True
    ) -> Any:
        self.calls += 1
        mode = self.queue.pop(0) if self.queue else "ok"
        if mode != "ok":
            self.misbehaved[mode] = self.misbehaved.get(mode, 0) + 1
        await asyncio.sleep(0)
        if mode == "raise":
            raise ConnectionResetError("injected: connection reset by peer")
        if mode == "cancelled":
            raise asyncio.CancelledError()
        if mode == "success_false":
            return {"success": False, "error": "injected: upstream 503", "data": None, "metadata": {}}
        rows: list[dict[str, Any]] = []
        for sym in symbols:
            arr = self.truth.get((sym, interval), np.zeros(0, CANDLE_DTYPE))
            if to is not None:
                arr = arr[arr["ts"] < to_ms(to)]
            page = arr[len(arr) - min(len(arr), count, 200, self.cap) :][::-1]
            if mode == "short" and len(page) > 1:
                page = page[: len(page) // 2]
            got = candles_to_upbit(np.ascontiguousarray(page), sym, interval)
            if got and mode == "zero_price":
                got[len(got) // 2].update(opening_price=0.0, low_price=0.0, trade_price=0.0)
            elif got and mode == "high_below_low":
                r = got[len(got) // 2]
                r["high_price"], r["low_price"] = r["low_price"], r["high_price"]
            rows += got
        if mode == "not_a_dict":
            return rows
        return {"success": True, "data": rows, "metadata": {"source": "api"}}

    async def get_ticker_data(self, symbols: list[str], use_cache: bool = True) -> Any:
        return {"success": False, "error": "no tickers in this test", "data": None, "metadata": {}}

    async def get_orderbook_data(self, symbols: list[str], use_cache: bool = True) -> Any:
        return {"success": False, "error": "no orderbooks in this test", "data": None, "metadata": {}}

    async def get_trades(self, symbols: list[str], count: int = 100) -> Any:
        return {"success": False, "error": "no trades in this test", "data": None, "metadata": {}}


# ------------------------------------------------------------------------------ storage faults
class Tmpfs:
    """A small tmpfs mounted at a directory, remountable read-only: the one cheap way to make a
    directory read-only for root, whom file permissions do not stop."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.readonly = False

    @classmethod
    def mount(cls, path: Path) -> Tmpfs | None:
        """The mounted tmpfs, or None when this process cannot mount (not root, no permission)."""
        if not hasattr(os, "geteuid") or os.geteuid() != 0:
            return None
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64m,mode=0700", "tmpfs", str(path)], capture_output=True
        )
        return cls(path) if r.returncode == 0 else None

    def remount(self, readonly: bool) -> bool:
        r = subprocess.run(
            ["mount", "-o", f"remount,{'ro' if readonly else 'rw'}", str(self.path)], capture_output=True
        )
        if r.returncode == 0:
            self.readonly = readonly
        return r.returncode == 0

    def unmount(self) -> None:
        if subprocess.run(["umount", str(self.path)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True)


class SqliteLock:
    """Another connection of this process holding SQLite's write lock (``BEGIN IMMEDIATE``), as
    ``mds maintain --force`` in another process would."""

    def __init__(self, conn: apsw.Connection) -> None:
        self.conn = conn

    @classmethod
    def take(cls, db_path: Path) -> SqliteLock | None:
        """The lock, or None if the file cannot be locked (it is not a database any more)."""
        conn = apsw.Connection(str(db_path))
        try:
            conn.set_busy_timeout(2000)
            conn.execute("BEGIN IMMEDIATE")
        except apsw.Error:
            conn.close()
            return None
        return cls(conn)

    def release(self) -> None:
        self.conn.execute("ROLLBACK")
        self.conn.close()


def flip_sqlite_byte(db_path: Path, rng: random.Random) -> bool:
    """Flip one bit inside a stored candle blob (a chunk or a tail row) in the database file.

    The WAL is checkpointed into the file first (by another connection: invisible to the store),
    then a random byte of a random blob is located in the file by a window of its bytes that
    occurs exactly once. Returns False when no such window was found (nothing was changed).
    """
    conn = apsw.Connection(str(db_path))
    try:
        conn.set_busy_timeout(2000)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        blobs = [bytes(b) for (b,) in conn.execute("SELECT data FROM chunk")]
        blobs += [bytes(b) for (b,) in conn.execute("SELECT v FROM tail")]
    except apsw.Error:  # not a database any more (an earlier fault garbled it)
        return False
    finally:
        conn.close()
    if not blobs:
        return False
    data = db_path.read_bytes()
    for _ in range(40):
        blob = blobs[rng.randrange(len(blobs))]
        off = rng.randrange(len(blob))
        lo = max(0, off - 12)
        window = blob[lo : lo + 24]
        if len(window) < 16:
            continue
        pos = data.find(window)
        if pos < 0 or data.find(window, pos + 1) >= 0:
            continue
        at = pos + off - lo
        with open(db_path, "r+b") as f:
            f.seek(at)
            f.write(bytes([data[at] ^ (1 << rng.randrange(8))]))
            f.flush()
            os.fsync(f.fileno())
        return True
    return False


def garble_sqlite_header(db_path: Path, rng: random.Random) -> tuple[int, bytes, bytes]:
    """Garbage over the first 100 bytes (the SQLite header) of a closed database file; returns
    what :func:`restore_sqlite_header` needs: ``(inode, header, garbage)``."""
    garbage = rng.randbytes(100)
    with open(db_path, "r+b") as f:
        header = f.read(100)
        f.seek(0)
        f.write(garbage)
    return os.stat(db_path).st_ino, header, garbage


def restore_sqlite_header(db_path: Path, inode: int, header: bytes, garbage: bytes) -> bool:
    """Put the header back, unless the file is another one now (the store moved the damaged file
    away, or rewrote it): then acknowledged writes may live in the new file."""
    try:
        if os.stat(db_path).st_ino != inode:
            return False
        with open(db_path, "r+b") as f:
            if f.read(100) != garbage:
                return False
            f.seek(0)
            f.write(header)
    except FileNotFoundError:
        return False
    return True


def damage_lmdb(lmdb_dir: Path, how: str, rows: list[bytes], rng: random.Random) -> bool:
    """Damage the data file of a closed LMDB environment.

    ``meta``: garbage over both meta pages. ``truncate``: cut the file to 12 KiB. ``row``: flip a
    bit in every copy of a stored candle row (``rows``: the model's rows to look for; the tier
    keeps rows raw, so a row's 56 bytes are found in the file). Returns False if nothing changed.
    """
    data_file = lmdb_dir / "data.mdb"
    if not data_file.exists():
        return False
    if how == "meta":
        with open(data_file, "r+b") as f:
            f.write(rng.randbytes(8192))
        return True
    if how == "truncate":
        os.truncate(data_file, 12 * 1024)
        return True
    data = data_file.read_bytes()
    for _ in range(30):
        if not rows:
            return False
        row = rows[rng.randrange(len(rows))]
        hits = []
        pos = data.find(row)
        while pos >= 0:
            hits.append(pos)
            pos = data.find(row, pos + 1)
        if not hits:
            continue
        off = rng.randrange(len(row))
        bit = 1 << rng.randrange(8)
        with open(data_file, "r+b") as f:
            for p in hits:
                f.seek(p + off)
                f.write(bytes([data[p + off] ^ bit]))
        return True
    return False


#: Tier methods a one-shot backend error is injected into, and the backend's own errors.
BACKEND_TARGETS = {
    "sqlite": ("write", "delete", "read_range", "read_latest", "read_from", "coverage", "last_ts"),
    "disk": ("get_range", "get_latest", "put_range", "delete", "held"),
}
BACKEND_ERRORS = {
    "sqlite": (apsw.IOError, apsw.CorruptError),
    "disk": (lmdb.Error, lmdb.CorruptedError),
}


class OneShot:
    """Make ``obj.name`` raise ``exc`` on its next call only (an instance attribute shadowing the
    method, so the store's calls through ``obj.name`` see it)."""

    def __init__(self, obj: Any, name: str, exc: BaseException) -> None:
        self.obj, self.name = obj, name
        self.fired = False
        real = getattr(obj, name)

        def once(*args: Any, **kwargs: Any) -> Any:
            if not self.fired:
                self.fired = True
                self.remove()
                raise exc
            return real(*args, **kwargs)

        setattr(obj, name, once)

    def remove(self) -> None:
        self.obj.__dict__.pop(self.name, None)
