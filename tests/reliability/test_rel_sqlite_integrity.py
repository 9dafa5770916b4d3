"""Issue 14 item 3: a damaged SQLite file is never served as a wrong price.

A byte flipped inside a stored chunk (raw or compressed) or inside a tail row (the live edge) is
written straight into the file with a plain apsw UPDATE, as a bad disk or a stray write would
leave it. Every read path must then raise :class:`DamagedChunkError` naming the damaged span,
``integrity_problems()`` must name it, and ``quarantine_damaged()`` must remove exactly it and
shrink the coverage so the span reads as missing. Also: schema 2 files (no checksums) migrate.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import _relutil as R
import apsw
import numpy as np
import pytest

from mds.errors import StorageUnavailableError
from mds.tiers.sqlite import CHUNK_SLOTS, SCHEMA_VERSION, TAIL_MAX, DamagedChunkError, SqliteStore
from mds.tiers.sqlite.codec import (
    CODEC_COMPRESSED,
    CODEC_RAW,
    CODEC_ZLIB_DELTA_SHUFFLE,
    decode as _decode,
    encode as _encode,
    tail_rows as _tail_rows,
    tail_values as _tail_values,
)
from mds.tiers.sqlite.schema import _SCHEMA_V2
from mds.timeframes import parse_timeframe

M1 = parse_timeframe("1m")
D1 = parse_timeframe("1d")
SYM = "KRW-BTC"
MIN = R.MIN
W = CHUNK_SLOTS * MIN  # a 1m chunk's grid span
N = 3 * CHUNK_SLOTS + 40  # three-plus chunks of history
EDGE = 6  # the newest candles, written one at a time: they stay tail rows
ALL = (-(1 << 60), 1 << 60)


def _rows() -> np.ndarray:
    a = R.marked(R.T0 + MIN * np.arange(N), 1.0)
    a["close"] = 50_000_000.0 + np.arange(N)  # distinct, plausible prices
    a["open"] = a["close"] - 500.0
    a["high"] = a["close"] + 1000.0
    a["low"] = a["open"] - 1.0
    return a


def same(x: np.ndarray, y: np.ndarray) -> bool:
    return x.dtype == y.dtype and x.tobytes() == y.tobytes()


def _store(path: Path, **kw) -> SqliteStore:
    kw.setdefault("maintenance_interval_s", None)
    kw.setdefault("compress_after_days", None)
    return SqliteStore(path, **kw)


def _fill(path: Path, compressed: bool) -> np.ndarray:
    a = _rows()
    clock = R.Clock(int(a["ts"][-1]) + 30 * R.DAY)
    s = _store(path, compress_after_days=0.0 if compressed else None, clock=clock)
    s.write(SYM, M1, a[:-EDGE], covered=[[int(a["ts"][0]), int(a["ts"][-1]) + MIN]])
    for i in range(N - EDGE, N):
        s.write(SYM, M1, a[i : i + 1])
    if compressed:
        assert s.maintain()["compressed_chunks"] >= 3
    assert s.stats()["tail_rows"] == EDGE + 1
    assert s.integrity_problems() == []
    s.close()
    return a


def _raw(path: Path) -> apsw.Connection:
    return apsw.Connection(str(path))


def _flip(blob: bytes, at: int) -> bytes:
    b = bytearray(blob)
    b[at] ^= 0x10
    return bytes(b)


def _damage(path: Path, a: np.ndarray, where: str) -> tuple[int, tuple[int, int], int | None]:
    """Damage one stored place; returns (index of a damaged row, damaged span, chunk key or None)."""
    conn = _raw(path)
    try:
        if where == "tail":
            i = N - 1  # the newest candle: the live edge
            ts = int(a["ts"][i])
            (v,) = conn.execute("SELECT v FROM tail WHERE sid = 1 AND ts = ?", (ts,)).fetchall()[0]
            conn.execute("UPDATE tail SET v = ? WHERE sid = 1 AND ts = ?", (_flip(v, 32 + 5), ts))  # close
            return i, (ts, ts + MIN), None
        i = CHUNK_SLOTS + CHUNK_SLOTS // 2  # inside the second chunk of history
        ts = int(a["ts"][i])
        assert M1.origin_ms == 0
        span = (ts // W * W, ts // W * W + W)
        key, codec, data = conn.execute(
            "SELECT key, codec, data FROM chunk WHERE first_ts <= ? AND last_ts >= ?", (ts, ts)
        ).fetchall()[0]
        j = i - int(np.searchsorted(a["ts"], span[0]))  # the row's place in its chunk
        if where == "raw":
            assert codec == CODEC_RAW
            data = _flip(data, j * 56 + 32 + 5)  # a mantissa byte of close: a wrong, plausible price
        elif where == "packed_stream":
            assert codec == CODEC_COMPRESSED
            data = _flip(data, 2)  # a flag byte of the blosc header: its CRC-32 no longer matches
        else:  # packed_rows: rows damaged before they were compressed; the stream itself is sound
            assert codec == CODEC_COMPRESSED
            lo = int(np.searchsorted(a["ts"], span[0]))
            part = a[lo : int(np.searchsorted(a["ts"], span[1]))].copy()
            part.view(np.uint8)[j * 56 + 32 + 5] ^= 0x10
            data = _encode(part)
            _decode(codec, data)  # decodes fine: only the checksum can tell
        conn.execute("UPDATE chunk SET data = ? WHERE key = ?", (data, key))
        return i, span, key
    finally:
        conn.close()


def _table_state(path: Path) -> list:
    conn = _raw(path)
    try:
        return [
            conn.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall() for t in ("series", "chunk", "tail", "coverage")
        ]
    finally:
        conn.close()


@pytest.mark.parametrize("where", ["raw", "packed_stream", "packed_rows", "tail"])
def test_a_flipped_byte_is_never_served_and_quarantine_removes_exactly_it(tmp_path, where):
    path = tmp_path / "candles.sqlite3"
    a = _fill(path, compressed=where.startswith("packed"))
    i, span, key = _damage(path, a, where)
    ts = int(a["ts"][i])
    inside = (a["ts"] >= span[0]) & (a["ts"] < span[1])
    s = _store(path)
    seq = s.commit_seq()

    def damaged(call, *args):
        with pytest.raises(DamagedChunkError) as err:
            call(SYM, M1, *args)
        e = err.value
        assert (e.symbol, e.timeframe, e.span) == (SYM, "1m", span)
        assert isinstance(e, StorageUnavailableError)
        assert "quarantine_damaged" in str(e)
        assert ("does not decompress" if where == "packed_stream" else "checksum") in str(e)
        return e

    # every read path that touches the damaged place raises, whatever part of it was asked for
    damaged(s.read_range, *ALL)
    damaged(s.read_range, ts, ts + MIN)
    if where != "tail":
        damaged(s.read_range, span[0], span[0] + 5 * MIN)  # other rows of the same chunk
    damaged(s.read_latest, 10**6)
    damaged(s.read_latest, 3, ts + MIN)
    damaged(s.read_from, ts, 1)
    damaged(s.read_from, int(a["ts"][0]), N)
    damaged(s.gaps, span[0], span[1])
    e = damaged(s.gaps, None, None)
    assert pickle.loads(pickle.dumps(e)).span == span

    # writes and deletes that would read it refuse, and change nothing
    before = _table_state(path)
    upd = a[i : i + 1].copy()
    upd["volume"] += 1.0
    if where == "tail":
        damaged(s.write, a[i - 1 : i + 1])  # several edge rows: read, compared, merged
    else:
        damaged(s.write, upd)  # merged into the damaged chunk
        damaged(s.delete, ts, ts + MIN)  # part of the chunk: read, filtered, rewritten
    assert _table_state(path) == before
    assert s.commit_seq() == seq

    # undamaged places still read
    if where == "tail":
        assert same(s.read_range(SYM, M1, int(a["ts"][0]), int(a["ts"][N - EDGE])), a[: N - EDGE])
    else:
        assert same(s.read_range(SYM, M1, int(a["ts"][0]), span[0]), a[a["ts"] < span[0]])
        assert same(s.read_latest(SYM, M1, EDGE + 10), a[-(EDGE + 10) :])
        assert same(s.read_from(SYM, M1, span[1], 5), a[a["ts"] >= span[1]][:5])

    # check() names it
    problems = s.integrity_problems()
    assert len(problems) == 1, problems
    assert "damaged" in problems[0]
    assert (f"chunk {key} " if key is not None else f"tail row {SYM} 1m {ts}:") in problems[0]

    # quarantine removes exactly the damaged place and its span from the coverage
    assert s.quarantine_damaged(SYM, M1, span[0], span[1]) == [span]
    assert s.commit_seq() == seq + 1
    assert s.integrity_problems() == []
    first, end = int(a["ts"][0]), int(a["ts"][-1]) + MIN
    expect_cov = [[first, span[0]], [span[1], end]] if span[1] < end else [[first, span[0]]]
    assert s.coverage(SYM, M1).tolist() == expect_cov
    assert same(s.read_range(SYM, M1, *ALL), a[~inside])
    assert same(s.read_latest(SYM, M1, 10**6), a[~inside])
    assert s.gaps(SYM, M1, span[0], span[1]) == [(span[0], span[1], "missing")]
    assert s.quarantine_damaged(SYM, M1) == []  # nothing left: no change, no commit
    assert s.commit_seq() == seq + 1
    # the span can be written again (what a refetch does), and reads whole again
    s.write(SYM, M1, a[inside], covered=[list(span)])
    assert same(s.read_range(SYM, M1, *ALL), a)
    assert s.integrity_problems() == []
    s.close()


def test_quarantine_outside_the_damage_keeps_everything(tmp_path):
    path = tmp_path / "candles.sqlite3"
    a = _fill(path, compressed=False)
    _i, span, _key = _damage(path, a, "raw")
    s = _store(path)
    cov = s.coverage(SYM, M1).tolist()
    assert s.quarantine_damaged(SYM, M1, span[1], span[1] + W) == []
    assert s.quarantine_damaged("KRW-ETH", M1) == []
    assert s.coverage(SYM, M1).tolist() == cov
    with pytest.raises(DamagedChunkError):
        s.read_range(SYM, M1, *ALL)
    assert s.quarantine_damaged(SYM, M1) == [span]  # unbounded: finds it
    s.close()
    ro = _store(path, readonly=True)
    with pytest.raises(StorageUnavailableError, match="readonly"):
        ro.quarantine_damaged(SYM, M1)
    ro.close()


def test_a_damaged_chunk_is_not_compressed_and_stays_refused(tmp_path):
    path = tmp_path / "candles.sqlite3"
    a = _fill(path, compressed=False)
    _i, span, key = _damage(path, a, "raw")
    s = _store(path, compress_after_days=0.0, clock=R.Clock(int(a["ts"][-1]) + 30 * R.DAY))
    rep = s.maintain()
    assert rep["compressed_chunks"] >= 2  # the others were
    codec = s._conn_().execute("SELECT codec FROM chunk WHERE key = ?", (key,)).fetchall()[0][0]
    assert codec == CODEC_RAW
    with pytest.raises(DamagedChunkError):
        s.read_range(SYM, M1, span[0], span[1])
    assert s.quarantine_damaged(SYM, M1) == [span]
    assert same(s.read_range(SYM, M1, *ALL), a[(a["ts"] < span[0]) | (a["ts"] >= span[1])])
    s.close()


def test_a_damaged_tail_row_is_not_folded_into_a_chunk(tmp_path):
    # A fold reads the whole edge into chunks: a damaged row would get a fresh, matching checksum.
    path = tmp_path / "candles.sqlite3"
    a = _fill(path, compressed=False)
    i, span, _ = _damage(path, a, "tail")
    s = _store(path)
    more = R.marked(int(a["ts"][-1]) + MIN * np.arange(1, 30), 2.0)
    with pytest.raises(DamagedChunkError) as err:
        s.write(SYM, M1, more)  # past TAIL_MAX: folds
    assert err.value.span == span
    assert s.quarantine_damaged(SYM, M1) == [span]
    s.write(SYM, M1, more)
    assert same(s.read_range(SYM, M1, *ALL), np.concatenate([np.delete(a, i), more]))
    assert s.integrity_problems() == []
    s.close()


# --- schema 2 files -------------------------------------------------------------------------------
def _write_v2(path: Path) -> dict[tuple[str, str], tuple[np.ndarray, list[list[int]]]]:
    """A schema-2 file as the v2 code wrote it: raw and compressed chunks, 56-byte tail rows."""
    m = R.marked(R.T0 + MIN * np.arange(2 * CHUNK_SLOTS + 30), 1.0)
    d = R.marked(R.T0 - 2000 * R.DAY + R.DAY * np.arange(1500), 2.0)
    series = {
        (SYM, "1m"): (m, [[R.T0, int(m["ts"][-1]) + MIN]], CODEC_RAW, 5),
        ("KRW-ETH", "1d"): (d, [[int(d["ts"][0]), int(d["ts"][-1]) + R.DAY]], CODEC_ZLIB_DELTA_SHUFFLE, 1),
    }
    conn = _raw(path)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(_SCHEMA_V2)
    with conn:
        for sid, ((sym, tfname), (rows, cov, codec, edge)) in enumerate(series.items(), start=1):
            tf = parse_timeframe(tfname)
            seal = int(rows["ts"][-edge])
            conn.execute(
                "INSERT INTO series(sid, symbol, timeframe, seal_ts) VALUES (?, ?, ?, ?)", (sid, sym, tfname, seal)
            )
            body = rows[:-edge]
            keys = np.array([SqliteStore._key(sid, tf, int(t)) for t in body["ts"]])
            for k in np.unique(keys):
                part = body[keys == k]
                data = part.tobytes() if codec == CODEC_RAW else _encode(part, codec)
                conn.execute(
                    "INSERT INTO chunk(key, n, first_ts, last_ts, codec, data) VALUES (?, ?, ?, ?, ?, ?)",
                    (int(k), len(part), int(part["ts"][0]), int(part["ts"][-1]), codec, data),
                )
            for r in rows[-edge:]:
                conn.execute("INSERT INTO tail(sid, ts, v) VALUES (?, ?, ?)", (sid, int(r["ts"]), r.tobytes()))
            for lo, hi in cov:
                conn.execute("INSERT INTO coverage(sid, start_ts, end_ts) VALUES (?, ?, ?)", (sid, lo, hi))
        conn.execute("INSERT INTO meta(k, v) VALUES ('last_maintenance_ms', ?)", (R.NOW,))
    conn.execute("PRAGMA user_version = 2")
    conn.close()
    return {k: (v[0], v[1]) for k, v in series.items()}


def test_a_version_2_file_migrates_with_checksums(tmp_path):
    path = tmp_path / "v2.sqlite3"
    series = _write_v2(path)
    with pytest.raises(StorageUnavailableError, match="needs a migration: open it once with a writer"):
        SqliteStore(path, readonly=True)
    s = _store(path)
    assert s._pragma_int("user_version") == SCHEMA_VERSION == 4
    assert s.commit_seq() == 1  # the migration is one commit
    for (sym, tfname), (rows, cov) in series.items():
        assert same(s.read_range(sym, tfname, *ALL), rows)
        assert same(s.read_latest(sym, tfname, 10), rows[-10:])
        assert s.coverage(sym, tfname).tolist() == cov
    assert s.integrity_problems() == []
    tables = {r[0] for r in s._conn_().execute("SELECT name FROM sqlite_schema")}
    assert "v2_chunk" not in tables and "chunk_uncompressed" not in tables and "chunk_to_compress" in tables
    s.close()
    fresh = _store(tmp_path / "new.sqlite3")
    migrated = SqliteStore(path, readonly=True)  # migrated: a reader opens it now
    for t in ("chunk", "tail", "meta"):
        q = f"PRAGMA table_info({t})"
        assert migrated._conn_().execute(q).fetchall() == fresh._conn_().execute(q).fetchall()
    fresh.close()
    migrated.close()
    # the checksums were computed: damage after the migration is caught
    conn = _raw(path)
    key, data = conn.execute("SELECT key, data FROM chunk WHERE key >> 36 = 1 ORDER BY key LIMIT 1").fetchall()[0]
    conn.execute("UPDATE chunk SET data = ? WHERE key = ?", (_flip(data, 100), key))
    (ts, v), *_ = conn.execute("SELECT ts, v FROM tail WHERE sid = 2").fetchall()
    conn.execute("UPDATE tail SET v = ? WHERE sid = 2 AND ts = ?", (_flip(v, 20), ts))
    conn.close()
    s = _store(path)
    with pytest.raises(DamagedChunkError):
        s.read_range(SYM, M1, *ALL)
    with pytest.raises(DamagedChunkError) as err:
        s.read_latest("KRW-ETH", D1, 1)
    assert err.value.span == (ts, ts + R.DAY)
    assert len(s.integrity_problems()) == 2
    s.close()


def test_a_version_2_chunk_that_does_not_decode_stays_refused(tmp_path):
    path = tmp_path / "v2.sqlite3"
    _write_v2(path)
    conn = _raw(path)
    key, data = conn.execute("SELECT key, data FROM chunk WHERE key >> 36 = 2 ORDER BY key LIMIT 1").fetchall()[0]
    conn.execute("UPDATE chunk SET data = ? WHERE key = ?", (data[: len(data) // 2], key))  # truncated stream
    conn.close()
    s = _store(path)
    with pytest.raises(DamagedChunkError, match="does not decompress"):
        s.read_range("KRW-ETH", D1, *ALL)
    assert any(f"chunk {key} " in p for p in s.integrity_problems())
    assert len(s.quarantine_damaged("KRW-ETH", D1)) == 1
    assert s.integrity_problems() == []
    s.close()


def test_tail_values_check_whole_rows_in_any_order():
    # group_concat's order is not promised: the live edge is sorted after the check, and a value
    # cut short, changed or outside the range asked for is refused as a whole.
    rows = _rows()[:TAIL_MAX]
    values = _tail_values(rows)
    shuffled = [values[i] for i in np.random.default_rng(3).permutation(len(values))]
    for blob, descending in ((b"".join(values), False), (b"".join(values[::-1]), True), (b"".join(shuffled), False)):
        got = _tail_rows(blob, int(rows["ts"][0]), int(rows["ts"][-1]) + 1, descending)
        assert got is not None and same(np.ascontiguousarray(got), rows)
        assert _tail_rows(blob, int(rows["ts"][1]), 1 << 60, descending) is None
        assert _tail_rows(blob, -(1 << 60), int(rows["ts"][-1]), descending) is None
        assert _tail_rows(blob[:-1], -(1 << 60), 1 << 60, descending) is None
        for at in (0, 8, 55, 56, 63):  # the ts word, a price, the last row byte, the checksum
            assert _tail_rows(_flip(blob, 64 * 3 + at), -(1 << 60), 1 << 60, descending) is None
