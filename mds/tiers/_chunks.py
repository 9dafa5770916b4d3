"""How candles are laid out in a durable tier's rows, shared by the SQLite and PostgreSQL tiers:
chunk keys and spans, the chunk codecs (raw or compressed), live-edge (tail) values with their
checksums, checking stored rows against them, and checking a batch before it is written.

Pure functions of bytes and arrays; nothing here touches a connection. A chunk key packs
``(sid, chunk number)`` into one signed 64-bit integer, so both tiers key chunks the same way
and a range scan of one key interval walks one series.

Chunk codecs (``chunk.codec``; every one decodes to the same rows, so ``crc`` never changes):

- 0, raw: the CANDLE_DTYPE bytes.
- 1, the first compressed codec (read; no longer written: upkeep recompresses it to 2): an int64
  delta of every 8-byte word against the previous row, a byte shuffle in numpy, zlib level 6.
  Decoding a 1,024-row chunk took 140-300 us, most of a range read from old history.
- 2, what :func:`encode` writes: the same int64 delta, row by row, then rows of zeros up to a
  multiple of 8 rows, the last of them holding the row count in its first word; one c-blosc
  1.x chunk (python-blosc) of it with 56-byte items (one row), bit shuffle and LZ4HC level 9;
  then the CRC-32 of that chunk (4 bytes, little-endian). A 56-byte item is what keeps c-blosc
  1.x from splitting LZ4's input into 8 byte streams (it splits items of up to 16 bytes, which
  made every LZ4 setting larger than codec 1), and the padding to whole groups of 8 items is
  what makes it bit-shuffle at all (it copies a block of any other length unshuffled). The CRC
  stands in for zlib's own check in codec 1: c-blosc keeps none, and a damaged stream that
  bit-shuffles back into wrong rows can cancel out in the rows' checksum. Smaller than codec 1 on generated
  and recorded Upbit candles (about 10 % in total, and on every data set) and 4-5x faster to
  decode; the measurements are in ``benches/bench_codec.py``. The blosc header records its
  shuffle, compressor and sizes: a chunk that c-blosc wrote under other settings (its
  ``BLOSC_*`` environment variables override the caller's) still decodes to the same rows.
"""

from __future__ import annotations

import hashlib
import struct
import threading
import zlib
from functools import cache
from itertools import pairwise
from math import isfinite
from typing import Any

import numpy as np

from mds import _kernels as _k
from mds._checksum import WORDS_PER_ROW, row_checksum, row_checksums
from mds._dtypes import CANDLE_DTYPE, CANDLE_RAW
from mds.errors import InvalidCandleError
from mds.timeframes import Timeframe

#: Grid slots per chunk: 1,024 slots are 56 KiB of raw candles (17 h of 1m candles).
CHUNK_SLOTS = 1024
#: Codec ids stored in ``chunk.codec`` (see the module docstring).
CODEC_RAW = 0
CODEC_ZLIB_DELTA_SHUFFLE = 1
CODEC_BLOSC_DELTA_BITSHUFFLE_LZ4HC = 2
#: The codec :func:`encode` writes; upkeep brings older compressed chunks to it.
CODEC_COMPRESSED = CODEC_BLOSC_DELTA_BITSHUFFLE_LZ4HC

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


@cache
def _blosc() -> Any:
    """python-blosc, imported on first use: its import takes about 11 ms (7 % of ``import mds``)
    and sets c-blosc's global thread count, which only a store that touches compressed history
    should pay for."""
    import blosc

    return blosc


#: Codec 2's LZ4HC level: levels 3 to 9 decode equally fast and encode in about 0.2 ms; 9 is the
#: smallest, 1 and 2 are larger than codec 1 on some data sets (``benches/bench_codec.py``).
_LZ4HC_LEVEL = 9
_COLS = ROW // 8  # 8-byte words per row
_BLOSC_HEADER = 16  # c-blosc 1.x: version, versionlz, flags, typesize, nbytes, blocksize, cbytes
_CRC = 4
_MAX_PADDED = CHUNK_SLOTS // 8 * 8 + 8  # rows of a full chunk's padded delta


def _padded_rows(n: int) -> int:
    """Codec 2's rows for ``n`` candles: the deltas and at least one row holding the count,
    a multiple of 8 (c-blosc 1.x bit-shuffles only whole groups of 8 items)."""
    return n // 8 * 8 + 8


