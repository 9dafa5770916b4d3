"""The PostgreSQL tier's series catalog (``mds_series``): ``(symbol, timeframe)`` to the series id
``sid`` that keys its chunks, tail rows and coverage, and the per-series write lock that
serialises writers of one series across hosts.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from mds.errors import StorageUnavailableError
from mds.tiers._chunks import NEG_INF
from mds.timeframes import Timeframe

_SQL_LOCK = "SELECT sid, seal_ts FROM mds_series WHERE symbol = %s AND timeframe = %s FOR UPDATE"


#: ``NOT EXISTS`` of a series' catalog row as cached (sid, symbol, timeframe): true when the
#: tables were created again under a live connection and the id now names another series (or
#: none). The reads run it in their first statement (a primary-key probe) and raise StaleCatalog.
SQL_STALE = "NOT EXISTS (SELECT 1 FROM mds_series WHERE sid = %s AND symbol = %s AND timeframe = %s)"


class StaleCatalog(StorageUnavailableError):
    """A cached series id no longer names the series (the tables were created again under a live
    connection: ``pg_restore --clean``, an operator starting over). The tier forgets the cache
    and asks again."""


class Series(NamedTuple):
    """One series as the role modules see it: its id, market code and timeframe."""

    sid: int
    symbol: str
    tf: Timeframe

    @property
    def key(self) -> tuple[int, str, str]:
        """The parameters of :data:`SQL_STALE`."""
        return self.sid, self.symbol, self.tf.name


class Catalog:
    """The ``sid`` of each series this connection has seen, cached.

    A sid never changes in a database (series rows are kept when a series is deleted), so the
    cache stays right whatever other hosts do; it is cleared on a rollback, which may have undone
    the row, and whenever the connection is dropped or replaced: the URL may then name a
    database created again, where the same sid is another series.
    """

    __slots__ = ("sids",)

    def __init__(self) -> None:
        self.sids: dict[tuple[str, str], int] = {}

    def lookup(self, conn: Any, symbol: str, tf: Timeframe) -> Series | None:
        """The series (None: nobody created it yet)."""
        sid = self.sids.get((symbol, tf.name))
        if sid is None:
            row = conn.execute(
                "SELECT sid FROM mds_series WHERE symbol = %s AND timeframe = %s", (symbol, tf.name)
            ).fetchone()
            if row is None:
                return None
            sid = self.sids[(symbol, tf.name)] = int(row[0])
        return Series(sid, symbol, tf)

    def lock(self, conn: Any, symbol: str, tf: Timeframe) -> tuple[Series, int]:
        """Lock the series' catalog row for the rest of the caller's transaction (creating the series
        if new) and read its live-edge boundary ``seal_ts`` as of the lock.

        Every writer of a series takes this lock first, so writers on different hosts follow one
        another and each one's reads see the previous one's commit (READ COMMITTED takes a new
        snapshot per statement).
        """
        row = conn.execute(_SQL_LOCK, (symbol, tf.name)).fetchone()
        if row is None:
            conn.execute(
                "INSERT INTO mds_series(symbol, timeframe, seal_ts) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                (symbol, tf.name, NEG_INF),
            )
            row = conn.execute(_SQL_LOCK, (symbol, tf.name)).fetchone()
        sid = self.sids[(symbol, tf.name)] = int(row[0])
        return Series(sid, symbol, tf), int(row[1])

    def clear(self) -> None:
        self.sids.clear()


def list_series(conn: Any) -> list[tuple[str, str, int, int, int]]:
    """Every series with candles: ``(symbol, timeframe name, count, first_ts, last_ts)`` (one
    statement: one snapshot)."""
    rows = conn.execute(
        "SELECT s.symbol, s.timeframe, coalesce(c.n, 0) + coalesce(t.n, 0), least(c.lo, t.lo), greatest(c.hi, t.hi) "
        "FROM mds_series s "
        "LEFT JOIN (SELECT key >> 36 AS sid, sum(n) AS n, min(first_ts) AS lo, max(last_ts) AS hi "
        "           FROM mds_chunk GROUP BY 1) c ON c.sid = s.sid "
        "LEFT JOIN (SELECT sid, count(*) AS n, min(ts) AS lo, max(ts) AS hi FROM mds_tail GROUP BY sid) t "
        "       ON t.sid = s.sid "
        "WHERE c.n IS NOT NULL OR t.n IS NOT NULL ORDER BY s.symbol, s.timeframe"
    ).fetchall()
    return [(str(a), str(b), int(n), int(lo), int(hi)) for a, b, n, lo, hi in rows]
