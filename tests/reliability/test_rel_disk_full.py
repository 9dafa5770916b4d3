"""A full disk (issue 14, item 4): never a SIGBUS; a typed error at open and on write, the
acknowledged data intact, and writes working again once space frees.

Every scenario runs on a small tmpfs (root only: skipped otherwise) and, where a memory map is
touched, in a child process: a SIGBUS must fail the test, not end the run. tmpfs is the strictest
case: there even a *read* of a page without a block faults when the file system is full.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import _relutil as R
import numpy as np
import pytest

import mds
from mds._files import allocate, has_holes, map_shared
from mds.errors import StorageUnavailableError

HERE = Path(__file__).parent

pytestmark = pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to mount a small tmpfs"
)


@pytest.fixture
def fs(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs, private (0700), unmounted at the end."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", str(mnt)], capture_output=True, text=True
    )
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(directory: Path) -> Path:
    """Write a filler file until the file system is full (down to the last byte)."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    chunk = 1 << 16
    try:
        while chunk:
            try:
                os.write(fd, bytes(chunk))
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                chunk //= 2
    finally:
        os.close(fd)
    return filler


def _child(code: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(
        [sys.executable, "-X", "faulthandler", "-c", code, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
        env=R.child_env(),
        cwd=HERE,
    )
    assert r.returncode != -signal.SIGBUS, f"killed by SIGBUS:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    assert r.returncode == 0, f"exit {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


class Conversation:
    """A child script that prints a JSON line (or ``ready``) at each step and waits for a line
    on stdin before the next; the parent changes the disk in between. A child that dies (by
    SIGBUS) ends the conversation: the step answers None and :meth:`finish` reports it."""

    def __init__(self, code: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-X", "faulthandler", "-c", code, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=R.child_env(),
            cwd=HERE,
        )

    def read(self) -> object:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            return None
        return "ready" if line.strip() == "ready" else json.loads(line)

    def step(self) -> object:
        """Let the child go on; its next answer."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write("go\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            return None
        return self.read()

    def finish(self) -> None:
        try:
            _, err = self.proc.communicate(timeout=300)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        rc = self.proc.returncode
        assert rc != -signal.SIGBUS, f"killed by SIGBUS:\n{err[-3000:]}"
        assert rc == 0, f"exit {rc}:\n{err[-3000:]}"


# --- map_shared ---------------------------------------------------------------------------------

_MAP_SPARSE = """
import os, sys
from mds._files import map_shared
m = map_shared(sys.argv[1], 1 << 16)
m[:] = b"\\x01" * len(m)  # touches every page: a SIGBUS here if a block were missing
m.flush()
print("ok")
"""


def test_map_shared_refuses_a_file_it_cannot_allocate(fs: Path) -> None:
    # A sparse file (as Store._open_changes used to leave changes.bin), then the disk fills.
    path = fs / "changes.bin"
    with open(path, "wb") as f:
        f.truncate(1 << 16)
        f.seek(40_000)
        f.write(b"stamp")
    filler = fill(fs)
    with pytest.raises(StorageUnavailableError, match="full") as info:
        map_shared(path, 1 << 16)
    assert info.value.errno == errno.ENOSPC
    with pytest.raises(StorageUnavailableError, match="full"):
        map_shared(fs / "new.bin", 1 << 16)
    filler.unlink()
    m = map_shared(path, 1 << 16)  # space again: allocated, content kept
    assert m[40_000:40_005] == b"stamp"
    m.close()
    fd = os.open(path, os.O_RDONLY)
    try:
        assert not has_holes(fd, 1 << 16)
    finally:
        os.close(fd)
    fill(fs)
    _child(_MAP_SPARSE, str(path))  # mapped while full: every page already has its block
    R.TALLY["disk_full_scenarios"] += 1


def test_map_shared_without_fallocate_writes_zeros(fs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def unsupported(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, "not supported")

    monkeypatch.setattr(os, "posix_fallocate", unsupported)
    path = fs / "changes.bin"
    with open(path, "wb") as f:
        f.truncate(1 << 15)
        f.seek(20_000)
        f.write(b"stamp")
    m = map_shared(path, 1 << 16)  # holes filled, then extended with zeros
    assert m[20_000:20_005] == b"stamp"
    assert m[:20_000] == bytes(20_000) and m[20_005:] == bytes((1 << 16) - 20_005)
    m.close()
    fd = os.open(path, os.O_RDONLY)
    try:
        assert not has_holes(fd, 1 << 16)
    finally:
        os.close(fd)
    fill(fs)
    with pytest.raises(StorageUnavailableError, match="full"):
        map_shared(fs / "other.bin", 1 << 16)
    fd = os.open(fs / "sparse", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, 1 << 16)
        with pytest.raises(OSError) as info:
            allocate(fd, 1 << 16)
        assert info.value.errno == errno.ENOSPC
    finally:
        os.close(fd)


def test_map_shared_readonly_needs_an_allocated_file(fs: Path) -> None:
    path = fs / "changes.bin"
    with pytest.raises(StorageUnavailableError):
        map_shared(path, 4096, readonly=True)  # missing: nothing is created
    assert not path.exists()
    with open(path, "wb") as f:
        f.truncate(4096)
    with pytest.raises(StorageUnavailableError, match="sparse"):
        map_shared(path, 4096, readonly=True)  # a read of a hole faults on a full tmpfs
    map_shared(path, 4096).close()
    m = map_shared(path, 4096, readonly=True)
    assert m[:] == bytes(4096)
    m.close()


# --- the LMDB tier ------------------------------------------------------------------------------

_TIER_OPEN = """
import sys
from mds.errors import StorageUnavailableError
from mds.tiers.disk import LmdbTier
try:
    LmdbTier(sys.argv[1])
except StorageUnavailableError as exc:
    print("refused", exc.errno, exc)
else:
    print("opened")
"""


def test_lmdb_tier_opened_on_a_full_disk_is_a_typed_error(fs: Path) -> None:
    # liblmdb used to create lock.mdb sparse and touch it: SIGBUS on a full disk.
    fill(fs)
    r = _child(_TIER_OPEN, str(fs / "lmdb"))
    assert r.stdout.startswith(f"refused {errno.ENOSPC} "), r.stdout
    (fs / "filler").unlink()
    r = _child(_TIER_OPEN, str(fs / "lmdb"))  # space again: the half-made environment opens
    assert r.stdout.startswith("opened"), r.stdout + r.stderr


_TIER_WRITE = """
import json, os, sys
import numpy as np
sys.path.insert(0, ".")
import _relutil as R
from mds.errors import StorageUnavailableError
from mds.tiers.disk import LmdbTier
from mds.timeframes import parse_timeframe
M1, S1 = parse_timeframe("1m"), parse_timeframe("1s")
t = LmdbTier(sys.argv[1], clock=R.Clock(), map_size=32 << 20)
a = R.marked(R.NOW - 2 * R.DAY + R.MIN * np.arange(500), 1.0)
s, e = int(a["ts"][0]), int(a["ts"][-1]) + R.MIN
t.put_range("KRW-BTC", M1, s, e, a)
print("ready", flush=True)
sys.stdin.readline()  # the parent fills the disk
out = {}
b = R.marked(R.NOW - R.DAY + 1000 * np.arange(60_000), 2.0)  # 3 MB: past the file's slack
bs, be = int(b["ts"][0]), int(b["ts"][-1]) + 1000
try:
    t.put_range("KRW-ETH", S1, bs, be, b)
    out["full"] = "stored"
except StorageUnavailableError as exc:
    out["full"] = exc.errno
out["degraded"] = t.degraded
out["a_intact"] = bool(np.array_equal(t.get_range("KRW-BTC", M1, s, e), a))
out["b_held"] = t.held("KRW-ETH", S1).tolist()
print(json.dumps(out), flush=True)
sys.stdin.readline()  # the parent frees space
t.put_range("KRW-ETH", S1, bs, be, b)
out = {"b_read": bool(np.array_equal(t.get_range("KRW-ETH", S1, bs, be), b)), "degraded": t.degraded,
       "a_intact": bool(np.array_equal(t.get_range("KRW-BTC", M1, s, e), a)), "check": t.check()}
print(json.dumps(out), flush=True)
"""


def test_lmdb_tier_write_on_a_full_disk_is_enospc_then_works(fs: Path) -> None:
    # Without writemap LMDB writes pages with pwrite(): a full disk is ENOSPC, not a SIGBUS.
    child = Conversation(_TIER_WRITE, str(fs / "lmdb"))
    assert child.read() == "ready"
    filler = fill(fs)
    full = child.step()
    filler.unlink()
    after = child.step()
    child.finish()
    assert full == {"full": errno.ENOSPC, "degraded": True, "a_intact": True, "b_held": []}
    assert after == {"b_read": True, "degraded": False, "a_intact": True, "check": []}


# --- the store ----------------------------------------------------------------------------------

_STORE_OPEN = """
import sys
import mds
from mds.errors import MdsError
try:
    st = mds.open(sys.argv[1])
except MdsError as exc:
    print("refused", type(exc).__name__, exc)
else:
    print("opened")
    st.close()
"""


def test_store_opened_on_a_full_disk_is_a_typed_error(fs: Path) -> None:
    fill(fs)
    r = _child(_STORE_OPEN, str(fs / "store"))
    assert r.stdout.startswith("refused StorageUnavailableError"), r.stdout + r.stderr[-2000:]
    (fs / "filler").unlink()
    r = _child(_STORE_OPEN, str(fs / "store"))
    assert r.stdout.startswith("opened"), r.stdout + r.stderr[-2000:]
    R.TALLY["disk_full_scenarios"] += 1


#: Enough series that their change-stamp slots span every page of changes.bin.
SYMBOLS = [f"KRW-C{i:02d}" for i in range(24)]

_STORE_WRITE = """
import json, sys
import numpy as np
sys.path.insert(0, ".")
import _relutil as R
import mds
from mds.errors import StorageUnavailableError
path, when = sys.argv[1], sys.argv[2]
symbols = json.loads(sys.argv[3])
clock = R.Clock()
N = 1000
a = R.marked(R.T0 + R.MIN * np.arange(300), 1.0)
def batch(i):
    return R.marked(R.T0 + R.MIN * np.arange(N), 10.0 + i)
def read(sym, n):
    try:
        return st.candles(sym, "1m", start=R.T0, end=R.T0 + n * R.MIN)
    except StorageUnavailableError as exc:
        return "typed: " + str(exc)
if when == "before":
    st = mds.open(path, clock=clock)
    st.write_candles("KRW-BTC", "1m", a, complete=(R.T0, R.T0 + 300 * R.MIN))
else:
    with mds.open(path, clock=clock) as st:
        st.write_candles("KRW-BTC", "1m", a, complete=(R.T0, R.T0 + 300 * R.MIN))
print("ready", flush=True)
sys.stdin.readline()  # the parent fills the disk
if when == "after":
    st = mds.open(path, clock=clock)  # an existing store opens on a full disk
out = {"stored": [], "refused": [], "wrong": [], "typed_reads": []}
for i, sym in enumerate(symbols):
    try:
        st.write_candles(sym, "1m", batch(i))
        out["stored"].append(sym)
    except StorageUnavailableError:
        out["refused"].append(sym)
    got = read(sym, N)
    if isinstance(got, str):
        out["typed_reads"].append(got)
    elif sym in out["stored"] and not np.array_equal(got, batch(i)):
        out["wrong"].append(sym)
got = read("KRW-BTC", 300)
if isinstance(got, str):
    out["typed_reads"].append(got)
elif not np.array_equal(got, a):
    out["wrong"].append("KRW-BTC")
print(json.dumps(out), flush=True)
sys.stdin.readline()  # the parent frees space
out = {"refused": [], "wrong": []}
for i, sym in enumerate(symbols):
    try:
        st.write_candles(sym, "1m", batch(i))
    except StorageUnavailableError as exc:
        out["refused"].append(f"{sym}: {exc}")
        continue
    if not np.array_equal(read(sym, N), batch(i)):
        out["wrong"].append(sym)
print(json.dumps(out), flush=True)
st.close()
"""


@pytest.mark.parametrize("when", ["before", "after"])
def test_store_write_on_a_full_disk_then_space_frees(fs: Path, when: str) -> None:
    # "before": the store was open when the disk filled; "after": an existing store is opened
    # on the full disk. Either way: typed errors, acknowledged data intact, no SIGBUS (the
    # change-stamp file was a sparse map whose untouched pages faulted).
    path = fs / "store"
    child = Conversation(_STORE_WRITE, str(path), when, json.dumps(SYMBOLS))
    assert child.read() == "ready"
    filler = fill(fs)
    full = child.step()
    filler.unlink()
    after = child.step()
    child.finish()
    assert isinstance(full, dict)
    assert full["wrong"] == [], full  # a read answers what is stored, or a typed error
    assert full["refused"], "the disk never filled up"
    # Writes work again as soon as space frees (no waiting out a degraded tier).
    assert after == {"refused": [], "wrong": []}
    with mds.open(path, clock=R.Clock()) as st:  # everything acknowledged is there
        a = R.marked(R.T0 + R.MIN * np.arange(300), 1.0)
        assert np.array_equal(st.candles("KRW-BTC", "1m", start=R.T0, end=R.T0 + 300 * R.MIN), a)
        for i, sym in enumerate(SYMBOLS):
            want = R.marked(R.T0 + R.MIN * np.arange(1000), 10.0 + i)
            assert np.array_equal(st.candles(sym, "1m", start=R.T0, end=R.T0 + 1000 * R.MIN), want)
        assert st.check().ok
    R.TALLY["disk_full_typed_reads"] += len(full["typed_reads"])
    R.TALLY["disk_full_scenarios"] += 1
