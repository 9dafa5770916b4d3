"""Planted files (issue 14, item 8): a store never writes through a link somebody left in its
directory, and never uses a directory another user owns or can change.

Each planted entry is refused with a typed error, and what it points at is left byte-identical.
Ownership cases need root (``chown``); they are skipped otherwise.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import _relutil as R
import numpy as np
import pytest

import mds
from mds._files import STORE_ENTRIES, check_store_dir, map_shared
from mds.errors import InvalidRequestError, StorageUnavailableError
from mds.tiers.disk import LmdbTier

NOBODY = 65534
root_only = pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to chown")


def _snapshot(path: Path) -> dict[str, bytes | None]:
    """Every file under ``path`` (or ``path`` itself) and its bytes; a missing path is {}."""
    if not os.path.lexists(path):
        return {}
    if path.is_file():
        return {path.name: path.read_bytes()}
    out: dict[str, bytes | None] = {}
    for dirpath, _, files in os.walk(path):
        for f in files:
            p = Path(dirpath) / f
            out[str(p.relative_to(path))] = p.read_bytes()
    return out


def _a_store(path: Path) -> None:
    """A small real store at ``path`` (so the victims are real store files)."""
    with mds.open(path, clock=R.Clock()) as st:
        st.write_candles(
            "KRW-BTC", "1m", R.marked(R.T0 + R.MIN * np.arange(100), 1.0), complete=(R.T0, R.T0 + 100 * R.MIN)
        )


def _open_and_write(path: Path) -> None:
    """Open a store and write to it: what a store that opened anyway writes through a link."""
    with mds.open(path, clock=R.Clock()) as st:
        st.write_candles("KRW-ETH", "1m", R.marked(R.T0 + R.MIN * np.arange(10), 2.0))


#: (entry planted as a link, what it points at: "file" (another file with content), "dangling"
#: (a path that does not exist yet), "dir" (another store's directory)).
PLANTED = [
    ("changes.bin", "file"),
    ("changes.bin", "dangling"),
    ("candles.sqlite3", "dangling"),
    ("candles.sqlite3", "file"),
    ("candles.sqlite3-wal", "file"),
    ("candles.sqlite3-shm", "dangling"),
    ("lmdb.stale", "dangling"),
    ("lmdb", "dir"),
    ("lmdb/data.mdb", "file"),
    ("lmdb/lock.mdb", "dangling"),
]


def _plant(tmp_path: Path, entry: str, kind: str) -> tuple[Path, Path]:
    """A store directory with ``entry`` planted as a link; returns (store, link target)."""
    store = tmp_path / "store"
    store.mkdir(mode=0o700)
    if "/" in entry:
        (store / entry).parent.mkdir(mode=0o700)
    if kind == "file":
        target = tmp_path / "victim.bin"
        target.write_bytes(os.urandom(1 << 15))
    elif kind == "dangling":
        target = tmp_path / "created-through-the-link"
    else:
        target = tmp_path / "other-store"
        _a_store(target)
        target = target / "lmdb"
    os.symlink(target, store / entry)
    return store, target


@pytest.mark.parametrize(("entry", "kind"), PLANTED, ids=[f"{e}-{k}" for e, k in PLANTED])
def test_check_store_dir_refuses_a_planted_link(tmp_path: Path, entry: str, kind: str) -> None:
    store, target = _plant(tmp_path, entry, kind)
    before = _snapshot(target)
    with pytest.raises(StorageUnavailableError, match="symbolic link"):
        check_store_dir(store, create=True)
    assert _snapshot(target) == before


@pytest.mark.parametrize(("entry", "kind"), PLANTED, ids=[f"{e}-{k}" for e, k in PLANTED])
def test_store_refuses_a_planted_link(tmp_path: Path, entry: str, kind: str) -> None:
    store, target = _plant(tmp_path, entry, kind)
    before = _snapshot(target)
    with pytest.raises(StorageUnavailableError, match="symbolic link"):
        _open_and_write(store)
    assert _snapshot(target) == before  # nothing written through the link
    assert not os.path.lexists(target) or kind != "dangling"
    R.TALLY["planted_links_refused"] += 1


def test_every_store_entry_is_checked(tmp_path: Path) -> None:
    # The list covers what a store creates: open one, write, and compare the names it made.
    path = tmp_path / "store"
    with mds.open(path, clock=R.Clock()) as st:
        st.write_candles("KRW-BTC", "1m", R.marked(R.T0 + R.MIN * np.arange(10), 1.0))
        made = {str(p.relative_to(path)) for p in path.rglob("*")}
    assert made <= set(STORE_ENTRIES), made - set(STORE_ENTRIES)


def test_store_directory_that_is_a_link_is_refused(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir(mode=0o700)
    (victim / "keep.txt").write_text("mine")
    os.symlink(victim, tmp_path / "store")
    with pytest.raises(StorageUnavailableError, match="symbolic link"):
        check_store_dir(tmp_path / "store", create=True)
    with pytest.raises(StorageUnavailableError, match="symbolic link"):
        mds.open(tmp_path / "store", clock=R.Clock()).close()
    assert sorted(p.name for p in victim.iterdir()) == ["keep.txt"]


def test_lmdb_tier_alone_refuses_a_linked_directory(tmp_path: Path) -> None:
    _a_store(tmp_path / "other")
    before = _snapshot(tmp_path / "other" / "lmdb")
    os.symlink(tmp_path / "other" / "lmdb", tmp_path / "lmdb")
    with pytest.raises(StorageUnavailableError, match="symbolic link"):
        LmdbTier(tmp_path / "lmdb", clock=R.Clock())
    assert _snapshot(tmp_path / "other" / "lmdb") == before


def test_map_shared_refuses_a_link(tmp_path: Path) -> None:
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"x" * 100)
    os.symlink(victim, tmp_path / "changes.bin")
    with pytest.raises(StorageUnavailableError, match="symbolic link"):
        map_shared(tmp_path / "changes.bin", 4096)
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling.bin")
    with pytest.raises(StorageUnavailableError, match="symbolic link"):
        map_shared(tmp_path / "dangling.bin", 4096)
    assert victim.read_bytes() == b"x" * 100
    assert not (tmp_path / "nowhere").exists()


def test_hard_linked_store_file_is_refused(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir(mode=0o700)
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"y" * 1000)
    os.link(victim, store / "changes.bin")
    with pytest.raises(StorageUnavailableError, match="hard link"):
        check_store_dir(store, create=True)
    with pytest.raises(StorageUnavailableError, match="hard link"):
        mds.open(store, clock=R.Clock()).close()
    assert victim.read_bytes() == b"y" * 1000


def test_path_that_is_not_a_directory_is_bad_input(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(InvalidRequestError):
        check_store_dir(tmp_path / "file", create=True)
    with pytest.raises(InvalidRequestError):
        check_store_dir("", create=True)
    with pytest.raises(StorageUnavailableError, match="does not exist"):
        check_store_dir(tmp_path / "missing", create=False)
    assert not (tmp_path / "missing").exists()


@pytest.mark.skipif(
    sys.platform == "win32", reason="no POSIX modes on Windows: os.stat reports 0o777 for every directory"
)
def test_own_directory_open_to_everyone_is_made_private(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    os.chmod(store, 0o777)  # as `mkdir` under umask 0 leaves it in a shared /tmp
    assert check_store_dir(store, create=True) is True
    assert stat.S_IMODE(store.stat().st_mode) == 0o700
    os.chmod(store, 0o777)
    with mds.open(store, clock=R.Clock()):
        assert stat.S_IMODE(store.stat().st_mode) == 0o700


@pytest.mark.skipif(sys.platform == "win32", reason="Windows has no sticky bit and no POSIX modes")
def test_directory_in_a_parent_anyone_can_rename_in_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)  # no sticky bit: anyone may rename the store away and plant a link
    with pytest.raises(StorageUnavailableError, match="sticky"):
        check_store_dir(shared / "store", create=True)
    os.chmod(shared, 0o1777)  # like /tmp
    assert check_store_dir(shared / "store", create=True) is True


@root_only
def test_directory_of_another_user_writable_by_all_is_refused(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    os.chmod(store, 0o777)
    os.chown(store, NOBODY, NOBODY)
    with pytest.raises(StorageUnavailableError, match="owned by uid"):
        check_store_dir(store, create=True)
    with pytest.raises(StorageUnavailableError, match="owned by uid"):
        mds.open(store, clock=R.Clock()).close()
    assert list(store.iterdir()) == []  # nothing created in it
    assert stat.S_IMODE(store.stat().st_mode) == 0o777  # and not taken over


@root_only
@pytest.mark.parametrize("entry", ["changes.bin", "candles.sqlite3", "lmdb", "lmdb/lock.mdb"])
def test_entry_of_another_user_is_refused(tmp_path: Path, entry: str) -> None:
    store = tmp_path / "store"
    _a_store(store)
    os.chown(store / entry, NOBODY, NOBODY)
    before = _snapshot(store)
    with pytest.raises(StorageUnavailableError, match="owned by uid"):
        check_store_dir(store, create=True)
    with pytest.raises(StorageUnavailableError, match="owned by uid"):
        mds.open(store, clock=R.Clock()).close()
    assert _snapshot(store) == before
