"""Processes sharing a store directory without a durable tier (``tiers=("memory", "disk")``).

LMDB is then the store they share. What one process writes or deletes is what the others answer
at their next read, never what they kept in memory before: a write stamps the series as a
durable write does (changes.bin), and a reader drops its memory of a series whose stamp moved.
Two processes writing one series both land: a fill of LMDB is refused when another process began
a write of the series since this one stamped it, and is merged again with what the other left.
The other process is a real one (tests/_fast_peer.py), driven line by line.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import mds
from mds import Config
from mds.testing import dense_candles
from mds.timeutil import to_ms

PEER = str(Path(__file__).parent / "_fast_peer.py")
SYM, TF = "KRW-BTC", "1m"
MIN = 60_000
T = to_ms("2025-01-06T00:00:00Z")  # the data end here (exclusive)
NOW = T + 30_000
CFG = Config(tiers=("memory", "disk"))
ANSWER_S = 60.0  # bound on one answer of the peer


class Peer:
    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self._sel = selectors.DefaultSelector()
        assert proc.stdout is not None
        self._sel.register(proc.stdout, selectors.EVENT_READ)

    def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        if not self._sel.select(timeout=ANSWER_S):
            raise AssertionError(f"the peer gave no answer within {ANSWER_S} s")
        line = self.proc.stdout.readline()
        assert line, f"the peer exited ({self.proc.poll()})"
        out: dict[str, Any] = json.loads(line)
        return out

    def ask(self, cmd: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self.read()


@contextmanager
def peer(path: Path) -> Iterator[Peer]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    proc = subprocess.Popen(
        [sys.executable, PEER, str(path), str(NOW)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    p = Peer(proc)
    try:
        assert p.read() == {"ready": True}
        yield p
    finally:
        if proc.poll() is None:
            assert proc.stdin is not None
            proc.stdin.write("quit\n")
            proc.stdin.close()
            try:
                proc.wait(timeout=ANSWER_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
        p._sel.close()


def history() -> np.ndarray:
    return dense_candles(500, T - 500 * MIN, MIN, seed=3)


def revised(arr: np.ndarray, idx: list[int], factor: float) -> np.ndarray:
    """The candles at ``idx`` of ``arr`` with their close (and high) moved."""
    fix = arr[sorted(i % len(arr) for i in idx)].copy()
    fix["close"] = np.round(fix["close"] * factor, -3)
    fix["high"] = np.maximum(fix["high"], fix["close"])
    fix["low"] = np.minimum(fix["low"], fix["close"])
    return fix


def applied(arr: np.ndarray, fix: np.ndarray) -> np.ndarray:
    out = arr.copy()
    out[np.searchsorted(out["ts"], fix["ts"])] = fix
    return out


def memory_hits(st: mds.Store) -> int:
    return int(st.stats()["hits"]["storage_memory"])


def test_a_revision_by_one_process_is_what_the_other_answers_next(tmp_path: Path) -> None:
    arr = history()
    with mds.open(tmp_path, config=CFG, clock=lambda: NOW) as st:
        st.write_candles(SYM, TF, arr)
        with peer(tmp_path) as b:
            b.ask("latest 100")
            again = b.ask("latest 100")
            assert again["source"] == ["storage_memory"]  # the peer's memory holds the series
            assert again["close"] == arr["close"][-100:].tolist()

            fix = revised(arr, [-1, -50], 1.5)
            st.write_candles(SYM, TF, fix)
            want = applied(arr, fix)
            got = b.ask("latest 100")
            assert got["ts"] == want["ts"][-100:].tolist()
            assert got["close"] == want["close"][-100:].tolist()
            got = b.ask(f"range {int(arr['ts'][-60])} {T}")
            assert got["close"] == want["close"][-60:].tolist()

            # and the other way round: this process's memory holds the series too
            st.candles(SYM, TF, count=5)
            hits = memory_hits(st)
            assert st.candles(SYM, TF, count=5)["close"].tolist() == want["close"][-5:].tolist()
            assert memory_hits(st) == hits + 1
            assert b.ask(f"set {int(arr['ts'][-2])} 12345000") == {"ok": True}
            assert st.candles(SYM, TF, count=5)["close"].tolist()[-2] == 12345000.0


def test_a_delete_by_one_process_is_not_answered_by_the_other(tmp_path: Path) -> None:
    arr = history()
    ts = arr["ts"]
    with mds.open(tmp_path, config=CFG, clock=lambda: NOW) as st:
        st.write_candles(SYM, TF, arr)
        with peer(tmp_path) as b:
            b.ask("latest 100")
            again = b.ask(f"range {int(ts[-100])} {T}")
            assert again["source"] == ["storage_memory"] and len(again["ts"]) == 100
            assert st.delete(SYM, TF, start=int(ts[-10])) == 10
            got = b.ask(f"range {int(ts[-100])} {T}")
            assert got["ts"] == ts[-100:-10].tolist()
            got = b.ask("latest 20")
            assert got["ts"] == ts[-30:-10].tolist()


def test_two_processes_writing_one_series_both_land(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The other process writes between this one's stamp and its LMDB fill (made to happen there,
    inside this write): the fill is refused, merged again with the other's candle, and both land."""
    arr = history()
    ts = arr["ts"]
    with mds.open(tmp_path, config=CFG, clock=lambda: NOW) as st:
        st.write_candles(SYM, TF, arr)
        st.candles(SYM, TF, count=100)  # this process's memory holds the newest candles
        with peer(tmp_path) as b:
            writer = st._writer
            merge = writer._merge_with_fast
            calls: list[int] = []

            def merge_after_the_other(*args: Any) -> np.ndarray:
                if not calls:
                    assert b.ask(f"set {int(ts[-7])} 11111000") == {"ok": True}
                calls.append(1)
                return merge(*args)

            writer._merge_with_fast = merge_after_the_other  # type: ignore[method-assign]
            mine = revised(arr, [-3], 2.0)
            with caplog.at_level(logging.INFO, logger="mds.store.writes"):
                st.write_candles(SYM, TF, mine)
            writer._merge_with_fast = merge  # type: ignore[method-assign]
            assert len(calls) == 2  # merged twice: the first fill was refused
            assert "another process wrote the series meanwhile" in caplog.text

            want = applied(arr, mine)
            want["close"][-7] = want["open"][-7] = want["high"][-7] = want["low"][-7] = 11111000.0
            got = b.ask(f"range {int(ts[-20])} {T}")
            assert got["close"] == want["close"][-20:].tolist()
            assert st.candles(SYM, TF, start=int(ts[-20]), end=T)["close"].tolist() == want["close"][-20:].tolist()
    # and a store opened afresh reads both from LMDB
    with mds.open(tmp_path, config=Config(tiers=("disk",)), clock=lambda: NOW) as fresh:
        assert fresh.candles(SYM, TF, start=int(ts[-20]), end=T)["close"].tolist() == want["close"][-20:].tolist()


