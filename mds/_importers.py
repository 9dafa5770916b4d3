"""Streaming readers of candle files for ``mds import`` (private).

A file is read in bounded pieces and handed out as CANDLE_DTYPE batches of at most
:data:`BATCH_ROWS` rows, so what the reader holds depends on the batch size, never on the file.
Everything a hostile file can do ends in :class:`BadInput` (one line on stderr, exit status 2 in
the CLI): binary data and NUL bytes, other encodings, lines or CSV fields or JSON values past
:data:`MAX_LINE` characters, JSON nested deeper than a list of pages of candle objects, times
outside the years 1900 to 2199, non-finite numbers, prices that are not positive.

Formats (see the CLI's ``import`` help): ``upbit-json`` (a candle object, a list of candle objects
or a list of pages, i.e. lists of candle objects), ``upbit-csv``, ``pyupbit-csv``, ``ccxt-csv``.
JSON is parsed by a small incremental scanner: runs of flat candle objects are found with one
regular expression (linear: its alternatives never overlap) and decoded by :mod:`json` as one
bounded list; anything else (a candle object with nested values, an error document) is decoded
alone, after its nesting depth was counted within :data:`MAX_LINE` characters.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import io
import json
import os
import re
import stat
from collections.abc import Callable, Generator, Iterator
from typing import Any, BinaryIO, NoReturn

import numpy as np

from mds import _kernels as K
from mds._dtypes import CANDLE_DTYPE
from mds.convert import candles_from_upbit
from mds.errors import InvalidCandleError, InvalidRequestError, MdsError
from mds.timeframes import TIMEFRAMES, Timeframe
from mds.timeutil import iso_utc_z, now_ms, to_ms

__all__ = ["BATCH_ROWS", "IMPORT_FORMATS", "MAX_LINE", "BadInput", "CandleFile", "infer_timeframe"]

IMPORT_FORMATS = ("auto", "upbit-json", "upbit-csv", "pyupbit-csv", "ccxt-csv")
#: Rows per batch handed to the store (one ``write_candles`` call each).
BATCH_ROWS = 50_000
#: Longest CSV line or record, or JSON value (a candle object, or a run of them decoded at once),
#: in characters. A candle is a few hundred; the bound also caps what a failing regular expression
#: match can keep on its backtracking stack.
MAX_LINE = 1 << 16
#: Longest CSV field accepted, in characters (a candle's fields are short).
_MAX_FIELD = 1 << 16
#: Deepest nesting accepted inside one JSON candle object (Upbit's are flat: depth 1).
MAX_DEPTH = 8
#: Rows and characters of one parsed piece (converted to arrays before the next is read).
_PIECE_ROWS = 8192
_PIECE_CHARS = 1 << 20
#: Characters read from the file at a time.
_READ_CHARS = 1 << 18
_KST_MS = 9 * 3_600_000
_MIN_MS = to_ms("1900-01-01")
_MAX_MS = to_ms("2199-12-31T23:59:59.999")
_PRICES = ("open", "high", "low", "close")

_WS = re.compile(r"[ \t\n\r]*")
_STR = r'"[^"\\]*(?:\\.[^"\\]*)*"'
#: A flat JSON object: no ``{ } [ ]`` outside strings. Every alternative starts with a different
#: character, so a failed match backtracks in linear time.
_OBJ = r'\{[^{}\[\]"]*(?:' + _STR + r'[^{}\[\]"]*)*\}'
_RUN = re.compile(_OBJ + r"(?:[ \t\n\r]*,[ \t\n\r]*" + _OBJ + r")*")
_TOKEN = re.compile(_STR + r"|[\[\]{}]")
_EPOCH = re.compile(r"-?[0-9]+(?:\.0*)?")
#: Times gathered before a file whose neighbours are never one interval apart is taken as coarser
#: candles (a daily file imported as 1m); fewer when the file holds fewer.
_INTERVAL_EVIDENCE = 1000
#: Epoch milliseconds below this (1973-03-03) are epoch seconds in any candle file (seconds up to
#: the year 5138): Upbit opened in 2017.
_SECONDS_BELOW = 100_000_000_000


class BadInput(MdsError, ValueError):
    """Bad command-line input or an unreadable/invalid file: exit status 2."""


def interval_steps(tf: Timeframe, ts: np.ndarray) -> np.ndarray | None:
    """Intervals of ``tf`` between neighbours of the sorted unique times ``ts`` (calendar months
    for ``1M``); None when a time is not on ``tf``'s grid."""
    if not bool(tf.aligned(ts).all()):
        return None
    if tf.is_month:
        months = ts.astype("datetime64[ms]").astype("datetime64[M]").astype(np.int64)
        return np.diff(months)
    return np.diff(ts) // tf.interval_ms


