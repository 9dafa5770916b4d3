"""Disk tier: the recent candles of every series in one LMDB environment.

LMDB maps the file into every process that opens the store path, so a process that starts cold
reads the last month of a series at memory-map speed, and many reader processes share one copy
in the page cache with a single writer. The tier is a cache in front of SQLite: everything in it
can be rebuilt from SQLite, which is why it favours speed over durability and why damage to it
(a corrupt, truncated or deleted file) is repaired by starting empty rather than by failing.

Layout (see docs/ARCHITECTURE.md, "Disk tier (LMDB)"):

- ``chunks`` database: key ``series key + period start`` (so keys sort by series, then time and
  a range is one cursor walk); value ``[H, M] + msgpack([version, rows, written_at, checksum]) +
  padding + raw CANDLE_DTYPE rows`` (H is the header length, a multiple of 8, so rows in overflow
  pages are 8-byte aligned; M is the msgpack length; checksum: 64-bit sum of the row words).
- ``held`` database: key ``series key``; value ``msgpack([version, [s0, e0, s1, e1, ...]])``,
  the half-open ranges the tier holds in full. Chunks and held ranges change in one write
  transaction, so readers in other processes see both or neither.
- ``meta`` database: the on-disk format version.
"""

from __future__ import annotations

import bisect
import contextlib
import errno

try:  # POSIX; on Windows the recreate lock is skipped (LMDB locks the environment itself)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]
import itertools
import logging
import os
import struct
import threading
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import lmdb
import msgpack
import numpy as np

from mds._checksum import row_checksum
from mds._dtypes import CANDLE_DTYPE, CANDLE_RAW
from mds._files import allocate, check_entries, check_private_dir, open_private, storage_error
from mds._kernels import CHUNK_KEY_MAX as _MAX_KEY, ChunkCorrupt, file_state, walk_chunks
from mds.errors import StorageUnavailableError
from mds.timeframes import DAY_MS, HOUR_MS, Timeframe
from mds.timeutil import now_ms

__all__ = ["CHUNK_PERIOD_MS", "FORMAT_VERSION", "LmdbTier"]

log = logging.getLogger(__name__)

#: On-disk format of this module; bump it when a key or value layout changes. An environment
#: with another version is cleared on open (it is a cache: SQLite refills it).
FORMAT_VERSION = 2

#: Chunk period per timeframe: about 500 to 4000 rows (30 to 220 KiB) a chunk, so a
#: 1,000-candle read touches one to three values and an append rewrites at most one chunk.
#: Periods are aligned to the epoch (a multiple of whole UTC days, or of an hour for 1s).
CHUNK_PERIOD_MS: dict[str, int] = {
    "1s": HOUR_MS,
    "1m": DAY_MS,
    "3m": 2 * DAY_MS,
    "5m": 4 * DAY_MS,
    "10m": 8 * DAY_MS,
    "15m": 8 * DAY_MS,
    "30m": 16 * DAY_MS,
    "1h": 32 * DAY_MS,
    "4h": 128 * DAY_MS,
    "1d": 4096 * DAY_MS,
    "1w": 4096 * DAY_MS,
    "1M": 4096 * DAY_MS,
}

_ROW = CANDLE_DTYPE.itemsize
_MiB = 1 << 20
_KEY = struct.Struct(">Q")
_OFFSET = 1 << 63  # period start as unsigned big-endian: byte order == time order
#: Bounds on a held set: 50,000 disjoint ranges per series is far past any real use. The byte
#: bound is checked before a value is touched: a damaged node can claim a size that reaches
#: past the end of the map.
_MAX_HELD_INTS = 100_000
_MAX_HELD_BYTES = 9 * _MAX_HELD_INTS + 16
#: Allocated bytes kept past the last committed page. LMDB trusts the page structure it reads:
#: a damaged node can point up to 64 KiB past its page, and reading past the end of the file
#: kills the process with SIGBUS; past the end plus this slack it reads zeros and reports
#: corruption instead.
_SLACK = 1 << 20
_MAX_ROWS = 1 << 26  # sanity bound on a chunk header's row count
_MAX_VERIFIED = 1 << 18  # chunk versions remembered as checked (about 150 bytes each)
_DATA = "data.mdb"
_LOCK = "lock.mdb"
_RECREATE_LOCK = "recreate.lock"
#: The entries of the environment directory (name -> is a directory), checked before each open.
_ENTRIES = {_DATA: False, _LOCK: False, _RECREATE_LOCK: False}
#: Reader slots of the lock file (py-lmdb's default, passed explicitly: it fixes the file size).
_MAX_READERS = 126
#: The lock file's size as liblmdb sizes it: ``(max_readers - 1) * sizeof(MDB_reader) +
#: sizeof(MDB_txninfo)`` (mdb_env_setup_locks; 64 and 192 bytes with glibc on x86-64, 8 KiB in
#: all). liblmdb maps the lock file shared and, when it creates it, extends it with ftruncate: a
#: sparse file, whose first touched page kills the process with SIGBUS on a full disk. The file is
#: created here with its blocks allocated first; an existing file of at least this size is used
#: as it is by liblmdb (its size then fixes the reader slots), so every process maps the same size.
_LOCK_SIZE = (_MAX_READERS - 1) * 64 + 192
#: errno values of open failures that are a state of the machine (full, read-only, no
#: permission, out of descriptors), not damage: the files are kept, not recreated. EIO counts
#: when the disk is (nearly) full: liblmdb reports a short write as EIO.
_ENVIRONMENTAL = frozenset(
    {
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EROFS,
        errno.EACCES,
        errno.EPERM,
        errno.ELOOP,
        errno.ENOTDIR,
        errno.EMFILE,
        errno.ENFILE,
    }
)
_CORRUPTION = (
    lmdb.CorruptedError,
    lmdb.PageNotFoundError,
    lmdb.InvalidError,
    lmdb.VersionMismatchError,
    lmdb.PanicError,
    lmdb.BadValsizeError,
    lmdb.BadTxnError,  # a read txn LMDB flagged as failed: it met a bad page
    lmdb.BadDbiError,  # a named database's record changed under us (never done on purpose)
)

Loader = Callable[[str, Timeframe, int, int], np.ndarray]


_SEP = b"\x1f"


_NOT_READ = object()


class _Refused(Exception):
    """A guarded write found the series changed since its rows were read; nothing is written."""


#: A value or a file that cannot be what this module wrote (the kernels' walk raises it too).
_Corrupt = ChunkCorrupt


class _Gone(Exception):
    """The mapped data file was deleted or replaced: follow the path to the new one."""


def _space_left(path: str) -> int:
    """Bytes this process may still write on ``path``'s file system (large when unknown)."""
    try:
        st = os.statvfs(path)
    except (OSError, AttributeError):
        return 1 << 62
    return st.f_bavail * st.f_frsize


def _errno_of(exc: BaseException) -> int | None:
    """The errno behind an ``OSError`` or an LMDB error (py-lmdb keeps only the message for
    errno values it has no class for)."""
    if isinstance(exc, OSError):
        return exc.errno
    if isinstance(exc, lmdb.DiskError):
        return errno.ENOSPC
    if isinstance(exc, lmdb.ReadonlyError):
        return errno.EACCES
    if isinstance(exc, lmdb.MemoryError):
        return errno.ENOMEM
    if isinstance(exc, lmdb.Error):
        text = str(exc)
        for code in (*_ENVIRONMENTAL, errno.EIO):
            if text.endswith(os.strerror(code)):
                return code
    return None


# -- value codecs --------------------------------------------------------------------------------