@pytest.mark.parametrize("tiers", [("disk",), ("memory", "disk")])
def test_a_range_the_fast_tiers_hold_in_parts_answers_every_stored_part(tmp_path: Path, tiers: tuple[str, ...]) -> None:
    """Without a durable tier (nor Layer 1), a range that no tier holds whole is answered from
    the parts they hold: never only memory's window, never an empty array."""
    arr = history()
    ts = arr["ts"]
    with mds.open(tmp_path, config=Config(tiers=tiers), clock=lambda: NOW) as st:
        st.write_candles(SYM, TF, arr[:200])
        st.write_candles(SYM, TF, arr[300:])
        want = np.concatenate([arr[:200], arr[300:]])
        assert st.candles(SYM, TF, start=int(ts[0]), end=T).tobytes() == want.tobytes()
        assert st.candles(SYM, TF, start=int(ts[150]), end=int(ts[350])).tobytes() == want[150:250].tobytes()
        assert st.delete(SYM, TF, start=int(ts[-10])) == 10
        assert st.candles(SYM, TF, start=int(ts[100]), end=T).tobytes() == want[100:-10].tobytes()
        assert len(st.candles(SYM, TF, start=int(ts[210]), end=int(ts[290]))) == 0  # nothing stored there


def test_gap_kinds_without_a_durable_tier_see_every_stored_part(tmp_path: Path) -> None:
    """A ``no_trades`` label needs coverage *and* no stored candle: with candles held in two
    parts of LMDB, the covered slots that hold candles are no gap at all."""
    arr = history()
    ts = arr["ts"]
    with mds.open(tmp_path, config=Config(tiers=("disk",)), clock=lambda: NOW) as st:
        st.write_candles(SYM, TF, np.delete(arr[:200], [50]), complete=(int(ts[0]), int(ts[200])))
        st.write_candles(SYM, TF, arr[300:], complete=(int(ts[300]), T))
        gaps = [(g.start, g.end, g.kind) for g in st.gaps(SYM, TF, start=int(ts[0]), end=T)]
        assert gaps == [(int(ts[50]), int(ts[51]), "no_trades"), (int(ts[200]), int(ts[300]), "missing")]
