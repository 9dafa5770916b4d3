"""One request budget per machine: every ``UpbitRouter`` on it, in any thread, event loop or
process, draws from one sliding window per (server, rate-limit group).

Upbit counts quotation requests per IP, so N processes each pacing itself at 10/s send N x 10/s
and get 429s, then 418 blocks. Here each budget is a small file under a per-user directory
(``$MDS_BUDGET_DIR``, else ``$XDG_RUNTIME_DIR/mds-budget``, else ``<tmp>/mds-budget-<uid>``; mode
0700), named after the server (scheme, host, port), the group and the window. Its state (the
response stamps of the window and the slots in flight, on ``time.monotonic()``, which on Linux
is CLOCK_MONOTONIC and so one clock for every process) is read and rewritten under
``fcntl.flock``, which the kernel releases when a process dies, so a process killed while
holding the lock stalls nobody.

The rules are those of the in-process pacer (:class:`_Pacer`, the fallback), now shared:

- a slot is taken when a request is sent and stamped when its response arrives (the server
  counts the request somewhere in between), so at most ``limit`` requests of every process fall
  in any server-side window;
- a slot whose holder died (its pid is gone or a zombie) or that outlived ``hold_s`` (the request
  timeout bounds it) becomes a stamp at the moment that is found, the latest time the server can
  have counted it, so it expires one window later instead of leaking;
- ``Remaining-Req: ... sec=N`` from any process fills the window up to what the server counted;
  a 429 (``sec=0``) fills it for everyone.

The lock is only ever tried, never waited on in the kernel: a process that holds it and does not
let go (hung, stopped with SIGSTOP, or hostile) must not stall every router on the machine. A
router that finds it busy retries with growing sleeps for ``lock_wait_s``, then paces the group
alone (with a warning) and tries the file again every ``lock_retry_s``, carrying what it sent
meanwhile into the file when it gets back. A response whose stamp cannot be written at once is
written at the next chance; until then its slot stays in flight, which only holds the budget
longer, and at worst it expires at its deadline as a dead holder's slot does.

Slots and stamps from a previous boot (a persistent ``$MDS_BUDGET_DIR``; the monotonic clock
restarts) carry times later than now: they are taken as stamps at now, so they cost one window.

Where ``fcntl`` is missing (Windows) or the directory is unusable, each router paces itself
alone (the old behaviour) and a warning says so.
"""

from __future__ import annotations

import array
import asyncio
import bisect
import collections
import contextlib
import errno
import itertools
import logging
import os
import re
import stat
import struct
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

from mds._files import check_private_dir, open_private
from mds.errors import MdsError

logger = logging.getLogger(__name__)

ENV_DIR = "MDS_BUDGET_DIR"
_MAGIC = b"MDSB"
#: magic, number of stamps, number of slots, crc32 of what follows
_HEADER = struct.Struct("<4sIII")
#: pid, token, taken at, deadline
_SLOT = struct.Struct("<qqdd")
#: shortest sleep while waiting (the event loop's timer resolution is about 1 ms anyway)
_MIN_SLEEP_S = 0.0005
#: longest sleep between two tries of a busy lock (the sleeps double from ``_MIN_SLEEP_S``)
_MAX_LOCK_SLEEP_S = 0.05
#: what ``SharedBudget._try_take`` returns when another process holds the lock
_BUSY = -1.0
#: the longest a slot may be held (``hold_s`` is capped at it): a slot whose deadline lies further
#: ahead was not written by this boot's clock, or not by a budget at all
MAX_HOLD_S = 3600.0
#: budget files untouched this long hold nothing that still counts; removed when a process starts
_SWEEP_AGE_S = 3600.0
_TOKENS = itertools.count(1)
#: the token of a slot taken from the in-process pacer
_LOCAL = -1
_swept: set[str] = set()
_warned: set[str] = set()
_registry_lock = threading.Lock()


