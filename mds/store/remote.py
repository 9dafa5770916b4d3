"""Keeping this host's fast tiers honest when other hosts write the durable tier (DESIGN.md 7).

With history on a server, every host keeps its own memory and LMDB copies of durable rows. A
change another host commits arrives through the durable tier's change feed
(:class:`~mds.tiers.durable.ChangeFeed`): the span is dropped from LMDB and the series' change
stamp moves, so every process on this store directory drops its memory window and cached
coverage of the series at its next read (a memory hit still costs no server round trip: the
stamp is local). When the feed listens again after an interruption, or when the store opens
(LMDB may hold rows other hosts rewrote while it was closed), LMDB is emptied and every stamp
moves. While the feed is down and the server still answers, the fast tiers are not used (another
host may write unheard); while the server does not answer either, nobody can write there, so
what the fast tiers prove is answered.
"""

from __future__ import annotations

import logging
from typing import Any

from mds.errors import InvalidRequestError
from mds.store.changes import ChangeSlots
from mds.store.coverage import Coverage
from mds.store.health import Tiers
from mds.timeframes import parse_timeframe

logger = logging.getLogger(__name__)


class RemoteChanges:
    """Subscribes to a shared durable tier's change feed each time the tier opens."""

    def __init__(self, tiers: Tiers, slots: ChangeSlots, coverage: Coverage, lock: Any) -> None:
        self.tiers = tiers
        self.slots = slots
        self.coverage = coverage
        self.lock = lock
        self.received = 0  # changes applied (for stats and tests)

    def opened(self, name: str, tier: Any) -> None:
        """A tier opened (hook of :class:`Tiers`). LMDB opened over a shared durable tier may
        hold rows other hosts rewrote while it was closed: it starts empty. A shared durable tier
        that opens (again) is subscribed to; what was missed before is forgotten."""
        if self.tiers.history is None:
            return
        if name == "disk":
            self.tiers.guard("disk", tier.clear)
        elif name == "sqlite" and callable(getattr(tier, "subscribe", None)):
            self.tiers.feed_live = False  # until the feed says it listens
            self._forget_all()
            tier.subscribe(self._changed)

    def _changed(self, symbol: str | None, timeframe: str | None, start: int, end: int) -> None:
        """Feed callback (the feed's thread): another host changed ``[start, end)`` of a series,
        or (``symbol`` None) anything may have changed."""
        with self.lock:
            self.received += 1
            if symbol is None or timeframe is None:
                state = self.tiers.states.get("sqlite")
                live = bool(getattr(state.obj if state is not None else None, "listening", False))
                if live == self.tiers.feed_live and not live:
                    return  # told twice (late heartbeat, then the connection lost)
                if live:  # trusted again: anything may have changed while it was not
                    logger.info("change feed up: dropping this host's copies of durable rows")
                    self._forget_all()
                    self.tiers.copies_trusted = True
                else:
                    logger.info("change feed down: reads ask the server while it answers")
                    if getattr(state.obj if state is not None else None, "feed_late", False):
                        # connected but deaf: other hosts may be writing unheard even if the
                        # server stops answering this host next; only a heartbeat heard (then
                        # every copy dropped) vouches for the copies again
                        self.tiers.copies_trusted = False
                # while the feed is down and the server answers, other hosts may write unheard:
                # the fast tiers are not used (see Tiers.tier); when the server cannot answer
                # either, nobody writes there, and what the fast tiers prove is answered
                self.tiers.feed_live = live
                return
            try:
                tf = parse_timeframe(timeframe)
            except InvalidRequestError:
                logger.warning("change feed: unknown timeframe %r; dropping every copy", timeframe)
                self._forget_all()
                return
            disk = self._disk()
            if disk is not None and self.tiers.guard("disk", disk.delete, symbol, tf, start, end) is None:
                self._forget_all()  # LMDB could not drop the span: it must not answer it
                return
            # every process on this directory drops the series at its next read (the stamp); this
            # one at once (also where the stamps cannot be written: a read-only directory)
            self.slots.touch((symbol, tf.name))
            self.coverage.forget(symbol, tf)

    def _disk(self) -> Any:
        """The LMDB tier object whether or not reads may use it now (its copies are dropped
        even while it is not in use: Tiers.tier() would hide it while the feed is down)."""
        state = self.tiers.states.get("disk")
        return None if state is None else state.obj

    def _forget_all(self) -> None:
        disk = self._disk()
        if disk is not None:
            self.tiers.guard("disk", disk.clear)
        self.slots.touch_all()
        self.coverage.drop()
        mem = self.tiers.states.get("memory")
        if mem is not None:
            mem.obj.clear()
