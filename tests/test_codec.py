"""Chunk codec 2 (issue 20) and schema 4: int64 delta of every word, padded to 8 rows, in a
c-blosc 1.x chunk (python-blosc: 56-byte items, bit shuffle, LZ4HC 9), then its CRC-32.

Round trips of arbitrary rows, the payload's layout, sizes against codec 1 on realistic candles,
damaged payloads (never a wrong row: a damaged codec-2 chunk raises the same Damage /
DamagedChunkError as a damaged zlib one, its CRC-32 catching what c-blosc would decode to wrong
rows), and real SQLite files: a version-3 file as the previous code wrote it (codec-1 chunks)
opens, reads the same, migrates to version 4 and is recompressed to codec 2 by upkeep; a
version-5 file is refused.
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import apsw
import blosc
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from mds._checksum import row_checksum
from mds._dtypes import CANDLE_DTYPE
from mds.convert import candles_from_upbit
from mds.errors import StorageUnavailableError
from mds.testing import dense_candles, generate_market
from mds.tiers._chunks import (
    CHUNK_SLOTS,
    CODEC_BLOSC_DELTA_BITSHUFFLE_LZ4HC as CODEC_2,
    CODEC_COMPRESSED,
    CODEC_RAW,
    CODEC_ZLIB_DELTA_SHUFFLE as CODEC_1,
    ROW,
    Damage,
    chunk_problems,
    decode,
    encode,
    verified,
)
from mds.tiers.durable import DamagedChunkError
from mds.tiers.sqlite import SCHEMA_VERSION, SqliteStore
from mds.tiers.sqlite.schema import _SCHEMA_V3_CHUNK_INDEX
from mds.timeframes import DAY_MS, MINUTE_MS, parse_timeframe

REAL_1M = Path(__file__).resolve().parents[2] / "shared" / "data" / "upbit" / "krw-btc_1m_smtm_raw200.json"
M1 = parse_timeframe("1m")
SYM = "KRW-BTC"
T0 = 1_700_000_000_000 - 1_700_000_000_000 % (CHUNK_SLOTS * MINUTE_MS)  # a 1m chunk boundary
ALL = (-(1 << 60), 1 << 60)


def _crc(a: np.ndarray) -> int:
    return row_checksum(a, 0, len(a))


def _rows(ts: list[int], prices: list[float]) -> np.ndarray:
    a = np.zeros(len(ts), dtype=CANDLE_DTYPE)
    a["ts"] = ts
    for i, name in enumerate(("open", "high", "low", "close", "volume", "value")):
        a[name] = prices[i::6][: len(ts)] if prices else 0.0
    return a


# ---------------------------------------------------------------------------------- round trips
_INT64 = st.one_of(st.integers(-(1 << 63), (1 << 63) - 1), st.sampled_from([-(1 << 63), (1 << 63) - 1, 0, -1, 1]))
_EXTREME = [math.inf, -math.inf, 1.7976931348623157e308, -1.7976931348623157e308, 5e-324, -5e-324, -0.0, 0.0]
_FLOAT = st.one_of(st.floats(allow_nan=False), st.sampled_from(_EXTREME))


@st.composite
def _candles(draw: st.DrawFn) -> np.ndarray:
    n = draw(st.integers(0, 300))
    ts = draw(st.lists(_INT64, min_size=n, max_size=n))
    prices = draw(st.lists(_FLOAT, min_size=6 * n, max_size=6 * n))
    return _rows(ts, prices)


@settings(max_examples=150, deadline=None)
@given(_candles())
def test_every_codec_round_trips_arbitrary_rows_exactly(a: np.ndarray) -> None:
    for codec in (CODEC_1, CODEC_2):
        got = decode(codec, encode(a, codec))
        assert got.dtype == CANDLE_DTYPE and got.flags.c_contiguous
        assert got.tobytes() == a.tobytes()  # bit for bit: -0.0, infinities, int64 wrap of the deltas
    assert decode(CODEC_RAW, a.tobytes()).tobytes() == a.tobytes()


def test_encode_writes_codec_2_and_full_empty_and_one_row_chunks_round_trip() -> None:
    assert CODEC_COMPRESSED == CODEC_2 == 2
    full = dense_candles(CHUNK_SLOTS, T0, seed=4)
    assert encode(full) == encode(full, CODEC_2)
    for a in (full, full[:1], full[:0], full[::-1].copy()):  # descending ts: negative deltas
        assert decode(CODEC_2, encode(a)).tobytes() == a.tobytes()
    assert verified(CODEC_2, _crc(full), encode(full)).tobytes() == full.tobytes()
    assert verified(CODEC_2, _crc(full[:1]), encode(full[:1])).tobytes() == full[:1].tobytes()
    with pytest.raises(Damage, match="holds no rows"):
        verified(CODEC_2, 0, encode(full[:0]))
    with pytest.raises(ValueError, match="cannot encode codec 0"):
        encode(full, CODEC_RAW)


def _chunks_of(a: np.ndarray, tf_name: str) -> list[np.ndarray]:
    tf = parse_timeframe(tf_name)
    k = (a["ts"] - tf.origin_ms) // (tf.interval_ms * CHUNK_SLOTS)
    return [np.ascontiguousarray(a[k == u]) for u in np.unique(k)]


def _realistic() -> dict[str, list[np.ndarray]]:
    sets = {
        "1m KRW-BTC liquid": _chunks_of(generate_market(SYM, "1m", T0 - 5 * DAY_MS, T0, seed=1), "1m"),
        "1m illiquid": _chunks_of(generate_market("KRW-MLK", "1m", T0 - 5 * DAY_MS, T0, liquidity="illiquid"), "1m"),
        # BTC-quoted prices have 8 decimals and no trailing zero bits: only a delta of the price
        # words (not of ts alone) gets these below codec 1
        "1m BTC-ETH": _chunks_of(generate_market("BTC-ETH", "1m", T0 - 3 * DAY_MS, T0, seed=3), "1m"),
        "1m BTC-XRP": _chunks_of(generate_market("BTC-XRP", "1m", T0 - 3 * DAY_MS, T0, seed=2), "1m"),
        "1d KRW-ETH": _chunks_of(generate_market("KRW-ETH", "1d", T0 - 1500 * DAY_MS, T0, seed=4), "1d"),
    }
    if REAL_1M.exists():  # recorded Upbit candles (shared/data/upbit/SOURCES.md)
        real = candles_from_upbit(json.loads(REAL_1M.read_text()))
        sets["recorded KRW-BTC 1m"] = [np.sort(real, order="ts")]
    return sets


def test_codec_2_is_at_least_as_small_as_codec_1_on_realistic_candles() -> None:
    for name, chunks in _realistic().items():
        one = sum(len(encode(c, CODEC_1)) for c in chunks)
        two = sum(len(encode(c, CODEC_2)) for c in chunks)
        assert two <= one, (name, two, one)
        for c in chunks:
            assert verified(CODEC_2, _crc(c), encode(c)).tobytes() == c.tobytes()


# ------------------------------------------------------------------------------- damaged payloads
_SAMPLE = dense_candles(700, T0, seed=9)
_PACKED = encode(_SAMPLE)


def _with_crc(frame: bytes | bytearray) -> bytes:
    """A codec-2 payload of the blosc ``frame``: the frame, then its CRC-32."""
    return bytes(frame) + zlib.crc32(frame).to_bytes(4, "little")


def test_the_codec_2_payload_is_one_blosc_chunk_of_padded_rows_then_its_crc() -> None:
    for n in (0, 1, 7, 8, 9, 700, CHUNK_SLOTS):
        a = dense_candles(n, T0, seed=n)
        data = encode(a)
        frame = data[:-4]
        assert data == _with_crc(frame)
        padded = (n // 8 + 1) * 8  # whole groups of 8 rows, one at least for the row count
        assert frame[0] == 2 and frame[3] == ROW  # c-blosc 1.x format 2, a row per item
        assert frame[2] == 0x34  # bit shuffle, not split into byte streams, LZ4 (LZ4HC) format
        assert int.from_bytes(frame[4:8], "little") == padded * ROW  # bytes before compression
        assert int.from_bytes(frame[8:12], "little") == padded * ROW  # one block
        assert int.from_bytes(frame[12:16], "little") == len(frame)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(_PACKED) - 1), st.integers(0, 7), st.booleans())
def test_a_flipped_bit_or_a_cut_in_a_codec_2_payload_is_refused(at: int, bit: int, cut: bool) -> None:
    data = bytearray(_PACKED)
    data[at] ^= 1 << bit
    if cut:
        data = data[: at + 1]
    with pytest.raises(Damage, match="does not decompress"):
        verified(CODEC_2, _crc(_SAMPLE), bytes(data))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(_PACKED) - 5), st.integers(0, 255)), min_size=1, max_size=8))
def test_a_damaged_blosc_chunk_under_a_matching_crc_is_refused_or_decoded_within_bounds(
    damage: list[tuple[int, int]],
) -> None:
    """What the CRC guards: c-blosc must not crash on a damaged chunk (a CRC-32 collision, or a
    stray write of a whole payload) and decodes at most a chunk's rows."""
    frame = bytearray(_PACKED[:-4])
    for at, byte in damage:
        frame[at] = byte
    try:
        got = decode(CODEC_2, _with_crc(frame))
    except Damage:
        return
    assert got.dtype == CANDLE_DTYPE and len(got) <= CHUNK_SLOTS