def encode(arr: np.ndarray, codec: int = CODEC_COMPRESSED) -> bytes:
    """The stored bytes of the C-contiguous rows ``arr`` in compressed ``codec`` (1 or 2; 1 is
    kept so that tests can write chunks as older versions did)."""
    n = len(arr)
    words = arr.view("<i8").reshape(n, _COLS)
    if codec == CODEC_BLOSC_DELTA_BITSHUFFLE_LZ4HC:
        buf = np.zeros((_padded_rows(n), _COLS), dtype="<i8")
        buf[:n] = words
        buf[1:n] -= words[:-1]  # wraps on overflow, as the sum back does
        buf[-1, 0] = n
        b = _blosc()
        packed = b.compress_ptr(buf.ctypes.data, len(buf), ROW, _LZ4HC_LEVEL, b.BITSHUFFLE, "lz4hc")
        return bytes(packed) + zlib.crc32(packed).to_bytes(_CRC, "little")
    if codec == CODEC_ZLIB_DELTA_SHUFFLE:
        delta = words.copy()
        delta[1:] -= words[:-1]  # wraps on overflow; undone exactly by the cumulative sum
        return zlib.compress(np.ascontiguousarray(delta.view(np.uint8).reshape(n, ROW).T).tobytes(), 6)
    raise ValueError(f"cannot encode codec {codec}")


