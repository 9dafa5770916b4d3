"""One LMDB environment per path and process: opening it safely, growing its map, following a
data file another process replaced, recreating a damaged one, and running transactions that
recover from all of these."""

from __future__ import annotations

import contextlib
import errno

try:  # POSIX; on Windows the recreate lock is skipped (LMDB locks the environment itself)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]
import logging
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import lmdb
import msgpack

from mds._files import allocate, check_entries, check_private_dir, open_private, storage_error
from mds._kernels import file_state
from mds.errors import StorageUnavailableError
from mds.tiers._lmdb_format import FORMAT_VERSION, _Corrupt, _format_of, _Seen

log = logging.getLogger(__name__)

_MiB = 1 << 20
#: Allocated bytes kept past the last committed page. LMDB trusts the page structure it reads:
#: a damaged node can point up to 64 KiB past its page, and reading past the end of the file
#: kills the process with SIGBUS; past the end plus this slack it reads zeros and reports
#: corruption instead.
_SLACK = 1 << 20
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


# -- opening steps ---------------------------------------------------------------------------------


def _data_ident(path: str) -> tuple[int, int] | None:
    """``(device, inode)`` of the data file at ``path``, None when there is none."""
    try:
        st = os.stat(os.path.join(path, _DATA))
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino)


def _lmdb_open(path: str, map_size: int, durable: bool, **kw: Any) -> lmdb.Environment:
    """``lmdb.open`` with the settings every opener of the tier uses (``kw``: the mode)."""
    return lmdb.open(
        path,
        map_size=map_size,
        subdir=True,
        mode=0o600,
        max_dbs=4,
        max_readers=_MAX_READERS,
        # A cache of SQLite: no fsync by default. A killed process loses nothing (the page
        # cache keeps the writes); after a power loss the Store rebuilds the tier.
        sync=durable,
        metasync=durable,
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


def _remove_files(path: str, expected: tuple[int, int] | None) -> None:
    """Delete the data and lock file at ``path``, unless another process already replaced the
    data file."""
    check_private_dir(path, create=True)
    lock_path = os.path.join(path, _RECREATE_LOCK)
    try:
        fd = open_private(lock_path, os.O_RDWR | os.O_CREAT)
    except StorageUnavailableError:
        raise
    except OSError as exc:
        raise storage_error("cannot create", lock_path, exc) from exc
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        if _data_ident(path) != expected:
            return  # somebody recreated it meanwhile: use theirs
        for name in (_DATA, _LOCK):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(path, name))
    finally:
        os.close(fd)


# -- the shared environment handle -----------------------------------------------------------------


