"""The LMDB disk tier's on-disk format: key layout, chunk and held-range values and their codecs.

Everything read back is parsed with size limits and checked before it is used; a value that cannot
be what this module wrote raises :data:`_Corrupt` (the tier then recreates the environment).

Layout (see docs/ARCHITECTURE.md, "Disk tier (LMDB)"):

- ``chunks`` database: key ``series key + period start`` (so keys sort by series, then time and
  a range is one cursor walk); value ``[H, M] + msgpack([version, rows, written_at, checksum]) +
  padding + raw CANDLE_DTYPE rows`` (H is the header length, a multiple of 8, so rows in overflow
  pages are 8-byte aligned; M is the msgpack length; checksum: 64-bit sum of the row words).
- ``held`` database: key ``series key``; value ``msgpack([version, [s0, e0, s1, e1, ...]])``,
  the half-open ranges the tier holds in full. Chunks and held ranges change in one write
  transaction, so readers in other processes see both or neither.
- ``meta`` database: the on-disk format version.
"""

from __future__ import annotations

import contextlib
import itertools
import struct
from collections.abc import Iterator
from typing import Any

import msgpack
import numpy as np

from mds._checksum import row_checksum
from mds._dtypes import CANDLE_DTYPE, CANDLE_RAW
from mds._kernels import CHUNK_KEY_MAX as _MAX_KEY, ChunkCorrupt
from mds.timeframes import DAY_MS, HOUR_MS

#: On-disk format of this module; bump it when a key or value layout changes. An environment
#: with another version is cleared on open (it is a cache: SQLite refills it).
FORMAT_VERSION = 2

#: Chunk period per timeframe: about 500 to 4000 rows (30 to 220 KiB) a chunk, so a
#: 1,000-candle read touches one to three values and an append rewrites at most one chunk.
#: Periods are aligned to the epoch (a multiple of whole UTC days, or of an hour for 1s).
CHUNK_PERIOD_MS: dict[str, int] = {
    "1s": HOUR_MS,
    "1m": DAY_MS,
    "3m": 2 * DAY_MS,
    "5m": 4 * DAY_MS,
    "10m": 8 * DAY_MS,
    "15m": 8 * DAY_MS,
    "30m": 16 * DAY_MS,
    "1h": 32 * DAY_MS,
    "4h": 128 * DAY_MS,
    "1d": 4096 * DAY_MS,
    "1w": 4096 * DAY_MS,
    "1M": 4096 * DAY_MS,
}

_ROW = CANDLE_DTYPE.itemsize
_KEY = struct.Struct(">Q")
_OFFSET = 1 << 63  # period start as unsigned big-endian: byte order == time order
#: Bounds on a held set: 50,000 disjoint ranges per series is far past any real use. The byte
#: bound is checked before a value is touched: a damaged node can claim a size that reaches
#: past the end of the map.
_MAX_HELD_INTS = 100_000
_MAX_HELD_BYTES = 9 * _MAX_HELD_INTS + 16
_MAX_ROWS = 1 << 26  # sanity bound on a chunk header's row count
_MAX_VERIFIED = 1 << 18  # chunk versions remembered as checked (about 150 bytes each)
_SEP = b"\x1f"  # between the fields of a series key: ``symbol 0x1f timeframe 0x1f``


#: A value or a file that cannot be what this module wrote (the kernels' walk raises it too).
_Corrupt = ChunkCorrupt


#: Memo of a chunk version this process has checked: ``(header bytes, header length, rows,
#: written_at)``. The header bytes hold the format, row count, written-at time and checksum, so a
#: value whose header bytes and size equal the memo's parses to the same fields and carries rows
#: that already matched that checksum.
_Seen = tuple[bytes, int, int, int]


# -- value codecs --------------------------------------------------------------------------------


def _pack_chunk(rows: np.ndarray, written_at: int) -> tuple[bytes, _Seen]:
    """The chunk value for ``rows`` and its :data:`_Seen` memo entry."""
    raw = np.ascontiguousarray(rows).view(np.uint8).data
    crc = row_checksum(raw, 0, len(rows))
    head = msgpack.packb([FORMAT_VERSION, len(rows), int(written_at), crc])
    m = len(head)
    h = (m + 2 + 7) & ~7
    val = b"".join((bytes((h, m)), head, bytes(h - 2 - m), raw))
    return val, (val[:h], h, len(rows), int(written_at))


