"""``mds watch``: Upbit's live feed as a terminal table, and a recorder of its raw frames (private).

Built on :class:`mds.layer1.UpbitStream` alone (no store): one connection for every market
named, a table per market (last price, change, spread, trades a second, lag) redrawn by rich on a
terminal, or plain lines (one per market a second) anywhere else.

``--record FILE`` writes every frame received, keepalive answers included, as JSON Lines::

    {"received": 1618678263010, "binary": true, "frame": "{\\"ty\\":\\"trade\\", ...}"}

``received`` is epoch ms on the wall clock when the frame arrived, ``binary`` says whether it
came as a binary frame (Upbit's) and ``frame`` is its text. A binary frame that is not UTF-8 (a
cut or corrupted frame) is decoded with ``surrogateescape``, which JSON keeps as ``\\udcXX``
escapes: :func:`read_recording` gives back the exact bytes, so a replay through
:class:`~mds.layer1.stream.FrameParser` sees what the stream saw.

Where the connection was lost (closed, failed, or silent) the file has a marker line::

    {"received": 1618678263010, "lost": true}

``received`` is when the last frame before the loss arrived. :func:`read_recording` yields None
for it, the form :class:`~mds.layer1.ReplayStream` takes for a lost connection, so a store that
follows the replay leaves the lost span uncovered as the live store did. A consumer that fell
behind (``overflow``) loses nothing here: every frame is recorded before it is queued.

At the end, a market that got no message at all is named on stderr; when none of them got one
(a market the server does not know, or a feed that sent nothing) the exit status is 1.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

from mds._cli_output import _is_tty
from mds._importers import BadInput
from mds.errors import MdsError
from mds.timeutil import iso_utc_z, now_ms

__all__ = ["WATCH_KINDS", "Recorder", "cmd_watch", "read_recording"]

#: Kinds ``mds watch`` subscribes to by default (and all it shows).
WATCH_KINDS = ("ticker", "trade", "orderbook")
#: Trades a second are counted over this many trailing seconds.
_RATE_WINDOW_S = 10.0
#: Redraws a second on a terminal; plain lines are written once a second.
_TTY_REFRESH_S = 0.25
_PLAIN_EVERY_S = 1.0
#: Longest wait for the stream before the loop looks at Ctrl-C and the deadline again.
_POLL_S = 0.1


class Recorder:
    """The ``on_frame`` hook of ``--record``: one JSON line per frame received, and a marker
    where the connection was lost (see the module).

    A write that fails (a full disk) stops the recording: the error is kept in :attr:`error` and
    ``on_error`` is called (``mds watch`` stops the stream with it). It never raises into the
    stream, which would take the error for a failed connection and reconnect.
    """

    def __init__(
        self,
        fh: TextIO | None = None,
        clock: Callable[[], int] = now_ms,
        on_error: Callable[[], None] | None = None,
    ) -> None:
        self.fh = fh  # frames before it is set are not recorded (none arrive before the stream starts)
        self.clock = clock
        self.on_error = on_error
        self.frames = 0
        self.losses = 0
        self.error: OSError | None = None
        self._last = 0  # ``received`` of the last frame written

    def __call__(self, frame: bytes | str) -> None:
        if self.fh is None:
            return
        binary = not isinstance(frame, str)
        text = frame if isinstance(frame, str) else frame.decode("utf-8", "surrogateescape")
        received = self.clock()
        if self._write({"received": received, "binary": binary, "frame": text}):
            self.frames += 1
            self._last = received

    def events(self, events: list[Any]) -> None:
        """Mark the connection losses among the stream's ``events`` (the watch loop's batches).

        The watch loop drains every queued event whenever it runs, and the stream reconnects only
        after an ``await`` that lets it run, so the marker lands before the next connection's
        first frame. An ``overflow`` or ``stopped`` end is no loss of the recording.

        The marker's ``received`` is this recorder's stamp of the last frame it wrote, as the
        replay ends the epoch there; the stream's ``Disconnected.at`` can be earlier (after a
        keepalive answer it is what that answer proves, see :class:`~mds.layer1.stream.Disconnected`).
        """
        from mds.layer1.stream import Disconnected

        for ev in events:
            lost = type(ev) is Disconnected and ev.reason not in ("overflow", "stopped")
            if lost and self._write({"received": max(ev.at, self._last), "lost": True}):
                self.losses += 1

    def flush(self) -> None:
        """Flush the file (a failure is kept in :attr:`error`, as for a write)."""
        if self.fh is not None:
            try:
                self.fh.flush()
            except OSError as exc:
                self._failed(exc)

    def _write(self, obj: dict[str, Any]) -> bool:
        if self.fh is None:
            return False
        try:
            self.fh.write(json.dumps(obj) + "\n")
        except OSError as exc:
            self._failed(exc)
            return False
        return True

    def _failed(self, exc: OSError) -> None:
        self.fh = None  # nothing more is written; the caller closes the file
        if self.error is None:
            self.error = exc
            if self.on_error is not None:
                self.on_error()


def read_recording(path: str | Path) -> Iterator[tuple[int, bytes | str] | None]:
    """``(received, frame)`` for every frame line of a ``--record`` file, the frame as it arrived
    (bytes for a binary frame, str for a text frame), and None where the connection was lost:
    the items :class:`~mds.layer1.ReplayStream` takes."""
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise TypeError("not an object")
                received = int(obj["received"])
                if obj.get("lost") is True and "frame" not in obj:
                    yield None
                    continue
                binary, text = bool(obj["binary"]), obj["frame"]
                if not isinstance(text, str):
                    raise TypeError("frame is not a string")
            except (ValueError, TypeError, KeyError) as exc:
                raise BadInput(f"{path}: line {n} is not a recorded frame ({exc})") from None
            yield received, (text.encode("utf-8", "surrogateescape") if binary else text)


# ---------------------------------------------------------------------------------------------
# what is shown
# ---------------------------------------------------------------------------------------------


class _Market:
    __slots__ = ("ask", "bid", "change", "lags", "last", "messages", "trades")

    def __init__(self) -> None:
        self.last: float | None = None
        self.change: float | None = None  # signed change rate against the previous close
        self.ask: float | None = None
        self.bid: float | None = None
        self.trades: collections.deque[float] = collections.deque()  # monotonic receive times
        self.lags: collections.deque[int] = collections.deque(maxlen=256)
        self.messages = 0


class _View:
    """The per-market figures, fed with the stream's events."""

    HEADERS = ("market", "last", "change", "spread", "trades/s", "lag ms")

    def __init__(self, markets: tuple[str, ...]) -> None:
        self.markets = {m: _Market() for m in markets}
        self.started = time.monotonic()
        self.connected = False
        self.epochs = 0

    def apply(self, events: list[Any]) -> None:
        from mds.layer1.stream import Connected, Disconnected, OrderbookMessage, TickerMessage, TradeMessage

        now = time.monotonic()
        for ev in events:
            kind = type(ev)
            if kind is Connected:
                self.connected, self.epochs = True, self.epochs + 1
                continue
            if kind is Disconnected:
                self.connected = False
                continue
            m = self.markets.get(ev.market)
            if m is None:  # a market nobody asked for: not ours to show
                continue
            m.messages += 1
            m.lags.append(ev.received - ev.timestamp)
            if kind is TickerMessage:
                m.last = ev.trade_price
                rate = ev.fields.get("signed_change_rate")
                m.change = float(rate) if rate is not None else m.change
            elif kind is TradeMessage:
                m.last = ev.price
                m.trades.append(now)
                prev = ev.fields.get("prev_closing_price")
                if prev:  # the ticker's rate when there is one; the trade says the same
                    m.change = ev.price / float(prev) - 1.0
            elif kind is OrderbookMessage:
                units = ev.fields["orderbook_units"]
                if units:
                    m.ask, m.bid = float(units[0]["ask_price"]), float(units[0]["bid_price"])

    def rows(self) -> list[list[str]]:
        now = time.monotonic()
        span = min(_RATE_WINDOW_S, max(now - self.started, 1e-3))
        out = []
        for sym, m in self.markets.items():
            while m.trades and m.trades[0] < now - _RATE_WINDOW_S:
                m.trades.popleft()
            spread = "-"
            if m.ask is not None and m.bid is not None:
                mid = (m.ask + m.bid) / 2
                bps = f" ({1e4 * (m.ask - m.bid) / mid:.1f} bp)" if mid > 0 else ""
                spread = _price(m.ask - m.bid) + bps
            out.append(
                [
                    sym,
                    "-" if m.last is None else _price(m.last),
                    "-" if m.change is None else f"{100 * m.change:+.2f}%",
                    spread,
                    f"{len(m.trades) / span:.1f}",
                    "-" if not m.lags else f"{statistics.median(m.lags):.0f}",
                ]
            )
        return out