def infer_timeframe(ts: np.ndarray) -> Timeframe | None:
    """The timeframe of candles opening at ``ts``: the one whose single interval is the most common
    positive difference between neighbouring times and on whose grid every time lies (calendar
    rules for weeks, which open on Mondays, and months, which open on the 1st: a month is 28 to 31
    days). None for fewer than two times or when no timeframe fits.
    """
    u = np.unique(np.asarray(ts, dtype=np.int64))
    if len(u) < 2:
        return None
    for tf in TIMEFRAMES.values():
        steps = interval_steps(tf, u)
        if steps is None:
            continue
        values, counts = np.unique(steps, return_counts=True)
        if int(values[int(np.argmax(counts))]) == 1:  # ties: the smallest step wins
            return tf
    return None


#: Fields only Upbit's realtime messages carry (REST and WebSocket, DEFAULT and SIMPLE formats).
_REALTIME_FIELDS = (
    ("orderbook", ("orderbook_units", "obu", "total_ask_size", "tas")),
    ("trade", ("sequential_id", "sid", "ask_bid", "ab")),
    ("ticker", ("acc_trade_price_24h", "atp24h", "signed_change_rate", "scr", "change")),
)


def _realtime_kind(obj: dict[str, Any]) -> str | None:
    """``"ticker"``, ``"orderbook"`` or ``"trade"`` for a realtime message, None for anything else
    (a candle, an error document)."""
    if "candle_date_time_utc" in obj:
        return None
    kind = obj.get("type", obj.get("ty"))
    if kind in ("ticker", "orderbook", "trade"):
        return str(kind)
    for name, fields in _REALTIME_FIELDS:
        if any(f in obj for f in fields):
            return name
    return None


def _seconds_hint(n: int) -> str:
    return (
        f"timestamps look like epoch seconds ({n} is {iso_utc_z(n * 1000)} in seconds, 1970 in milliseconds); "
        "expected milliseconds (multiply the column by 1000)"
    )


def _duration(ms: int) -> str:
    for unit, size in (("day", 86_400_000), ("hour", 3_600_000), ("minute", 60_000), ("second", 1000)):
        if ms % size == 0:
            n = ms // size
            return f"{n} {unit}{'s' if n != 1 else ''}"
    return f"{ms} ms"


def _json_int(text: str) -> int | float:
    # A huge integer literal becomes a float (then inf, refused as not finite) instead of an int
    # that numpy cannot convert (OverflowError) or that Python refuses to parse (digit limit).
    return int(text) if len(text) <= 18 else float(text)


