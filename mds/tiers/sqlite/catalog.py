"""The SQLite tier's series catalog: ``(symbol, timeframe)`` to the series id ``sid`` that keys its
chunks, tail rows and coverage, the writer's live-edge state per series, and the list of series.
"""

from __future__ import annotations

from typing import Any

from mds.tiers.sqlite.codec import CID_BITS, NEG_INF
from mds.timeframes import Timeframe


class Catalog:
    """What one connection knows of the ``series`` table, cached.

    ``sids`` maps ``(symbol, timeframe name)`` to ``sid`` (a sid never changes: series rows are
    kept when a series is deleted). ``seals`` holds, for the writer, ``[seal_ts, tail rows,
    newest tail ts]`` per sid; it is dropped whenever another connection may have changed it.
    Both are cleared on a rollback (a rolled-back transaction may have created the rows).
    """

    __slots__ = ("seals", "sids")

    def __init__(self) -> None:
        self.sids: dict[tuple[str, str], int] = {}
        self.seals: dict[int, list[int]] = {}

    def lookup(self, conn: Any, symbol: str, tf: Timeframe) -> int | None:
        """The series' sid (None: no such series)."""
        k = (symbol, tf.name)
        sid = self.sids.get(k)
        if sid is None:
            rows = conn.execute("SELECT sid FROM series WHERE symbol = ? AND timeframe = ?", k).fetchall()
            if not rows:
                return None
            sid = self.sids[k] = int(rows[0][0])
        return sid

    def sid_for_write(self, conn: Any, symbol: str, tf: Timeframe) -> int:
        """The series' sid, creating the series (inside the caller's write transaction)."""
        sid = self.lookup(conn, symbol, tf)
        if sid is None:
            conn.execute("INSERT INTO series(symbol, timeframe, seal_ts) VALUES (?, ?, ?)", (symbol, tf.name, NEG_INF))
            sid = self.sids[(symbol, tf.name)] = int(conn.last_insert_rowid())
            self.seals[sid] = [NEG_INF, 0, NEG_INF]
        return sid

    def seal_state(self, conn: Any, sid: int) -> list[int]:
        """``[seal_ts, tail rows, newest tail ts]`` of the series; the writer updates it in place."""
        st = self.seals.get(sid)
        if st is None:
            seal = conn.execute("SELECT seal_ts FROM series WHERE sid = ?", (sid,)).fetchall()[0][0]
            n, newest = conn.execute("SELECT count(*), max(ts) FROM tail WHERE sid = ?", (sid,)).fetchall()[0]
            st = self.seals[sid] = [int(seal), int(n), NEG_INF if newest is None else int(newest)]
        return st

    def clear(self) -> None:
        self.sids.clear()
        self.seals.clear()


def list_series(conn: Any) -> list[tuple[str, str, int, int, int]]:
    """Every series with candles: ``(symbol, timeframe name, count, first_ts, last_ts)`` (call
    inside a read transaction: several statements)."""
    out = []
    for sid, symbol, tfname in conn.execute(
        "SELECT sid, symbol, timeframe FROM series ORDER BY symbol, timeframe"
    ).fetchall():
        lo, hi = sid << CID_BITS, ((sid + 1) << CID_BITS) - 1
        cn, cf, cl = conn.execute(
            "SELECT coalesce(sum(n), 0), min(first_ts), max(last_ts) FROM chunk WHERE key BETWEEN ? AND ?",
            (lo, hi),
        ).fetchall()[0]
        tn, tfst, tl = conn.execute("SELECT count(*), min(ts), max(ts) FROM tail WHERE sid = ?", (sid,)).fetchall()[0]
        count = int(cn) + int(tn)
        if count:
            first = cf if cf is not None else tfst
            last = tl if tl is not None else cl
            out.append((symbol, tfname, count, int(first), int(last)))
    return out
