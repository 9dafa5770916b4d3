"""The files of a store directory: never through a planted link, never another user's, and never
mapped into memory before their blocks exist.

Two hazards are handled here, for every module that creates or maps a file in a store directory:

- **Planted entries.** A store directory in a shared place (``/tmp``) can be prepared by another
  user: a symbolic link named like one of the store's files makes mds write through it, and a
  directory writable by others lets them add such links at any time. :func:`check_store_dir`
  refuses links, entries of other users and directories of other users, and makes a directory of
  ours private (0700) first, so that nobody else can add an entry after the check. Files are then
  opened with ``O_NOFOLLOW`` (:func:`open_private`).
- **Sparse memory maps.** A page of a shared map whose file block does not exist yet is allocated
  when it is first touched; on a full disk (tmpfs: even for a read) the kernel then kills the
  process with ``SIGBUS``. :func:`map_shared` allocates every block before it maps the file, so a
  full disk is a :class:`~mds.errors.StorageUnavailableError` at open instead.

Error types: a path that can never be a store (empty, a NUL byte, an existing file that is not a
directory) is bad input, :class:`~mds.errors.InvalidRequestError`. A directory or entry that is
unsafe or unusable as it stands (a link, another owner, open to others, full, read-only) is a
state of the storage that the user fixes outside the call, and whose path stays the right one to
pass afterwards: :class:`~mds.errors.StorageUnavailableError` (an ``OSError``, with ``errno`` set
when the cause was one).
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import stat
from collections.abc import Mapping
from pathlib import Path

from mds.errors import InvalidRequestError, StorageUnavailableError

__all__ = [
    "STORE_ENTRIES",
    "allocate",
    "check_entries",
    "check_private_dir",
    "check_store_dir",
    "has_holes",
    "map_shared",
    "open_private",
    "storage_error",
]

log = logging.getLogger(__name__)

#: What mds creates or opens inside a store directory (name -> is a directory). Checked by
#: :func:`check_store_dir` before anything is opened.
STORE_ENTRIES: Mapping[str, bool] = {
    "candles.sqlite3": False,
    "candles.sqlite3-wal": False,
    "candles.sqlite3-shm": False,
    "candles.sqlite3-journal": False,
    "changes.bin": False,
    "lmdb.stale": False,
    "lmdb": True,
    "lmdb/data.mdb": False,
    "lmdb/lock.mdb": False,
    "lmdb/recreate.lock": False,
}

_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_GROUP_OTHER = 0o077
_GROUP_OTHER_WRITE = stat.S_IWGRP | stat.S_IWOTH
#: posix_fallocate errors that mean "this file system cannot", not "this call failed".
_NO_FALLOCATE = {errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL}
_ZEROS = bytes(1 << 16)


def _euid() -> int:
    return os.geteuid() if hasattr(os, "geteuid") else -1


def storage_error(action: str, path: str | os.PathLike[str], exc: OSError) -> StorageUnavailableError:
    """A :class:`StorageUnavailableError` for an ``OSError`` met while ``action`` on ``path``,
    with a message saying what to do, and the cause's ``errno``."""
    code = exc.errno
    if code in (errno.ENOSPC, errno.EDQUOT):
        hint = "the disk (or the quota) is full: free space, then retry"
    elif code == errno.ELOOP:
        hint = "it is a symbolic link: remove it (mds never follows a link inside a store directory)"
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "it cannot be written: check the owner and mode of the store directory, or use a writable one"
    else:
        hint = "check the store directory and its device"
    err = StorageUnavailableError(f"{action} {os.fspath(path)}: {exc.strerror or exc}; {hint}")
    err.errno = code
    return err


def _refuse(path: str, what: str, hint: str) -> StorageUnavailableError:
    return StorageUnavailableError(f"store path {path} {what}; {hint}")


def _writable(path: str) -> bool:
    """Whether this process may create and remove entries in the directory ``path``."""
    effective = os.access in os.supports_effective_ids
    return os.access(path, os.W_OK | os.X_OK, effective_ids=effective)