def test_codec_2_damage_names_what_is_wrong() -> None:
    crc = _crc(_SAMPLE)
    flagged = bytearray(_PACKED)
    flagged[2] ^= 0x10  # the blosc header's no-split flag
    with pytest.raises(Damage, match="does not decompress \\(its CRC-32 does not match"):
        verified(CODEC_2, crc, bytes(flagged))
    unknown = bytearray(_PACKED[:-4])
    unknown[2] ^= 0xE0  # the compressor's format code: one c-blosc does not know
    with pytest.raises(Damage, match="does not decompress \\(Error"):
        verified(CODEC_2, crc, _with_crc(unknown))  # past the CRC: c-blosc refuses it
    with pytest.raises(Damage, match="does not decompress \\(a 10-byte payload"):
        verified(CODEC_2, crc, _PACKED[:10])
    with pytest.raises(Damage, match="does not decompress"):
        verified(CODEC_2, crc, b"")
    frame = bytearray(_PACKED[:-4])
    with pytest.raises(Damage, match="its header claims"):
        verified(CODEC_2, crc, _with_crc(frame[:-1]))
    claims = bytearray(frame)
    claims[4:8] = ((CHUNK_SLOTS + 16) * ROW).to_bytes(4, "little")  # more rows than a chunk holds
    with pytest.raises(Damage, match="not the padded rows of one chunk"):
        verified(CODEC_2, crc, _with_crc(claims))
    claims[4:8] = (700 * ROW).to_bytes(4, "little")  # not whole groups of 8 rows
    with pytest.raises(Damage, match="not the padded rows of one chunk"):
        verified(CODEC_2, crc, _with_crc(claims))
    padded = np.zeros((704, 7), dtype="<i8")  # 700 rows' padding, with a count that does not fit it
    padded[-1, 0] = 600
    miscounted = blosc.compress(padded.tobytes(), ROW, 9, blosc.BITSHUFFLE, "lz4hc")
    with pytest.raises(Damage, match="a row count of 600 in 39424 bytes"):
        verified(CODEC_2, crc, _with_crc(miscounted))
    wrong = _SAMPLE.copy()
    wrong["close"][350] += 1.0  # compressed after the damage: the stream is sound, the rows are not
    with pytest.raises(Damage, match="do not match their checksum"):
        verified(CODEC_2, crc, encode(wrong))
    with pytest.raises(Damage, match="unknown codec 3"):
        verified(3, crc, _PACKED)
    key = (1 << 36) + (1 << 35) + 5
    assert chunk_problems(key, 700, 0, 0, CODEC_2, crc, bytes(flagged), "X 1m", M1, 1 << 62)[0].endswith(
        "(quarantine_damaged() drops it for a refetch)"
    )