def _price(v: float) -> str:
    """A price with thousands separators and no trailing zeros (Upbit ticks go to 8 decimals)."""
    if not math.isfinite(v):
        return str(v)
    return f"{v:,.8f}".rstrip("0").rstrip(".") or "0"


# ---------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------


def _kinds(text: str) -> tuple[str, ...]:
    kinds = tuple(dict.fromkeys(k.strip() for k in text.split(",") if k.strip()))
    bad = [k for k in kinds if k not in WATCH_KINDS]
    if not kinds or bad:
        raise BadInput(f"--kinds {text!r}: give a comma-separated list of {', '.join(WATCH_KINDS)}")
    return kinds


def cmd_watch(args: argparse.Namespace) -> int:
    """Show the live feed of the markets given until Ctrl-C (exit 130) or ``--seconds``."""
    from mds.cli import _deferred_interrupt
    from mds.layer1.stream import UpbitStream

    record: Path | None = None
    if args.record is not None:
        record = Path(args.record).expanduser()
        if record.is_dir():
            raise BadInput(f"watch --record {record}: is a directory")
        if record.exists() and not args.force:
            raise BadInput(f"{record} exists: give --force to overwrite it, or another name")
    elif args.force:
        raise BadInput("--force goes with --record")
    recorder = Recorder() if record is not None else None
    # the stream checks markets, kinds, format and URL before anything is written
    stream = UpbitStream(args.markets, kinds=_kinds(args.kinds), url=args.url, format=args.format, on_frame=recorder)
    fh: TextIO | None = None
    if record is not None and recorder is not None:
        recorder.on_error = stream.close  # a failed write ends the watch, never a reconnect
        try:
            fh = recorder.fh = open(record, "w", encoding="utf-8")  # noqa: SIM115 -- closed in the finally below
        except OSError as exc:
            raise MdsError(f"cannot write {record}: {exc.strerror or exc}") from None
    view = _View(stream.markets)
    out = sys.stdout
    t0 = time.monotonic()
    deadline = None if args.seconds is None else t0 + args.seconds
    try:
        with _deferred_interrupt() as stop:
            if _is_tty(out):
                _run_rich(stream, view, stop, deadline, recorder, out)
            else:
                _run_plain(stream, view, stop, deadline, recorder, out)
    finally:
        if fh is not None:
            try:
                fh.close()
            except OSError as exc:  # the last buffered lines did not fit
                if recorder is not None and recorder.error is None:
                    recorder.error = exc
    st = stream.stats()
    msgs = st["messages"]
    total = sum(msgs.values())
    failed = recorder.error if recorder is not None else None
    out.write(
        f"{total} messages in {time.monotonic() - t0:.1f} s ("
        + ", ".join(f"{k} {msgs[k]}" for k in ("ticker", "trade", "orderbook") if k in stream.kinds)
        + f"); {st['malformed']} malformed, {st['dropped']} dropped, {st['reconnects']} reconnects"
        + (f"; {recorder.frames} frames recorded to {record}" if recorder is not None and failed is None else "")
        + "\n"
    )
    out.flush()
    if failed is not None:
        raise MdsError(f"cannot write {record}: {failed.strerror or failed}")
    silent = [m for m, v in view.markets.items() if v.messages == 0]
    if stop.is_set():
        if silent and st["connects"]:
            sys.stderr.write(f"mds watch: no message for {', '.join(silent)}\n")
        sys.stderr.write("mds watch: interrupted\n")
        return 130
    if st["connects"] == 0:
        raise MdsError(f"could not connect to {args.url}: {st['last_error'] or 'no answer'}")
    if len(silent) == len(view.markets):
        why = f" (the server said: {st['last_error']})" if st["server_errors"] and st["last_error"] else ""
        raise MdsError(f"no message for {', '.join(silent)} in {time.monotonic() - t0:.1f} s{why}")
    if silent:
        sys.stderr.write(f"mds watch: warning: no message for {', '.join(silent)}\n")
    return 0