def check_private_dir(path: str | os.PathLike[str], *, create: bool) -> bool:
    """Check that ``path`` is a directory of ours that nobody else can change; create it if asked.

    Parameters
    ----------
    path
        The directory. Only its last component is checked for a link: parents may be links
        (``/tmp`` is one on some systems).
    create
        Create it (mode 0700; missing parents with the default mode) when it does not exist.

    Returns
    -------
    bool
        Whether this process can write in it (False on a read-only file system or without
        write permission: the caller then opens the store read-only).

    Raises
    ------
    InvalidRequestError
        ``path`` is empty, holds a NUL byte, or names something that is not a directory.
    StorageUnavailableError
        ``path`` is a symbolic link, is owned by another user, is missing (and ``create`` is
        False) or cannot be created, or is writable by others and cannot be made private.

    Notes
    -----
    A directory of ours open to group or others (0777 in a shared ``/tmp``) is made 0700 rather
    than refused when mds created it, when it is empty or when it holds a store: nobody else can
    add an entry from then on, and the entries that are there are checked by
    :func:`check_entries`. Any other directory keeps its mode (``mds stats --path ~`` must not
    change a home directory); one that group or others can write is refused. On a read-only file
    system the mode cannot change, but nobody can add an entry either, so it is left as it is.
    """
    p = os.fspath(path)
    if not p or "\0" in p:
        raise InvalidRequestError(f"bad store path {p!r}")
    created = False
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        if not create:
            raise _refuse(p, "does not exist", "create it first or open it writable") from None
        try:
            parent = os.path.dirname(os.path.abspath(p))
            os.makedirs(parent, exist_ok=True)
            os.mkdir(p, 0o700)
            created = True
        except FileExistsError:
            pass  # created meanwhile (by us or by someone else): the checks below decide
        except OSError as exc:
            raise storage_error("cannot create the store directory", p, exc) from exc
        st = os.lstat(p)
    except OSError as exc:
        raise storage_error("cannot inspect the store directory", p, exc) from exc
    if stat.S_ISLNK(st.st_mode):
        raise _refuse(
            p,
            "is a symbolic link",
            "mds does not follow a link as its directory (another user may have planted it); "
            "pass the real directory (os.path.realpath) if the link is yours",
        )
    if not stat.S_ISDIR(st.st_mode):
        raise InvalidRequestError(f"store path {p} exists and is not a directory")
    uid = _euid()
    if uid >= 0 and st.st_uid != uid:
        raise _refuse(
            p,
            f"is owned by uid {st.st_uid}, not by this user (uid {uid})",
            "use a directory of your own (for example under your home directory)",
        )
    writable = _writable(p)
    if st.st_mode & _GROUP_OTHER and not created and not _ours_to_change(p):
        # A directory mds did not create and that holds no store (a home directory, say): its
        # mode is its owner's choice. Only one others could plant entries in is refused.
        if st.st_mode & _GROUP_OTHER_WRITE:
            raise _refuse(
                p,
                f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):o}) and holds no mds store",
                "mds changes the mode only of a directory it created or one holding a store: "
                "use a new directory, or chmod go-w it yourself",
            )
    else:
        _make_private(p, st, 0o700, writable)
    _check_parent(p)
    return writable


def _ours_to_change(path: str) -> bool:
    """Whether mds may make the existing directory ``path`` private: it is empty (nothing of
    anyone's to expose or protect) or holds an mds store or LMDB environment (created by mds,
    opened up since)."""
    try:
        names = set(os.listdir(path))
    except OSError:
        return False
    return not names or any(name.rsplit("/", 1)[-1] in names for name in STORE_ENTRIES)


def _make_private(path: str, st: os.stat_result, mode: int, writable: bool) -> None:
    """chmod an entry of ours that is open to group or others to ``mode``."""
    if not st.st_mode & _GROUP_OTHER:
        return
    try:
        os.chmod(path, mode, follow_symlinks=False)
    except OSError as exc:
        if exc.errno == errno.EROFS or (not writable and not st.st_mode & _GROUP_OTHER_WRITE):
            # Nobody can add or change an entry on a read-only file system; an entry only
            # readable by others leaks data but cannot be changed by them.
            log.info("cannot make %s private (%s); it cannot be changed by others either", path, exc)
            return
        raise storage_error("cannot make private", path, exc) from exc
    log.info("made %s private (mode %o -> %o)", path, stat.S_IMODE(st.st_mode), mode)


def _check_parent(path: str) -> None:
    """Refuse a directory whose parent lets others rename it away and plant a link in its place
    (writable by others without the sticky bit, which ``/tmp`` has)."""
    parent = os.path.dirname(os.path.abspath(path))
    try:
        st = os.stat(parent)
    except OSError:
        return
    if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
        raise _refuse(
            path,
            f"is in {parent}, which every user can write and which has no sticky bit",
            "anyone could replace the store directory there: use a private parent directory",
        )