def _open_regular(path: str) -> BinaryIO:
    """Open ``path`` for reading if it is a regular file (never blocks on a FIFO)."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise BadInput(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
            raise BadInput(f"cannot read {path}: {kind}, not a file of candles")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb", buffering=1 << 16)
    except BaseException:
        os.close(fd)
        raise


class _Reader:
    """UTF-8 text of a regular file, read in bounded pieces; refuses NUL bytes."""

    def __init__(self, raw: BinaryIO, path: str) -> None:
        self.path = path
        self._text = io.TextIOWrapper(raw, encoding="utf-8-sig", errors="strict", newline="")

    def _guard(self, fn: Any, n: int) -> str:
        try:
            s = fn(n)
        except UnicodeDecodeError:
            raise BadInput(f"{self.path} is not UTF-8 text (binary or another encoding?)") from None
        except OSError as exc:
            raise BadInput(f"cannot read {self.path}: {exc.strerror or exc}") from None
        if "\x00" in s:
            raise BadInput(f"{self.path} holds NUL bytes: binary data, not a file of candles")
        return str(s)

    def read(self, n: int) -> str:
        """Up to ``n`` characters; '' at the end."""
        return self._guard(self._text.read, n)

    def rewind(self) -> None:
        self._text.seek(0)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._text.close()


class CandleFile:
    """A candle file opened for import, read batch by batch.

    Parameters
    ----------
    path
        The file; it must be a regular file (not a directory, FIFO or device).
    fmt
        One of :data:`IMPORT_FORMATS`; ``"auto"`` tells the format from the first characters
        (``[`` or ``{``, or a ``.json`` name: Upbit JSON) or from the CSV header.
    symbol, tf
        The series the file must hold (an Upbit ``market`` field or column must name it; a
        ``unit`` field must match the timeframe).
    batch_rows
        Rows per batch (default :data:`BATCH_ROWS`).

    Raises
    ------
    BadInput
        The file cannot be read, is empty, or its format cannot be told; later, from
        :meth:`batches`, anything wrong inside it.
    """

    def __init__(self, path: str, fmt: str, symbol: str, tf: Timeframe, batch_rows: int | None = None) -> None:
        self.path = path
        self.symbol = symbol
        self.tf = tf
        self.batch_rows = int(batch_rows or BATCH_ROWS)
        #: Rows superseded by a later row of the same time (last wins) that were dropped while
        #: batching (the rest of the duplicates are dropped by the store, batch by batch).
        self.superseded = 0
        #: True when the file has no quote volume column (``value`` estimated as close * volume).
        self.value_estimated = False
        #: Times gathered for the check for coarser candles (None: decided, the file is not coarser).
        self._coarse_seen: np.ndarray | None = np.empty(0, dtype=np.int64)
        self._rd = _Reader(_open_regular(path), path)
        try:
            head = self._first_char()
            if not head:
                raise BadInput(f"{path} is empty")
            if fmt == "auto" and (head in "[{" or path.lower().endswith(".json")):
                fmt = "upbit-json"
            self.fmt = fmt
            self.where = "candle" if fmt == "upbit-json" else "line"
            self._pieces: Generator[tuple[np.ndarray, np.ndarray], None, None] = (
                self._json_pieces() if fmt == "upbit-json" else self._csv_pieces()
            )
            if fmt != "upbit-json":
                next(self._pieces)  # reads the header: a CSV format is told, or refused, now
        except BaseException:
            self._rd.close()
            raise

    def __enter__(self) -> CandleFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._pieces.close()
        self._rd.close()

    def _first_char(self) -> str:
        """The first non-blank character ('' for a blank file); the file is then read again
        from its start."""
        while True:
            s = self._rd.read(_READ_CHARS)
            if not s:
                return ""
            body = s.lstrip()
            if body:
                self._rd.rewind()
                return body[0]

    def _bad(self, at: int | None, message: str) -> BadInput:
        return BadInput(f"{self.path}: {message}" if at is None else f"{self.path}: {self.where} {at}: {message}")

    # ------------------------------------------------------------------ batches
    def batches(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """CANDLE_DTYPE arrays of at most ``batch_rows`` rows each, in file order, with the line
        (CSV) or candle number (JSON) of each row.

        The last row of a batch is moved to the next batch, and the other rows of the batch with
        its time are dropped (the last row wins; :attr:`superseded` counts them), so in a file
        sorted by time (either way) no time is split across two batches.
        """
        size = max(2, self.batch_rows)  # >= 2: a batch always gives away more than the row it keeps
        parts: list[tuple[np.ndarray, np.ndarray]] = []
        n = 0
        for arr, where in self._pieces:
            if not len(arr):
                continue
            parts.append((arr, where))
            n += len(arr)
            while n >= size:
                arr = np.concatenate([p[0] for p in parts])
                where = np.concatenate([p[1] for p in parts])
                head, w_head = arr[:size], where[:size]
                same = head["ts"] == head["ts"][-1]
                self.superseded += int(np.count_nonzero(same)) - 1
                # copies: the concatenation is let go once the batch has been used
                parts = [(head[-1:].copy(), w_head[-1:].copy())]
                if n > size:
                    parts.append((arr[size:].copy(), where[size:].copy()))
                n = n - size + 1
                keep = ~same
                if keep.any():
                    yield head[keep], w_head[keep]
        self._interval_end()
        if parts:
            yield np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    # ------------------------------------------------------------------ values
    def _checked(self, arr: np.ndarray, where: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Refuse times outside 1900 to 2199, non-finite numbers, prices that are not positive,
        negative volumes, and what the store refuses (see ``Store.write_candles``)."""
        ts = arr["ts"]
        out = (ts < _MIN_MS) | (ts > _MAX_MS)
        if out.any():
            i = int(np.argmax(out))
            raise self._bad(int(where[i]), f"time {int(ts[i])} (epoch ms) is outside the years 1900 to 2199")
        bad = np.zeros(len(arr), dtype=bool)
        for f in (*_PRICES, "volume", "value"):
            col = arr[f]
            bad |= ~np.isfinite(col) | ((col <= 0) if f in _PRICES else (col < 0))
        if bad.any():
            i = int(np.argmax(bad))
            for f in (*_PRICES, "volume", "value"):
                v = float(arr[f][i])
                if v != v or v in (float("inf"), float("-inf")):
                    raise self._bad(int(where[i]), f"{f} {v!r} is not a finite number")
                if f in _PRICES and v <= 0:
                    raise self._bad(int(where[i]), f"{f} {v!r} is not a positive price")
                if v < 0:
                    raise self._bad(int(where[i]), f"{f} {v!r} is negative")
        self._check_interval(ts)
        # the store's own check, here too: the line is named, and a file refused in its first
        # batch creates no store
        idx, reason = K.validate(arr, *self.tf.kernel_args, now_ms())
        if len(idx):
            name = K.REASONS.get(int(reason[0]), str(int(reason[0])))
            raise self._bad(int(where[int(idx[0])]), f"invalid candle: {name}")
        return arr, where

    def _check_interval(self, ts: np.ndarray) -> None:
        """Refuse candles of another interval than ``-t`` (a wrong ``-t`` would otherwise store
        daily candles as 1m ones: hundreds of thousands of phantom missing minutes).

        Finer candles (times off the grid of ``-t``, on the grid of a finer timeframe) are looked
        for in every piece. Coarser ones need more evidence, gathered over the first pieces (in
        any order): the file holds coarser candles when no two of its first
        :data:`_INTERVAL_EVIDENCE` times (or all of them) are one interval apart, every one lies on
        a coarser timeframe's grid, and that timeframe's interval is the most common step. An
        illiquid market's sparse file has some neighbours one interval apart, or times off any
        coarser grid, and is taken.
        """
        u = np.unique(ts)
        if not len(u):
            return
        if bool(self.tf.aligned(u).all()):
            if self._coarse_seen is not None:
                seen = np.union1d(self._coarse_seen, u)
                steps = interval_steps(self.tf, seen)
                if steps is not None and bool((steps == 1).any()):
                    self._coarse_seen = None  # neighbours one interval apart: not coarser
                elif len(seen) >= _INTERVAL_EVIDENCE:
                    self._coarse_seen = None
                    self._refuse_interval(seen, coarser_only=True)
                else:
                    self._coarse_seen = seen
            return
        if len(u) >= 2:
            self._refuse_interval(u, coarser_only=False)

    def _interval_end(self) -> None:
        """At the end of the file: decide on the times gathered for the coarser check."""
        seen, self._coarse_seen = self._coarse_seen, None
        if seen is not None and len(seen) >= 2:
            self._refuse_interval(seen, coarser_only=True)

    def _refuse_interval(self, u: np.ndarray, *, coarser_only: bool) -> None:
        """Raise when the sorted unique times ``u`` are candles of another timeframe than
        ``-t``; return when they fit none (the row checks name what is wrong, if anything)."""
        found = infer_timeframe(u)
        if found is None or found == self.tf or (coarser_only and found.interval_ms <= self.tf.interval_ms):
            return
        values, counts = np.unique(np.diff(u), return_counts=True)
        common = int(values[int(np.argmax(counts))])
        raise self._bad(
            None,
            f"the file holds {found.name} candles (most often {_duration(common)} apart), not {self.tf.name} "
            f"(give -t {found.name}); nothing was stored",
        )

    def _check_units(self, units: set[Any], at: int | None) -> None:
        if not units:
            return
        if self.tf.minutes_unit is None or units != {self.tf.minutes_unit}:
            shown = ", ".join(sorted(str(u) for u in units))
            raise self._bad(at, f"the file holds {shown}-minute candles, not {self.tf.name}")

    def _from_upbit(self, rows: list[Any], where: np.ndarray, market: str | None) -> np.ndarray:
        try:
            return candles_from_upbit(rows, market=market)
        except InvalidCandleError as exc:
            at = int(where[exc.rows[0]]) if exc.rows and 0 <= exc.rows[0] < len(where) else None
            raise self._bad(at, str(exc)) from None
        except (OverflowError, ValueError, TypeError) as exc:
            raise self._bad(None, f"a candle field holds a value that is not a number ({exc})") from None

    # ------------------------------------------------------------------ JSON
    def _json_pieces(self) -> Generator[tuple[np.ndarray, np.ndarray], None, None]:
        js = _JsonScanner(self._rd, self.path)
        count = 0

        def piece(rows: list[Any]) -> tuple[np.ndarray, np.ndarray]:
            nonlocal count
            first = count + 1
            count += len(rows)
            if not all(isinstance(r, dict) for r in rows):
                raise BadInput(
                    f"{self.path}: Upbit JSON must hold candle objects (dicts with candle_date_time_utc, "
                    "opening_price, ...)"
                )
            kind = _realtime_kind(rows[0])
            if kind is not None:
                raise BadInput(
                    f"{self.path}: holds {kind} messages: realtime data (ticker/orderbook/trades) is not "
                    "persisted, mds import takes candles (Upbit candle JSON or CSV)"
                )
            try:
                units = {r["unit"] for r in rows if "unit" in r}
            except TypeError:
                raise self._bad(first, "the unit field holds a value that is not a number") from None
            self._check_units(units, first)
            where = np.arange(first, first + len(rows), dtype=np.int64)
            return self._checked(self._from_upbit(rows, where, self.symbol), where)

        # The file: one JSON value, or several separated by white space (JSON Lines, as
        # ``mds export --out x.jsonl`` writes them): candle objects, or lists (pages) of them.
        objs: list[Any] = []
        while True:
            js.skip_ws()
            head = js.peek()
            if head == "{":  # a candle, or an error document such as {"error": {...}}
                objs.append(js.value())
                if len(objs) >= _PIECE_ROWS:
                    yield piece(objs)
                    objs = []
                continue
            if objs:
                yield piece(objs)
                objs = []
            if not head:
                return
            if head != "[":
                js.value()  # raises "not valid JSON" for garbage
                raise BadInput(
                    f"{self.path}: Upbit JSON must be a list of candles or a list of pages (lists of candles)"
                )
            yield from self._json_list(js, piece)

    def _json_list(
        self, js: _JsonScanner, piece: Callable[[list[Any]], tuple[np.ndarray, np.ndarray]]
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The pieces of the list at ``js.pos``: candle objects, or pages (lists) of them."""
        js.pos += 1
        depth = 1  # 1: in the file's list, 2: in a page
        expect = "first"  # "first": a value or ']'; "value": a value; "next": ',' or ']'
        while depth:
            js.skip_ws()
            c = js.peek()
            if not c:
                js.fail("the file ends inside a list")
            if expect == "next":
                if c not in ",]":
                    js.fail("',' or ']' was expected")
                js.pos += 1
                if c == "]":
                    depth -= 1
                else:
                    expect = "value"
            elif c == "]" and expect == "first":
                js.pos += 1
                depth -= 1
                expect = "next"
            elif c == "{":
                yield piece(js.run())
                expect = "next"
            elif c == "[":
                if depth == 2:
                    raise BadInput(
                        f"{self.path}: Upbit JSON must hold candle objects or pages (lists) of them; "
                        f"found a list nested deeper at {js.where()}"
                    )
                js.pos += 1
                depth = 2
                expect = "first"
            elif c in "],":
                js.fail("a value was expected")
            else:
                yield piece([js.value()])  # not a candle object: refused by piece()

    # ------------------------------------------------------------------ CSV
    def _csv_pieces(self) -> Generator[tuple[np.ndarray, np.ndarray], None, None]:
        """First yields nothing useful (an empty piece, after the header was read and the format
        told), then the pieces of the file."""
        state = {"line": 0, "record": 0, "piece": 0}
        rd = self._rd
        path = self.path

        def lines() -> Iterator[str]:
            # Blocks split at "\n" (as the csv module reads a file opened with newline=""): no
            # line is ever longer than MAX_LINE in memory, and the per-line cost stays small.
            carry = ""
            while True:
                block = rd.read(_READ_CHARS)
                parts = (carry + block).split("\n") if block else ([carry] if carry else [])
                carry = parts.pop() if block else ""
                if len(carry) > MAX_LINE:
                    n = state["line"] + len(parts) + 1
                    raise BadInput(f"{path}: line {n} is longer than {MAX_LINE} characters")
                for part in parts:
                    state["line"] += 1
                    size = len(part) + 1
                    if size > MAX_LINE:
                        raise BadInput(f"{path}: line {state['line']} is longer than {MAX_LINE} characters")
                    state["record"] += size
                    state["piece"] += size
                    if state["record"] > MAX_LINE:
                        raise BadInput(
                            f"{path}: line {state['line']}: a CSV record longer than {MAX_LINE} characters "
                            "(a quote left open?)"
                        )
                    yield part + "\n"
                if not block:
                    return

        old_limit = csv.field_size_limit(_MAX_FIELD)
        try:
            reader = csv.reader(lines())

            def records() -> Generator[list[str], None, None]:
                try:
                    for row in reader:
                        state["record"] = 0
                        if row and (row[0].strip() or any(c.strip() for c in row)):
                            yield row
                except csv.Error as exc:
                    raise BadInput(f"{path}: line {state['line']}: not valid CSV: {exc}") from None

            recs = records()
            first = next(recs, None)
            if first is None:
                raise BadInput(f"{path} holds no candles (the CSV file holds no rows)")
            header = [h.strip() for h in first]
            pending: list[list[str]] = []
            pending_lines: list[int] = []
            fmt = self._csv_format(header)
            if fmt == "ccxt-csv" and header[0].lstrip("-").isdigit():
                pending.append(first)  # no header: timestamp,open,high,low,close,volume
                pending_lines.append(state["line"])
                header = ["timestamp", "open", "high", "low", "close", "volume"]
            convert = self._csv_converter(fmt, header)
            piece_rows = min(_PIECE_ROWS, max(2, self.batch_rows))
            yield np.empty(0, CANDLE_DTYPE), np.empty(0, np.int64)
            state["piece"] = 0
            recs.close()  # the rest is read by the loop below (one generator less per row)
            try:
                for row in reader:
                    state["record"] = 0
                    if not row or not (row[0].strip() or any(c.strip() for c in row)):
                        continue
                    pending.append(row)
                    pending_lines.append(state["line"])
                    if len(pending) >= piece_rows or state["piece"] >= _PIECE_CHARS:
                        yield self._checked(*convert(pending, np.array(pending_lines, dtype=np.int64)))
                        pending, pending_lines = [], []
                        state["piece"] = 0
            except csv.Error as exc:
                raise BadInput(f"{path}: line {state['line']}: not valid CSV: {exc}") from None
            if pending:
                yield self._checked(*convert(pending, np.array(pending_lines, dtype=np.int64)))
        finally:
            csv.field_size_limit(old_limit)

    def _csv_format(self, header: list[str]) -> str:
        fmt = self.fmt
        low = [h.lower() for h in header]
        if fmt == "auto":
            if "candle_date_time_utc" in low:
                fmt = "upbit-csv"
            elif "timestamp" in low or "ts" in low or (low and low[0].lstrip("-").isdigit()):
                fmt = "ccxt-csv"
            elif {"open", "high", "low", "close", "volume"} <= set(low):
                fmt = "pyupbit-csv"
            else:
                raise BadInput(
                    f"cannot tell the format of {self.path}: expected Upbit JSON, or a CSV header with "
                    "candle_date_time_utc (upbit-csv), timestamp (ccxt-csv) or an index plus "
                    "open,high,low,close,volume,value (pyupbit-csv)"
                )
        self.fmt = fmt
        return fmt

    def _column(self, header: list[str], name: str) -> int:
        low = [h.lower() for h in header]
        if name not in low:
            shown = ",".join(header)
            shown = shown if len(shown) <= 200 else shown[:200] + "..."
            raise BadInput(f"{self.fmt}: the CSV header lacks the column {name!r} (header: {shown})")
        return low.index(name)

    def _csv_converter(self, fmt: str, header: list[str]) -> Any:
        """A function (rows, line numbers) -> (candles, line numbers) for this header."""
        if fmt == "upbit-csv":
            for need in ("candle_date_time_utc", "opening_price", "high_price", "low_price", "trade_price"):
                self._column(header, need)
            width = len(header)
            has_market = "market" in header
            has_unit = "unit" in header

            def upbit(rows: list[list[str]], lines: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
                short = [i for i, r in enumerate(rows) if len(r) < width]
                if short:
                    raise self._bad(int(lines[short[0]]), "too few columns")
                dicts = [dict(zip(header, r)) for r in rows]
                if has_market:
                    other = {d["market"] for d in dicts} - {self.symbol}
                    if other:
                        shown = ", ".join(sorted(o[:40] for o in other)[:5])
                        raise self._bad(None, f"the file holds candles of {shown}, not {self.symbol}")
                if has_unit:
                    try:
                        units = {int(d["unit"]) for d in dicts if d["unit"].strip()}
                    except ValueError:
                        raise self._bad(None, "the unit column holds a value that is not an integer") from None
                    self._check_units(units, None)
                return self._from_upbit(dicts, lines, None), lines

            return upbit
        if fmt == "ccxt-csv":  # the time column: ccxt's "timestamp", or "ts" (CANDLE_DTYPE's name)
            ti = self._column(header, "ts" if "ts" in [h.lower() for h in header] else "timestamp")
            naive_offset = 0
        else:  # pyupbit: the first column is the KST index, whatever its name
            ti = 0
            naive_offset = _KST_MS
        cols = {f: self._column(header, f) for f in ("open", "high", "low", "close", "volume")}
        has_value = "value" in [h.lower() for h in header]
        if fmt == "pyupbit-csv" and not has_value:
            raise BadInput("pyupbit-csv: the CSV header lacks the column 'value'")
        if has_value:
            cols["value"] = self._column(header, "value")
        self.value_estimated = not has_value
        ncols = max(ti, *cols.values()) + 1
        allow_epoch = fmt == "ccxt-csv"

        def ohlcv(rows: list[list[str]], lines: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            short = [i for i, r in enumerate(rows) if len(r) < ncols]
            if short:
                raise self._bad(int(lines[short[0]]), "too few columns")
            arr = np.empty(len(rows), dtype=CANDLE_DTYPE)
            arr["ts"] = self._times([r[ti] for r in rows], lines, naive_offset, allow_epoch)
            for f, i in cols.items():
                arr[f] = self._floats([r[i] for r in rows], lines, f)
            if not has_value:
                arr["value"] = arr["close"] * arr["volume"]
            return arr, lines

        return ohlcv

    def _floats(self, col: list[str], lines: np.ndarray, name: str) -> np.ndarray:
        try:
            return np.asarray(col, dtype=np.float64)
        except (ValueError, OverflowError, TypeError):
            pass
        for i, v in enumerate(col):
            try:
                float(v)
            except (ValueError, OverflowError):
                shown = v if len(v) <= 40 else v[:40] + "..."
                raise self._bad(int(lines[i]), f"{name} {shown!r} is not a number") from None
        raise self._bad(None, f"{name}: a value is not a number")  # pragma: no cover

    def _times(self, col: list[str], lines: np.ndarray, naive_offset_ms: int, allow_epoch: bool) -> np.ndarray:
        """Time cells: epoch ms (when allowed) or ISO date-times; naive ones are shifted by
        ``-naive_offset_ms`` (a KST index: 9 h). Times outside 1900 to 2199 are refused."""
        if allow_epoch:
            try:  # the usual case, vectorised: every cell a whole number of ms
                out = np.asarray(col, dtype=np.int64)
            except (ValueError, OverflowError, TypeError):
                pass
            else:
                if len(out) and 0 <= int(out.max()) < _SECONDS_BELOW:
                    raise self._bad(int(lines[0]), _seconds_hint(int(out[0])))
                if not len(out) or (int(out.min()) >= _MIN_MS and int(out.max()) <= _MAX_MS):
                    return out
        out = np.empty(len(col), dtype=np.int64)
        for i, v in enumerate(col):
            t = v.strip()
            shown = t if len(t) <= 40 else t[:40] + "..."
            try:
                if allow_epoch and _EPOCH.fullmatch(t):
                    n = int(t.split(".", 1)[0])
                    if 0 <= n < _SECONDS_BELOW:
                        raise self._bad(int(lines[i]), _seconds_hint(n))
                    out[i] = to_ms(n, name="time")
                    continue
                dt = _dt.datetime.fromisoformat(t[:-1] + "+00:00" if t.endswith(("Z", "z")) else t)
                out[i] = to_ms(dt, name="time") - (naive_offset_ms if dt.tzinfo is None else 0)
            except InvalidRequestError:
                raise self._bad(int(lines[i]), f"time {shown!r} is outside the years 1900 to 2199") from None
            except (ValueError, OverflowError):
                raise self._bad(int(lines[i]), f"{shown!r} is not a time") from None
        return out


class _JsonScanner:
    """The structure of one JSON document, over a sliding buffer of the file's text."""

    def __init__(self, rd: _Reader, path: str) -> None:
        self.rd = rd
        self.path = path
        self.buf = ""
        self.pos = 0
        self.base = 0  # characters dropped from the front of buf
        self.lines_base = 0  # line breaks in them
        self.eof = False

    def where(self, pos: int | None = None) -> str:
        """``line L, column C`` (both 1-based) of buffer position ``pos`` (default: pos)."""
        at = self.pos if pos is None else pos
        line = self.lines_base + self.buf.count("\n", 0, at) + 1
        nl = self.buf.rfind("\n", 0, at)
        if nl < 0 and self.base:  # the line starts in text already dropped: its column is unknown
            return f"line {line}"
        return f"line {line}, column {at - nl}"

    def fill(self, need: int) -> None:
        """Make the buffer hold ``need`` characters after pos, or all that is left."""
        while len(self.buf) - self.pos < need and not self.eof:
            s = self.rd.read(_READ_CHARS)
            if not s:
                self.eof = True
                break
            self.base += self.pos
            self.lines_base += self.buf.count("\n", 0, self.pos)
            self.buf = self.buf[self.pos :] + s
            self.pos = 0

    def skip_ws(self) -> None:
        while True:
            self.pos = _WS.match(self.buf, self.pos).end()  # type: ignore[union-attr]
            if self.pos < len(self.buf) or self.eof:
                return
            self.fill(1)

    def peek(self) -> str:
        self.fill(1)
        return self.buf[self.pos] if self.pos < len(self.buf) else ""

    def fail(self, why: str) -> NoReturn:
        raise BadInput(f"{self.path}: not valid JSON at {self.where()}: {why}")

    def run(self) -> list[Any]:
        """Decode the run of flat objects starting at pos (at least one object)."""
        self.fill(MAX_LINE + 1)
        m = _RUN.match(self.buf, self.pos, min(len(self.buf), self.pos + MAX_LINE))
        if m is None:
            return [self.value()]  # nested values, or not valid: decoded alone, bounded
        text = self.buf[self.pos : m.end()]
        try:
            rows = json.loads("[" + text + "]", parse_int=_json_int)
        except ValueError as exc:
            self.pos += max(0, exc.pos - 1) if isinstance(exc, json.JSONDecodeError) else 0
            self.fail(exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc))
        self.pos = m.end()
        return list(rows)

    def value(self) -> Any:
        """Decode one value of at most MAX_LINE characters and MAX_DEPTH levels at pos."""
        self.fill(MAX_LINE + 1)
        stop = min(len(self.buf), self.pos + MAX_LINE)
        end = None
        depth = 0
        if self.buf[self.pos : self.pos + 1] in ("{", "["):
            for tok in _TOKEN.finditer(self.buf, self.pos, stop):
                c = tok.group()[0]
                if c == '"':
                    continue
                if c in "{[":
                    depth += 1
                    if depth > MAX_DEPTH:
                        raise BadInput(
                            f"{self.path}: JSON nested deeper than {MAX_DEPTH} levels at "
                            f"{self.where(tok.start())}: not Upbit candles"
                        )
                else:
                    depth -= 1
                    if depth == 0:
                        end = tok.end()
                        break
            if end is None:
                if stop < len(self.buf) or not self.eof:
                    raise BadInput(f"{self.path}: a JSON value at {self.where()} is longer than {MAX_LINE} characters")
                self.fail("the file ends inside a value")
        try:
            obj, used = json.JSONDecoder(parse_int=_json_int).raw_decode(self.buf[self.pos : end or stop])
        except json.JSONDecodeError as exc:
            self.pos += exc.pos
            self.fail(exc.msg)
        except (ValueError, RecursionError) as exc:  # pragma: no cover - bounded above
            self.fail(str(exc))
        self.pos += used
        return obj
