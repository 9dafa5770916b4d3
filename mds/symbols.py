"""Upbit market codes (``QUOTE-BASE``, upper case)."""

from __future__ import annotations

import re

from mds.errors import InvalidRequestError

__all__ = ["validate_symbol"]

_SYMBOL = re.compile(r"[A-Z]{2,10}-[A-Z0-9]{1,20}")


def validate_symbol(symbol: object) -> str:
    """Return ``symbol`` if it is an Upbit market code such as ``KRW-BTC``.

    Only ``QUOTE-BASE`` in upper-case ASCII passes (quote: 2-10 letters, base: 1-20 letters or
    digits, as in ``KRW-1INCH``). Nothing is normalised: ``krw-btc`` is rejected, so a typo
    cannot create a second series.

    Raises
    ------
    InvalidRequestError
        For anything else (wrong type, lower case, whitespace, SQL or path fragments, unicode).
    """
    if not isinstance(symbol, str):
        raise InvalidRequestError(f"symbol must be a string, got {type(symbol).__name__}")
    if not _SYMBOL.fullmatch(symbol):
        shown = symbol if len(symbol) <= 40 else symbol[:40] + "..."
        raise InvalidRequestError(
            f"invalid symbol {shown!r}: expected an Upbit market code QUOTE-BASE in upper case, e.g. KRW-BTC"
        )
    return symbol