def _pack_chunk(rows: np.ndarray, written_at: int) -> tuple[bytes, _Seen]:
    """The chunk value for ``rows`` and its :data:`_Seen` memo entry."""
    raw = np.ascontiguousarray(rows).view(np.uint8).data
    crc = row_checksum(raw, 0, len(rows))
    head = msgpack.packb([FORMAT_VERSION, len(rows), int(written_at), crc])
    m = len(head)
    h = (m + 2 + 7) & ~7
    val = b"".join((bytes((h, m)), head, bytes(h - 2 - m), raw))
    return val, (val[:h], h, len(rows), int(written_at))


def _chunk_header(val: Any) -> tuple[int, int, int, int]:
    """``(header length, rows, written_at, crc)`` of a chunk value, checked against its size."""
    size = len(val)
    if size < 8:
        raise _Corrupt("chunk value too short")
    h, m = val[0], val[1]
    if h & 7 or m + 2 > h or h > size:
        raise _Corrupt("bad chunk header length")
    try:
        head = msgpack.unpackb(
            val[2 : 2 + m], max_array_len=8, max_map_len=0, max_str_len=0, max_bin_len=0, max_ext_len=0
        )
    except (ValueError, TypeError) as exc:  # msgpack's errors derive from these
        raise _Corrupt(f"unreadable chunk header: {exc}") from None
    if type(head) is not list or len(head) != 4 or head[0] != FORMAT_VERSION:
        raise _Corrupt("chunk header of another format")
    _, n, written, crc = head
    if type(n) is not int or type(written) is not int or not 0 < n <= _MAX_ROWS or h + n * _ROW != size:
        raise _Corrupt("chunk header does not match its size")
    if not -_OFFSET <= written < _OFFSET:
        raise _Corrupt("chunk written-at time outside int64")
    if type(crc) is not int:
        raise _Corrupt("chunk header without a checksum")
    return h, n, written, crc


#: Memo of a chunk version this process has checked: ``(header bytes, header length, rows,
#: written_at)``. The header bytes hold the format, row count, written-at time and checksum, so a
#: value whose header bytes and size equal the memo's parses to the same fields and carries rows
#: that already matched that checksum.
_Seen = tuple[bytes, int, int, int]


def _chunk_view(val: Any, key: bytes, verified: dict[bytes, _Seen]) -> tuple[int, int, int]:
    """``(header length, rows, written_at)`` of a chunk value, header and checksum checked.

    The rows' checksum is checked the first time this process sees a chunk version (about 3 us
    for a day of 1m candles) and remembered in ``verified`` (key -> :data:`_Seen`), so damage
    written into the file while no process had checked it yet is caught without a checksum on
    every read. A later read of the same version compares the header bytes with the memo (one
    ``memcmp`` of about 24 bytes) instead of unpacking them again: any change to the header
    (another version, or damage) differs from the memo and is parsed and checked in full.
    """
    seen = verified.get(key)
    if seen is not None:
        head, h, n, written = seen
        if len(val) == h + n * _ROW and val[:h] == head:
            return h, n, written
    h, n, written, crc = _chunk_header(val)
    if row_checksum(val, h, n) != crc:
        raise _Corrupt("chunk rows do not match their checksum")
    if len(verified) >= _MAX_VERIFIED:
        verified.clear()
    verified[key] = (bytes(val[:h]), h, n, written)
    return h, n, written


def _chunk_rows(val: Any, key: bytes, verified: dict[bytes, _Seen]) -> tuple[np.ndarray, np.ndarray, int]:
    """Zero-copy ``(raw rows, ts view, written_at)`` of a chunk value (valid while its txn lives),
    checked by :func:`_chunk_view`."""
    h, n, written = _chunk_view(val, key, verified)
    raw = np.frombuffer(val, dtype=CANDLE_RAW, count=n, offset=h)
    ts = np.ndarray((n,), dtype="<i8", buffer=val, offset=h, strides=(_ROW,))
    return raw, ts, written


def _put_chunk(h: _Env, txn: Any, key: bytes, rows: np.ndarray, written_at: int) -> None:
    val, seen = _pack_chunk(rows, written_at)
    txn.put(key, val, db=h.chunks)
    h.verified[key] = seen  # harmless if the txn aborts: the stored header then differs


def _cur_key(cur: Any) -> bytes:
    """The cursor's key, refused before anything else is read when no key of ours is that long.

    A damaged node can claim a key size that pushes LMDB's view of its value outside the map.
    """
    key = cur.key()
    if len(key) > _MAX_KEY:
        raise _Corrupt("key longer than any key this module writes")
    return bytes(key)


def _items(cur: Any) -> Iterator[tuple[bytes, Any]]:
    """``(key, value)`` of every entry, keys checked by :func:`_cur_key` first."""
    ok = cur.first()
    while ok:
        key = _cur_key(cur)
        yield key, cur.value()
        ok = cur.next()


def _pack_held(flat: list[int]) -> bytes:
    return msgpack.packb([FORMAT_VERSION, flat])


def _set_held(h: _Env, txn: Any, prefix: bytes, flat: list[int]) -> None:
    """Store a series' held ranges; an empty set removes the entry."""
    if flat:
        txn.put(prefix, _pack_held(flat), db=h.held)
    else:
        txn.delete(prefix, db=h.held)


def _unpack_held(val: Any) -> list[int]:
    if len(val) > _MAX_HELD_BYTES:  # checked before touching it: a garbage size may reach past the file
        raise _Corrupt("held ranges value too large")
    try:
        obj = msgpack.unpackb(
            val, max_array_len=_MAX_HELD_INTS, max_map_len=0, max_str_len=0, max_bin_len=0, max_ext_len=0
        )
    except (ValueError, TypeError) as exc:
        raise _Corrupt(f"unreadable held ranges: {exc}") from None
    if type(obj) is not list or len(obj) != 2 or obj[0] != FORMAT_VERSION or type(obj[1]) is not list:
        raise _Corrupt("held ranges of another format")
    flat: list[int] = obj[1]
    if len(flat) % 2 or any(type(x) is not int for x in flat):
        raise _Corrupt("held ranges are not pairs of ints")
    if any(a >= b for a, b in itertools.pairwise(flat)):
        raise _Corrupt("held ranges are not sorted and disjoint")
    return flat


# -- interval sets as flat sorted lists [s0, e0, s1, e1, ...] (strictly increasing) ----------------
# Held sets have a handful of ranges; plain lists beat numpy arrays at that size.


def _contains(flat: list[int], start: int, end: int) -> bool:
    i = bisect.bisect_right(flat, start)
    return bool(i & 1) and end <= flat[i]


def _union(flat: list[int], start: int, end: int) -> list[int]:
    if start >= end:
        return flat
    lo = bisect.bisect_left(flat, start)  # ranges ending before start stay (adjacent ones merge)
    hi = bisect.bisect_right(flat, end)
    if lo & 1:
        start = flat[lo - 1]
        lo -= 1
    if hi & 1:
        end = flat[hi]
        hi += 1
    return [*flat[:lo], start, end, *flat[hi:]]


def _subtract(flat: list[int], start: int, end: int) -> list[int]:
    if start >= end:
        return flat
    out: list[int] = []
    for i in range(0, len(flat), 2):
        a, b = flat[i], flat[i + 1]
        if b <= start or a >= end:
            out += (a, b)
            continue
        if a < start:
            out += (a, start)
        if b > end:
            out += (end, b)
    return out


def _intersect(flat: list[int], start: int, end: int) -> list[tuple[int, int]]:
    out = []
    for i in range(0, len(flat), 2):
        a, b = max(flat[i], start), min(flat[i + 1], end)
        if a < b:
            out.append((a, b))
    return out


