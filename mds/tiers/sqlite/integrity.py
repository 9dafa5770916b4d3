"""Damage in the SQLite tier: the :class:`DamagedChunkError` that names rows failing their
checksum, quarantining such rows, and the full self-check (SQLite's own check plus the tier's
invariants).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from mds import _kernels as _k
from mds.errors import MdsError
from mds.tiers.durable import DamagedChunkError
from mds.tiers.sqlite.codec import (
    CID_BITS,
    TS_LIMIT,
    Damage,
    chunk_key,
    chunk_problems,
    chunk_span,
    coverage_problems,
    tail_problems,
    tail_row_problem,
    tail_rows,
    verified,
)
from mds.tiers.sqlite.coverage import change_coverage, drop_damaged_coverage, read_coverage
from mds.timeframes import Timeframe, parse_timeframe
from mds.timeutil import iso_utc

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- naming damage
def damaged(conn: Any, path: str, sid: int, tf: Timeframe, start: int, end: int, what: str) -> DamagedChunkError:
    rows = conn.execute("SELECT symbol FROM series WHERE sid = ?", (sid,)).fetchall()
    symbol = str(rows[0][0]) if rows else f"<series {sid}>"
    when = ""
    if start > -TS_LIMIT and end < TS_LIMIT:
        when = f" ({iso_utc(start)} to {iso_utc(end)} UTC)"
    logger.warning("SQLite store %s: %s %s [%d, %d) is damaged: %s", path, symbol, tf.name, start, end, what)
    return DamagedChunkError(
        f"SQLite store {path}: stored candles of {symbol} {tf.name} in [{start}, {end}){when} are "
        f"damaged ({what}); they were not served. Drop them with quarantine_damaged() so they are "
        "refetched from Layer 1 (Store.check() names every damaged span), or restore a backup",
        symbol,
        tf.name,
        start,
        end,
    )


def chunk_damaged(conn: Any, path: str, key: int, tf: Timeframe, why: str) -> DamagedChunkError:
    start, end = chunk_span(key, tf)
    return damaged(conn, path, key >> CID_BITS, tf, start, end, f"chunk {key} {why}")


def chunk_checked(conn: Any, path: str, key: int, tf: Timeframe, codec: int, crc: int, data: Any) -> np.ndarray:
    """A stored chunk's rows, checked against its checksum; DamagedChunkError naming them if not."""
    try:
        return verified(codec, crc, data)
    except Damage as exc:
        raise chunk_damaged(conn, path, key, tf, str(exc)) from None


def tail_damaged(conn: Any, path: str, sid: int, tf: Timeframe, lo: int, hi: int) -> DamagedChunkError:
    """The error for tail values that failed a check: finds the first damaged row by its key."""
    rows = conn.execute(
        "SELECT ts, v FROM tail WHERE sid = ? AND ts >= ? AND ts < ? ORDER BY ts", (sid, lo, hi)
    ).fetchall()
    for ts, v in rows:
        why = tail_row_problem(int(ts), v)
        if why is not None:
            return damaged(conn, path, sid, tf, int(ts), tf.next(int(ts)), f"tail row {why}")
    # not one row alone: name the whole live edge that was read
    start = int(rows[0][0]) if rows else lo
    end = tf.next(int(rows[-1][0])) if rows else hi
    return damaged(conn, path, sid, tf, start, end, "tail rows do not read back as stored")


def tail_checked(
    conn: Any, path: str, data: Any, sid: int, tf: Timeframe, lo: int, hi: int, *, descending: bool = False
) -> np.ndarray:
    """The candles of tail values read for ``lo <= ts < hi``, ascending, checked (read-only,
    possibly strided: callers copy)."""
    a = tail_rows(data, lo, hi, descending)
    if a is None:
        raise tail_damaged(conn, path, sid, tf, lo, hi)
    return a