def check_entries(directory: str | os.PathLike[str], entries: Mapping[str, bool], *, writable: bool = True) -> None:
    """Refuse planted entries of ``directory``: links, entries of other users, wrong kinds.

    Parameters
    ----------
    directory
        The directory, already checked by :func:`check_private_dir`.
    entries
        Relative name -> whether it must be a directory. Missing entries are fine.
    writable
        Whether the directory is writable (an entry open to others is then made private).

    Raises
    ------
    StorageUnavailableError
        An entry is a symbolic link, is owned by another user, is not a regular file (or not a
        directory where one is expected), or is a file with more than one name (a hard link:
        writing it would change the other name too).
    """
    d = os.fspath(directory)
    uid = _euid()
    for name, is_dir in entries.items():
        full = os.path.join(d, name)
        try:
            st = os.lstat(full)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as exc:
            raise storage_error("cannot inspect", full, exc) from exc
        if stat.S_ISLNK(st.st_mode):
            raise _refuse(
                full,
                "is a symbolic link",
                "mds never follows a link inside a store directory (another user may have planted it): remove it",
            )
        if not (stat.S_ISDIR(st.st_mode) if is_dir else stat.S_ISREG(st.st_mode)):
            kind = "a directory" if is_dir else "a regular file"
            raise _refuse(full, f"is not {kind}", "remove it (mds recreates what it needs)")
        if uid >= 0 and st.st_uid != uid:
            raise _refuse(full, f"is owned by uid {st.st_uid}, not by this user (uid {uid})", "remove it")
        if not is_dir and st.st_nlink > 1:
            raise _refuse(
                full, f"has {st.st_nlink} names (hard links)", "replace it by a copy (writes would change every name)"
            )
        _make_private(full, st, 0o700 if is_dir else 0o600, writable)


def check_store_dir(path: Path | str, *, create: bool) -> bool:
    """Check a store directory and every entry mds opens in it, before anything is opened.

    Parameters
    ----------
    path
        The store directory (already ``expanduser``-ed).
    create
        Create it with mode 0700 when it does not exist.

    Returns
    -------
    bool
        Whether this process can write in it; False means: open the store read-only.

    Raises
    ------
    InvalidRequestError
        ``path`` can never be a store (empty, NUL byte, not a directory).
    StorageUnavailableError
        The directory or one of :data:`STORE_ENTRIES` is a symbolic link or belongs to another
        user, the directory is missing (``create`` False) or cannot be created, or it is open to
        others and cannot be made private. Nothing was opened or written through a link.

    Notes
    -----
    After this check the directory is ours and private, so no other user can plant an entry
    before the store opens its files (root can, and is trusted).
    """
    writable = check_private_dir(path, create=create)
    check_entries(path, STORE_ENTRIES, writable=writable)
    return writable


def open_private(path: str | os.PathLike[str], flags: int, mode: int = 0o600) -> int:
    """``os.open`` that never follows a link and accepts only a regular file of ours.

    Returns the descriptor (close-on-exec). Raises ``OSError`` as ``os.open`` does (``ELOOP``
    for a link) and :class:`StorageUnavailableError` for a file of another user, a hard-linked
    file or something that is not a regular file.
    """
    fd = os.open(path, flags | _O_NOFOLLOW | _O_CLOEXEC, mode)
    try:
        st = os.fstat(fd)
        uid = _euid()
        p = os.fspath(path)
        if not stat.S_ISREG(st.st_mode):
            raise _refuse(p, "is not a regular file", "remove it (mds recreates what it needs)")
        if uid >= 0 and st.st_uid != uid:
            raise _refuse(p, f"is owned by uid {st.st_uid}, not by this user (uid {uid})", "remove it")
        if st.st_nlink > 1:
            raise _refuse(p, f"has {st.st_nlink} names (hard links)", "replace it by a copy")
    except BaseException:
        os.close(fd)
        raise
    return fd


def has_holes(fd: int, length: int) -> bool:
    """Whether bytes ``[0, length)`` of the file may lack blocks (or lie past its end).

    Allocated means: the file's block count covers its size (``fallocate`` counts; on tmpfs and
    ext4 a preallocated page still reads as a hole to ``SEEK_HOLE``), or ``SEEK_HOLE`` finds
    no hole (written data everywhere, for file systems that store it compressed).
    """
    st = os.fstat(fd)
    if st.st_size < length:
        return True
    if length <= 0 or st.st_blocks * 512 >= st.st_size:
        return False
    seek_hole = getattr(os, "SEEK_HOLE", None)
    if seek_hole is not None:
        try:
            return os.lseek(fd, 0, seek_hole) < length
        except OSError:
            pass
    return True


