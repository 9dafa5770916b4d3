"""Reading what a Layer 1 answers: the seed's ``{"success", "data", "metadata"}`` dicts, checked
and turned into the store's terms (:class:`Layer1Answer`, numpy arrays, coverage).

Every check that makes a malformed or lying answer a :class:`~mds.errors.Layer1Error` instead of
data lives here; the connector decides what to ask and when.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mds._dtypes import TRADE_DTYPE
from mds.convert import candles_from_upbit
from mds.errors import InvalidCandleError, Layer1Error
from mds.layer1._paging import BadPayload, CandlePages, newest_first, page_ts
from mds.models import DataType, StorageRequest
from mds.timeframes import Timeframe

_CANDLE_KEYS = frozenset(
    (
        "candle_date_time_utc",
        "opening_price",
        "high_price",
        "low_price",
        "trade_price",
        "candle_acc_trade_volume",
        "candle_acc_trade_price",
    )
)


@dataclass(frozen=True, slots=True)
class Layer1Answer:
    """What the connector got from the Layer 1, in the store's terms.

    Attributes
    ----------
    data_type : DataType
    source : str
        ``"layer1_cache"`` (answered by the Layer 1's cache, no network) or ``"layer1_api"``.
    arrays : dict
        Candles: ``{symbol: CANDLE_DTYPE array}`` ascending, unique ``ts``; it may end with the
        still-forming candle (at or after ``covered[symbol][1]``). Trades: ``{symbol:
        TRADE_DTYPE array}`` ascending. Tickers and orderbooks: ``{symbol: dict}`` in Upbit
        field names.
    records : dict
        Trades only: ``{symbol: [Upbit trade dicts]}``, newest first (the arrays drop fields).
    covered : dict
        Candles only: ``{symbol: (start, end)}``; in ``[start, end)`` the array holds every
        candle the source has, so an absent slot there means no trades.
    exhausted : dict
        Candles only: ``{symbol: bool}``, the source has nothing older than the array's first row.
    calls : int
        Layer 1 calls made for this answer.
    latency_ms : float
    origin : tuple or None
        Cache answers only: ``(data list, its length, first row, last row, fetched_at)`` of the
        ``peek_cache`` answer it was converted from; the same list again means the same entry.
    """

    data_type: DataType
    source: str
    arrays: dict[str, Any]
    records: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    covered: dict[str, tuple[int, int]] = field(default_factory=dict)
    exhausted: dict[str, bool] = field(default_factory=dict)
    calls: int = 0
    latency_ms: float = 0.0
    origin: tuple[Any, int, Any, Any, Any] | None = None


def _rows_of(payload: Any, what: str) -> list[dict[str, Any]]:
    """The ``data`` of an answer as a flat list of dicts (a ``{symbol: rows}`` dict is flattened)."""
    data = payload
    if isinstance(data, list):
        if not all(isinstance(r, Mapping) for r in data):
            raise BadPayload(f"{what}: data holds something other than objects")
        return [dict(r) for r in data]
    if isinstance(data, Mapping):
        out: list[dict[str, Any]] = []
        for sym, rows in data.items():
            items = [rows] if isinstance(rows, Mapping) else rows
            if not isinstance(items, list) or not all(isinstance(r, Mapping) for r in items):
                raise BadPayload(f"{what}: data[{sym!r}] is not a list of objects")
            out.extend({"market": sym, **dict(r)} for r in items)
        return out
    raise BadPayload(f"{what}: data is {type(data).__name__}, not a list")


def _by_symbol(req: StorageRequest, answer: Mapping[str, Any], what: str) -> dict[str, list[dict[str, Any]]]:
    """The rows of an answer grouped by ``market``, one list for each symbol of ``req``.

    Raises
    ------
    Layer1Error
        A row of a market not asked for.
    """
    per: dict[str, list[dict[str, Any]]] = {s: [] for s in req.symbols}
    for r in _rows_of(answer.get("data"), what):
        m = r.get("market")
        if m not in per:
            raise Layer1Error(f"Layer 1 {what} answered for {m!r}, asked for {list(req.symbols)}")
        per[m].append(r)
    return per


def _bad_price(p: Any) -> bool:
    """A number that cannot be a price (<= 0, NaN, infinite). Not a number is left to the
    realtime cache's own checks."""
    if isinstance(p, bool) or not isinstance(p, (int, float, np.integer, np.floating)):
        return False
    return not (math.isfinite(p) and p > 0)


def meta_of(answer: Mapping[str, Any]) -> Mapping[str, Any]:
    """The ``metadata`` of an answer, or an empty mapping when it has none (or not a mapping)."""
    meta = answer.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def envelope(method: str, result: Any) -> dict[str, Any]:
    """The answer of a Layer 1 call as a dict, if it is a success.

    Raises
    ------
    Layer1Error
        Not a success/data/metadata dict, or not ``success=True`` without an error.
    """
    if not isinstance(result, Mapping) or "success" not in result:
        raise Layer1Error(f"Layer 1 {method} returned {type(result).__name__}, not a success/data/metadata dict")
    # Only success=True (the bool) without an error is a success: "false", 1 or an answer
    # that carries an error is a failure, never an (empty) page that could prove anything.
    if result.get("success") is not True or result.get("error"):
        meta = result.get("metadata") if isinstance(result.get("metadata"), Mapping) else {}
        msg = result.get("error") or result.get("message") or (meta or {}).get("error") or "no message"
        raise Layer1Error(f"Layer 1 {method} did not answer success=True: {result.get('success')!r}, {msg}")
    return dict(result)


def candle_page(answer: Mapping[str, Any], what: str, tf: Timeframe, sym: str, to: int | None) -> list[dict[str, Any]]:
    """The rows of one candle page of ``sym``, checked as :func:`~mds.layer1._paging.page_ts`
    does (``to`` exclusive) and for the fields a candle needs.

    Raises
    ------
    BadPayload
    """
    rows = _rows_of(answer.get("data"), what)
    page_ts(rows, tf, sym, to)
    for r in rows:
        if not r.keys() >= _CANDLE_KEYS:
            raise BadPayload(f"{what}: a candle lacks {sorted(_CANDLE_KEYS - r.keys())}")
    return rows


def latest_end(tf: Timeframe, meta: Mapping[str, Any] | None, pages: CandlePages, asked_at: int) -> int:
    """End of coverage for a ``to``-less answer: the forming interval's start, as of the answer.

    A Layer 1 that dates its answer (``fetched_at``) is trusted; one that says it answered
    from a cache but does not date it covers only up to its newest candle.
    """
    meta = meta or {}
    at = meta.get("fetched_at")
    if isinstance(at, (int, np.integer)) and not isinstance(at, bool):
        return tf.floor(int(at))
    if meta.get("cache_hit") or meta.get("source") == "cache":
        return int(pages.ts[0]) if len(pages.ts) else tf.floor(asked_at)
    return tf.floor(asked_at)


def candles_array(sym: str, rows: list[Any]) -> np.ndarray:
    """Upbit candle dicts of ``sym`` as a CANDLE_DTYPE array, ascending ``ts``.

    Raises
    ------
    Layer1Error
        A candle the store would refuse (see :func:`mds.convert.candles_from_upbit`).
    """
    try:
        arr = candles_from_upbit(rows, market=sym)
    except InvalidCandleError as exc:
        raise Layer1Error(f"Layer 1 returned unusable candles for {sym}: {exc}") from None
    arr = arr[::-1]
    order = np.argsort(arr["ts"], kind="stable")
    return np.ascontiguousarray(arr[order])


def snapshots(req: StorageRequest, answer: Mapping[str, Any], what: str) -> dict[str, Any]:
    """``{symbol: ticker or orderbook dict}``, exactly one for each symbol of ``req``.

    Raises
    ------
    Layer1Error
        A symbol not asked for or missing, or a ticker whose ``trade_price`` cannot be a price.
    """
    rows = _rows_of(answer.get("data"), what)
    out: dict[str, Any] = {}
    for r in rows:
        m = r.get("market")
        if req.data_type is DataType.TICKER and _bad_price(r.get("trade_price")):
            raise Layer1Error(f"Layer 1 {what} answered a ticker of {m!r} with trade_price {r.get('trade_price')!r}")
        if isinstance(m, str) and m in req.symbols:
            out[m] = r
        else:
            raise Layer1Error(f"Layer 1 {what} answered for {m!r}, asked for {list(req.symbols)}")
    missing = [s for s in req.symbols if s not in out]
    if missing:
        raise Layer1Error(f"Layer 1 {what} gave no answer for {missing}")
    return out


def trades(req: StorageRequest, answer: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``({symbol: TRADE_DTYPE array}, {symbol: [trade dicts]})`` of a ``get_trades`` answer;
    arrays ascending, one row per ``sequential_id`` (the row delivered later wins).

    Raises
    ------
    Layer1Error
        A symbol not asked for, a missing or unparsable field, or an impossible price or volume.
    """
    per = _by_symbol(req, answer, "get_trades")
    arrays: dict[str, Any] = {}
    for s, rs in per.items():
        arr = np.zeros(len(rs), dtype=TRADE_DTYPE)
        try:
            arr["ts"] = [int(r["timestamp"]) for r in rs]
            arr["price"] = [float(r["trade_price"]) for r in rs]
            arr["volume"] = [float(r["trade_volume"]) for r in rs]
            arr["side"] = [1 if str(r["ask_bid"]).upper() == "BID" else -1 for r in rs]
            arr["sequential_id"] = [int(r["sequential_id"]) for r in rs]
        except (KeyError, TypeError, ValueError) as exc:
            raise Layer1Error(f"Layer 1 returned unusable trades for {s}: {exc!r}") from None
        price, volume = arr["price"], arr["volume"]
        if not (np.isfinite(price).all() and np.isfinite(volume).all()) or (price <= 0).any() or (volume < 0).any():
            raise Layer1Error(f"Layer 1 returned trades for {s} with a price <= 0, a negative or non-finite number")
        # duplicates of a sequential_id: the row delivered later in the answer wins
        _, first_rev = np.unique(arr["sequential_id"][::-1], return_index=True)
        arr = arr[np.sort(len(arr) - 1 - first_rev)]
        arrays[s] = np.ascontiguousarray(arr[np.argsort(arr["ts"], kind="stable")])
        per[s] = rs
    return arrays, per


def cached_candles(
    req: StorageRequest, tf: Timeframe, answer: Mapping[str, Any], want: int
) -> tuple[dict[str, np.ndarray], dict[str, tuple[int, int]], dict[str, bool]] | None:
    """A ``peek_cache`` candle answer as ``(arrays, covered, exhausted)`` for ``req``, or None
    when the cache cannot answer it in full (fewer than ``want`` candles, or a range outside
    what the cache covers).

    Raises
    ------
    Layer1Error
        A candle of a market not asked for, or an unusable candle.
    """
    by_sym = _by_symbol(req, answer, "peek_cache")
    meta = meta_of(answer)
    arrays: dict[str, np.ndarray] = {}
    covered: dict[str, tuple[int, int]] = {}
    exhausted: dict[str, bool] = {}
    meta_cov = meta.get("covered") if isinstance(meta.get("covered"), Mapping) else {}
    meta_exh = meta.get("exhausted") if isinstance(meta.get("exhausted"), Mapping) else {}
    for s, rs in by_sym.items():
        ts = page_ts(rs, tf, s, None)
        order = newest_first(ts)  # duplicates: the row delivered later wins, as for pages
        rs = [rs[i] for i in order.tolist()]
        ts = ts[order]
        # Only the Layer 1's explicit True claims that its cache holds the market's whole
        # history (UpbitRouter claims it only after an empty page proved it); anything
        # else, a truthy string included, claims nothing.
        ex = (meta_exh or {}).get(s) is True
        cov = (meta_cov or {}).get(s)
        if isinstance(cov, (list, tuple)) and len(cov) == 2 and all(isinstance(v, (int, np.integer)) for v in cov):
            lo, hi = int(cov[0]), int(cov[1])
        else:
            # An undated cache covers only what lies between its oldest and newest candle.
            if len(rs) < want and not ex:
                return None
            lo = int(ts[-1]) if len(ts) else 0
            hi = int(ts[0]) if len(ts) else 0
        arr = candles_array(s, rs)
        if req.start_time is not None or req.end_time is not None:
            a = req.start_time if req.start_time is not None else lo
            b = req.end_time if req.end_time is not None else hi
            if (a < lo and not ex) or b > hi:
                return None
            arr = np.ascontiguousarray(arr[(arr["ts"] >= a) & (arr["ts"] < b)])
            lo, hi = a, b
        elif len(arr) > want:
            arr = np.ascontiguousarray(arr[-want:])
            lo, ex = int(arr["ts"][0]), False
        arrays[s] = arr
        covered[s] = (lo, hi)
        exhausted[s] = ex
    return arrays, covered, exhausted
