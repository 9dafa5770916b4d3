"""The checksum of stored candle rows, shared by the disk tiers.

One definition, so that a chunk written by one tier can be checked by another and a file's
checksums mean the same thing in every version of mds that reads it.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

from mds._dtypes import CANDLE_DTYPE

__all__ = ["WORDS_PER_ROW", "row_checksum", "row_checksums"]

#: 8-byte words in one CANDLE_DTYPE row.
WORDS_PER_ROW = CANDLE_DTYPE.itemsize // 8
_HALVES_PER_ROW = 2 * WORDS_PER_ROW
_ONE_ROW = struct.Struct(f"<{_HALVES_PER_ROW}I")
_MASK = (1 << 64) - 1
#: Odd weights from 3 on, one per 4-byte half-word of a chunk (1,024 rows at most; grown on demand).
_WEIGHTS = np.arange(3, 3 + 2 * 1024 * _HALVES_PER_ROW, 2, dtype=np.uint64)
_ROW_WEIGHTS = [int(w) for w in _WEIGHTS[:_HALVES_PER_ROW]]


def _weights(m: int) -> np.ndarray:
    global _WEIGHTS
    if m > len(_WEIGHTS):
        _WEIGHTS = np.arange(3, 3 + 2 * m, 2, dtype=np.uint64)
    return _WEIGHTS[:m]


def row_checksum(buf: Any, offset: int, n: int) -> int:
    """Checksum of ``n`` rows starting at byte ``offset`` of ``buf``: the sum of their 4-byte
    half-words, the j-th weighted by the odd number ``2j + 3``, modulo 2**64.

    Parameters
    ----------
    buf : buffer
        Any object exporting the buffer protocol (bytes, memoryview, a C-contiguous array).
    offset : int
        Byte offset of the first row.
    n : int
        Number of CANDLE_DTYPE rows (56 bytes each).

    Returns
    -------
    int
        In ``[0, 2**64)``.

    Notes
    -----
    Every change of one or two bits is caught, wherever they are (also one in the rows and one in
    a stored checksum): a flip of bit k of half-word j changes the sum by ``(2j + 3) 2**k``, and
    since every weight is odd and at least 3 and the sum never wraps for a chunk (below 2**61),
    two such changes cancel only if they are the same flip. A plain sum of words misses two flips
    of one bit position in opposite directions. About 10 us for a chunk of 1,024 rows here (a
    plain sum takes 2 us); garbage, zeroed or misdirected pages and torn writes are caught too.

    Raises
    ------
    ValueError
        ``buf`` holds fewer than ``offset + 56 * n`` bytes.
    """
    if n == 1:  # the live edge's one-candle write: struct is several times cheaper than ufuncs here
        try:
            halves = _ONE_ROW.unpack_from(buf, offset)
        except struct.error as exc:
            raise ValueError(str(exc)) from None
        return sum(w * h for w, h in zip(_ROW_WEIGHTS, halves)) & _MASK
    arr = np.frombuffer(buf, dtype=np.uint32, count=n * _HALVES_PER_ROW, offset=offset)
    return int(np.dot(arr.astype(np.uint64), _weights(len(arr))))


def row_checksums(words: np.ndarray) -> np.ndarray:
    """Per-row :func:`row_checksum` of rows given as a ``uint64`` array of shape ``(n, k >= 7)``.

    Only the first 7 words of each row count, so rows stored with extra words (for example their
    checksum beside them) can be checked without a copy.
    """
    halves = np.ascontiguousarray(words[:, :WORDS_PER_ROW]).view(np.uint32).astype(np.uint64)
    return np.asarray(halves @ _weights(_HALVES_PER_ROW), dtype=np.uint64)
