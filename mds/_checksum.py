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
_ONE_ROW = struct.Struct(f"<{WORDS_PER_ROW}Q")
_MASK = (1 << 64) - 1


def row_checksum(buf: Any, offset: int, n: int) -> int:
    """64-bit wrapping sum of the 8-byte words of ``n`` rows starting at byte ``offset`` of ``buf``.

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
        The sum modulo 2**64, in ``[0, 2**64)``.

    Notes
    -----
    Catches random damage (a flipped bit or byte, garbage, zeroed or misdirected pages, torn
    writes: any change of a single word changes the sum) at memory speed, about 8x faster than
    zlib's CRC-32 here. It misses reorderings of whole words and changes that cancel out, which
    the storage engines underneath do not produce by accident. The sum of two row ranges'
    checksums (mod 2**64) is the checksum of both, so per-row sums add up to a chunk's sum.

    Raises
    ------
    ValueError
        ``buf`` holds fewer than ``offset + 56 * n`` bytes.
    """
    if n == 1:  # the live edge's one-candle write: struct is several times cheaper than a ufunc here
        try:
            return sum(_ONE_ROW.unpack_from(buf, offset)) & _MASK
        except struct.error as exc:
            raise ValueError(str(exc)) from None
    words = np.frombuffer(buf, dtype=np.uint64, count=n * WORDS_PER_ROW, offset=offset)
    return int(np.add.reduce(words, dtype=np.uint64))


def row_checksums(words: np.ndarray) -> np.ndarray:
    """Per-row :func:`row_checksum` of rows given as a ``uint64`` array of shape ``(n, k >= 7)``.

    Only the first 7 words of each row are summed, so rows stored with extra words (for example
    their checksum beside them) can be checked without a copy.
    """
    return np.add.reduce(words[:, :WORDS_PER_ROW], axis=1, dtype=np.uint64)