def _covering(flat: list[int], t: int) -> tuple[int, int] | None:
    """The held range ``[a, b)`` with ``a <= t < b``."""
    i = bisect.bisect_right(flat, t)
    return (flat[i - 1], flat[i]) if i & 1 else None


# -- the shared environment handle -----------------------------------------------------------------


class _Env:
    """One LMDB environment per path and process (LMDB forbids opening it twice in a process).

    Owns the recovery logic: map growth, adopting another process's resize, and recreating a
    damaged environment. Callers hold ``lock`` around every transaction.

    ``readonly``: opened with ``readonly=True`` (a read-only store directory); nothing is created,
    allocated or recreated, and damage makes reads answer "not held".
    """

    _registry: ClassVar[dict[str, _Env]] = {}
    _registry_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, path: str, map_size: int, map_size_cap: int, durable: bool, readonly: bool = False) -> None:
        self.path = path
        self.map_size_cap = map_size_cap
        self.initial_map_size = map_size
        self.durable = durable
        self.readonly = readonly
        self.lock = threading.RLock()
        self.refs = 0
        self.env: lmdb.Environment | None = None
        self.fd = -1
        #: Our descriptor of lock.mdb, kept open while liblmdb has the file open: closing any
        #: descriptor of it would drop this process's fcntl locks on it (LMDB's liveness locks).
        self.lock_fd = -1
        #: Whether liblmdb runs without its lock file (read-only environment it cannot lock).
        self.unlocked = False
        self.warned_damage = False
        self.ident: tuple[int, int] | None = None
        self.psize = 4096
        self.recreated = 0
        self.resizes = 0
        self.verified: dict[bytes, _Seen] = {}
        self.held_cache: dict[bytes, tuple[bytes, list[int]]] = {}
        self.checked_size = -1
        self.chunks: Any = None
        self.held: Any = None
        self.meta: Any = None
        self._open()

    @classmethod
    def acquire(cls, path: str, map_size: int, map_size_cap: int, durable: bool, readonly: bool = False) -> _Env:
        # The path as given: realpath would follow a planted link in its last component.
        check_private_dir(path, create=not readonly)
        key = os.path.realpath(path)
        with cls._registry_lock:
            env = cls._registry.get(key)
            if env is None:
                env = cls(key, map_size, map_size_cap, durable, readonly)
                cls._registry[key] = env
            else:
                env.map_size_cap = max(env.map_size_cap, map_size_cap)
                if env.readonly and not readonly:
                    with env.lock:
                        env.make_writable()
            env.refs += 1
            return env

    def release(self) -> None:
        with self._registry_lock:
            self.refs -= 1
            if self.refs > 0:
                return
            self._registry.pop(self.path, None)
        with self.lock:
            self._close()

    def make_writable(self) -> None:
        """Reopen a read-only environment writable (a writable tier joined it in this process);
        on failure it stays read-only and the error is raised."""
        self._close()
        self.readonly = False
        try:
            self._open()
        except StorageUnavailableError:
            self.readonly = True
            with contextlib.suppress(StorageUnavailableError):
                self._open()
            raise

    # -- open / close / recreate ---------------------------------------------------------------
    def _data_ident(self) -> tuple[int, int] | None:
        try:
            st = os.stat(os.path.join(self.path, _DATA))
        except FileNotFoundError:
            return None
        return (st.st_dev, st.st_ino)

    def _open(self) -> None:
        for attempt in range(3):
            seen = self._data_ident()
            try:
                self._prepare()
                self._open_once()
                return
            except StorageUnavailableError:
                self._close()
                raise
            except (lmdb.Error, _Corrupt, OSError) as exc:
                self._close()
                code = _errno_of(exc)
                if code == errno.EIO and _space_left(self.path) < 2 * _SLACK:
                    code = errno.ENOSPC
                if code in _ENVIRONMENTAL or self.readonly:
                    # A full disk, a read-only or foreign directory is no damage: keep the files.
                    hint = (
                        "free disk space, then retry"
                        if code in (errno.ENOSPC, errno.EDQUOT)
                        else "check the directory's permissions and device (it is a cache: removing "
                        "it is safe, SQLite refills it)"
                    )
                    err = StorageUnavailableError(f"cannot open the LMDB disk tier at {self.path}: {exc}; {hint}")
                    err.errno = code
                    raise err from exc
                if attempt == 2:
                    raise StorageUnavailableError(
                        f"cannot open the LMDB disk tier at {self.path}: {exc}; remove the directory "
                        "(it is a cache, SQLite refills it) or check permissions and free space"
                    ) from exc
                log.warning("LMDB disk tier at %s unusable (%s); recreating it empty", self.path, exc)
                self._remove_files(seen)

    def _prepare(self) -> None:
        """Refuse planted links and foreign files, then give the lock file its blocks."""
        writable = check_private_dir(self.path, create=not self.readonly)
        check_entries(self.path, _ENTRIES, writable=writable)
        path = os.path.join(self.path, _LOCK)
        try:
            fd = open_private(path, os.O_RDWR | os.O_CREAT)
        except StorageUnavailableError:
            raise
        except OSError as exc:
            if self.readonly and exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT):
                return  # liblmdb cannot write it either: it runs without it (see _open_once)
            raise storage_error("cannot create the LMDB lock file", path, exc) from exc
        self.lock_fd = fd
        try:
            # Never changes the size of a lock file that has one: liblmdb sizes its reader table
            # by it, and every process must map the same size.
            allocate(fd, os.fstat(fd).st_size or _LOCK_SIZE)
        except OSError as exc:
            raise storage_error("cannot allocate the LMDB lock file", path, exc) from exc

    def _lmdb_open(self, **kw: Any) -> lmdb.Environment:
        return lmdb.open(
            self.path,
            map_size=self.initial_map_size,
            subdir=True,
            mode=0o600,
            max_dbs=4,
            max_readers=_MAX_READERS,
            # A cache of SQLite: no fsync by default. A killed process loses nothing (the page
            # cache keeps the writes); after a power loss the Store rebuilds the tier.
            sync=self.durable,
            metasync=self.durable,
            readahead=False,
            # Not writemap, although it makes bulk loads faster: with it LMDB ftruncates the
            # file to each opener's map size, so a process opening with a smaller map would
            # shrink the file under another process that grew it (SIGBUS in that writer).
            # A cross-process lock around every open and resize could prevent that, but not
            # the second hazard: writemap extends the file sparsely and writes through the
            # map, so a full disk (or quota) faults the writer with SIGBUS where pwrite()
            # returns ENOSPC, which the tier turns into "degraded" (issue 5: never fail the
            # caller). Bulk load measured 70-80 ms with writemap vs 145-160 ms without.
            writemap=False,
            max_spare_txns=2,
            **kw,
        )

    def _open_once(self) -> None:
        if self.readonly:
            self.unlocked = False
            try:
                # On a read-only file system liblmdb itself skips the lock file (EROFS).
                env = self._lmdb_open(readonly=True, lock=True, create=False)
            except lmdb.Error as exc:
                if _errno_of(exc) not in (errno.EACCES, errno.EPERM):
                    raise
                # The lock file cannot be written (a directory we may not write in). Without it
                # a writer in another process may reuse pages a read still walks: what such a
                # read meets is damage, caught by the checks and answered as "not held".
                log.info("LMDB disk tier at %s: lock file not writable, reading without it", self.path)
                env = self._lmdb_open(readonly=True, lock=False, create=False)
                self.unlocked = True
        else:
            env = self._lmdb_open(lock=True)
        self.env = env
        if self.lock_fd >= 0:
            # liblmdb extends a lock file shorter than its own size (another build's struct
            # sizes) sparsely: allocate that tail before any reader slot in it is touched.
            allocate(self.lock_fd, os.fstat(self.lock_fd).st_size)
        self.fd = open_private(os.path.join(self.path, _DATA), os.O_RDONLY if self.readonly else os.O_RDWR)
        st = os.fstat(self.fd)
        self.ident = (st.st_dev, st.st_ino)
        info = env.info()
        if info["map_size"] < self.initial_map_size and not self.readonly:
            env.set_mapsize(self.initial_map_size)
        self.psize = psize = env.stat()["psize"]
        need = (info["last_pgno"] + 1) * psize
        if st.st_size < need:
            raise _Corrupt(f"data file truncated ({st.st_size} bytes, committed pages need {need})")
        env.reader_check()  # reader slots left behind by killed processes
        if self.readonly:
            self._open_dbs_readonly(env)
        else:
            self.ensure_slack()
            self._open_dbs(env)
        self.verified = {}
        self.held_cache = {}
        self.checked_size = -1
        self.warned_damage = False

    def _open_dbs(self, env: lmdb.Environment) -> None:
        with env.begin(write=True) as txn:
            self.meta = env.open_db(b"meta", txn=txn)
            self.chunks = env.open_db(b"chunks", txn=txn)
            self.held = env.open_db(b"held", txn=txn)
            raw = txn.get(b"format", db=self.meta)
            version = None
            if raw is not None:
                with contextlib.suppress(ValueError, TypeError):
                    version = msgpack.unpackb(raw, max_array_len=0, max_map_len=0, max_str_len=0, max_bin_len=0)
            if version != FORMAT_VERSION:
                if raw is not None:
                    log.warning("LMDB disk tier at %s has format %r, clearing it", self.path, version)
                txn.drop(self.chunks, delete=False)
                txn.drop(self.held, delete=False)
                txn.put(b"format", msgpack.packb(FORMAT_VERSION), db=self.meta)

    def _open_dbs_readonly(self, env: lmdb.Environment) -> None:
        """Open the named databases without creating them; one that is missing, or another
        format, cannot be cleared here: the tier is then unusable (StorageUnavailableError)."""
        try:
            # Without txn=: py-lmdb then commits the handles; one opened in a caller's read
            # transaction is dropped with it.
            self.meta = env.open_db(b"meta", create=False)
            self.chunks = env.open_db(b"chunks", create=False)
            self.held = env.open_db(b"held", create=False)
        except lmdb.NotFoundError:
            raise StorageUnavailableError(
                f"the LMDB disk tier at {self.path} is empty and read-only; reads go to SQLite"
            ) from None
        with env.begin() as txn:
            raw = txn.get(b"format", db=self.meta)
        version = None
        if raw is not None:
            with contextlib.suppress(ValueError, TypeError):
                version = msgpack.unpackb(raw, max_array_len=0, max_map_len=0, max_str_len=0, max_bin_len=0)
        if version != FORMAT_VERSION:
            raise StorageUnavailableError(
                f"the LMDB disk tier at {self.path} has format {version!r} (not {FORMAT_VERSION}) and is "
                "read-only; reads go to SQLite"
            )

    def _close(self) -> None:
        if self.env is not None:
            with contextlib.suppress(lmdb.Error):
                self.env.close()
            self.env = None
        for name in ("fd", "lock_fd"):  # after env.close(): see lock_fd
            fd = getattr(self, name)
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
                setattr(self, name, -1)
        self.ident = None

    def _remove_files(self, expected: tuple[int, int] | None) -> None:
        """Delete data and lock file, unless another process already replaced the data file."""
        check_private_dir(self.path, create=True)
        lock_path = os.path.join(self.path, _RECREATE_LOCK)
        try:
            fd = open_private(lock_path, os.O_RDWR | os.O_CREAT)
        except StorageUnavailableError:
            raise
        except OSError as exc:
            raise storage_error("cannot create", lock_path, exc) from exc
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            if self._data_ident() != expected:
                return  # somebody recreated it meanwhile: use theirs
            for name in (_DATA, _LOCK):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.path, name))
        finally:
            os.close(fd)

    def recreate(self, reason: str) -> None:
        """Replace a damaged environment by an empty one (the Store refills it lazily).

        Read-only: nothing can be replaced; the damage is logged once and reads of it answer
        "not held" (the Store asks SQLite).
        """
        if self.readonly:
            if not self.warned_damage:
                log.warning("LMDB disk tier at %s is damaged (%s) and read-only: not repaired", self.path, reason)
                self.warned_damage = True
            return
        log.warning("LMDB disk tier at %s is damaged (%s); recreating it empty", self.path, reason)
        ident = self.ident
        self._close()
        self._remove_files(ident)
        self.recreated += 1
        self._open()

    def reopen(self) -> None:
        """Follow the data file to a new inode (deleted or replaced by another process)."""
        self._close()
        if self._data_ident() is not None:
            log.info("LMDB disk tier at %s was replaced; reopening", self.path)
        elif not self.readonly:
            log.warning("LMDB disk tier at %s was deleted; recreating it empty", self.path)
            self.recreated += 1
        self._open()

    def ensure_open(self) -> lmdb.Environment:
        if self.env is None:
            self._open()
        assert self.env is not None
        return self.env

    def check_file(self, links: int | None = None, size: int = -1) -> None:
        """Check, inside a transaction, that the mapped data file can back it.

        ``links, size``: the descriptor's :func:`file_state`, when the caller read it already
        (readers do, and call this only when the link count is 0 or the size changed).

        Called after the transaction began, so every page it can reach was written before the
        ``fstat`` (LMDB writes pages before the meta page that references them). A truncated
        file would fault on access (SIGBUS) and a deleted one hides other processes' writes;
        both are caught here, before any read. Costs one ``fstat`` (about 0.3 us) while the size is
        unchanged.
        A file truncated after this check, during the read itself, can still fault: LMDB
        offers no protection against that and neither does this module.
        """
        if links is None:
            try:
                links, size = file_state(self.fd)
            except OSError as exc:
                raise _Gone(str(exc)) from None
        if links == 0:
            raise _Gone("data file deleted")
        if size == self.checked_size:
            return  # pages are written before the file grows past them; only truncation shrinks it
        need = (self.env.info()["last_pgno"] + 1) * self.psize  # type: ignore[union-attr]
        if size < need:
            raise _Corrupt(f"data file truncated to {size} bytes, committed pages need {need}")
        self.checked_size = size

    def ensure_slack(self) -> None:
        """Keep ``_SLACK`` allocated bytes past the last committed page (never shrinks the file)."""
        if self.readonly or not hasattr(os, "posix_fallocate"):
            return
        assert self.env is not None
        want = (self.env.info()["last_pgno"] + 1) * self.psize + _SLACK
        size = os.fstat(self.fd).st_size
        if size < want:
            try:
                os.posix_fallocate(self.fd, size, want - size)
            except OSError as exc:  # full disk, unsupported file system: only the guard is lost
                log.debug("LMDB disk tier: cannot extend %s: %s", self.path, exc)

    # -- map size ------------------------------------------------------------------------------
    def adopt_resize(self) -> None:
        """Another process grew the map: take its size (LMDB's MDB_MAP_RESIZED)."""
        assert self.env is not None
        self.env.set_mapsize(0)

    def grow(self, needed: int) -> bool:
        """Grow the map for a write of about ``needed`` bytes; False when the cap is reached."""
        assert self.env is not None
        current = self.env.info()["map_size"]
        if current >= self.map_size_cap:
            return False
        new = min(self.map_size_cap, max(current * 2, current + 2 * needed))
        new = (new + _MiB - 1) // _MiB * _MiB
        log.info("LMDB disk tier at %s: map %d -> %d bytes", self.path, current, new)
        self.env.set_mapsize(new)
        self.resizes += 1
        return True


