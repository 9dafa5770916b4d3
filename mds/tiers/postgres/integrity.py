"""Damage in the PostgreSQL tier: the :class:`DamagedChunkError` naming stored rows that fail
their checksum, quarantining such rows, and the self-check of the tier's invariants.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from mds import _kernels as _k
from mds.errors import MdsError
from mds.tiers._chunks import (
    CID_BITS,
    TS_LIMIT,
    Damage,
    chunk_key,
    chunk_problems,
    chunk_span,
    coverage_crc,
    coverage_problems,
    tail_problems,
    tail_row_problem,
    tail_rows,
    verified,
)
from mds.tiers.durable import DamagedChunkError
from mds.tiers.postgres.catalog import Series
from mds.tiers.postgres.coverage import change_coverage, drop_damaged_coverage
from mds.timeframes import Timeframe, parse_timeframe
from mds.timeutil import iso_utc

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- naming damage
def damaged(where: str, s: Series, start: int, end: int, what: str) -> DamagedChunkError:
    when = f" ({iso_utc(start)} to {iso_utc(end)} UTC)" if start > -TS_LIMIT and end < TS_LIMIT else ""
    logger.warning("PostgreSQL tier %s: %s %s [%d, %d) is damaged: %s", where, s.symbol, s.tf.name, start, end, what)
    return DamagedChunkError(
        f"PostgreSQL tier {where}: stored candles of {s.symbol} {s.tf.name} in [{start}, {end}){when} are "
        f"damaged ({what}); they were not served. Drop them with quarantine_damaged() so they are refetched "
        "from Layer 1 (Store.check() names every damaged span)",
        s.symbol,
        s.tf.name,
        start,
        end,
    )


def checked_chunk(where: str, s: Series, key: int, codec: int, crc: int, data: Any) -> np.ndarray:
    """A stored chunk's rows, checked against its checksum (read-only view)."""
    try:
        return verified(codec, crc, data)
    except Damage as exc:
        start, end = chunk_span(key, s.tf)
        raise damaged(where, s, start, end, f"chunk {key} {exc}") from None


def checked_tail(conn: Any, where: str, s: Series, data: Any, lo: int, hi: int, descending: bool = False) -> np.ndarray:
    """The candles of concatenated tail values read for ``lo <= ts < hi``, checked; on damage the
    first damaged row is named (looked up by its key)."""
    a = tail_rows(data, lo, hi, descending)
    if a is not None:
        return a
    rows = conn.execute(
        "SELECT ts, v FROM mds_tail WHERE sid = %s AND ts >= %s AND ts < %s ORDER BY ts", (s.sid, lo, hi)
    ).fetchall()
    for ts, v in rows:
        why = tail_row_problem(int(ts), bytes(v))
        if why is not None:
            raise damaged(where, s, int(ts), s.tf.next(int(ts)), f"tail row {why}")
    start = int(rows[0][0]) if rows else lo
    end = s.tf.next(int(rows[-1][0])) if rows else hi
    raise damaged(where, s, start, end, "tail rows do not read back as stored")