def default_dir() -> str:
    """``$MDS_BUDGET_DIR``, else ``$XDG_RUNTIME_DIR/mds-budget``, else ``<tmp>/mds-budget-<uid>``."""
    env = os.environ.get(ENV_DIR)
    if env:
        return env
    run = os.environ.get("XDG_RUNTIME_DIR")
    if run and os.path.isdir(run):
        return os.path.join(run, "mds-budget")
    uid = os.geteuid() if hasattr(os, "geteuid") else os.getpid()
    return os.path.join(tempfile.gettempdir(), f"mds-budget-{uid}")


def budget_name(base_url: str, group: str, window_s: float) -> str:
    """File name of the budget of ``group`` on the server of ``base_url`` (scheme, host, port):
    two servers on different ports (FakeUpbit instances) never share one."""
    parts = urlsplit(base_url)
    scheme = (parts.scheme or "https").lower()
    try:
        port = parts.port
    except ValueError:
        port = None
    if port is None:
        port = 443 if scheme == "https" else 80
    raw = f"{scheme}_{(parts.hostname or '').lower()}_{port}_{group}_{window_s:g}s"
    return re.sub(r"[^A-Za-z0-9._-]", "_", raw) + ".budget"


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not: it can send nothing more)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # EPERM: someone else's process, alive
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


@dataclass
class _State:
    """A budget file's content: response stamps (ascending) and slots in flight."""

    done: array.array[float] = field(default_factory=lambda: array.array("d"))
    slots: list[tuple[int, int, float, float]] = field(default_factory=list)

    @classmethod
    def load(cls, data: bytes) -> _State | None:
        """Parse a file's bytes; None when they are not a budget (torn or foreign)."""
        if not data:
            return cls()
        if len(data) < _HEADER.size:
            return None
        magic, n_done, n_slots, crc = _HEADER.unpack_from(data)
        end = _HEADER.size + 8 * n_done + _SLOT.size * n_slots
        body = data[_HEADER.size : end]
        if magic != _MAGIC or len(data) < end or zlib.crc32(body) != crc:
            return None
        done = array.array("d")
        done.frombytes(body[: 8 * n_done])
        if sys.byteorder != "little":  # pragma: no cover - the file is little-endian everywhere
            done.byteswap()
        slots = list(_SLOT.iter_unpack(body[8 * n_done :]))
        return cls(done, slots)

    def dump(self) -> bytes:
        done = array.array("d", self.done)
        if sys.byteorder != "little":  # pragma: no cover
            done.byteswap()
        body = done.tobytes() + b"".join(_SLOT.pack(*s) for s in self.slots)
        return _HEADER.pack(_MAGIC, len(self.done), len(self.slots), zlib.crc32(body)) + body


@dataclass
class _Pacer:
    """Sliding-window limiter for one rate-limit group, in this process only (the fallback where
    the budget cannot be shared).

    A slot is taken when a request is sent and stamped when its response arrives; the server
    counts the request in between, so at most ``limit`` requests fall in any server-side window.
    """

    limit: int
    window_s: float
    done: collections.deque[float] = field(default_factory=collections.deque)
    in_flight: int = 0
    waits: int = 0
    waited_s: float = 0.0

    def _prune(self, now: float) -> None:
        while self.done and self.done[0] <= now - self.window_s:
            self.done.popleft()

    async def acquire(self) -> int:
        waited = False
        t0 = time.monotonic()
        while True:
            now = time.monotonic()
            self._prune(now)
            if self.in_flight + len(self.done) < self.limit:
                self.in_flight += 1
                if waited:
                    self.waits += 1
                    self.waited_s += now - t0
                return _LOCAL
            waited = True
            delay = self.done[0] + self.window_s - now if self.done else self.window_s / 20
            await asyncio.sleep(min(max(delay, _MIN_SLEEP_S), self.window_s))

    def release(self, server_left: int | None, token: int = _LOCAL) -> None:
        self.in_flight -= 1
        now = time.monotonic()
        self.done.append(now)
        if server_left is not None:
            self._prune(now)
            # The server has counted more than we sent (another process on this IP, or a 429):
            # fill the window so the next request waits for it to pass.
            missing = (self.limit - server_left) - (self.in_flight + len(self.done))
            for _ in range(max(0, missing)):
                self.done.append(now)

    def summary(self) -> dict[str, Any]:
        return {"waits": self.waits, "waited_s": round(self.waited_s, 6)}