class _Env:
    """One LMDB environment per path and process (LMDB forbids opening it twice in a process).

    Owns the recovery logic: map growth, adopting another process's resize, and recreating a
    damaged environment; :meth:`reading` and :meth:`write` run transactions with it. Callers hold
    ``lock`` around every transaction.

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
    def _open(self) -> None:
        for attempt in range(3):
            seen = _data_ident(self.path)
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
                _remove_files(self.path, seen)

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

    def _open_once(self) -> None:
        how = (self.path, self.initial_map_size, self.durable)
        if self.readonly:
            self.unlocked = False
            try:
                # On a read-only file system liblmdb itself skips the lock file (EROFS).
                env = _lmdb_open(*how, readonly=True, lock=True, create=False)
            except lmdb.Error as exc:
                if _errno_of(exc) not in (errno.EACCES, errno.EPERM):
                    raise
                # The lock file cannot be written (a directory we may not write in). Without it
                # a writer in another process may reuse pages a read still walks: what such a
                # read meets is damage, caught by the checks and answered as "not held".
                log.info("LMDB disk tier at %s: lock file not writable, reading without it", self.path)
                env = _lmdb_open(*how, readonly=True, lock=False, create=False)
                self.unlocked = True
        else:
            env = _lmdb_open(*how, lock=True)
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
            version = _format_of(raw)
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
        version = _format_of(raw)
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
        _remove_files(self.path, ident)
        self.recreated += 1
        self._open()

    def reopen(self) -> None:
        """Follow the data file to a new inode (deleted or replaced by another process)."""
        self._close()
        if _data_ident(self.path) is not None:
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

    # -- transactions ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def reading(self) -> Iterator[tuple[_Env, Any]]:
        """A read transaction (buffers=True) on a checked environment, recovering from damage.

        Yields ``(self, txn)`` inside the handle lock.
        """
        with self.lock:
            txn = self._begin_read()
            try:
                self.check_file()
                yield self, txn
            finally:
                txn.abort()

    def _begin_read(self) -> Any:
        """Begin a read transaction (buffers=True), taking another process's map size first
        when LMDB says the map was resized."""
        env = self.ensure_open()
        try:
            return env.begin(buffers=True)
        except lmdb.MapResizedError:
            self.adopt_resize()
            return env.begin(buffers=True)

    def write(
        self,
        fn: Callable[[_Env, Any], Any],
        needed: int,
        path: str,
        counts: dict[str, int],
        degrade: Callable[[str], None],
    ) -> Any:
        """Run ``fn(self, txn)`` in a write transaction, growing the map when it is full.

        A resized map, damage (counted in ``counts["errors"]``, the environment recreated) and a
        replaced data file are recovered from and ``fn`` runs again. A failure no retry gets past
        (the map full at its cap, a full disk, an I/O error) calls ``degrade(reason)`` and raises
        StorageUnavailableError naming ``path`` (the tier's path as given); the failed transaction
        changed nothing.
        """
        with self.lock:
            for _ in range(64):
                env = self.ensure_open()
                try:
                    with env.begin(write=True) as txn:
                        self.check_file()
                        result = fn(self, txn)
                except lmdb.MapResizedError:
                    self.adopt_resize()
                    continue
                except lmdb.MapFullError:
                    if self.grow(needed):
                        continue
                    degrade(f"LMDB map is full at its cap of {self.map_size_cap} bytes")
                    raise StorageUnavailableError(
                        f"the LMDB disk tier at {path} is full (map_size_cap={self.map_size_cap} bytes); "
                        "raise the cap or lower the retention; reads keep working"
                    ) from None
                except (_Corrupt, *_CORRUPTION) as exc:
                    counts["errors"] += 1
                    self.recreate(str(exc) or type(exc).__name__)
                    continue
                except _Gone:
                    self.reopen()
                    continue
                except lmdb.Error as exc:
                    # A full disk is ENOSPC from pwrite() here (no writemap: nothing is written
                    # through the map), never a SIGBUS; the failed commit changed nothing.
                    degrade(str(exc))
                    code = _errno_of(exc)
                    if code == errno.EIO and _space_left(path) < needed + _SLACK:
                        code = errno.ENOSPC  # liblmdb reports a short pwrite() (disk full) as EIO
                    full = code in (errno.ENOSPC, errno.EDQUOT)
                    hint = "free disk space; reads keep working" if full else "check the store directory"
                    err = StorageUnavailableError(f"LMDB disk tier write failed: {exc}; {hint}")
                    err.errno = code
                    raise err from exc
                except OSError as exc:
                    if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EIO):
                        raise
                    degrade(str(exc))
                    raise storage_error("LMDB disk tier write failed at", path, exc) from exc
                self.ensure_slack()
                return result
            raise StorageUnavailableError("LMDB disk tier: write kept failing after repeated map resizes")

    def figures(self) -> dict[str, Any]:
        """Entries, series, bytes and map size (zeros and ``error`` when unreadable), the map's
        cap, and how often it was resized and recreated."""
        out: dict[str, Any] = {}
        try:
            with self.reading() as (h, txn):
                st = txn.stat(h.chunks)
                info = h.env.info()  # type: ignore[union-attr]
                psize = h.env.stat()["psize"]  # type: ignore[union-attr]
                out["entries"] = st["entries"]
                out["series"] = txn.stat(h.held)["entries"]
                out["bytes"] = (info["last_pgno"] + 1) * psize
                out["map_size"] = info["map_size"]
        except lmdb.Error as exc:
            out.update(entries=0, series=0, bytes=0, map_size=0, error=str(exc))
        out["map_size_cap"] = self.map_size_cap
        out["map_resizes"] = self.resizes
        out["recreated"] = self.recreated
        return out
