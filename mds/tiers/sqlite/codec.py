"""How candles are laid out in the SQLite tier's rows: chunk keys and spans, the chunk codec (raw
or compressed), tail values with their checksums, and checking stored rows against them.

Pure functions of bytes and arrays; nothing here touches the connection.
"""

from __future__ import annotations

import struct
import zlib
from itertools import pairwise
from typing import Any

import numpy as np

from mds._checksum import WORDS_PER_ROW, row_checksum, row_checksums
from mds._dtypes import CANDLE_DTYPE, CANDLE_RAW
from mds.timeframes import Timeframe

#: Grid slots per chunk: 1,024 slots are 56 KiB of raw candles (17 h of 1m candles).
CHUNK_SLOTS = 1024
#: Codec ids stored in ``chunk.codec``.
CODEC_RAW = 0
CODEC_ZLIB_DELTA_SHUFFLE = 1

ROW = CANDLE_DTYPE.itemsize
TAIL_V = ROW + 8  # a tail value: the candle, then its checksum
_TAIL_WORDS = struct.Struct(f"<{2 * (ROW // 8)}IQ")  # the row's 4-byte half-words, then its checksum
_ROW_WEIGHTS = tuple(range(3, 3 + 4 * (ROW // 8), 2))  # row_checksum's weights for one row
_TAIL_RECORD = np.dtype([("row", CANDLE_RAW), ("crc", "<u8")])
_U64 = (1 << 64) - 1
CID_BITS = 36
_CID_OFFSET = 1 << (CID_BITS - 1)
_CID_MIN = -_CID_OFFSET
_CID_MAX = _CID_OFFSET - 1
_CID_MASK = (1 << CID_BITS) - 1
TS_LIMIT = 1 << 50  # about year 37,600: keeps chunk numbers inside their 36 bits
NEG_INF = -(1 << 62)
POS_INF = 1 << 62


class Damage(Exception):
    """Stored rows that cannot be served; the caller turns it into a :class:`DamagedChunkError`."""


def chunk_key(sid: int, tf: Timeframe, ts: int) -> int:
    """The key of the chunk of series ``sid`` that holds ``ts``: ``(sid << 36)`` + chunk number."""
    cid = (ts - tf.origin_ms) // (tf.interval_ms * CHUNK_SLOTS)
    cid = _CID_MIN if cid < _CID_MIN else _CID_MAX if cid > _CID_MAX else cid
    return (sid << CID_BITS) + cid + _CID_OFFSET


def chunk_span(key: int, tf: Timeframe) -> tuple[int, int]:
    """The grid span ``[start, end)`` a chunk key stands for (what :func:`chunk_key` maps in)."""
    cid = (key & _CID_MASK) - _CID_OFFSET
    width = tf.interval_ms * CHUNK_SLOTS
    start = NEG_INF if cid <= _CID_MIN else tf.origin_ms + cid * width
    end = POS_INF if cid >= _CID_MAX else tf.origin_ms + (cid + 1) * width
    return start, end


def signed(crc: int) -> int:
    """A checksum in ``[0, 2**64)`` as the signed 64-bit integer SQLite stores."""
    return crc - (1 << 64) if crc >> 63 else crc


def encode(arr: np.ndarray) -> bytes:
    """Codec 1: int64 delta of every 8-byte word against the previous row, byte shuffle, zlib 6."""
    words = arr.view(np.int64).reshape(-1, 7)
    delta = words.copy()
    delta[1:] -= words[:-1]  # wraps on overflow; undone exactly by the cumulative sum
    return zlib.compress(np.ascontiguousarray(delta.view(np.uint8).reshape(len(arr), ROW).T).tobytes(), 6)


def decode(codec: int, data: bytes) -> np.ndarray:
    """The rows of a chunk's stored bytes, unchecked (raw rows are a read-only view of ``data``)."""
    if codec == CODEC_RAW:
        return np.frombuffer(data, dtype=CANDLE_DTYPE)
    if codec == CODEC_ZLIB_DELTA_SHUFFLE:
        planes = np.frombuffer(zlib.decompress(data), dtype=np.uint8)
        n = len(planes) // ROW
        words = np.ascontiguousarray(planes.reshape(ROW, n).T).view(np.int64)
        return np.cumsum(words, axis=0, dtype=np.int64).view(CANDLE_DTYPE).reshape(n)
    raise Damage(f"has an unknown codec {codec}")


def verified(codec: int, crc: int, data: Any) -> np.ndarray:
    """The rows of a stored chunk, checked against its checksum (raises :class:`Damage`)."""
    try:
        a = decode(codec, data)
    except zlib.error as exc:
        raise Damage(f"does not decompress ({exc})") from None
    except ValueError:
        raise Damage(f"holds {len(data)} bytes, not whole rows") from None
    if not len(a):
        raise Damage("holds no rows")
    if row_checksum(a, 0, len(a)) != crc & _U64:
        raise Damage("rows do not match their checksum")
    return a


def tail_values(rows: np.ndarray) -> list[bytes]:
    """The stored tail values of ``rows`` (C-contiguous): each candle followed by its checksum."""
    words = rows.view(np.uint64).reshape(len(rows), WORDS_PER_ROW)
    raw = np.concatenate([words, row_checksums(words)[:, None]], axis=1).tobytes()
    return [raw[i : i + TAIL_V] for i in range(0, len(raw), TAIL_V)]


def tail_value(row: np.ndarray) -> bytes:
    """The stored tail value of a one-row array."""
    raw = row.tobytes()
    return raw + row_checksum(raw, 0, 1).to_bytes(8, "little")


def tail_rows(data: Any, lo: int, hi: int, descending: bool = False) -> np.ndarray | None:
    """Candles of concatenated tail values (ascending, or descending if so read), sorted
    ascending; None unless every value is whole, matches its checksum and lies in ``[lo, hi)``.

    A live edge is a few rows: checked one by one in Python, which costs less here than the fixed
    overhead of a handful of numpy calls (the same weighted sum as :func:`row_checksum`).
    """
    if len(data) % TAIL_V:
        return None
    tss = []
    for w in _TAIL_WORDS.iter_unpack(data):
        if sum(k * h for k, h in zip(_ROW_WEIGHTS, w)) & _U64 != w[-1]:
            return None
        t = w[0] | (w[1] << 32)
        tss.append(t - (1 << 64) if t >> 63 else t)
    a = np.frombuffer(data, dtype=_TAIL_RECORD)["row"].view(CANDLE_DTYPE)
    if descending:
        a = a[::-1]
        tss.reverse()
    if len(tss) > 1 and any(x >= y for x, y in pairwise(tss)):  # group_concat order is not promised
        order = sorted(range(len(tss)), key=tss.__getitem__)
        a = a[order]
        tss = [tss[i] for i in order]
    if not (lo <= tss[0] and tss[-1] < hi):
        return None  # a row whose key says otherwise
    return a


def tail_row_problem(ts: int, v: Any) -> str | None:
    """Why the stored tail row ``(ts, v)`` cannot be served, or None."""
    if not isinstance(v, bytes) or len(v) != TAIL_V:
        return f"malformed ({len(v) if isinstance(v, bytes) else type(v).__name__} bytes, not {TAIL_V})"
    if row_checksum(v, 0, 1) != int.from_bytes(v[ROW:], "little"):
        return "does not match its checksum"
    if int.from_bytes(v[:8], "little", signed=True) != ts:
        return "holds another ts than its key"
    return None


def empty() -> np.ndarray:
    return np.zeros(0, dtype=CANDLE_DTYPE)


def concat(parts: list[np.ndarray]) -> np.ndarray:
    """One new array of the parts (rows copied as raw bytes, not field by field)."""
    if not parts:
        return empty()
    if len(parts) == 1:
        return parts[0].view(CANDLE_RAW).copy().view(CANDLE_DTYPE)
    return np.concatenate([p.view(CANDLE_RAW) for p in parts]).view(CANDLE_DTYPE)


def sorted_by_ts(a: np.ndarray) -> np.ndarray:
    """``a`` itself when its ``ts`` ascend strictly, else sorted by ``ts`` (a guard, rarely taken)."""
    ts = a["ts"]
    if len(a) > 1 and not bool(np.all(ts[1:] > ts[:-1])):
        a = a[np.argsort(ts, kind="stable")]
    return a
