"""The SQLite tier's apsw connection: opening it (file mode, pragmas, read-only file systems),
reading integer pragmas, closing and rolling back quietly, and translating apsw errors into
:class:`~mds.errors.StorageUnavailableError` messages that say what to do.
"""

from __future__ import annotations

import logging
import os
import urllib.parse
from contextlib import suppress
from typing import Any, Literal

import apsw

from mds.errors import StorageUnavailableError

logger = logging.getLogger(__name__)

#: The pragmas read as integers (a Literal: every name interpolated into SQL is one of these).
PragmaName = Literal["auto_vacuum", "data_version", "freelist_count", "page_count", "user_version"]

_MESSAGES: list[tuple[type[BaseException], str]] = [
    (
        apsw.BusyError,
        "the database is locked by another writer (waited busy_timeout_ms); "
        "only one process may write at a time: close the other writer or raise busy_timeout_ms",
    ),
    (apsw.LockedError, "the database is locked by another connection of this process; finish that transaction first"),
    (
        apsw.FullError,
        "the disk is full (or the file hit its size limit); the transaction was rolled back: free space, then retry",
    ),
    (apsw.NotADBError, "the file is not an SQLite database: point mds at another path or move the file away"),
    (
        apsw.CorruptError,
        "the database file is corrupt: restore a backup, or move it away and let mds rebuild it from Layer 1",
    ),
    (
        apsw.IOError,
        "an I/O error occurred (disk removed, file system error); the transaction was rolled back: "
        "check the disk, then retry",
    ),
    (apsw.CantOpenError, "cannot open the database file: check that the directory exists and is writable"),
    (apsw.ReadOnlyError, "the database is read-only (opened readonly, or file/directory permissions)"),
    (apsw.PermissionsError, "permission denied on the database file: check file and directory permissions"),
]


def translate(exc: apsw.Error, path: str) -> StorageUnavailableError:
    for cls, msg in _MESSAGES:
        if isinstance(exc, cls):
            return StorageUnavailableError(f"SQLite store {path}: {msg} ({exc})")
    return StorageUnavailableError(f"SQLite store {path}: {exc}")


def connect(path: str, *, readonly: bool, durable: bool, busy_timeout_ms: int, vfs: str | None = None) -> Any:
    """Open ``path`` (created 0600 with its directory unless ``readonly``) and set the pragmas:
    WAL, ``synchronous`` by ``durable``, incremental auto-vacuum on a new file, a 64 MiB cache.

    Raises apsw's (or the OS's) error untranslated; the connection is closed then.
    """
    flags = apsw.SQLITE_OPEN_READONLY if readonly else apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE
    if not readonly:
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        if path != ":memory:":
            # Private from the start: SQLite gives the -wal and -shm files the database
            # file's permissions, so creating it 0600 keeps all three owner-only.
            with suppress(FileExistsError):
                create = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
                os.close(os.open(path, create, 0o600))
    conn = _open(path, flags, vfs, readonly)
    try:
        conn.set_busy_timeout(int(busy_timeout_ms))
        if not readonly:
            # Only takes effect on a new file, and setting it takes the write lock: an opener
            # would wait for (and fail behind) another process's write transaction.
            if conn.execute("PRAGMA page_count").fetchall()[0][0] == 0:
                conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchall()[0][0]
            if str(mode).lower() != "wal":
                logger.warning("SQLite store %s: journal_mode is %s, not wal", path, mode)
            conn.execute(f"PRAGMA synchronous = {'FULL' if durable else 'NORMAL'}")
        conn.execute("PRAGMA cache_size = -65536")  # 64 MiB page cache
    except BaseException:
        close_quietly(conn, path)
        raise
    return conn


def _open(path: str, flags: int, vfs: str | None, readonly: bool) -> Any:
    """Open the connection. A WAL database on a read-only file system cannot be opened in
    the usual way when its ``-shm`` file is gone (SQLite would have to create it): there,
    and only there, it is opened ``immutable`` - nobody can change a read-only mount."""
    conn = apsw.Connection(path, flags=flags, vfs=vfs) if vfs else apsw.Connection(path, flags=flags)
    if not readonly:
        return conn
    try:
        conn.execute("PRAGMA user_version").fetchall()  # SQLite opens the file lazily
        return conn
    except apsw.CantOpenError:
        conn.close()
        if not (_on_readonly_fs(path) and os.path.exists(path)):
            raise
    uri = "file:" + urllib.parse.quote(os.path.abspath(path)) + "?immutable=1"
    logger.info("SQLite store %s: on a read-only file system, opened immutable", path)
    flags |= apsw.SQLITE_OPEN_URI
    return apsw.Connection(uri, flags=flags, vfs=vfs) if vfs else apsw.Connection(uri, flags=flags)


def _on_readonly_fs(path: str) -> bool:
    try:
        return bool(os.statvfs(os.path.dirname(os.path.abspath(path))).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):  # no statvfs (Windows): not known to be read-only
        return False


def pragma_int(conn: Any, name: PragmaName) -> int:
    return int(conn.execute(f"PRAGMA {name}").fetchall()[0][0])


def close_quietly(conn: Any, path: str) -> None:
    try:
        conn.close()
    except apsw.Error as exc:
        logger.warning("SQLite store %s: close failed: %s", path, exc)


def rollback_quietly(conn: Any, path: str) -> None:
    try:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
    except apsw.Error as exc:
        logger.warning("SQLite store %s: rollback failed: %s", path, exc)


class Snapshot:
    """A read transaction around several statements; a no-op inside a transaction (``in_txn``,
    or one the connection is in). A class: cheaper than a generator context manager."""

    __slots__ = ("_conn", "_own")

    def __init__(self, conn: Any, in_txn: bool) -> None:
        self._conn = conn
        self._own = not in_txn

    def __enter__(self) -> None:
        self._own = self._own and not self._conn.in_transaction
        if self._own:
            self._conn.execute("BEGIN")

    def __exit__(self, *exc: object) -> None:
        if self._own and self._conn.in_transaction:
            self._conn.execute("COMMIT")