# -- the tier -------------------------------------------------------------------------------------


class LmdbTier:
    """Recent candles per series in LMDB, shared by every process that opens the same path.

    Parameters
    ----------
    path : str or os.PathLike
        Directory of the environment; created with mode 0700 when missing.
    retention_ms : int
        Only candles newer than ``clock() - retention_ms`` are stored and answered (31 days).
    ttl_ms : int
        A chunk written more than ``ttl_ms`` ago is stale (1 day): a read refreshes it through
        ``loader``, ``purge_expired`` removes it.
    map_size : int
        Initial map size in bytes; the map grows by itself (doubling) when a write needs more.
    map_size_cap : int
        The map never grows past this; a write that needs more raises
        :class:`~mds.errors.StorageUnavailableError` and the tier reports itself degraded.
    clock : callable, optional
        Returns epoch ms; the wall clock by default.
    loader : callable, optional
        ``loader(symbol, tf, start, end)`` returns exactly all durable (SQLite) candles in
        ``[start, end)``; used to refresh stale chunks on read. Without one, stale chunks count
        as not held.
    durable : bool
        ``fsync`` each commit. Off by default: the tier is a cache of SQLite; a killed process
        loses nothing, a power loss may leave a damaged file that is detected and rebuilt.
    readonly : bool
        Open an existing environment read-only (a read-only store directory or file system):
        reads work, every write (``put_range``, ``delete``, ``purge_expired``, ``clear``) raises
        :class:`~mds.errors.StorageUnavailableError` and changes nothing, stale chunks count as
        not held, damage is not repaired (reads of it answer None). A missing or empty
        environment raises :class:`~mds.errors.StorageUnavailableError` at open. Where LMDB's
        lock file cannot be written either, reads run without it (see Notes).

    Raises
    ------
    StorageUnavailableError
        At open: the directory or one of its files is a symbolic link or belongs to another
        user, the disk is full, the directory cannot be written (and ``readonly`` is False), or
        the environment is unusable. Nothing was written through a link; a full disk or a
        permission problem never deletes the files.

    Notes
    -----
    Every file LMDB maps is allocated before it is mapped (the lock file is created here with
    its blocks; the data file is written with ``pwrite``, not through the map), so a full disk
    is an error, never a ``SIGBUS``. A read-only tier without a writable lock file registers no
    reader slot: a writer in another process may then reuse pages a read is walking; what the
    read meets is damage, detected and answered as None (not held), never served.

    Thread-safe (one lock per environment and process). Readers in other processes see only
    committed writes. A damaged environment (corrupt, truncated or deleted files) is detected
    at open and on access and recreated empty: reads then answer None (not held) until the
    Store refills the tier. Everything read from disk is parsed with size limits; nothing is
    unpickled or evaluated.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        retention_ms: int = 31 * DAY_MS,
        ttl_ms: int = DAY_MS,
        map_size: int = 64 * _MiB,
        map_size_cap: int = 8 << 30,
        clock: Callable[[], int] | None = None,
        loader: Loader | None = None,
        durable: bool = False,
        readonly: bool = False,
    ) -> None:
        self.path = os.fspath(path)
        self.readonly = bool(readonly)
        self.retention_ms = int(retention_ms)
        self.ttl_ms = int(ttl_ms)
        self.clock: Callable[[], int] = clock or now_ms
        self.loader = loader
        #: ``version(symbol, tf)``: a value that changes whenever the series is written to SQLite
        #: (the Store's change stamp). A refresh through ``loader`` is kept only if it did not change.
        self.version: Callable[[str, Timeframe], object] | None = None
        self.degraded = False
        self.degraded_reason: str | None = None
        self._counts = {"hits": 0, "misses": 0, "refreshed_chunks": 0, "errors": 0}
        self._specs: dict[tuple[str, str], tuple[bytes, int, int]] = {}
        cap = max(int(map_size_cap), _MiB)
        map_size = min(max(int(map_size), _MiB), cap)
        self._env: _Env | None = _Env.acquire(self.path, map_size, cap, durable, self.readonly)

    # -- plumbing ---------------------------------------------------------------------------------
    def _handle(self) -> _Env:
        if self._env is None:
            raise StorageUnavailableError("the LMDB disk tier is closed")
        return self._env

    def _prefix(self, symbol: str, tf: Timeframe) -> bytes:
        return (self._specs.get((symbol, tf.name)) or self._spec(symbol, tf))[0]

    def _spec(self, symbol: str, tf: Timeframe) -> tuple[bytes, int, int]:
        """``(key prefix, chunk period, row interval or 0 for months)`` of a series, cached."""
        spec = (f"{symbol}\x1f{tf.name}\x1f".encode(), CHUNK_PERIOD_MS[tf.name], 0 if tf.is_month else tf.interval_ms)
        self._specs[(symbol, tf.name)] = spec
        return spec

    @staticmethod
    def _period(tf: Timeframe) -> int:
        return CHUNK_PERIOD_MS[tf.name]

    @contextlib.contextmanager
    def _reading(self) -> Iterator[tuple[_Env, Any]]:
        """A read transaction (buffers=True) on a checked environment, recovering from damage.

        Yields inside the handle lock.
        """
        h = self._handle()
        with h.lock:
            env = h.ensure_open()
            try:
                txn = env.begin(buffers=True)
            except lmdb.MapResizedError:
                h.adopt_resize()
                txn = env.begin(buffers=True)
            try:
                h.check_file()
                yield h, txn
            finally:
                txn.abort()

    def _read(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(handle, txn, *args)`` in a read transaction; damage is repaired and means None.

        The same steps as :meth:`_reading`, written out: the generator-based context manager
        costs about 1 us, a quarter of a 1,000-candle read.
        """
        h = self._env
        if h is None:
            raise StorageUnavailableError("the LMDB disk tier is closed")
        try:
            with h.lock:
                env = h.env if h.env is not None else h.ensure_open()
                try:
                    txn = env.begin(buffers=True)
                except lmdb.MapResizedError:
                    h.adopt_resize()
                    txn = env.begin(buffers=True)
                try:
                    try:  # check_file's common case, inlined
                        links, size = file_state(h.fd)
                    except OSError as exc:
                        raise _Gone(str(exc)) from None
                    if not links or size != h.checked_size:
                        h.check_file(links, size)
                    return fn(h, txn, *args)
                finally:
                    txn.abort()
        except (_Corrupt, *_CORRUPTION) as exc:
            self._counts["errors"] += 1
            with h.lock:
                h.recreate(str(exc) or type(exc).__name__)
            return None
        except _Gone:
            with h.lock:
                h.reopen()
            return None
        except lmdb.Error as exc:  # readers full, I/O error ...: not held, the Store goes on
            self._counts["errors"] += 1
            log.warning("LMDB disk tier read failed: %s", exc)
            return None

    def _write(self, fn: Callable[[_Env, Any], Any], needed: int = 0) -> Any:
        """Run ``fn(handle, txn)`` in a write transaction, growing the map when it is full."""
        h = self._handle()
        if self.readonly:
            raise StorageUnavailableError(f"the LMDB disk tier at {self.path} is open read-only; nothing was written")
        with h.lock:
            for _ in range(64):
                env = h.ensure_open()
                try:
                    with env.begin(write=True) as txn:
                        h.check_file()
                        result = fn(h, txn)
                except lmdb.MapResizedError:
                    h.adopt_resize()
                    continue
                except lmdb.MapFullError:
                    if h.grow(needed):
                        continue
                    self._degrade(f"LMDB map is full at its cap of {h.map_size_cap} bytes")
                    raise StorageUnavailableError(
                        f"the LMDB disk tier at {self.path} is full (map_size_cap={h.map_size_cap} bytes); "
                        "raise the cap or lower the retention; reads keep working"
                    ) from None
                except (_Corrupt, *_CORRUPTION) as exc:
                    self._counts["errors"] += 1
                    h.recreate(str(exc) or type(exc).__name__)
                    continue
                except _Gone:
                    h.reopen()
                    continue
                except lmdb.Error as exc:
                    # A full disk is ENOSPC from pwrite() here (no writemap: nothing is written
                    # through the map), never a SIGBUS; the failed commit changed nothing.
                    self._degrade(str(exc))
                    code = _errno_of(exc)
                    if code == errno.EIO and _space_left(self.path) < needed + _SLACK:
                        code = errno.ENOSPC  # liblmdb reports a short pwrite() (disk full) as EIO
                    full = code in (errno.ENOSPC, errno.EDQUOT)
                    hint = "free disk space; reads keep working" if full else "check the store directory"
                    err = StorageUnavailableError(f"LMDB disk tier write failed: {exc}; {hint}")
                    err.errno = code
                    raise err from exc
                except OSError as exc:
                    if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EIO):
                        raise
                    self._degrade(str(exc))
                    raise storage_error("LMDB disk tier write failed at", self.path, exc) from exc
                h.ensure_slack()
                self.degraded = False
                self.degraded_reason = None
                return result
            raise StorageUnavailableError("LMDB disk tier: write kept failing after repeated map resizes")

    def _degrade(self, reason: str) -> None:
        if not self.degraded:
            log.warning("LMDB disk tier degraded: %s", reason)
        self.degraded = True
        self.degraded_reason = reason

    def _cutoff(self, now: int) -> int:
        return now - self.retention_ms

    # -- reads ------------------------------------------------------------------------------------
    def get_range(self, symbol: str, tf: Timeframe, start: int, end: int) -> np.ndarray | None:
        """The candles in ``[start, end)`` if the tier holds that whole range, else None.

        Parameters
        ----------
        symbol : str
            Canonical market code.
        tf : Timeframe
            Canonical timeframe.
        start, end : int
            Half-open range, epoch ms.

        Returns
        -------
        numpy.ndarray or None
            A new read-only CANDLE_DTYPE array (ascending ``ts``, possibly empty: a held range
            without trades), or None when part of the range is not held, older than the
            retention window, stale and not refreshable, or the environment was damaged.
        """
        start, end = int(start), int(end)
        if end <= start:
            return np.empty(0, CANDLE_DTYPE)
        now = self.clock()
        if start < now - self.retention_ms:
            self._counts["misses"] += 1
            return None
        prefix, period, step = self._specs.get((symbol, tf.name)) or self._spec(symbol, tf)
        stale_before = now - self.ttl_ms
        h = self._env
        res: Any = _NOT_READ
        if h is not None and h.env is not None:
            # _read's common case written out: a third of a read's cost went to Python frames.
            # Anything unusual (damage, a resized map, a replaced file) raises and takes _read.
            try:
                with h.lock:
                    txn = h.env.begin(None, None, False, True)  # buffers=True; keywords cost a dict a call
                    try:
                        links, size = file_state(h.fd)  # an OSError takes _read, which says "gone"
                        if not links or size != h.checked_size:
                            h.check_file(links, size)
                        res = _range_in(h, txn, prefix, period, step, start, end, stale_before)
                    finally:
                        txn.abort()
            except Exception:  # the general path below repairs and reports it
                res = _NOT_READ
        if type(res) is np.ndarray:
            self._counts["hits"] += 1
            return res
        args = (prefix, period, step, start, end, stale_before)
        return self._read_fresh(symbol, tf, _range_in, args, res)

    def _read_fresh(
        self,
        symbol: str,
        tf: Timeframe,
        walk: Callable[..., np.ndarray | list[int] | None],
        args: tuple[Any, ...],
        first: Any = _NOT_READ,
    ) -> np.ndarray | None:
        """Run a read walk ``walk(h, txn, *args)`` (unless ``first`` is its result already); when it
        names stale periods, refresh them from the loader and walk once more. Counts the hit or
        miss."""
        for attempt in range(2):
            res = first if attempt == 0 and first is not _NOT_READ else self._read(walk, *args)
            if res is None or type(res) is np.ndarray:
                break
            if not self._refresh(symbol, tf, res):  # a list of stale periods
                res = None
                break
        else:
            res = None
        if res is None:
            self._counts["misses"] += 1
            return None
        self._counts["hits"] += 1
        return res

    def get_latest(self, symbol: str, tf: Timeframe, n: int, end: int) -> np.ndarray | None:
        """The latest ``n`` candles before ``end``, if the held ranges prove they are the latest.

        Returns the rows only when the held range that reaches ``end`` contains at least ``n``
        candles (within the retention window); otherwise None (the Store asks SQLite, which
        knows the whole history). ``n <= 0`` gives an empty array.
        """
        n, end = int(n), int(end)
        if n <= 0:
            return np.empty(0, CANDLE_DTYPE)
        now = self.clock()
        spec = self._specs.get((symbol, tf.name)) or self._spec(symbol, tf)
        return self._read_fresh(symbol, tf, _latest_in, (*spec, n, end, self._cutoff(now), now - self.ttl_ms))

    def _refresh(self, symbol: str, tf: Timeframe, periods: list[int]) -> bool:
        """Reload stale chunks from the loader; False when there is no loader or it failed."""
        if self.loader is None:
            return False
        prefix = self._prefix(symbol, tf)
        period = self._period(tf)
        now = self.clock()
        cutoff = self._cutoff(now)
        held = self._read(lambda h, txn: _held_of(h, txn, prefix))
        if held is None:
            return False
        fresh: dict[int, np.ndarray] = {}
        token = self.version(symbol, tf) if self.version is not None else None
        try:
            for p in periods:
                pieces = [self._load(symbol, tf, a, b) for a, b in _intersect(held, max(p, cutoff), p + period)]
                fresh[p] = np.concatenate(pieces) if pieces else np.empty(0, CANDLE_DTYPE)
        except StorageUnavailableError as exc:
            log.warning("LMDB disk tier: refresh of %s %s failed: %s", symbol, tf.name, exc)
            return False

        def apply(h: _Env, txn: Any) -> None:
            if self.version is not None and self.version(symbol, tf) != token:
                raise _Refused  # the series was written since it was loaded: do not keep that copy
            for p, rows in fresh.items():
                key = prefix + _KEY.pack(p + _OFFSET)
                if len(rows):
                    _put_chunk(h, txn, key, rows, now)
                else:
                    txn.delete(key, db=h.chunks)

        try:
            self._write(apply, needed=sum(r.nbytes for r in fresh.values()))
        except (StorageUnavailableError, _Refused):
            return False
        self._counts["refreshed_chunks"] += len(fresh)
        return True

    def _load(self, symbol: str, tf: Timeframe, a: int, b: int) -> np.ndarray:
        assert self.loader is not None
        rows = np.asarray(self.loader(symbol, tf, a, b))
        if rows.dtype != CANDLE_DTYPE:
            raise TypeError(f"loader returned {rows.dtype}, expected CANDLE_DTYPE")
        ts = rows["ts"]
        return np.ascontiguousarray(rows[int(ts.searchsorted(a)) : int(ts.searchsorted(b))])

    def held(self, symbol: str, tf: Timeframe) -> np.ndarray:
        """The ranges the tier holds in full, ``int64[k, 2]`` half-open, clipped to retention.

        Staleness is not considered (a stale chunk's range is still listed).
        """
        flat = self._read(lambda h, txn: _held_of(h, txn, self._prefix(symbol, tf)))
        flat = _subtract(flat or [], -(1 << 62), self._cutoff(self.clock()))
        return np.asarray(flat, dtype=np.int64).reshape(-1, 2)

    # -- writes -----------------------------------------------------------------------------------
    def put_range(
        self,
        symbol: str,
        tf: Timeframe,
        start: int,
        end: int,
        candles: np.ndarray,
        guard: Callable[[], bool] | None = None,
    ) -> int:
        """Store ``candles`` as exactly all candles of the series in ``[start, end)``.

        What the tier held in that range is replaced, and the range is marked held, in one
        transaction. The part older than the retention window is neither stored nor held.

        Parameters
        ----------
        symbol, tf
            Canonical series.
        start, end : int
            Half-open range, epoch ms.
        candles : numpy.ndarray
            CANDLE_DTYPE, sorted by ``ts``, unique, closed candles; rows outside the range are
            ignored.
        guard : callable, optional
            Called inside the write transaction (which excludes every other LMDB writer); when it
            returns False nothing is written. A reader process filling the tier from SQLite uses
            it to check that no write to the series began since it read.

        Returns
        -------
        int
            Number of candles stored (0 when the guard refused).

        Raises
        ------
        StorageUnavailableError
            The map is full at its cap or the disk failed; the tier is then degraded (reads
            keep working, the write changed nothing).
        """
        start, end = int(start), int(end)
        if candles.dtype != CANDLE_DTYPE:
            raise TypeError(f"candles must be CANDLE_DTYPE, got {candles.dtype}")
        now = self.clock()
        cutoff = self._cutoff(now)
        start = max(start, cutoff)
        if end <= start:
            return 0
        ts = candles["ts"]
        rows = np.ascontiguousarray(candles[int(ts.searchsorted(start)) : int(ts.searchsorted(end))])
        prefix = self._prefix(symbol, tf)
        period = self._period(tf)

        def apply(h: _Env, txn: Any) -> None:
            if guard is not None and not guard():
                raise _Refused
            _replace(h, txn, prefix, period, start, end, rows, now)
            flat = _held_of(h, txn, prefix)
            flat = _subtract(_union(flat, start, end), -(1 << 62), cutoff)
            txn.put(prefix, _pack_held(flat), db=h.held)

        try:
            self._write(apply, needed=rows.nbytes + 4096)
        except _Refused:
            return 0
        return len(rows)

    def delete(self, symbol: str, tf: Timeframe, start: int | None = None, end: int | None = None) -> int:
        """Remove the series' candles in ``[start, end)`` (None: unbounded) and stop holding it.

        Returns the number of candles removed.
        """
        lo = -(1 << 62) if start is None else int(start)
        hi = (1 << 62) if end is None else int(end)
        if hi <= lo:
            return 0
        prefix = self._prefix(symbol, tf)
        period = self._period(tf)

        def apply(h: _Env, txn: Any) -> int:
            removed = _replace(h, txn, prefix, period, lo, hi, np.empty(0, CANDLE_DTYPE), self.clock())
            _set_held(h, txn, prefix, _subtract(_held_of(h, txn, prefix), lo, hi))
            return removed

        return int(self._write(apply))

    def purge_expired(self) -> int:
        """Remove chunks past their TTL or older than the retention window.

        Their ranges stop being held; held ranges older than the window are dropped too.
        Returns the number of chunks removed (the Store reports it as ``disk_entries_purged``).
        """
        now = self.clock()
        cutoff = self._cutoff(now)
        stale_before = now - self.ttl_ms

        def apply(h: _Env, txn: Any) -> int:
            drop: dict[bytes, list[tuple[int, int]]] = {}
            cur = txn.cursor(db=h.chunks)
            removed = 0
            ok = cur.first()
            while ok:
                key = _cur_key(cur)
                prefix, p = key[:-8], _KEY.unpack_from(key, len(key) - 8)[0] - _OFFSET
                tf_name = prefix[:-1].rsplit(b"\x1f", 1)[-1].decode("ascii", "replace")
                period = CHUNK_PERIOD_MS.get(tf_name)
                try:
                    written = _chunk_header(cur.value())[2]
                    bad = period is None
                except _Corrupt:
                    written, bad = 0, True
                if bad or written < stale_before or (period is not None and p + period <= cutoff):
                    drop.setdefault(prefix, []).append((p, p + (period or 1)))
                    removed += 1
                    ok = cur.delete() and bool(cur.key())  # False past the last key
                    continue
                if p < cutoff:  # the chunk the window boundary cuts: keep chunk rows inside held
                    raw, ts, _ = _chunk_rows(cur.value(), key, h.verified)
                    rows = raw[int(ts.searchsorted(cutoff)) :].view(CANDLE_DTYPE)
                    if not len(rows):
                        removed += 1
                        ok = cur.delete() and bool(cur.key())
                        continue
                    val, seen = _pack_chunk(rows, written)
                    cur.put(key, val)
                    h.verified[key] = seen
                ok = cur.next()
            updates: list[tuple[bytes, list[int]]] = []
            for key, val in _items(txn.cursor(db=h.held)):
                try:
                    flat = _unpack_held(val)
                except _Corrupt:
                    updates.append((key, []))
                    continue
                new = _subtract(flat, -(1 << 62), cutoff)
                for a, b in drop.get(key, ()):
                    new = _subtract(new, a, b)
                if new != flat:
                    updates.append((key, new))
            for key, new in updates:
                _set_held(h, txn, key, new)
            return removed

        return int(self._write(apply))

    def clear(self) -> None:
        """Remove every chunk and held range (the environment stays)."""

        def apply(h: _Env, txn: Any) -> None:
            txn.drop(h.chunks, delete=False)
            txn.drop(h.held, delete=False)

        self._write(apply)

    # -- inspection -------------------------------------------------------------------------------
    def series(self) -> list[tuple[str, str]]:
        """Every ``(symbol, timeframe name)`` the tier holds a range of, sorted.

        Raises
        ------
        StorageUnavailableError
            The environment cannot be read.
        """

        def walk(h: _Env, txn: Any) -> list[tuple[str, str]]:
            out = []
            for k, _ in _items(txn.cursor(db=h.held)):
                sym, _, tfname = k[:-1].decode("ascii", "replace").partition("\x1f")
                out.append((sym, tfname))
            return sorted(out)

        try:
            with self._reading() as (h, txn):
                return walk(h, txn)
        except (lmdb.Error, _Corrupt) as exc:
            raise StorageUnavailableError(f"LMDB tier {self.path}: cannot list its series: {exc}") from exc

    def check(self) -> list[str]:
        """Walk every chunk and held set; a list of problems (empty when consistent).

        Checks headers and sizes, that rows are sorted and unique, lie in their chunk's period
        and inside a held range. Read-only: it repairs nothing (``clear`` or ``delete`` do).
        """

        cutoff = self._cutoff(self.clock())

        def walk(h: _Env, txn: Any) -> list[str]:
            problems: list[str] = []
            helds: dict[bytes, list[int]] = {}
            for k, val in _items(txn.cursor(db=h.held)):
                try:
                    helds[k] = _unpack_held(val)
                except _Corrupt as exc:
                    problems.append(f"held {k!r}: {exc}")
            for k, val in _items(txn.cursor(db=h.chunks)):
                prefix, p = k[:-8], _KEY.unpack_from(k, len(k) - 8)[0] - _OFFSET
                series_name = prefix[:-1].replace(_SEP, b" ").decode("ascii", "replace")
                name = f"chunk {series_name}@{p}"
                period = CHUNK_PERIOD_MS.get(prefix[:-1].rsplit(b"\x1f", 1)[-1].decode("ascii", "replace"))
                if period is None or p % period:
                    problems.append(f"{name}: key does not name a chunk period")
                    continue
                try:
                    _, ts, _ = _chunk_rows(val, k, {})
                except _Corrupt as exc:
                    problems.append(f"{name}: {exc}")
                    continue
                if len(ts) > 1 and not bool(np.all(ts[1:] > ts[:-1])):
                    problems.append(f"{name}: rows not sorted and unique")
                if ts[0] < p or ts[-1] >= p + period:
                    problems.append(f"{name}: rows outside the chunk period")
                flat = helds.get(prefix, [])
                # Rows older than the retention window may stay in a chunk whose held range was
                # trimmed (purge_expired drops them); they are never served, so they are no problem.
                live = ts[ts >= cutoff]
                outside = len(live) and not _contains(flat, int(live[0]), int(live[-1]) + 1)
                if outside and not all(_covering(flat, int(t)) for t in live):
                    problems.append(f"{name}: rows outside the held ranges")
            return problems

        try:
            with self._reading() as (h, txn):
                return walk(h, txn)
        except lmdb.Error as exc:
            return [f"LMDB environment unreadable: {exc}"]
        except _Corrupt as exc:
            return [f"LMDB environment damaged: {exc}"]

    def stats(self) -> dict[str, Any]:
        """JSON-serialisable figures: entries, bytes, map size, degraded flag and counters."""
        h = self._handle()
        out: dict[str, Any] = {"path": self.path, "degraded": self.degraded, "degraded_reason": self.degraded_reason}
        out.update(self._counts)
        try:
            with self._reading() as (h, txn):
                st = txn.stat(h.chunks)
                info = h.env.info()  # type: ignore[union-attr]
                psize = h.env.stat()["psize"]  # type: ignore[union-attr]
                out["entries"] = st["entries"]
                out["series"] = txn.stat(h.held)["entries"]
                out["bytes"] = (info["last_pgno"] + 1) * psize
                out["map_size"] = info["map_size"]
        except lmdb.Error as exc:
            out.update(entries=0, series=0, bytes=0, map_size=0, error=str(exc))
        out["map_size_cap"] = h.map_size_cap
        out["map_resizes"] = h.resizes
        out["recreated"] = h.recreated
        return out

    def close(self) -> None:
        """Release the environment (files stay); further calls raise StorageUnavailableError."""
        env, self._env = self._env, None
        if env is not None:
            env.release()

    def __enter__(self) -> LmdbTier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _range_in(
    h: _Env, txn: Any, prefix: bytes, period: int, step: int, start: int, end: int, stale_before: int
) -> np.ndarray | list[int] | None:
    """The read walk of :meth:`LmdbTier.get_range` (see :func:`walk_chunks` for the result)."""
    hv = txn.get(prefix, None, h.held)  # db=h.held (positional: no keyword dict)
    if hv is None or not _contains(_held_parsed(h, prefix, hv), start, end):
        return None
    return walk_chunks(
        txn.cursor(h.chunks), prefix, period, start, end, -1, step, stale_before, h.verified, _chunk_view
    )


