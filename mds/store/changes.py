"""Cross-process change stamps: how a store learns that another process rewrote a series.

``changes.bin`` in the store directory holds one 8-byte stamp per hash slot of series, shared by
every process through a memory map, and after them the highest durable ``commit_seq`` any store
on the path acknowledged. A writer stamps a series' slot *in progress* (odd) before its durable
write and *final* (even) after the commit; a reader compares the stamp with the one it saw last
before trusting its memory tier (about 0.2 us, where ``PRAGMA data_version`` costs about 5 us).
Hash collisions only cause a spurious refresh.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mds._files import map_shared
from mds.errors import StorageUnavailableError
from mds.timeframes import Timeframe

logger = logging.getLogger(__name__)

SLOTS = 4096


class _Pid:
    """This process's id shifted into a stamp's high bits (``os.getpid()`` is a system call;
    refreshed in a forked child)."""

    bits = os.getpid() << 40

    @classmethod
    def refresh(cls) -> None:
        cls.bits = os.getpid() << 40


_PID = _Pid
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_Pid.refresh)


class ChangeSlots:
    """The change stamps of one store directory, as this process sees them.

    ``array`` is None when there are no stamps (a store without persistent tiers, or a read-only
    directory without ``changes.bin``); callers then fall back to the durable tier's coarser
    ``data_version``. ``seen`` holds the stamp this process last synchronised with per series,
    ``dirty`` the series it stamped in progress and has not finished, ``contested`` the series
    whose slot another writer moved while this one wrote (between its last look and its final
    stamp): what this process holds of them cannot be vouched for, and the caller drops it
    (:meth:`take_contested`).
    """

    def __init__(self) -> None:
        self.array: np.ndarray | None = None
        #: The same stamps as a memoryview: reading one as an int costs half a numpy element
        self.words: memoryview | None = None
        self.acked: np.ndarray | None = None
        self._map: Any = None
        self.seen: dict[tuple[str, str], int] = {}
        self.dirty: set[tuple[str, str]] = set()
        self.contested: set[tuple[str, str]] = set()
        self._last: dict[int, int] = {}  # the last stamp this process wrote into each slot
        self.slot_of: dict[tuple[str, str], int] = {}
        self._keys_at: dict[int, list[tuple[str, str]]] = {}  # the series of this process per slot
        #: False when the map is read-only here (a read-only store directory): stamps are read only
        self.writable = False

    def open(self, path: Path, writable: bool) -> None:
        """Map ``path``; blocks are allocated before the map, so a full disk is an error here,
        never a SIGBUS later. A read-only directory without the file has no stamps."""
        try:
            size = (SLOTS + 1) * 8
            self._map = map_shared(path, size, readonly=not writable)
        except StorageUnavailableError as exc:
            if writable:
                raise
            logger.warning("no cross-process change slots (%s): rewrites by other processes show late", exc)
            self.array = None
            return
        self.writable = writable
        self.array = np.frombuffer(self._map, dtype=np.int64, count=SLOTS)
        self.words = memoryview(self._map)[: SLOTS * 8].cast("q")
        # after the hash slots: the highest SQLite commit_seq any store acknowledged on this path
        self.acked = np.frombuffer(self._map, dtype=np.int64, count=1, offset=SLOTS * 8)

    def close(self) -> None:
        if self._map is not None:
            self.array = self.acked = None  # views into the map: it cannot close while they live
            if self.words is not None:
                self.words.release()
                self.words = None
            with contextlib.suppress(BufferError, ValueError):
                self._map.close()
            self._map = None

    def slot(self, key: tuple[str, str]) -> int:
        slot = self.slot_of.get(key)
        if slot is None:
            digest = hashlib.blake2b(f"{key[0]}/{key[1]}".encode(), digest_size=8).digest()
            slot = self.slot_of[key] = int.from_bytes(digest, "little") % SLOTS
            self._keys_at.setdefault(slot, []).append(key)
        return slot

    def _write(self, words: memoryview, slot: int, key: tuple[str, str], stamp: int) -> None:
        """Stamp ``slot`` for ``key``. Other series of this process that share the slot (4,096
        slots: 100 series share about one) and were in step with it stay in step: this write
        changed ``key``, not them, and must not make them look changed by another writer."""
        prev = words[slot]
        words[slot] = stamp
        self._last[slot] = stamp
        for other in self._keys_at.get(slot, ()):
            if other != key and self.seen.get(other) == prev:
                self.seen[other] = stamp

    def begin(self, sym: str, tf: Timeframe) -> None:
        """Stamp a series' slot *in progress* (odd) before its durable write.

        Until the final stamp, readers in every process bypass their memory tier for the series
        and ask the durable tier, which shows the write exactly when it commits (a seqlock, in
        effect).
        """
        words = self.words
        if words is None:
            return
        key = (sym, tf.name)
        slot = self.slot(key)
        # the slot as this process last left (in this write) or saw it; anything else is another
        # writer's move
        if words[slot] != (self._last.get(slot) if key in self.dirty else self.seen.get(key)):
            self.contested.add(key)
        self._write(words, slot, key, (time.time_ns() ^ _PID.bits) | 1)
        self.dirty.add(key)

    def end(self, commit_seq: int | None) -> None:
        """Give every series stamped in progress its final (even) stamp, after the commit, and
        record ``commit_seq`` (the durable tier's, after that commit) as acknowledged."""
        words = self.words
        if words is None or not self.dirty:
            return
        for key in self.dirty:
            slot = self.slot(key)
            if words[slot] != self._last.get(slot):
                self.contested.add(key)  # another writer stamped between this begin and now
            stamp = (time.time_ns() ^ _PID.bits) & ~1
            self._write(words, slot, key, stamp)
            self.seen[key] = stamp
        self.dirty.clear()
        if commit_seq is not None and self.acked is not None and commit_seq > self.acked[0]:
            self.acked[0] = commit_seq

    def take_contested(self) -> set[tuple[str, str]]:
        """The contested series (see the class), forgotten here."""
        out, self.contested = self.contested, set()
        return out

    def touch(self, key: tuple[str, str]) -> None:
        """Move a series' stamp (final, even) without a write here: what every process on this
        directory caches of the series is dropped at its next read (another host changed it)."""
        if self.array is not None and self.writable:
            self.array[self.slot(key)] = (time.time_ns() ^ _PID.bits) & ~1

    def touch_all(self) -> None:
        """Move every stamp: anything may have changed."""
        if self.array is not None and self.writable:
            self.array[:] = (time.time_ns() ^ _PID.bits) & ~1

    def lost_commits(self, have: Callable[[], int]) -> str | None:
        """A message when the durable tier holds fewer commits (``have()``) than stores on this
        path acknowledged; None when nothing was lost (or there is no record to compare with).

        Every acknowledged durable commit leaves its ``commit_seq`` in ``changes.bin``, outside
        the database; a file whose own sequence is lower lost acknowledged writes (a WAL deleted
        after a crash, a file replaced by an older copy).
        """
        if self.acked is None:
            return None
        acked = int(self.acked[0])
        got = int(have())
        if got >= acked:
            return None
        return (
            f"sqlite: the file holds {got} committed transactions but {acked} were acknowledged: "
            f"the last {acked - got} acknowledged write(s) are lost (a deleted -wal file or an older "
            "copy of the database?); the data of that window cannot be vouched for. Restore it or "
            "refetch, then delete changes.bin to accept the file as it is"
        )

    def stamp(self, sym: str, tf: Timeframe) -> int | None:
        """The series' current change stamp (None without change slots)."""
        words = self.words
        return None if words is None else words[self.slot((sym, tf.name))]

    def changed(self, key: tuple[str, str]) -> int | None:
        """The series' stamp if it differs from the one last seen (None: unchanged); a changed
        stamp that is final is recorded as seen, one in progress (odd) by another writer is not."""
        words = self.words
        assert words is not None
        stamp: int = words[self.slot(key)]
        if self.seen.get(key) == stamp:
            return None
        if stamp & 1 and key not in self.dirty:
            self.seen.pop(key, None)
        else:
            self.seen[key] = stamp
        return stamp