# ---------------------------------------------------------------------------- quarantine
def quarantine(conn: Any, where: str, s: Series, lo: int, hi: int) -> list[tuple[int, int]]:
    """Delete the series' damaged chunks, tail rows and coverage rows overlapping ``[lo, hi)``,
    and subtract their spans from the coverage (inside the caller's write transaction, under
    the series lock); the spans, ascending (empty: nothing was damaged, nothing changed)."""
    spans = drop_damaged_coverage(conn, s.sid)
    bad_keys = []
    for key, codec, crc, data in conn.execute(
        "SELECT key, codec, crc, data FROM mds_chunk WHERE key BETWEEN %s AND %s",
        (chunk_key(s.sid, s.tf, lo), chunk_key(s.sid, s.tf, hi - 1)),
    ).fetchall():
        try:
            verified(codec, crc, data)
        except Damage as exc:
            logger.warning(
                "PostgreSQL tier %s: quarantining chunk %d of %s %s: %s", where, key, s.symbol, s.tf.name, exc
            )
            bad_keys.append(int(key))
            spans.append(chunk_span(key, s.tf))
    bad_ts = []
    for ts, v in conn.execute(
        "SELECT ts, v FROM mds_tail WHERE sid = %s AND ts >= %s AND ts < %s", (s.sid, lo, hi)
    ).fetchall():
        why = tail_row_problem(int(ts), bytes(v))
        if why is not None:
            logger.warning(
                "PostgreSQL tier %s: quarantining tail row %d of %s %s: %s", where, ts, s.symbol, s.tf.name, why
            )
            bad_ts.append(int(ts))
            spans.append((int(ts), s.tf.next(int(ts))))
    if not spans:
        return []
    if bad_keys:
        conn.execute("DELETE FROM mds_chunk WHERE key = ANY(%s)", (bad_keys,))
    if bad_ts:
        conn.execute("DELETE FROM mds_tail WHERE sid = %s AND ts = ANY(%s)", (s.sid, bad_ts))
    ranges = _k.interval_normalize(np.array(spans, dtype=np.int64))
    change_coverage(conn, where, s.sid, s.symbol, s.tf.name, ranges, add=False)
    return sorted(spans)


# ---------------------------------------------------------------------------- the self-check
def invariant_problems(conn: Any) -> list[str]:
    """Every stored row checked against its checksum and the layout's invariants (a full pass;
    chunks stream through a server-side cursor, so the caller's transaction is needed)."""
    problems: list[str] = []
    catalog: dict[int, tuple[str, int, Timeframe | None]] = {}
    for sid, sym, tfn, seal in conn.execute("SELECT sid, symbol, timeframe, seal_ts FROM mds_series").fetchall():
        try:
            tf: Timeframe | None = parse_timeframe(tfn)
        except MdsError as exc:
            problems.append(f"series {sym} {tfn}: unknown timeframe ({exc})")
            tf = None
        catalog[int(sid)] = (f"{sym} {tfn}", int(seal), tf)
    with conn.cursor(name="mds_check", binary=True) as cur:
        cur.itersize = 64
        cur.execute("SELECT key, n, first_ts, last_ts, codec, crc, data FROM mds_chunk ORDER BY key")
        for key, n, first, last, codec, crc, data in cur:
            label, seal, ctf = catalog.get(int(key) >> CID_BITS, ("", 0, None))
            if not label:
                problems.append(f"chunk {key}: belongs to no catalogued series (sid {int(key) >> CID_BITS})")
            elif ctf is not None:
                problems += chunk_problems(int(key), n, first, last, codec, crc, data, label, ctf, seal)
    for sid, ts, v in conn.execute("SELECT sid, ts, v FROM mds_tail ORDER BY sid, ts").fetchall():
        entry = catalog.get(int(sid))
        if entry is None:
            problems.append(f"tail row ({sid}, {ts}): belongs to no catalogued series")
        else:
            problems += tail_problems(int(ts), bytes(v), entry[0], entry[1])
    by_sid: dict[int, list[tuple[int, int]]] = {}
    for sid, a, b, crc in conn.execute("SELECT sid, start_ts, end_ts, crc FROM mds_coverage ORDER BY sid, start_ts"):
        entry = catalog.get(int(sid))
        if entry is None:
            problems.append(f"coverage row ({sid}, {a}): belongs to no catalogued series")
        elif coverage_crc(int(sid), int(a), int(b)) != crc:
            problems.append(f"coverage of {entry[0]}: a row does not match its checksum ({a}, {b})")
        else:
            by_sid.setdefault(int(sid), []).append((int(a), int(b)))
    for sid, ranges in by_sid.items():
        label, _, ctf = catalog[sid]
        problems += coverage_problems(np.array(ranges, dtype=np.int64), label, ctf)
    return problems