def _latest_in(
    h: _Env, txn: Any, prefix: bytes, period: int, step: int, n: int, end: int, cutoff: int, stale_before: int
) -> np.ndarray | list[int] | None:
    """The read walk of :meth:`LmdbTier.get_latest` (see :func:`walk_chunks` for the result)."""
    hv = txn.get(prefix, db=h.held)
    if hv is None:
        return None
    rng = _covering(_held_parsed(h, prefix, hv), end - 1)
    if rng is None:
        return None
    lower = max(rng[0], cutoff)
    if lower >= end:
        return None
    return walk_chunks(
        txn.cursor(db=h.chunks), prefix, period, lower, end, n, step, stale_before, h.verified, _chunk_view
    )


def _held_parsed(h: _Env, prefix: bytes, hv: Any) -> list[int]:
    """``_unpack_held`` with a per-process cache keyed by the value's bytes (callers never mutate)."""
    if len(hv) > _MAX_HELD_BYTES:
        raise _Corrupt("held ranges value too large")
    hit = h.held_cache.get(prefix)
    if hit is not None and hv == hit[0]:  # compares the bytes in place (no copy)
        return hit[1]
    raw = bytes(hv)
    flat = _unpack_held(raw)
    if len(h.held_cache) >= _MAX_VERIFIED:
        h.held_cache.clear()
    h.held_cache[prefix] = (raw, flat)
    return flat