def allocate(fd: int, length: int) -> None:
    """Give bytes ``[0, length)`` of the open file real blocks, extending it when it is shorter.

    Uses ``posix_fallocate``; where the file system does not support it, writes zeros into the
    holes and past the end, then ``fsync``. Existing content is never changed. Raises
    ``OSError`` (``ENOSPC`` on a full disk; the file may then have grown without all its blocks).

    Notes
    -----
    The fallback rewrites a hole with zeros (what it reads as). Another process writing into
    that same page through its own map at that moment could see its write undone; this needs a
    file left sparse by an older version on a file system without ``fallocate``, at open.
    """
    if length <= 0:
        return
    if hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(fd, 0, length)
            return
        except OSError as exc:
            if exc.errno not in _NO_FALLOCATE:
                raise
            log.debug("posix_fallocate unsupported here (%s): writing zeros", exc)
    _write_zeros(fd, length)
    os.fsync(fd)


def _write_zeros(fd: int, length: int) -> None:
    size = os.fstat(fd).st_size
    end = min(size, length)
    seek_hole, seek_data = getattr(os, "SEEK_HOLE", None), getattr(os, "SEEK_DATA", None)
    pos = 0
    # Without SEEK_HOLE the holes inside the existing part cannot be found without reading the
    # file, and rewriting data would race writers: they stay (only an older sparse file has any).
    while pos < end and seek_hole is not None and seek_data is not None:
        try:
            hole = os.lseek(fd, pos, seek_hole)
        except OSError:
            break
        if hole >= end:
            break
        try:
            data = os.lseek(fd, hole, seek_data)
        except OSError as exc:  # ENXIO: no data after the hole
            if exc.errno != errno.ENXIO:
                raise
            data = size
        _pwrite_zeros(fd, hole, min(data, end))
        pos = min(data, end)
    _pwrite_zeros(fd, max(size, 0), length)


def _pwrite_zeros(fd: int, start: int, end: int) -> None:
    pos = start
    while pos < end:
        n = os.pwrite(fd, _ZEROS[: min(len(_ZEROS), end - pos)], pos)
        if n <= 0:  # pragma: no cover - a short write without an error
            raise OSError(errno.EIO, "short write")
        pos += n


def map_shared(path: str | os.PathLike[str], size: int, *, readonly: bool = False) -> mmap.mmap:
    """Map the first ``size`` bytes of a store file shared, every block allocated first.

    Parameters
    ----------
    path
        The file; created (mode 0600) when missing, unless ``readonly``. Never a link.
    size
        Bytes to map. The file is extended (with allocated zeros) when it is shorter.
    readonly
        Open and map read-only (a store on a read-only directory). The file must exist, reach
        ``size`` and have no holes: nothing can allocate them.

    Returns
    -------
    mmap.mmap
        A ``MAP_SHARED`` map (``ACCESS_WRITE``, or ``ACCESS_READ`` when ``readonly``); the
        descriptor is closed (the map keeps the file open).

    Raises
    ------
    StorageUnavailableError
        The disk is full (``errno`` ENOSPC), the file is a link or not ours, cannot be created or
        written, or (``readonly``) is missing, short or sparse. Its message says what to do.
    """
    flags = os.O_RDONLY if readonly else os.O_RDWR | os.O_CREAT
    try:
        fd = open_private(path, flags)
    except StorageUnavailableError:
        raise
    except OSError as exc:
        raise storage_error("cannot open", path, exc) from exc
    try:
        if readonly:
            if has_holes(fd, size):
                raise _refuse(
                    os.fspath(path),
                    f"is shorter than {size} bytes or sparse, and the store is read-only",
                    "open the store once writable (it allocates the file)",
                )
            return mmap.mmap(fd, size, access=mmap.ACCESS_READ)
        allocate(fd, size)
        return mmap.mmap(fd, size, access=mmap.ACCESS_WRITE)
    except StorageUnavailableError:
        raise
    except OSError as exc:
        raise storage_error("cannot allocate and map", path, exc) from exc
    finally:
        os.close(fd)