# ------------------------------------------------------------------------------- SQLite files
def _store(path: Path, now: int, **kw: object) -> SqliteStore:
    kw.setdefault("maintenance_interval_s", None)
    kw.setdefault("compress_after_days", 7.0)
    return SqliteStore(path, clock=lambda: now, **kw)  # type: ignore[arg-type]


def _history(path: Path) -> tuple[np.ndarray, int]:
    """Four chunks of 1m candles and a live edge, a month before the clock; all compressed."""
    a = dense_candles(4 * CHUNK_SLOTS + 3, T0, seed=11)
    now = int(a["ts"][-1]) + 30 * DAY_MS
    s = _store(path, now)
    s.write(SYM, M1, a[:-3], covered=[[T0, int(a["ts"][-1]) + MINUTE_MS]])
    for i in range(len(a) - 3, len(a)):
        s.write(SYM, M1, a[i : i + 1])
    assert s.maintain()["compressed_chunks"] == 4
    assert s.stats()["chunks_compressed"] == 4 and s.stats()["chunks_older_codec"] == 0
    s.close()
    return a, now


def _codecs(path: Path) -> list[int]:
    conn = apsw.Connection(str(path))
    try:
        return [r[0] for r in conn.execute("SELECT codec FROM chunk ORDER BY key")]
    finally:
        conn.close()