def _chunk_header(val: Any) -> tuple[int, int, int, int]:
    """``(header length, rows, written_at, crc)`` of a chunk value, checked against its size."""
    size = len(val)
    if size < 8:
        raise _Corrupt("chunk value too short")
    h, m = val[0], val[1]
    if h & 7 or m + 2 > h or h > size:
        raise _Corrupt("bad chunk header length")
    try:
        head = msgpack.unpackb(
            val[2 : 2 + m], max_array_len=8, max_map_len=0, max_str_len=0, max_bin_len=0, max_ext_len=0
        )
    except (ValueError, TypeError) as exc:  # msgpack's errors derive from these
        raise _Corrupt(f"unreadable chunk header: {exc}") from None
    if type(head) is not list or len(head) != 4 or head[0] != FORMAT_VERSION:
        raise _Corrupt("chunk header of another format")
    _, n, written, crc = head
    if type(n) is not int or type(written) is not int or not 0 < n <= _MAX_ROWS or h + n * _ROW != size:
        raise _Corrupt("chunk header does not match its size")
    if not -_OFFSET <= written < _OFFSET:
        raise _Corrupt("chunk written-at time outside int64")
    if type(crc) is not int:
        raise _Corrupt("chunk header without a checksum")
    return h, n, written, crc


def _chunk_view(val: Any, key: bytes, verified: dict[bytes, _Seen]) -> tuple[int, int, int]:
    """``(header length, rows, written_at)`` of a chunk value, header and checksum checked.

    The rows' checksum is checked the first time this process sees a chunk version (about 3 us
    for a day of 1m candles) and remembered in ``verified`` (key -> :data:`_Seen`), so damage
    written into the file while no process had checked it yet is caught without a checksum on
    every read. A later read of the same version compares the header bytes with the memo (one
    ``memcmp`` of about 24 bytes) instead of unpacking them again: any change to the header
    (another version, or damage) differs from the memo and is parsed and checked in full.
    """
    seen = verified.get(key)
    if seen is not None:
        head, h, n, written = seen
        if len(val) == h + n * _ROW and val[:h] == head:
            return h, n, written
    h, n, written, crc = _chunk_header(val)
    if row_checksum(val, h, n) != crc:
        raise _Corrupt("chunk rows do not match their checksum")
    if len(verified) >= _MAX_VERIFIED:
        verified.clear()
    verified[key] = (bytes(val[:h]), h, n, written)
    return h, n, written


def _chunk_rows(val: Any, key: bytes, verified: dict[bytes, _Seen]) -> tuple[np.ndarray, np.ndarray, int]:
    """Zero-copy ``(raw rows, ts view, written_at)`` of a chunk value (valid while its txn lives),
    checked by :func:`_chunk_view`."""
    h, n, written = _chunk_view(val, key, verified)
    raw = np.frombuffer(val, dtype=CANDLE_RAW, count=n, offset=h)
    ts = np.ndarray((n,), dtype="<i8", buffer=val, offset=h, strides=(_ROW,))
    return raw, ts, written


def _cur_key(cur: Any) -> bytes:
    """The cursor's key, refused before anything else is read when no key of ours is that long.

    A damaged node can claim a key size that pushes LMDB's view of its value outside the map.
    """
    key = cur.key()
    if len(key) > _MAX_KEY:
        raise _Corrupt("key longer than any key this module writes")
    return bytes(key)


def _items(cur: Any) -> Iterator[tuple[bytes, Any]]:
    """``(key, value)`` of every entry, keys checked by :func:`_cur_key` first."""
    ok = cur.first()
    while ok:
        key = _cur_key(cur)
        yield key, cur.value()
        ok = cur.next()


def _pack_held(flat: list[int]) -> bytes:
    return msgpack.packb([FORMAT_VERSION, flat])


def _unpack_held(val: Any) -> list[int]:
    if len(val) > _MAX_HELD_BYTES:  # checked before touching it: a garbage size may reach past the file
        raise _Corrupt("held ranges value too large")
    try:
        obj = msgpack.unpackb(
            val, max_array_len=_MAX_HELD_INTS, max_map_len=0, max_str_len=0, max_bin_len=0, max_ext_len=0
        )
    except (ValueError, TypeError) as exc:
        raise _Corrupt(f"unreadable held ranges: {exc}") from None
    if type(obj) is not list or len(obj) != 2 or obj[0] != FORMAT_VERSION or type(obj[1]) is not list:
        raise _Corrupt("held ranges of another format")
    flat: list[int] = obj[1]
    if len(flat) % 2 or any(type(x) is not int for x in flat):
        raise _Corrupt("held ranges are not pairs of ints")
    if any(a >= b for a, b in itertools.pairwise(flat)):
        raise _Corrupt("held ranges are not sorted and disjoint")
    return flat


def _format_of(raw: Any) -> object:
    """The version in the ``meta`` database's ``format`` record (None when missing or unreadable)."""
    version = None
    if raw is not None:
        with contextlib.suppress(ValueError, TypeError):
            version = msgpack.unpackb(raw, max_array_len=0, max_map_len=0, max_str_len=0, max_bin_len=0)
    return version