def _run(
    stream: Any,
    view: _View,
    stop: Any,
    deadline: float | None,
    every: float,
    draw: Callable[[], None],
    recorder: Recorder | None = None,
) -> None:
    """Feed ``view`` (and ``recorder``'s loss markers) from ``stream`` and call ``draw`` every
    ``every`` seconds until Ctrl-C, the deadline or the stream's end (a failed recording closes
    it); the connection is closed before this returns."""

    def apply(batch: list[Any]) -> None:
        if recorder is not None:
            recorder.events(batch)
        view.apply(batch)

    async def main() -> None:
        async with stream:
            next_draw = time.monotonic() + every
            while not stop.is_set() and not stream.closed:
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    break
                if now >= next_draw:
                    draw()
                    next_draw = max(next_draw + every, now)
                wait = min(_POLL_S, next_draw - now, math.inf if deadline is None else deadline - now)
                apply(await stream.get_batch(timeout=max(wait, 0.0)))
        apply(await stream.get_batch(timeout=0))  # the rest, and the Disconnected marker

    asyncio.run(main())


def _title(stream: Any, view: _View) -> str:
    st = stream.stats()
    state = "connected" if view.connected else "connecting" if view.epochs == 0 else "reconnecting"
    return (
        f"{stream.url} {stream.format}: {state}, {sum(st['messages'].values())} messages, "
        f"{st['reconnects']} reconnects, {st['malformed']} malformed"
    )