def _as_version_3(path: Path) -> None:
    """Turn a closed version-4 file into what version 3 wrote: codec-1 chunks (same rows, same
    checksums), the version-3 compression index, ``user_version`` 3."""
    conn = apsw.Connection(str(path))
    try:
        with conn:
            for key, codec, data in conn.execute("SELECT key, codec, data FROM chunk").fetchall():
                if codec == CODEC_2:
                    rows = decode(CODEC_2, data)
                    conn.execute(
                        "UPDATE chunk SET codec = ?, data = ? WHERE key = ?", (CODEC_1, encode(rows, CODEC_1), key)
                    )
            conn.execute("DROP INDEX chunk_to_compress")
            conn.execute(_SCHEMA_V3_CHUNK_INDEX)
        conn.execute("PRAGMA user_version = 3")
    finally:
        conn.close()


def _indexes(s: SqliteStore) -> set[str]:
    return {r[0] for r in s._conn_().execute("SELECT name FROM sqlite_schema WHERE type = 'index'")}


def test_a_version_3_file_reads_migrates_and_is_recompressed_to_codec_2(tmp_path: Path) -> None:
    path = tmp_path / "v3.sqlite3"
    a, now = _history(path)
    _as_version_3(path)
    assert _codecs(path) == [CODEC_1] * 4

    reader = _store(path, now, readonly=True)  # a reader may not migrate: it reads version 3 as it is
    assert reader.stats()["schema_version"] == 3
    assert reader.read_range(SYM, M1, *ALL).tobytes() == a.tobytes()
    assert reader.integrity_problems() == []
    reader.close()

    s = _store(path, now, compress_after_days=None)
    seq = s.commit_seq()
    assert s._pragma_int("user_version") == SCHEMA_VERSION == 4
    assert s.commit_seq() == seq  # the migration changed no data
    assert "chunk_to_compress" in _indexes(s) and "chunk_uncompressed" not in _indexes(s)
    assert _codecs(path) == [CODEC_1] * 4  # not rewritten when opened: upkeep does that
    assert s.read_range(SYM, M1, *ALL).tobytes() == a.tobytes()
    assert s.read_latest(SYM, M1, 100).tobytes() == a[-100:].tobytes()
    assert s.stats()["chunks_older_codec"] == 4
    assert s.maintain()["compressed_chunks"] == 0  # compression off: codec 1 stays, readable
    s.close()

    s = _store(path, now)
    assert s.maintain()["compressed_chunks"] == 4
    assert _codecs(path) == [CODEC_2] * 4
    assert s.read_range(SYM, M1, *ALL).tobytes() == a.tobytes()
    assert s.stats()["chunks_older_codec"] == 0 and s.stats()["chunks_raw"] == 0
    assert s.integrity_problems() == []
    assert s.maintain()["compressed_chunks"] == 0  # nothing left to do
    fresh = _store(tmp_path / "new.sqlite3", now)
    assert _indexes(fresh) == _indexes(s)  # the migrated file has a new file's indexes
    fresh.close()
    s.close()