class BudgetUnavailable(MdsError):
    """The shared budget cannot be used here (no ``fcntl``, or its directory or file is unusable)."""


class SharedBudget:
    """The machine-wide budget of one (server, group, window), as a file under a lock.

    Parameters
    ----------
    directory : str
        The budget directory (created 0700).
    name : str
        The file name (:func:`budget_name`).
    window_s : float
        The sliding window.

    Attributes
    ----------
    limit : int
        Requests allowed per window; set by the transport before each use (a setting).
    hold_s : float
        How long a slot may stay in flight before it counts as finished (at most
        :data:`MAX_HOLD_S`).
    lock_wait_s : float
        How long to try a busy lock before pacing alone.
    lock_retry_s : float
        While pacing alone because the lock was held, how often to try the file again.
    waits, waited_s : int, float
        This process's acquisitions that had to wait, and how long they waited in all.
    reaped : int
        Slots of dead or overdue holders this process turned into stamps.
    corrections : int
        Stamps added because the server counted more than the budget held (``Remaining-Req``
        or a 429).
    lock_fallbacks : int
        Times this process gave up waiting for a lock another process held and paced alone.
    """

    def __init__(self, directory: str, name: str, window_s: float) -> None:
        if fcntl is None:  # pragma: no cover - Windows
            raise BudgetUnavailable("fcntl.flock is not available on this platform")
        try:
            check_private_dir(directory, create=True)
        except (MdsError, OSError) as exc:
            raise BudgetUnavailable(f"budget directory {directory}: {exc}") from exc
        self.directory = directory
        self.path = os.path.join(directory, name)
        self.window_s = window_s
        self.limit = 10
        self.hold_s = 60.0
        self.lock_wait_s = 2.0
        self.lock_retry_s = 1.0
        self.waits = 0
        self.waited_s = 0.0
        self.reaped = 0
        self.corrections = 0
        self.lock_fallbacks = 0
        self._mutex = threading.Lock()
        # This process's pacer while the file cannot be used: for good once the file failed,
        # until ``_retry_at`` (monotonic) while another process held its lock.
        self._fallback: _Pacer | None = None
        self._retry_at: float | None = None
        # Tokens of this process's slots in the file, not yet stamped.
        self._in_file: set[int] = set()
        # Tokens counted in flight by a fallback pacer (taken from it, or in the file when it began).
        self._local: dict[int, _Pacer] = {}
        # Responses whose stamps wait for the lock: (token, server_left).
        self._pending: list[tuple[int, int | None]] = []
        self._flush_loop: asyncio.AbstractEventLoop | None = None  # where a retry of _flush waits
        _sweep(directory)
        # Fail here, not at the first request, when the file cannot be made or locked; a lock
        # held by another process proves the file is usable, and is not waited for.
        with self._locked(blocking=False):
            pass

    @property
    def hold_s(self) -> float:
        """How long a slot may stay in flight (capped at :data:`MAX_HOLD_S`)."""
        return self._hold_s

    @hold_s.setter
    def hold_s(self, value: float) -> None:
        self._hold_s = min(float(value), MAX_HOLD_S)

    # -- the file under its lock ------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self, *, blocking: bool) -> Iterator[int | None]:
        """The budget file, open and locked (None: another process holds it; only when not
        ``blocking``). A new descriptor each time: its own open file description, so the lock
        excludes other threads and forked children too, and closing it releases the lock."""
        assert fcntl is not None
        with self._mutex:
            while True:
                try:
                    fd = open_private(self.path, os.O_RDWR | os.O_CREAT, 0o600)
                except (MdsError, OSError) as exc:
                    raise BudgetUnavailable(f"budget file {self.path}: {exc}") from exc
                try:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
                    except BlockingIOError:
                        yield None
                        return
                    except OSError as exc:  # e.g. ENOLCK: no locks on this file system
                        raise BudgetUnavailable(f"budget file {self.path}: {exc}") from exc
                    # A file removed by a sweep between our open and our lock is no longer the
                    # budget: others use the new one at the path.
                    try:
                        same = os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
                    except FileNotFoundError:
                        same = False
                    if same:
                        yield fd
                        return
                finally:
                    os.close(fd)

    def _read(self, fd: int, now: float) -> _State:
        size = os.fstat(fd).st_size
        data = os.pread(fd, size, 0) if size else b""
        state = _State.load(data)
        if state is None:
            # A torn or foreign file: assume the window is full rather than empty.
            logger.warning("request budget %s was unreadable; treating its window as used up", self.path)
            return _State(done=array.array("d", [now] * self.limit))
        return state

    def _write(self, fd: int, state: _State) -> None:
        data = state.dump()
        # One write of the whole state at offset 0: the header says how much of the file counts.
        os.pwrite(fd, data, 0)
        if os.fstat(fd).st_size > 2 * len(data) + 4096:
            os.ftruncate(fd, len(data))

    def _tidy(self, state: _State, now: float) -> None:
        """Turn slots of dead or overdue holders into stamps at ``now``; drop expired stamps."""
        me = os.getpid()
        keep = []
        for slot in state.slots:
            pid, _, taken, deadline = slot
            # A slot taken later than now, or due later than any hold allows, comes from a
            # previous boot's clock (its pid may well be alive again): it is over.
            stale = taken > now or deadline > now + MAX_HOLD_S
            if stale or deadline <= now or (pid != me and not _alive(pid)):
                # The server counted it (if it was ever sent) at some time before now.
                state.done.append(now)
                self.reaped += 1
                logger.info("request budget %s: a slot of pid %d taken %.3f s ago expired", self.path, pid, now - taken)
            else:
                keep.append(slot)
        state.slots = keep
        done = state.done
        if done and done[-1] > now:
            # Stamps later than now come from a previous boot's clock: now is the latest they
            # can count from.
            state.done = done = array.array("d", sorted(min(t, now) for t in done))
        # Stamps are appended in order (each at a monotonic time read under the lock).
        del done[: bisect.bisect_right(done, now - self.window_s)]

    # -- the pacer's interface --------------------------------------------------------------
    def _try_take(self, token: int) -> float | None:
        """Take a slot (None), or the seconds until one may free (``_BUSY`` when another process
        holds the lock). Stamps waiting for the lock are written first; a fallback pacer that
        waited for the lock hands its window over to the file."""
        with self._locked(blocking=False) as fd:
            if fd is None:
                return _BUSY
            now = time.monotonic()  # read under the lock: stamps go into the file in order
            state = self._read(fd, now)
            self._share_again(state, now)
            self._apply_pending(state, now)
            self._tidy(state, now)
            used = len(state.done) + len(state.slots)
            if used < self.limit:
                state.slots.append((os.getpid(), token, now, now + self.hold_s))
                self._write(fd, state)
                self._in_file.add(token)
                return None
            self._write(fd, state)
            need = used - self.limit + 1
            if need <= len(state.done):
                return state.done[need - 1] + self.window_s - now
            # Slots in flight fill the window: none frees before a response plus a window, but
            # look again soon in case a holder dies.
            return self.window_s / 20

    async def acquire(self) -> int:
        """Wait for a slot of the shared window (sleeping until the earliest one may free); the
        token returned goes to :meth:`release`. A lock held by another process is tried for
        ``lock_wait_s``, then this router paces alone until the lock is free again."""
        token = next(_TOKENS)
        t0 = time.monotonic()
        waited = False
        busy_since: float | None = None
        pause = _MIN_SLEEP_S
        while True:
            fb = self._fallback
            if fb is not None and (self._retry_at is None or time.monotonic() < self._retry_at):
                fb.limit = self.limit
                await fb.acquire()
                if fb is not self._fallback:  # the file came back meanwhile: take from it
                    fb.in_flight -= 1
                    continue
                self._local[token] = fb
                return token
            try:
                delay = self._try_take(token)
            except (BudgetUnavailable, OSError) as exc:
                self._give_up(exc)
                continue
            if delay is None:
                if waited:
                    self.waits += 1
                    self.waited_s += time.monotonic() - t0
                return token
            if delay == _BUSY:
                now = time.monotonic()
                if fb is not None:  # still held: pace alone a while longer
                    self._retry_at = now + self.lock_retry_s
                    continue
                if busy_since is None:
                    busy_since = now
                elif now - busy_since >= self.lock_wait_s:
                    self._pace_alone(now - busy_since)
                    continue
                await asyncio.sleep(pause)
                pause = min(2 * pause, _MAX_LOCK_SLEEP_S)
                continue
            busy_since, pause = None, _MIN_SLEEP_S
            waited = True
            await asyncio.sleep(min(max(delay, _MIN_SLEEP_S), self.window_s))

    def release(self, server_left: int | None, token: int = _LOCAL) -> None:
        """Stamp the slot ``token`` at this response; with the server's ``sec`` count
        (``Remaining-Req``; 0 for a 429) fill the window up to what the server counted.

        Never waits for the lock: when another process holds it, the stamp is written at the
        next chance (retried on the running event loop, and before the next slot is taken)."""
        pacer = self._local.pop(token, None)
        if pacer is not None:
            pacer.release(server_left)
        if token not in self._in_file:
            return
        self._in_file.discard(token)
        if self._fallback is not None and self._retry_at is None:
            return  # the file failed: nothing more can be written to it
        self._pending.append((token, server_left))
        if not self._flush():
            self._schedule_flush(_MIN_SLEEP_S, time.monotonic())

    def _apply_pending(self, state: _State, now: float) -> None:
        """Stamp, at ``now``, the responses that waited for the lock (later than they came: that
        only holds the window longer)."""
        me = os.getpid()
        pending, self._pending = self._pending, []
        for token, server_left in pending:
            state.slots = [s for s in state.slots if not (s[0] == me and s[1] == token)]
            state.done.append(now)
            if server_left is not None:
                self._tidy(state, now)
                missing = (self.limit - server_left) - (len(state.done) + len(state.slots))
                if missing > 0:
                    state.done.extend([now] * missing)
                    self.corrections += missing

    def _flush(self) -> bool:
        """Write the stamps that wait for the lock; False when another process holds it."""
        if not self._pending:
            return True
        try:
            with self._locked(blocking=False) as fd:
                if fd is None:
                    return False
                now = time.monotonic()
                state = self._read(fd, now)
                self._apply_pending(state, now)
                self._tidy(state, now)
                self._write(fd, state)
        except (BudgetUnavailable, OSError) as exc:
            self._pending.clear()
            self._give_up(exc)
        return True

    def _schedule_flush(self, pause: float, since: float) -> None:
        """Try :meth:`_flush` again after ``pause`` on the running event loop (doubling pauses),
        until the stamps are written or their slots have passed their deadlines anyway. Without a
        running loop the next :meth:`_try_take` writes them."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if self._flush_loop is loop:  # one retry at a time (one left on a closed loop is dropped)
            return
        self._flush_loop = loop

        def again() -> None:
            self._flush_loop = None
            if not self._flush() and time.monotonic() - since < self.hold_s:
                self._schedule_flush(min(2 * pause, _MAX_LOCK_SLEEP_S), since)

        loop.call_later(pause, again)

    def _fall_back(self) -> _Pacer:
        """A pacer for this process alone that counts this process's slots in the file as in
        flight (their responses still release them)."""
        fb = _Pacer(self.limit, self.window_s)
        # Also those of an earlier fallback still in flight (the file failed after one).
        tokens = self._in_file | self._local.keys()
        for token in tokens:
            self._local[token] = fb
        fb.in_flight = len(tokens)
        self._fallback = fb
        return fb

    def _pace_alone(self, busy_s: float) -> None:
        """Another process has held the lock for ``busy_s``: pace this group alone until it is
        free again (tried every ``lock_retry_s``)."""
        self.lock_fallbacks += 1
        logger.warning(
            "request budget %s: another process has held its lock for %.1f s; this router paces "
            "the group alone until the lock is free again",
            self.path,
            busy_s,
        )
        self._fall_back()
        self._retry_at = time.monotonic() + self.lock_retry_s

    def _share_again(self, state: _State, now: float) -> None:
        """Under the lock, after pacing alone because it was held: carry the fallback's window
        into the file (its stamps, and its requests in flight as slots of this process), so the
        shared window counts what this process sent meanwhile, and use the file again."""
        fb = self._fallback
        if fb is None or self._retry_at is None:
            return
        me = os.getpid()
        for token, pacer in self._local.items():
            if pacer is fb and token not in self._in_file:
                state.slots.append((me, token, now, now + self.hold_s))
                self._in_file.add(token)
        self._local.clear()
        fb._prune(now)
        if fb.done:
            state.done = array.array("d", sorted([*state.done, *fb.done]))
        self.waits += fb.waits
        self.waited_s += fb.waited_s
        self._fallback = self._retry_at = None
        logger.info("request budget %s: the lock is free again; this router shares the budget again", self.path)

    def _give_up(self, exc: BaseException) -> None:
        """Pace this group in this process from now on (the file failed mid-run)."""
        logger.warning("request budget %s failed (%s); this router paces the group alone from now on", self.path, exc)
        self._fall_back()
        self._retry_at = None
        self._pending.clear()

    @property
    def shared(self) -> bool:
        """Whether the budget is the machine-wide file now (not while another process holds
        its lock too long, nor after it failed)."""
        return self._fallback is None

    def summary(self) -> dict[str, Any]:
        """This process's figures: ``waits``, ``waited_s``, ``reaped``, ``corrections``,
        ``lock_fallbacks``, ``path``, ``shared``."""
        fb = self._fallback
        return {
            "waits": self.waits + (fb.waits if fb else 0),
            "waited_s": round(self.waited_s + (fb.waited_s if fb else 0.0), 6),
            "reaped": self.reaped,
            "corrections": self.corrections,
            "lock_fallbacks": self.lock_fallbacks,
            "path": self.path,
            "shared": fb is None,
        }


def _sweep(directory: str) -> None:
    """Remove this directory's budget files nobody touched for an hour (once per process): every
    stamp and slot in them has long expired. Under each file's lock; a process that opened one
    before it went re-opens the path (see ``SharedBudget._locked``)."""
    with _registry_lock:
        if directory in _swept:
            return
        _swept.add(directory)
    assert fcntl is not None
    cutoff = time.time() - _SWEEP_AGE_S
    try:
        names = [n for n in os.listdir(directory) if n.endswith(".budget")]
    except OSError:
        return
    for name in names:
        path = os.path.join(directory, name)
        try:
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode) or st.st_mtime > cutoff:
                continue
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(fd).st_mtime <= cutoff:
                os.unlink(path)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.ENOENT):
                logger.debug("could not sweep %s: %s", path, exc)
        finally:
            os.close(fd)


def open_budget(directory: str | None, base_url: str, group: str, window_s: float) -> SharedBudget | None:
    """The shared budget of ``group`` on ``base_url``'s server, or None (with a warning, once per
    directory) where it cannot be shared: then the caller paces alone."""
    d = directory or default_dir()
    try:
        return SharedBudget(d, budget_name(base_url, group, window_s), window_s)
    except BudgetUnavailable as exc:
        with _registry_lock:
            first = d not in _warned
            _warned.add(d)
        if first:
            logger.warning(
                "no machine-wide request budget (%s): each router paces itself alone, so several "
                "processes on this machine can exceed Upbit's limits together",
                exc,
            )
        return None
