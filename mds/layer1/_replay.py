"""Recorded WebSocket frames replayed through the stream's consumer API: :class:`ReplayStream`.

A recording (``mds watch --record``, or frames a test wrote down) goes through the same
:class:`~mds.layer1._ws_parse.FrameParser` as a live connection and comes out as the same events
(:class:`~mds.layer1.stream.Connected`, the messages, :class:`~mds.layer1.stream.Disconnected`),
so ``store.follow(ReplayStream(frames))`` fills a store exactly as the live feed did. Nothing here
touches the network.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any

from mds.layer1._ws_parse import FrameParser, candle_types, deliver, lag_percentiles
from mds.layer1.stream import Connected, Disconnected, StreamEvent
from mds.timeutil import Clock, now_ms

__all__ = ["ReplayStream"]

Frame = bytes | str
#: One item of a recording: a frame, ``(received_ms, frame)``, or None (the connection was lost
#: here: the epoch ends and the next frame starts a new one).
ReplayItem = Frame | tuple[int, Frame] | None


class ReplayStream:
    """Replay recorded frames with the consumer API of :class:`~mds.layer1.stream.UpbitStream`.

    Parameters
    ----------
    frames : iterable
        Frames in the order received: each a frame (bytes or str, one JSON message), a pair
        ``(received_ms, frame)`` (the receipt time recorded with it; it becomes ``received``), or
        None where the recorded connection was lost (the epoch ends there).
    candles : iterable of str
        The candle timeframes the recorded connection had subscribed. A store following the
        replay records coverage for these only (and for the spans between losses).
    clock : callable, optional
        Epoch ms for frames recorded without a receipt time; default the wall clock.
    loads : callable, optional
        JSON decoder for one frame, as for UpbitStream.

    Notes
    -----
    Bad frames are counted (``malformed``) and skipped, never fatal. Iterated lazily: a large
    recording is not held in memory.
    """

    def __init__(
        self,
        frames: Iterable[ReplayItem],
        *,
        candles: Iterable[str] = (),
        clock: Clock | None = None,
        loads: Callable[[bytes | str], Any] | None = None,
    ) -> None:
        self.candle_types = candle_types(candles)
        self.markets: tuple[str, ...] = ()
        self.clock: Clock = clock or now_ms
        self._at = 0  # receipt time of the frame being parsed
        self._parser = FrameParser(self._received, loads)
        self._items: Iterator[ReplayItem] = iter(frames)
        self._q: collections.deque[StreamEvent] = collections.deque()
        self._epoch = 0
        self._open = False
        self._last_at = 0
        self._done = False
        self._stopping = False
        self._messages = dict.fromkeys(("ticker", "trade", "orderbook", "candle"), 0)
        self._lags: collections.deque[int] = collections.deque(maxlen=4096)

    def _received(self) -> int:
        return self._at

    # -- lifecycle, as UpbitStream ---------------------------------------------------------------
    def start(self) -> None:
        """Nothing to connect (the API of UpbitStream)."""

    def close(self) -> None:
        """Stop replaying (any thread, idempotent); queued events stay readable."""
        self._stopping = True

    async def aclose(self) -> None:
        self.close()

    async def __aenter__(self) -> ReplayStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._done

    @property
    def started(self) -> bool:
        """Whether a consumer has read from it (one consumer per stream, as UpbitStream)."""
        return self._epoch > 0 or self._done

    @property
    def connected(self) -> bool:
        return self._open and not self._done

    # -- consuming ---------------------------------------------------------------------------------
    def __aiter__(self) -> ReplayStream:
        return self

    async def __anext__(self) -> StreamEvent:
        batch = await self.get_batch(1)
        if not batch:
            raise StopAsyncIteration
        return batch[0]

    async def get_batch(self, max_items: int = 4096, timeout: float | None = None) -> list[StreamEvent]:
        """Up to ``max_items`` events in order; ``[]`` once the recording is replayed and drained."""
        self._fill(max_items)
        q = self._q
        n = min(len(q), max_items)
        return [q.popleft() for _ in range(n)]

    async def run(self, callback: Callable[[list[StreamEvent]], Awaitable[None] | None], max_items: int = 4096) -> None:
        """Hand every batch of events to ``callback`` (sync or async) until the recording ends."""
        await deliver(self.get_batch, lambda: True, callback, max_items)

    def _fill(self, want: int) -> None:
        q = self._q
        parse = self._parser.parse
        while len(q) < want and not self._done:
            if self._stopping:
                self._end("stopped")
                break
            item = next(self._items, _END)
            if item is _END:
                self._end("stopped")
                break
            if item is None:
                self._end("closed")
                continue
            if isinstance(item, tuple):
                at, frame = item
                if isinstance(at, bool) or not isinstance(at, int):
                    at = math.floor(at) if isinstance(at, float) and math.isfinite(at) else self.clock()
            else:
                at, frame = self.clock(), item
            self._at = int(at)
            bad = self._parser.malformed
            msg = parse(frame)
            if self._parser.malformed > bad:
                # a frame that could not be read is a loss, as on a live connection: the epoch
                # ends at the last good frame and the next good one opens a new one
                self._end("malformed")
                continue
            if not self._open:
                self._epoch += 1
                self._open = True
                q.append(Connected(self._epoch, self._at))
            self._last_at = self._at
            if msg is None:
                continue
            name = type(msg).__name__
            self._messages["candle" if name == "CandleMessage" else name[: -len("Message")].lower()] += 1
            self._lags.append(msg.received - msg.timestamp)
            q.append(msg)

    def _end(self, reason: str) -> None:
        if self._open:
            self._open = False
            self._q.append(Disconnected(self._epoch, self._last_at, self._last_at, reason))
        if reason == "stopped":
            self._done = True

    # -- figures -----------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """The keys of :meth:`UpbitStream.stats` that a replay has (no connection figures)."""
        p = self._parser
        return {
            "messages": dict(self._messages),
            "dropped": 0,
            "malformed": p.malformed,
            "unknown_fields": p.unknown_fields,
            "server_errors": p.errors,
            "keepalives": p.keepalives,
            "connects": self._epoch,
            "reconnects": max(0, self._epoch - 1),
            "epoch": self._epoch,
            "connected": self.connected,
            "queued": len(self._q),
            "last_message_age_s": None,
            "lag_ms": lag_percentiles(self._lags.copy()),
            "last_error": p.last_error,
        }


_END: Any = object()
