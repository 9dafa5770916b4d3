"""SIGKILL a writer process at random (seeded) moments; after each kill nothing acknowledged is lost
and nothing is partial.

A child (``_rel_worker.py crash``) applies seeded batches (a ``write_candles`` with or without
``complete``, a ``store.batch()`` over two to four series, or a ``delete``) and appends each batch
id to an fsync'd file once the call returned. Batches commit in order, so after a kill the store
must equal a model that replayed either the acknowledged batches or those plus the one in flight:
every batch wholly present or wholly absent, every acknowledged batch present. The next child is
started while the previous one is checked, so the import cost does not count against the run.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _relutil as R
import numpy as np
import pytest
from _rel_worker import SERIES, plan

import mds
from mds import _kernels as K
from mds.timeframes import parse_timeframe

# TerminateProcess is another crash model, and SIGKILL does not exist there
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="signal.SIGKILL does not exist on Windows")

WORKER = str(Path(__file__).parent / "_rel_worker.py")


class Model:
    """What the store must hold after a prefix of the batches: rows per series and coverage."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], dict[int, bytes]] = {s: {} for s in SERIES}
        self.cov: dict[tuple[str, str], np.ndarray] = {s: np.zeros((0, 2), np.int64) for s in SERIES}

    def copy(self) -> Model:
        m = Model()
        m.rows = {k: dict(v) for k, v in self.rows.items()}
        m.cov = {k: v.copy() for k, v in self.cov.items()}
        return m

    def apply(self, kind: str, ops: list[Any]) -> None:
        if kind == "delete":
            sym, tfname, s, e = ops[0]
            d = self.rows[(sym, tfname)]
            for t in [t for t in d if s <= t < e]:
                del d[t]
            self.cov[(sym, tfname)] = K.interval_subtract(self.cov[(sym, tfname)], np.array([[s, e]], np.int64))
            return
        for sym, tfname, rows, complete in ops:
            d = self.rows[(sym, tfname)]
            for r in rows:  # in the order given: the last duplicate wins
                d[int(r["ts"])] = r.tobytes()
            if complete is not None:
                tf = parse_timeframe(tfname)
                cs, ce = tf.ceil(complete[0]), min(tf.ceil(complete[1]), tf.floor(R.NOW))
                if ce > cs:
                    self.cov[(sym, tfname)] = K.interval_union(self.cov[(sym, tfname)], np.array([[cs, ce]], np.int64))

    def array(self, key: tuple[str, str]) -> np.ndarray:
        d = self.rows[key]
        return np.frombuffer(b"".join(d[t] for t in sorted(d)), dtype=mds.CANDLE_DTYPE)

    def same_as(self, st: mds.Store) -> bool:
        for key in SERIES:
            got = st.candles(key[0], key[1], start=R.T0 - R.DAY, end=R.T0 + 11 * R.DAY)
            if got.tobytes() != self.array(key).tobytes():
                return False
            if st.coverage(*key) != [tuple(x) for x in self.cov[key].tolist()]:
                return False
        return True


def _spawn() -> subprocess.Popen[bytes]:
    R.TALLY["processes_started"] += 1
    return subprocess.Popen(
        [sys.executable, WORKER, "crash"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=R.child_env(),
    )


def _acks(path: Path) -> tuple[bool, list[int]]:
    try:
        lines = path.read_text().split("\n")[:-1]  # a torn last line (no newline) is not an ack
    except FileNotFoundError:
        return False, []
    return bool(lines) and lines[0] == "ready", [int(x) for x in lines[1:]]


def run_crashes(tmp_path: Path, kills: int, seed: int) -> dict[str, int]:
    rnd = random.Random(seed)
    path = tmp_path / "store"
    model = Model()
    next_id = 0
    acked_total = 0
    in_flight_committed = 0
    nxt = _spawn()
    t0 = time.monotonic()
    for i in range(kills):
        child, nxt = nxt, None
        ack = tmp_path / f"ack{i}"
        assert child.stdin is not None
        child.stdin.write(f"go {path} {seed} {next_id} {ack}\n".encode())
        child.stdin.flush()
        early = rnd.random() < 0.15  # some kills land while the store opens (recovery paths)
        delay = rnd.uniform(0.0, 0.05) if early else rnd.uniform(0.005, 0.3)
        if not early:
            deadline = time.monotonic() + 30
            while not _acks(ack)[0]:
                assert child.poll() is None, f"child died: {child.stderr.read().decode() if child.stderr else ''}"
                assert time.monotonic() < deadline, "child never opened the store"
                time.sleep(0.002)
        time.sleep(delay)
        if child.poll() is not None:
            err = child.stderr.read().decode() if child.stderr else ""
            pytest.fail(f"crash child exited by itself ({child.returncode}): {err[-3000:]}")
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        R.TALLY["crash_kills"] += 1
        nxt = _spawn() if i + 1 < kills else None  # warms up while this kill is checked
        _, ids = _acks(ack)
        assert ids == list(range(next_id, next_id + len(ids))), "acks out of order"
        for k in ids:
            model.apply(*plan(seed, k))
        acked_total += len(ids)
        with mds.open(path, clock=lambda: R.NOW) as st:
            rep = st.check()
            assert rep.ok, f"after kill {i} (acked up to {next_id + len(ids) - 1}): {rep.problems}"
            if model.same_as(st):
                next_id += len(ids)
            else:
                inflight = next_id + len(ids)
                candidate = model.copy()
                candidate.apply(*plan(seed, inflight))
                assert candidate.same_as(st), (
                    f"after kill {i}: the store matches neither the {len(ids)} acknowledged batches "
                    f"nor those plus batch {inflight} (lost or partial data)"
                )
                model = candidate
                next_id = inflight + 1
                in_flight_committed += 1
    if nxt is not None:
        nxt.kill()
        nxt.wait()
    secs = time.monotonic() - t0
    R.TALLY["crash_batches_acked"] += acked_total
    R.TALLY["crash_batches_committed_unacked"] += in_flight_committed
    R.TALLY["crash_seconds"] += round(secs)
    return {"acked": acked_total, "next_id": next_id}


def test_sigkill_loses_no_acknowledged_batch_and_leaves_none_partial(tmp_path: Path) -> None:
    out = run_crashes(tmp_path, kills=50, seed=20250106)
    assert out["acked"] > 50  # the kills landed between batches and inside them


@pytest.mark.stress
def test_sigkill_stress_many_kills(tmp_path: Path) -> None:
    out = run_crashes(tmp_path, kills=int(os.environ.get("MDS_REL_KILLS", "600")), seed=7)
    assert out["acked"] > 0
