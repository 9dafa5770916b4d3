"""Chunk codec 2 and schema 2 on the PostgreSQL tier, against a real (throwaway) server: a
version-1 database as the previous code wrote it (codec-1 chunks) is read as it is by a reader,
migrated by a writer and recompressed to codec 2 by ``maintain()``; a damaged codec-2 chunk is
refused as damage; a newer version is refused."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import psycopg
import pytest

from mds.errors import StorageUnavailableError
from mds.testing.generators import dense_candles
from mds.tiers._chunks import (
    CHUNK_SLOTS,
    CODEC_BLOSC_DELTA_BITSHUFFLE_LZ4HC as CODEC_2,
    CODEC_ZLIB_DELTA_SHUFFLE as CODEC_1,
    decode,
    encode,
)
from mds.tiers.durable import DamagedChunkError
from mds.tiers.postgres import SCHEMA_VERSION, PostgresTier
from mds.timeframes import DAY_MS, MINUTE_MS, parse_timeframe

M1 = parse_timeframe("1m")
SYM = "KRW-BTC"
T0 = 1_700_000_000_000 - 1_700_000_000_000 % (CHUNK_SLOTS * MINUTE_MS)  # a 1m chunk boundary
ALL = (-(1 << 60), 1 << 60)


@pytest.fixture
def tiers() -> Iterator[list[PostgresTier]]:
    opened: list[PostgresTier] = []
    yield opened
    for t in opened:
        t.close()


def sql(url: str, query: str, args: Any = None) -> list[Any]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(query, args)
        return cur.fetchall() if cur.description else []


def _history(tiers: list[PostgresTier], url: str) -> tuple[np.ndarray, int]:
    """Three chunks of 1m candles a month before the clock, compressed by maintain()."""
    a = dense_candles(3 * CHUNK_SLOTS, T0, seed=21)
    now = T0 + 40 * DAY_MS
    t = PostgresTier(url, clock=lambda: now, compress_after_days=7.0)
    tiers.append(t)
    t.write(SYM, M1, a)
    assert t.maintain()["compressed_chunks"] == 3
    assert [r[0] for r in sql(url, "SELECT codec FROM mds_chunk ORDER BY key")] == [CODEC_2] * 3
    return a, now


def _as_version_1(url: str) -> None:
    """What version 1 wrote: codec-1 chunks (same rows and checksums), its compression index."""
    with psycopg.connect(url, autocommit=True) as conn, conn.transaction():
        for key, data in conn.execute("SELECT key, data FROM mds_chunk WHERE codec = %s", (CODEC_2,)).fetchall():
            conn.execute(
                "UPDATE mds_chunk SET codec = %s, data = %s WHERE key = %s",
                (CODEC_1, encode(decode(CODEC_2, data), CODEC_1), key),
            )
        conn.execute("DROP INDEX mds_chunk_to_compress")
        conn.execute("CREATE INDEX mds_chunk_uncompressed ON mds_chunk(last_ts, key) WHERE codec = 0")
        conn.execute("UPDATE mds_meta SET v = 1 WHERE k = 'schema_version'")


def _indexes(url: str) -> set[str]:
    return {r[0] for r in sql(url, "SELECT indexname FROM pg_indexes WHERE tablename = 'mds_chunk'")}


def test_a_version_1_database_is_read_migrated_and_recompressed(pg_url: str, tiers: list[PostgresTier]) -> None:
    a, now = _history(tiers, pg_url)
    tiers.pop().close()
    _as_version_1(pg_url)

    reader = PostgresTier(pg_url, readonly=True, clock=lambda: now)
    tiers.append(reader)
    assert reader.stats()["schema_version"] == 1  # read as it is: version 1 holds no codec 2
    assert reader.read_range(SYM, M1, *ALL).tobytes() == a.tobytes()
    assert reader.integrity_problems() == []

    t = PostgresTier(pg_url, clock=lambda: now, compress_after_days=7.0)
    tiers.append(t)
    assert sql(pg_url, "SELECT v FROM mds_meta WHERE k = 'schema_version'") == [(SCHEMA_VERSION,)] == [(2,)]
    assert "mds_chunk_to_compress" in _indexes(pg_url) and "mds_chunk_uncompressed" not in _indexes(pg_url)
    assert t.stats()["chunks_older_codec"] == 3  # migrating rewrote no chunk
    assert t.read_range(SYM, M1, *ALL).tobytes() == a.tobytes()
    assert t.maintain()["compressed_chunks"] == 3
    assert [r[0] for r in sql(pg_url, "SELECT codec FROM mds_chunk")] == [CODEC_2] * 3
    assert t.stats()["chunks_older_codec"] == 0 and t.stats()["chunks_compressed"] == 3
    assert t.read_range(SYM, M1, *ALL).tobytes() == a.tobytes()
    assert reader.read_range(SYM, M1, *ALL).tobytes() == a.tobytes()  # the reader reads codec 2 too
    assert t.integrity_problems() == []


def test_a_damaged_codec_2_chunk_is_refused_as_damage(pg_url: str, tiers: list[PostgresTier]) -> None:
    a, _ = _history(tiers, pg_url)
    t = tiers[-1]
    key, data = sql(pg_url, "SELECT key, data FROM mds_chunk ORDER BY key LIMIT 1 OFFSET 1")[0]
    flagged = bytearray(data)
    flagged[2] ^= 0x10  # a flag bit of the blosc header: the payload fails its CRC-32
    sql(pg_url, "UPDATE mds_chunk SET data = %s WHERE key = %s", (bytes(flagged), key))
    span = (T0 + CHUNK_SLOTS * MINUTE_MS, T0 + 2 * CHUNK_SLOTS * MINUTE_MS)
    with pytest.raises(DamagedChunkError, match="does not decompress") as err:
        t.read_range(SYM, M1, *ALL)
    assert err.value.span == span
    problems = t.integrity_problems()
    assert len(problems) == 1 and "does not decompress" in problems[0]
    assert t.quarantine_damaged(SYM, M1) == [span]
    inside = (a["ts"] >= span[0]) & (a["ts"] < span[1])
    assert t.read_range(SYM, M1, *ALL).tobytes() == a[~inside].tobytes()


def test_a_newer_schema_version_is_refused(pg_url: str, tiers: list[PostgresTier]) -> None:
    _history(tiers, pg_url)
    sql(pg_url, "UPDATE mds_meta SET v = %s WHERE k = 'schema_version'", (SCHEMA_VERSION + 1,))
    for readonly in (False, True):
        with pytest.raises(StorageUnavailableError, match="schema version 3, newer than this mds \\(2\\): upgrade mds"):
            PostgresTier(pg_url, readonly=readonly)