def _run_rich(
    stream: Any, view: _View, stop: Any, deadline: float | None, recorder: Recorder | None, out: TextIO
) -> None:
    from rich.console import Console
    from rich.live import Live
    from rich.table import Table

    def table() -> Table:
        t = Table(title=_title(stream, view), title_justify="left")
        for i, h in enumerate(_View.HEADERS):
            t.add_column(h, justify="left" if i == 0 else "right", no_wrap=True)
        for r in view.rows():
            t.add_row(*r)
        return t

    with Live(table(), console=Console(file=out, highlight=False), auto_refresh=False) as live:

        def draw() -> None:
            live.update(table(), refresh=True)
            if recorder is not None:
                recorder.flush()

        _run(stream, view, stop, deadline, _TTY_REFRESH_S, draw, recorder)
        draw()


def _run_plain(
    stream: Any, view: _View, stop: Any, deadline: float | None, recorder: Recorder | None, out: TextIO
) -> None:
    widths = (10, 18, 9, 24, 9, 7)
    out.write("  ".join(["time_utc".ljust(20)] + [h.rjust(w) for h, w in zip(_View.HEADERS, widths)]) + "\n")
    out.flush()

    def draw() -> None:
        stamp = iso_utc_z(now_ms() // 1000 * 1000)
        for r in view.rows():
            cells = [stamp.ljust(20), r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
            out.write("  ".join(cells) + "\n")
        out.flush()
        if recorder is not None:
            recorder.flush()

    _run(stream, view, stop, deadline, _PLAIN_EVERY_S, draw, recorder)
    draw()  # the final figures