def _decode_blosc(data: Any) -> tuple[np.ndarray, int]:
    """Codec 2's rows and their checksum (:func:`mds._checksum.row_checksum`, computed while
    the delta is undone); Damage when the payload fails its CRC or does not decompress to one
    chunk's padded delta. A payload that passes both and still holds wrong rows is caught by the
    rows' checksum in :func:`verified`."""
    if len(data) < _BLOSC_HEADER + _CRC:
        raise Damage(f"does not decompress (a {len(data)}-byte payload, shorter than a blosc header)")
    packed = memoryview(data)[:-_CRC]
    if zlib.crc32(packed) != int.from_bytes(data[-_CRC:], "little"):
        raise Damage("does not decompress (its CRC-32 does not match: the stream is damaged)")
    nbytes = int.from_bytes(data[4:8], "little")
    cbytes = int.from_bytes(data[12:16], "little")
    if cbytes != len(packed):
        raise Damage(f"does not decompress (its header claims {cbytes} bytes, it holds {len(packed)})")
    # checked before allocating what the header claims: decompress_ptr writes all of it
    if nbytes % (8 * ROW) or not 0 < nbytes <= ROW * _MAX_PADDED:
        raise Damage(f"claims {nbytes} bytes, not the padded rows of one chunk")
    buf = np.empty((nbytes // ROW, _COLS), dtype="<i8")
    b = _blosc()
    try:
        got = b.decompress_ptr(packed, buf.ctypes.data)
    except (b.blosc_extension.error, ValueError, TypeError) as exc:
        raise Damage(f"does not decompress ({exc})") from None
    n = int(buf[-1, 0])
    if got != nbytes or not 0 <= n <= CHUNK_SLOTS or _padded_rows(n) != len(buf):
        raise Damage(f"does not decompress (a row count of {n} in {got} bytes)")
    rows = buf[:n]
    checksum = sum_rows(rows)
    return rows.view(CANDLE_DTYPE).reshape(-1), checksum


def sum_rows(rows: np.ndarray) -> int:
    """Undo codec 2's delta of the words ``rows`` (n x 7, C order) in place, a cumulative sum
    down each column, and return the rows' checksum. The compiled kernel does both in one pass:
    4 us for a full chunk here, against 46 us for numpy's sum in its twin and 10 us for the
    checksum alone (``python /tmp`` timings of 2,000 calls on one pinned CPU)."""
    return _k.undelta_rows(rows)


def decode(codec: int, data: Any) -> np.ndarray:
    """The rows of a chunk's stored bytes, unchecked (raw rows are a read-only view of ``data``).

    Raises :class:`Damage` for an unknown codec or a codec-2 payload that does not decode;
    ``zlib.error`` or ``ValueError`` for a codec-0 or codec-1 payload that does not.
    """
    if codec == CODEC_RAW:
        return np.frombuffer(data, dtype=CANDLE_DTYPE)
    if codec == CODEC_BLOSC_DELTA_BITSHUFFLE_LZ4HC:
        return _decode_blosc(data)[0]
    if codec == CODEC_ZLIB_DELTA_SHUFFLE:
        planes = np.frombuffer(zlib.decompress(data), dtype=np.uint8)
        n = len(planes) // ROW
        words = np.ascontiguousarray(planes.reshape(ROW, n).T).view(np.int64)
        return np.cumsum(words, axis=0, dtype=np.int64).view(CANDLE_DTYPE).reshape(n)
    raise Damage(f"has an unknown codec {codec}")


#: Compressed chunks decoded last, as ``(codec, crc, length) -> (the stored bytes, their rows)``:
#: a backtest walking old history in ranges reads most chunks twice (a range of 1,000 rows
#: crosses a chunk boundary), and decoding is most of such a read. A hit needs the stored bytes
#: to equal the cached ones exactly (a compare costs ~1 us against ~30 us of decoding), so
#: whatever rewrote the chunk, and any damage, is a miss: decoded and checked again.
_DECODED: dict[tuple[int, int, int], tuple[bytes, np.ndarray]] = {}
_DECODED_MAX = 8
_DECODED_LOCK = threading.Lock()


def verified(codec: int, crc: int, data: Any) -> np.ndarray:
    """The rows of a stored chunk, checked against its checksum (raises :class:`Damage`).

    Rows of a compressed chunk are read-only and may be shared with other calls that read the
    same stored bytes (see ``_DECODED``); raw rows are a view of ``data``."""
    if codec != CODEC_RAW:
        key = (codec, crc, len(data))
        hit = _DECODED.get(key)
        if hit is not None and hit[0] == data:
            return hit[1]
        a = _verified(codec, crc, data)
        a.flags.writeable = False
        with _DECODED_LOCK:
            _DECODED[key] = (bytes(data), a)
            if len(_DECODED) > _DECODED_MAX:
                del _DECODED[next(iter(_DECODED))]
        return a
    return _verified(codec, crc, data)


def _verified(codec: int, crc: int, data: Any) -> np.ndarray:
    checksum = None
    try:
        if codec == CODEC_BLOSC_DELTA_BITSHUFFLE_LZ4HC:
            a, checksum = _decode_blosc(data)  # summed while decoded
        else:
            a = decode(codec, data)
    except zlib.error as exc:
        raise Damage(f"does not decompress ({exc})") from None
    except ValueError:
        raise Damage(f"holds {len(data)} bytes, not whole rows") from None
    if not len(a):
        raise Damage("holds no rows")
    if (row_checksum(a, 0, len(a)) if checksum is None else checksum) != crc & _U64:
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


# ---------------------------------------------------------------------------- batches
_ROW_STRUCT = struct.Struct("<q6d")


def _row_ok(arr: np.ndarray, tf: Timeframe) -> bool:
    """Whether the single candle in ``arr`` passes every check of ``validate`` (no ``now``)."""
    ts, o, h, lo, c, v, q = _ROW_STRUCT.unpack_from(arr.data)
    if not (isfinite(o) and isfinite(h) and isfinite(lo) and isfinite(c) and isfinite(v) and isfinite(q)):
        return False
    if lo > o or lo > c or h < o or h < c or v < 0.0 or q < 0.0:
        return False
    if not (o > 0.0 and h > 0.0 and lo > 0.0 and c > 0.0):  # DESIGN.md section 6: prices are > 0
        return False
    if tf.is_month:
        return tf.is_aligned(ts)
    return (ts - tf.origin_ms) % tf.interval_ms == 0


def check_batch(candles: Any, tf: Timeframe, validated: bool = False) -> np.ndarray:
    """``candles`` as a C-contiguous array, or InvalidCandleError naming every invalid row.

    ``validated``: the rows come from ``mds._kernels.prepare``, which checked every row as
    ``validate`` does: only the shape, order and ``ts`` range are checked here (1.8 us less for
    the live edge's one-row write)."""
    if not isinstance(candles, np.ndarray) or candles.dtype != CANDLE_DTYPE or candles.ndim != 1:
        raise InvalidCandleError(
            f"candles must be a 1-D CANDLE_DTYPE array, got {getattr(candles, 'dtype', type(candles))}"
        )
    arr = np.ascontiguousarray(candles)
    n = len(arr)
    if not n:
        return arr
    ts = arr["ts"]
    if n > 1 and not bool(np.all(ts[1:] > ts[:-1])):
        raise InvalidCandleError("candles must be sorted by ts with unique ts (sort_dedup them first)")
    if not (int(ts[0]) > -TS_LIMIT and int(ts[-1]) < TS_LIMIT):
        raise InvalidCandleError(f"candle ts out of range (|ts| must be below {TS_LIMIT} ms)")
    if validated:
        return arr
    if n == 1 and _row_ok(arr, tf):
        return arr  # the scalar twin of validate() below: a kernel call costs more for one row
    idx, reason = _k.validate(arr, *tf.kernel_args)
    if len(idx):
        names = [_k.REASONS.get(int(r), str(int(r))) for r in reason]
        raise InvalidCandleError(
            f"{len(idx)} invalid candle(s), first at row {int(idx[0])}: {names[0]}; nothing was stored",
            rows=[int(i) for i in idx],
            reasons=names,
        )
    return arr


# ---------------------------------------------------------------------------- self-check
def chunk_problems(
    key: int, n: int, first: int, last: int, codec: int, crc: int, data: Any, label: str, tf: Timeframe, seal: int
) -> list[str]:
    """What is wrong with one stored chunk (``label`` names its series): damage, or a broken
    invariant of the layout (row count, order, first/last, key span, live-edge boundary,
    alignment); [] when sound."""
    span = chunk_span(key, tf)
    where = f"chunk {key} of {label} [{span[0]}, {span[1]})"
    try:
        a = verified(codec, crc, data)
    except Damage as exc:
        return [f"{where}: damaged, {exc} (quarantine_damaged() drops it for a refetch)"]
    ts = a["ts"]
    if len(a) != n or not len(a):
        return [f"{where}: holds {len(a)} rows, catalogue says {n}"]
    problems = []
    if len(a) > 1 and not bool(np.all(ts[1:] > ts[:-1])):
        problems.append(f"{where}: rows not sorted or not unique")
    if int(ts[0]) != first or int(ts[-1]) != last:
        problems.append(f"{where}: first/last ts {ts[0]}/{ts[-1]} differ from {first}/{last}")
    sid = key >> CID_BITS
    if chunk_key(sid, tf, int(ts[0])) != key or chunk_key(sid, tf, int(ts[-1])) != key:
        problems.append(f"{where}: rows outside the chunk's time span")
    if int(ts[-1]) >= seal:
        problems.append(f"{where}: rows at or after the live-edge boundary {seal}")
    if not bool(np.all(tf.aligned(ts))):
        problems.append(f"{where}: misaligned ts")
    return problems


def tail_problems(ts: int, v: Any, label: str, seal: int) -> list[str]:
    """What is wrong with one stored tail row ``(ts, v)`` of the series ``label``; [] when sound."""
    why = tail_row_problem(ts, v)
    if why is not None:
        return [f"tail row {label} {ts}: damaged, {why} (quarantine_damaged() drops it)"]
    if ts < seal:
        return [f"tail row {label} {ts}: below the live-edge boundary {seal}"]
    return []


def coverage_problems(cov: np.ndarray, label: str, tf: Timeframe | None) -> list[str]:
    """What is wrong with a series' checked coverage ranges (``tf`` None: its timeframe is
    unknown, bounds are not checked for alignment); [] when sound."""
    problems = []
    if len(cov) and (bool(np.any(cov[:, 1] <= cov[:, 0])) or bool(np.any(cov[1:, 0] <= cov[:-1, 1]))):
        problems.append(f"coverage of {label}: ranges empty, unsorted, overlapping or adjacent")
    bounds = cov[(cov != 0) & (cov != NEG_INF) & (cov != POS_INF)]  # 0: the start of history
    if tf is not None and len(bounds) and not bool(np.all(tf.aligned(bounds))):
        problems.append(f"coverage of {label}: a bound is not aligned to {tf.name}")
    return problems


# ------------------------------------------------------------------ coverage rows
EMPTY_RANGES = np.zeros((0, 2), dtype=np.int64)
_COV_ROW = struct.Struct("<qqq")


def coverage_crc(sid: int, start: int, end: int) -> int:
    """Checksum of one coverage row, bound to its series: a flipped bit in a bound (which would
    make never-fetched slots read as no_trades) or a row moved to another series fails it."""
    digest = hashlib.blake2b(_COV_ROW.pack(sid, start, end), digest_size=8, person=b"mds-coverage").digest()
    return int.from_bytes(digest, "little", signed=True)
