"""A read-only store directory (issue 14, item 2): it opens read-only and serves reads; writes
raise StorageUnavailableError. Before, the SQLite tier failed to open there, every read answered
an empty array and ``mds get`` printed "0 candles" with exit code 0.

Runs on a small tmpfs remounted read-only (root bypasses file permissions, so chmod cannot make a
directory read-only for the test; skipped without root).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import _relutil as R
import numpy as np
import pytest

import mds

pytestmark = pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to mount a tmpfs read-only"
)

SYM = "KRW-BTC"
N = 3000


@pytest.fixture
def ro_store(tmp_path: Path) -> Iterator[tuple[Path, np.ndarray]]:
    """A store with N candles on a tmpfs, remounted read-only; unmounted at the end."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m,mode=0700", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        path = mnt / "store"
        rows = R.marked(R.T0 + R.MIN * np.arange(N), 1.0)
        # written by a child, so that no handle of this process keeps the file system busy
        code = (
            "import sys, numpy as np, mds, _relutil as R\n"
            "with mds.open(sys.argv[1], clock=R.Clock()) as st:\n"
            f"    st.write_candles({SYM!r}, '1m', R.marked(R.T0 + R.MIN * np.arange({N}), 1.0),"
            f" complete=(R.T0, R.T0 + {N} * R.MIN))\n"
        )
        subprocess.run(
            [sys.executable, "-c", code, str(path)],
            check=True,
            timeout=120,
            env=R.child_env(),
            cwd=Path(R.__file__).parent,
        )
        r = subprocess.run(["mount", "-o", "remount,ro", str(mnt)], capture_output=True)
        if r.returncode:
            pytest.skip(f"cannot remount read-only: {r.stderr.decode().strip()}")
        yield path, rows
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_read_only_directory_opens_read_only_and_serves_reads(ro_store: tuple[Path, np.ndarray]) -> None:
    path, rows = ro_store
    with mds.open(path, clock=R.Clock()) as st:
        assert not st.writable
        assert st.candles(SYM, "1m", count=100).tobytes() == rows[-100:].tobytes()
        assert st.candles(SYM, "1m", start=R.T0, end=R.T0 + N * R.MIN).tobytes() == rows.tobytes()
        assert st.candles(SYM, "1m", start=R.T0 + 10 * R.MIN, count=5).tobytes() == rows[10:15].tobytes()
        assert st.coverage(SYM, "1m") == [(R.T0, R.T0 + N * R.MIN)]
        assert st.gaps(SYM, "1m") == []
        resp = asyncio.run(st.get(mds.StorageRequest("candle", [SYM], timeframe="1m", count=10)))
        assert resp.success and resp.arrays[SYM].tobytes() == rows[-10:].tobytes()
        with pytest.raises(mds.StorageUnavailableError, match="read-only"):
            st.write_candles(SYM, "1m", R.marked([R.T0 + N * R.MIN], 2.0))
        with pytest.raises(mds.StorageUnavailableError, match="read-only"):
            st.delete(SYM, "1m")
        assert st.candles(SYM, "1m", count=1).tobytes() == rows[-1:].tobytes()  # nothing changed


def test_mds_get_on_a_read_only_directory_prints_the_candles(ro_store: tuple[Path, np.ndarray]) -> None:
    path, _ = ro_store
    r = subprocess.run(
        [sys.executable, "-m", "mds.cli", "get", SYM, "-t", "1m", "--start", str(R.T0), "--end",
         str(R.T0 + 5 * R.MIN), "--format", "csv", "--path", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=R.child_env(),
    )
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1 + 5, r.stdout  # a header and five candles


def test_a_read_only_store_with_layer1_answers_fetches_unstored(ro_store: tuple[Path, np.ndarray]) -> None:
    """A read the tiers do not cover fetches from Layer 1 and cannot store it: it answers what
    Layer 1 supplied (typed errors only), and the read-only files stay as they were. Found by the
    model test: the fill wrote to the read-only change map and failed untyped."""
    from mds.layer1 import UpbitRouter
    from mds.testing import FakeUpbit

    path, rows = ro_store
    clock = R.Clock()
    truth = R.marked(R.T0 + R.MIN * np.arange(N + 500), 1.0)
    with FakeUpbit({(SYM, "1m"): truth}, clock=clock, rate_limit=None) as up:
        l1 = UpbitRouter(up.base_url, rate_limit=1000, backoff_s=0.01, max_backoff_s=0.05, clock=clock)
        cfg = mds.Config(lookup="storage_first")
        with mds.open(path, layer1=l1, config=cfg, clock=clock) as st:
            got = st.candles(SYM, "1m", start=R.T0 + (N - 100) * R.MIN, end=R.T0 + (N + 300) * R.MIN)
            assert got.tobytes() == truth[N - 100 : N + 300].tobytes()
            assert st.coverage(SYM, "1m") == [(R.T0, R.T0 + N * R.MIN)]  # nothing was stored
            assert st.candles(SYM, "1m", start=R.T0, end=R.T0 + N * R.MIN).tobytes() == rows.tobytes()
