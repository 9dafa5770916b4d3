"""Cross-process change stamps: how a store learns that another process rewrote a series.

``changes.bin`` in the store directory holds one 8-byte stamp per hash slot of series, shared by
every process through a memory map, and after them the highest durable ``commit_seq`` any store
on the path acknowledged, and the same record for a shared history server (:class:`SharedAcks`).
A writer stamps a series' slot *in progress* (odd) before its durable write and *final* (even)
after the commit; a reader compares the stamp with the one it saw last before trusting its memory
tier (about 0.2 us, where ``PRAGMA data_version`` costs about 5 us).
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
#: Words after the hash slots: the SQLite ``commit_seq`` acknowledged, then the shared history's
#: record (:class:`SharedAcks`): the server's identity, its ``commit_seq`` acknowledged, the
#: acknowledged value found missing there (0: none).
_TAIL = 4


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
        #: The shared history's acknowledgement record (None: a file of an older mds, read-only)
        self.shared: SharedAcks | None = None

    def open(self, path: Path, writable: bool) -> None:
        """Map ``path``; blocks are allocated before the map, so a full disk is an error here,
        never a SIGBUS later. A read-only directory without the file has no stamps."""
        try:
            self._map = map_shared(path, (SLOTS + _TAIL) * 8, readonly=not writable)
        except StorageUnavailableError as exc:
            if writable:
                raise
            try:  # the size an mds before the shared record wrote: read-only, it cannot grow
                self._map = map_shared(path, (SLOTS + 1) * 8, readonly=True)
            except StorageUnavailableError:
                logger.warning("no cross-process change slots (%s): rewrites by other processes show late", exc)
                self.array = None
                return
        self.writable = writable
        self.array = np.frombuffer(self._map, dtype=np.int64, count=SLOTS)
        self.words = memoryview(self._map)[: SLOTS * 8].cast("q")
        # after the hash slots: the highest SQLite commit_seq any store acknowledged on this path
        self.acked = np.frombuffer(self._map, dtype=np.int64, count=1, offset=SLOTS * 8)
        if len(self._map) >= (SLOTS + _TAIL) * 8:
            self.shared = SharedAcks(np.frombuffer(self._map, dtype=np.int64, count=3, offset=(SLOTS + 1) * 8))

    def close(self) -> None:
        if self._map is not None:
            self.array = self.acked = self.shared = None  # views into the map: it cannot close while they live
            if self.words is not None:
                self.words.release()
                self.words = None
            with contextlib.suppress(BufferError, ValueError):
                self._map.close()
            self._map = None

    def slot(self, key: tuple[str, str]) -> int:
        """The hash slot of a series (the hot callers look in ``slot_of`` first themselves)."""
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
        keys = self._keys_at[slot]  # slot() registered ``key`` there
        if len(keys) > 1:
            for other in keys:
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
        slot = self.slot_of.get(key)
        if slot is None:
            slot = self.slot(key)
        # the slot as this process last left (in this write) or saw it; anything else is another
        # writer's move
        if words[slot] != (self._last.get(slot) if key in self.dirty else self.seen.get(key)):
            self.contested.add(key)
        if not self.dirty and self.shared is not None:
            self.shared.before()
        self._write(words, slot, key, (time.time_ns() ^ _PID.bits) | 1)
        self.dirty.add(key)

    def end(self, commit_seq: int | None) -> None:
        """Give every series stamped in progress its final (even) stamp, after the commit, and
        record ``commit_seq`` (the durable tier's, after that commit) as acknowledged."""
        words = self.words
        if words is None or not self.dirty:
            return
        slot_of, last, seen = self.slot_of, self._last, self.seen
        # one final stamp for the commit: each slot still changes (from its odd stamp), and a
        # slot two of the series share is kept in step for both by _write
        stamp = (time.time_ns() ^ _PID.bits) & ~1
        for key in self.dirty:
            slot = slot_of[key]  # begin() found it
            if words[slot] != last.get(slot):
                self.contested.add(key)  # another writer stamped between this begin and now
            self._write(words, slot, key, stamp)
            seen[key] = stamp
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
        slot = self.slot_of.get(key)
        stamp: int = words[self.slot(key) if slot is None else slot]
        if self.seen.get(key) == stamp:
            return None
        if stamp & 1 and key not in self.dirty:
            self.seen.pop(key, None)
        else:
            self.seen[key] = stamp
        return stamp


class SharedAcks:
    """What this store directory's writes got acknowledged by a shared history server, kept in
    ``changes.bin`` beside the change stamps: so that a server that lost them (restored from an
    older backup, re-created empty) is reported, however many commits other hosts made since.

    A server counts every host's commits in one ``commit_seq``, so "fewer commits than
    acknowledged" proves nothing once other hosts wrote past the old count. The server also keeps,
    per store directory (``origin``), the ``commit_seq`` of that directory's latest commit (the
    tier's ledger); it only grows, in commit order. So the ledger's entry falling below the value
    recorded here means acknowledged commits are gone. It is compared in :meth:`lost` (``check()``,
    at open) and at every commit (the entry before this commit, against the value recorded before
    the transaction began: a later commit must not bury the evidence).

    Words: ``[0]`` the server's identity (a hash of its address and this directory's origin: a
    record for another server, or made by the directory before it was copied here, does not
    apply), ``[1]`` the highest ``commit_seq`` acknowledged there, ``[2]`` an acknowledged value
    found missing (0: none; kept until ``changes.bin`` is deleted).
    """

    __slots__ = ("_before", "words")

    def __init__(self, words: np.ndarray) -> None:
        self.words = words
        self._before: tuple[int, int] | None = None

    def before(self) -> None:
        """Record the acknowledged value before a write transaction begins: every commit counted in
        it is visible to that transaction's statements, so its ledger entry cannot be lower."""
        w = self.words
        self._before = (int(w[0]), int(w[1]))

    def commit(self, identity: int, seq: int, prev: int) -> str | None:
        """Record a commit acknowledged by server ``identity`` as ``seq``, whose ledger entry was
        ``prev`` before it (0: none). A message when ``prev`` shows acknowledged commits lost."""
        w = self.words
        before, self._before = self._before, None
        found = None
        if before is not None and before[0] == identity and prev < before[1]:
            found = self._missing(before[1], prev)
            if not w[2]:
                w[2] = before[1]
        if int(w[0]) != identity:  # the first commit to this server from here: a new record
            w[0], w[1], w[2] = identity, seq, 0
        elif seq > w[1]:
            w[1] = seq
        return found

    def lost(self, identity: int, have: Callable[[], int | None]) -> str | None:
        """A message when server ``identity`` lost commits acknowledged here; ``have()`` reads the
        ledger entry (after this record is read: a commit acknowledged meanwhile is in both; None:
        the server keeps no ledger, as before this directory's first commit there)."""
        w = self.words
        if int(w[0]) != identity:
            return None  # no record for this server (never written to it from here)
        acked, missing = int(w[1]), int(w[2])
        got = have()
        if got is None:
            got = 0  # no ledger at all: every commit acknowledged here wrote one, so it was lost
        if got < acked:
            return self._missing(acked, got)
        if missing:
            return self._missing(missing, None)
        return None

    @staticmethod
    def _missing(acked: int, got: int | None) -> str:
        found = "" if got is None else f"; its record of this store directory ends at commit {got}"
        return (
            f"history: the server lost writes this store directory had acknowledged (up to its commit {acked}"
            f"{found}): restored from an older backup, or re-created? The data of that window cannot be vouched "
            "for. Refetch it (mds backfill), then delete changes.bin to accept the server as it is"
        )