def test_the_scheduled_step_recompresses_codec_1_oldest_first(tmp_path: Path) -> None:
    path = tmp_path / "v3.sqlite3"
    a, now = _history(path)
    _as_version_3(path)
    clock = [now]
    s = SqliteStore(path, clock=lambda: clock[0], compress_after_days=7.0, maintenance_interval_s=60.0)
    clock[0] += 61_000
    assert s.maybe_maintain()
    assert _codecs(path) == [CODEC_2] * 4
    assert s.read_range(SYM, M1, *ALL).tobytes() == a.tobytes()
    s.close()


def test_a_damaged_codec_2_chunk_in_a_file_raises_damaged_chunk_error(tmp_path: Path) -> None:
    path = tmp_path / "candles.sqlite3"
    a, now = _history(path)
    conn = apsw.Connection(str(path))
    key, data = conn.execute("SELECT key, data FROM chunk ORDER BY key LIMIT 1 OFFSET 1").fetchall()[0]
    flagged = bytearray(data)
    flagged[2] ^= 0x10
    conn.execute("UPDATE chunk SET data = ? WHERE key = ?", (bytes(flagged), key))
    conn.close()
    s = _store(path, now)
    with pytest.raises(DamagedChunkError, match="does not decompress") as err:
        s.read_range(SYM, M1, *ALL)
    span = err.value.span
    assert span == (T0 + CHUNK_SLOTS * MINUTE_MS, T0 + 2 * CHUNK_SLOTS * MINUTE_MS)
    problems = s.integrity_problems()
    assert len(problems) == 1 and f"chunk {key}" in problems[0] and "does not decompress" in problems[0]
    assert s.maintain()["compressed_chunks"] == 0  # a damaged chunk is not rewritten under a fresh checksum
    assert s.quarantine_damaged(SYM, M1) == [span]
    inside = (a["ts"] >= span[0]) & (a["ts"] < span[1])
    assert s.read_range(SYM, M1, *ALL).tobytes() == a[~inside].tobytes()
    s.close()


def test_a_newer_version_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "v5.sqlite3"
    _, now = _history(path)
    conn = apsw.Connection(str(path))
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    for readonly in (False, True):
        with pytest.raises(StorageUnavailableError, match="schema version 5, newer than this mds \\(4\\): upgrade mds"):
            _store(path, now, readonly=readonly)


def test_a_decoded_chunk_is_reused_only_for_the_same_stored_bytes() -> None:
    """Decoded codec-2 chunks are kept for the next read of the same bytes; any other bytes under
    the same key (a rewritten chunk with an equal checksum and length, damage) decode again."""
    a = dense_candles(CHUNK_SLOTS, T0, seed=3)
    crc = row_checksum(a, 0, len(a))
    blob = encode(a, CODEC_2)
    first = verified(CODEC_2, crc, blob)
    assert first.tobytes() == a.tobytes() and not first.flags.writeable
    again = verified(CODEC_2, crc, bytes(blob))  # equal bytes, another object
    assert again is first
    # the same length and checksum, other bytes: a flipped bit of the compressed stream
    bad = bytearray(blob)
    bad[len(bad) // 2] ^= 0x10
    with pytest.raises(Damage):
        verified(CODEC_2, crc, bytes(bad))
    # the same rows written under other blosc settings: other bytes, decoded again, the same rows
    blosc.set_blocksize(8192)
    try:
        other = encode(a, CODEC_2)
    finally:
        blosc.set_blocksize(0)
    assert other != blob
    rows = verified(CODEC_2, crc, memoryview(other))
    assert rows is not first and rows.tobytes() == a.tobytes()
    with pytest.raises(ValueError):
        rows["close"][0] = 1.0  # shared with later reads: nobody may change them
