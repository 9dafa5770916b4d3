"""The error hierarchy of mds (DESIGN.md section 6).

Every error mds raises on purpose is a :class:`MdsError`; each subclass also inherits the builtin
that callers would naturally catch.
"""

from __future__ import annotations

__all__ = [
    "InvalidCandleError",
    "InvalidRequestError",
    "Layer1Error",
    "MdsError",
    "StorageUnavailableError",
]


class MdsError(Exception):
    """Base class of every error raised by mds."""


class InvalidRequestError(MdsError, ValueError):
    """A symbol, timeframe, time range or payload that mds cannot accept."""


class InvalidCandleError(MdsError, ValueError):
    """A candle batch failed validation; nothing of it was stored.

    ``rows`` holds the offending row indices (into the batch as given) and ``reasons`` the
    matching reason names, so callers can report or drop exactly those rows.
    """

    def __init__(self, message: str, rows: list[int] | None = None, reasons: list[str] | None = None):
        super().__init__(message)
        self.rows: list[int] = rows or []
        self.reasons: list[str] = reasons or []


class StorageUnavailableError(MdsError, OSError):
    """A storage tier (SQLite, LMDB) cannot be used: missing, locked, corrupt or full."""


class Layer1Error(MdsError, ConnectionError):
    """The Layer 1 (exchange router) failed, refused or answered with something unusable."""