# ---------------------------------------------------------------------------- quarantine
def quarantine(conn: Any, path: str, sid: int, symbol: str, tf: Timeframe, lo: int, hi: int) -> list[tuple[int, int]]:
    """Delete the series' damaged chunks and tail rows overlapping ``[lo, hi)`` and its damaged
    coverage rows, and subtract their spans from the coverage (inside the caller's write
    transaction); the spans, ascending (empty: nothing was damaged, nothing changed)."""
    bad_keys: list[int] = []
    # damaged coverage rows go first (whatever their span says): the subtraction
    # below reads the coverage, and a damaged row must not stay to prove anything
    spans: list[tuple[int, int]] = drop_damaged_coverage(conn, sid)
    cur = conn.execute(
        "SELECT key, codec, crc, data FROM chunk WHERE key BETWEEN ? AND ?",
        (chunk_key(sid, tf, lo), chunk_key(sid, tf, hi - 1)),
    )
    try:
        for key, codec, crc, data in cur:
            try:
                verified(codec, crc, data)
            except Damage as exc:
                logger.warning("SQLite store %s: quarantining chunk %d of %s %s: %s", path, key, symbol, tf.name, exc)
                bad_keys.append(key)
                spans.append(chunk_span(key, tf))
    finally:
        cur.close()
    bad_tail: list[tuple[int, int]] = []
    for ts, v in conn.execute("SELECT ts, v FROM tail WHERE sid = ? AND ts >= ? AND ts < ?", (sid, lo, hi)).fetchall():
        why = tail_row_problem(int(ts), v)
        if why is not None:
            logger.warning("SQLite store %s: quarantining tail row %d of %s %s: %s", path, ts, symbol, tf.name, why)
            bad_tail.append((sid, int(ts)))
            spans.append((int(ts), tf.next(int(ts))))
    if not spans:
        return []
    conn.executemany("DELETE FROM chunk WHERE key = ?", [(k,) for k in bad_keys])
    conn.executemany("DELETE FROM tail WHERE sid = ? AND ts = ?", bad_tail)
    change_coverage(conn, path, sid, _k.interval_normalize(np.array(spans, dtype=np.int64)), add=False)
    return sorted(spans)


# ---------------------------------------------------------------------------- the self-check
def sqlite_problems(conn: Any, full: bool) -> list[str]:
    """What ``PRAGMA integrity_check`` (``quick_check`` unless ``full``) reports; [] when ok."""
    rows = conn.execute("PRAGMA integrity_check" if full else "PRAGMA quick_check").fetchall()
    msgs = [str(r[0]) for r in rows]
    return [] if msgs == ["ok"] else msgs


def invariant_problems(conn: Any, path: str) -> list[str]:
    """The tier's own invariants (see ``SqliteStore.integrity_problems``); a full pass."""
    problems: list[str] = []
    seals = {
        sid: (sym, tfn, seal)
        for sid, sym, tfn, seal in conn.execute("SELECT sid, symbol, timeframe, seal_ts FROM series")
    }
    for key, n, first, last, codec, crc, data in conn.execute(
        "SELECT key, n, first_ts, last_ts, codec, crc, data FROM chunk"
    ):
        sid = key >> CID_BITS
        where = f"chunk {key}"
        if sid not in seals:
            problems.append(f"{where}: belongs to no catalogued series (sid {sid})")
            continue
        sym, tfn, seal = seals[sid]
        try:
            tf = parse_timeframe(tfn)
        except MdsError as exc:
            problems.append(f"{where} of {sym} {tfn}: unknown timeframe ({exc})")
            continue
        problems += chunk_problems(key, n, first, last, codec, crc, data, f"{sym} {tfn}", tf, seal)
    for sid, ts, v in conn.execute("SELECT sid, ts, v FROM tail"):
        if sid not in seals:
            problems.append(f"tail row ({sid}, {ts}): belongs to no catalogued series")
            continue
        sym, tfn, seal = seals[sid]
        problems += tail_problems(ts, v, f"{sym} {tfn}", seal)
    for sid in seals:
        sym, tfn, _ = seals[sid]
        try:
            cov = read_coverage(conn, path, sid)
        except DamagedChunkError as exc:
            problems.append(f"coverage of {sym} {tfn}: a row does not match its checksum ({exc.span})")
            continue
        try:
            ctf: Timeframe | None = parse_timeframe(tfn)
        except MdsError:
            ctf = None
        problems += coverage_problems(cov, f"{sym} {tfn}", ctf)
    orphans = conn.execute("SELECT count(*) FROM coverage WHERE sid NOT IN (SELECT sid FROM series)").fetchall()
    if orphans[0][0]:
        problems.append(f"{orphans[0][0]} coverage rows belong to no catalogued series")
    return problems