def _held_of(h: _Env, txn: Any, prefix: bytes) -> list[int]:
    hv = txn.get(prefix, db=h.held)
    return [] if hv is None else _unpack_held(hv)


def _replace(h: _Env, txn: Any, prefix: bytes, period: int, start: int, end: int, rows: np.ndarray, now: int) -> int:
    """Make ``rows`` (sorted, inside ``[start, end)``) the chunks' content in that range.

    Rows of boundary chunks outside the range stay; such a chunk keeps the older of the two
    written-at times, so staleness is never understated. Returns the number of rows removed.
    """
    removed = 0
    # Existing chunks overlapping the range: the interior ones are simply replaced or deleted.
    cur = txn.cursor(db=h.chunks)
    existing: list[int] = []
    stop = prefix + _KEY.pack(end + _OFFSET) if end < (1 << 62) else prefix + b"\xff" * 8
    lo = start - start % period if start > -(1 << 62) else -(1 << 62)
    if cur.set_range(prefix + _KEY.pack(max(lo, -_OFFSET) + _OFFSET)):
        while True:
            key = _cur_key(cur)
            if key >= stop:
                break
            existing.append(_KEY.unpack_from(key, len(prefix))[0] - _OFFSET)
            if not cur.next():
                break
    # New rows grouped by period.
    groups: dict[int, np.ndarray] = {}
    if len(rows):
        ts = rows["ts"]
        first = int(ts[0]) - int(ts[0]) % period
        edges = np.arange(first, int(ts[-1]) + period, period, dtype=np.int64)
        cuts = ts.searchsorted(edges).tolist()  # O(chunks log rows), not a pass over every row
        cuts.append(len(rows))
        for i, p in enumerate(edges.tolist()):
            if cuts[i + 1] > cuts[i]:
                groups[p] = rows[cuts[i] : cuts[i + 1]]
    for p in existing:
        key = prefix + _KEY.pack(p + _OFFSET)
        new = groups.pop(p, None)
        val = txn.get(key, db=h.chunks)
        if p >= start and p + period <= end:
            removed += _chunk_header(val)[1]
            if new is not None:
                _put_chunk(h, txn, key, new, now)
            else:
                txn.delete(key, db=h.chunks)
            continue
        raw, ots, written = _chunk_rows(val, key, h.verified)
        old, n = raw.view(CANDLE_DTYPE), len(raw)
        i0, i1 = int(ots.searchsorted(start)), int(ots.searchsorted(end))
        removed += i1 - i0
        pieces = [old[:i0], new, old[i1:]] if new is not None else [old[:i0], old[i1:]]
        merged = np.concatenate(pieces)
        kept = i0 + (n - i1)
        if len(merged) == 0:
            txn.delete(key, db=h.chunks)
        else:
            _put_chunk(h, txn, key, merged, min(written, now) if kept else now)
    for p, new in groups.items():
        _put_chunk(h, txn, prefix + _KEY.pack(p + _OFFSET), new, now)
    return removed
