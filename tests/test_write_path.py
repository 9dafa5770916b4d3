"""The shorter write and read paths of issue 20 give the same answers as the general ones.

- A memory-only store merges writes into its window in place and counts them there.
- At the live edge a durable store takes a dense batch as the durable tier's rows (no read back)
  and does not copy a small append past what LMDB holds into LMDB; LMDB takes it from a later
  read. A bulk append still fills LMDB.
- Inside a batch, a delete after a write makes the waiting fills read the committed rows back.
- gaps() labels holes in one pass; latest-N on a memory-only store takes the memory hit.
All against real tiers (SQLite file, LMDB environment), no Layer 1.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import mds
from mds import Config
from mds.testing import dense_candles
from mds.timeframes import TIMEFRAMES

M = 60_000
T0 = 1_700_000_040_000 // M * M
TF = TIMEFRAMES["1m"]
SYM = "KRW-BTC"


class Clock:
    def __init__(self, t: int) -> None:
        self.t = t

    def __call__(self) -> int:
        return self.t


def _lmdb_held(st: mds.Store, sym: str = SYM) -> list[tuple[int, int]]:
    disk = st._health.tier("disk")
    return [(int(a), int(b)) for a, b in disk.held(sym, TF).tolist()]


def _brute_gaps(ts: np.ndarray, cov: list[tuple[int, int]], start: int, end: int) -> list[tuple[int, int, str]]:
    """One slot at a time: absent slots in [start, end), labelled by coverage, runs merged."""
    have = set(ts.tolist())
    out: list[tuple[int, int, str]] = []
    for t in range(start, end, M):
        if t in have:
            continue
        kind = "no_trades" if any(a <= t < b for a, b in cov) else "missing"
        if out and out[-1][1] == t and out[-1][2] == kind:
            out[-1] = (out[-1][0], t + M, kind)
        else:
            out.append((t, t + M, kind))
    return out


# ---------------------------------------------------------------------------------------------
# memory-only stores
# ---------------------------------------------------------------------------------------------
def test_memory_only_counts_equal_a_full_store(tmp_path: Path) -> None:
    """The same writes (new, overlapping, corrected, unchanged, out of order with duplicates)
    count the same in a memory-only store as in one with every tier, and read back the same."""
    a = dense_candles(3_000, T0, seed=3)
    clock = Clock(T0 + 3_000 * M)
    full = mds.open(tmp_path / "full", clock=clock)
    mem = mds.open(tmp_path / "mem", config=Config(tiers=("memory",), memory_candles=10_000), clock=clock)
    changed = a[1_500:1_700].copy()
    changed["close"] = changed["low"]  # still valid, different bytes
    shuffled = np.concatenate([a[2_900:], a[2_950:2_960]])[::-1].copy()
    for batch in (a[:1_000], a[800:2_000], a[800:2_000], changed, a[2_000:2_900], shuffled):
        assert mem.write_candles(SYM, "1m", batch) == full.write_candles(SYM, "1m", batch)
    want = np.concatenate([a[:1_500], changed, a[1_700:]])
    for st in (mem, full):
        assert st.candles(SYM, "1m", start=T0, end=T0 + 3_000 * M).tobytes() == want.tobytes()
    full.close()
    mem.close()


def test_memory_only_latest_is_a_memory_hit_with_the_clock_ahead(tmp_path: Path) -> None:
    a = dense_candles(500, T0, seed=4)
    clock = Clock(T0 + 10_000 * M)  # stored data ends long before now (no Layer 1 to ask)
    st = mds.open(tmp_path, config=Config(tiers=("memory",)), clock=clock)
    st.write_candles(SYM, "1m", a, complete=(T0, T0 + 600 * M))  # coverage reaches past the data
    before = st.stats()["tiers"]["memory"]["misses"]
    for n in (1, 10, 500):
        got = st.candles(SYM, "1m", count=n)
        assert got.tobytes() == a[-n:].tobytes() and not got.flags.writeable
    assert st.stats()["tiers"]["memory"]["misses"] == before  # each answered by the memory hit
    assert st.candles(SYM, "1m", count=501).tobytes() == a.tobytes()  # fewer held: all of them
    st.close()


# ---------------------------------------------------------------------------------------------
# the live edge of a durable store
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def edge(tmp_path: Path) -> tuple[mds.Store, Clock, np.ndarray]:
    hist = dense_candles(2_000, T0, seed=5)
    clock = Clock(T0 + 2_000 * M)
    st = mds.open(tmp_path, clock=clock)
    st.write_candles(SYM, "1m", hist)
    return st, clock, hist


def test_appends_skip_lmdb_and_a_later_read_fills_it(edge: tuple[mds.Store, Clock, np.ndarray], tmp_path: Path) -> None:
    st, clock, hist = edge
    held = _lmdb_held(st)
    assert held and held[-1][1] == T0 + 2_000 * M
    new = dense_candles(5, T0 + 2_000 * M, seed=6)
    for i in range(5):
        clock.t = T0 + (2_001 + i) * M + 1_000
        with st.batch():
            r = st.write_candles(SYM, "1m", new[i : i + 1])
        assert (r.inserted, r.updated, r.unchanged) == (1, 0, 0)
    assert _lmdb_held(st) == held  # LMDB was not rewritten for each new minute
    want = np.concatenate([hist, new])
    assert st.candles(SYM, "1m", count=1_000).tobytes() == want[-1_000:].tobytes()  # memory
    # another store on the directory (memory empty) reads the durable tier, and fills LMDB
    other = mds.open(tmp_path, clock=clock)
    assert other.candles(SYM, "1m", count=1_005).tobytes() == want[-1_005:].tobytes()
    assert _lmdb_held(other)[-1][1] == T0 + 2_005 * M
    got = other.candles(SYM, "1m", start=T0 + 1_990 * M, end=T0 + 2_005 * M)
    assert got.tobytes() == want[1_990:].tobytes()
    other.close()
    st.close()


def test_a_bulk_append_still_fills_lmdb(edge: tuple[mds.Store, Clock, np.ndarray]) -> None:
    """Only small appends (the live edge) go around LMDB: a backfill's pages still fill it."""
    from mds.store.writes import LMDB_APPEND_MIN

    st, clock, _ = edge
    n = LMDB_APPEND_MIN
    clock.t = T0 + (2_000 + n) * M
    st.write_candles(SYM, "1m", dense_candles(n, T0 + 2_000 * M, seed=12))
    assert _lmdb_held(st)[-1][1] == T0 + (2_000 + n) * M
    st.close()


def test_a_correction_at_the_edge_reaches_every_tier(edge: tuple[mds.Store, Clock, np.ndarray], tmp_path: Path) -> None:
    """A rewrite of candles LMDB holds is not an append: LMDB drops and refills the span."""
    st, clock, hist = edge
    fix = hist[-3:].copy()
    fix["volume"] += 1.0  # every row's bytes change
    fix["value"] += 1.0
    with st.batch():
        r = st.write_candles(SYM, "1m", fix)
    assert (r.inserted, r.updated, r.unchanged) == (0, 3, 0)
    want = np.concatenate([hist[:-3], fix])
    assert st.candles(SYM, "1m", count=100).tobytes() == want[-100:].tobytes()
    disk = st._health.tier("disk")
    assert disk.get_range(SYM, TF, T0 + 1_997 * M, T0 + 2_000 * M).tobytes() == fix.tobytes()
    other = mds.open(tmp_path, config=Config(tiers=("sqlite",)), clock=clock)
    assert other.candles(SYM, "1m", count=100).tobytes() == want[-100:].tobytes()
    other.close()
    st.close()


def test_write_then_delete_in_one_batch_leaves_no_copy(
    edge: tuple[mds.Store, Clock, np.ndarray], tmp_path: Path
) -> None:
    st, clock, hist = edge
    clock.t = T0 + 2_003 * M
    new = dense_candles(2, T0 + 2_000 * M, seed=7)
    with st.batch():
        st.write_candles(SYM, "1m", new)
        st.delete(SYM, "1m", start=T0 + 2_001 * M, end=T0 + 2_002 * M)
    assert st.candles(SYM, "1m", count=2).tobytes() == np.concatenate([hist[-1:], new[:1]]).tobytes()
    assert st.candles(SYM, "1m", start=T0 + 2_001 * M, end=T0 + 2_002 * M).tobytes() == b""
    other = mds.open(tmp_path, config=Config(tiers=("sqlite",)), clock=clock)
    assert other.candles(SYM, "1m", start=T0 + 1_999 * M, end=T0 + 2_002 * M).tobytes() == (
        np.concatenate([hist[-1:], new[:1]]).tobytes()
    )
    other.close()
    st.close()


def test_two_writes_of_one_minute_in_a_batch_the_last_wins(edge: tuple[mds.Store, Clock, np.ndarray]) -> None:
    st, clock, _ = edge
    clock.t = T0 + 2_001 * M + 1_000
    first = dense_candles(1, T0 + 2_000 * M, seed=8)
    second = first.copy()
    second["volume"] += 1.0
    second["value"] += 1.0
    with st.batch():
        st.write_candles(SYM, "1m", first)
        r = st.write_candles(SYM, "1m", second)
    assert (r.inserted, r.updated, r.unchanged) == (0, 1, 0)
    assert st.candles(SYM, "1m", count=1).tobytes() == second.tobytes()
    assert st._health.db().read_range(SYM, TF, T0 + 2_000 * M, T0 + 2_001 * M).tobytes() == second.tobytes()
    st.close()


def test_an_append_after_a_write_lmdb_takes_in_one_batch_reaches_lmdb(
    edge: tuple[mds.Store, Clock, np.ndarray], tmp_path: Path
) -> None:
    """A batch's first write rewrites candles LMDB holds and runs past its end (LMDB takes it,
    with its own rows); a second write of the batch then rewrites that new part as a small
    append. LMDB decides both before the commit, but fills them in order after it: the second
    must reach LMDB too, or LMDB keeps the first write's superseded rows there."""
    st, clock, hist = edge
    clock.t = T0 + 2_005 * M + 1_000
    assert _lmdb_held(st)[-1][1] == T0 + 2_000 * M
    first = dense_candles(10, T0 + 1_995 * M, seed=10)  # 1995..2004: a correction and an append
    second = dense_candles(5, T0 + 2_000 * M, seed=11)  # 2000..2004 again, other bytes
    second["volume"] = first["volume"][5:] + 1.0
    second["value"] = first["value"][5:] + 1.0
    with st.batch():
        st.write_candles(SYM, "1m", first)
        st.write_candles(SYM, "1m", second)
    want = np.concatenate([hist[:-5], first[:5], second])
    disk = st._health.tier("disk")
    got = disk.get_range(SYM, TF, T0 + 1_995 * M, T0 + 2_005 * M)
    assert got is None or got.tobytes() == want[-10:].tobytes()  # not held, or exactly what is stored
    assert st.check().ok
    other = mds.open(tmp_path, clock=clock)  # memory empty: the latest rows come from LMDB
    assert other.candles(SYM, "1m", count=100).tobytes() == want[-100:].tobytes()
    other.close()
    st.close()


def test_a_rolled_back_batch_leaves_every_tier_as_it_was(edge: tuple[mds.Store, Clock, np.ndarray]) -> None:
    st, clock, hist = edge
    clock.t = T0 + 2_002 * M + 1_000
    held = _lmdb_held(st)
    def failing_batch() -> None:
        with st.batch():
            st.write_candles(SYM, "1m", dense_candles(2, T0 + 2_000 * M, seed=9))
            raise RuntimeError("the strategy failed mid-batch")

    with pytest.raises(RuntimeError, match="mid-batch"):
        failing_batch()
    assert _lmdb_held(st) == held
    assert st.candles(SYM, "1m", count=1_000).tobytes() == hist[-1_000:].tobytes()
    assert st.candles(SYM, "1m", start=T0 + 2_000 * M, end=T0 + 2_002 * M).tobytes() == b""
    disk = st._health.tier("disk")  # the reads above may fill LMDB: with what is stored, nothing
    assert disk.get_range(SYM, TF, T0 + 1_999 * M, T0 + 2_002 * M).tobytes() == hist[-1:].tobytes()
    st.close()


# ---------------------------------------------------------------------------------------------
# gaps in one pass
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tiers", [("memory",), ("memory", "disk", "sqlite"), ("sqlite",)])
def test_gaps_equal_a_slot_by_slot_answer(tmp_path: Path, tiers: tuple[str, ...]) -> None:
    rng = np.random.default_rng(11)
    a = dense_candles(3_000, T0, seed=10)
    a = np.delete(a, rng.choice(np.arange(1, 2_999), 300, replace=False))
    clock = Clock(T0 + 3_100 * M)
    st = mds.open(tmp_path, config=Config(tiers=tiers, memory_candles=5_000), clock=clock)
    covs = [(T0 + 100 * M, T0 + 900 * M), (T0 + 1_500 * M, T0 + 1_501 * M), (T0 + 2_000 * M, T0 + 3_050 * M)]
    st.write_candles(SYM, "1m", a)
    for c in covs:
        st.write_candles(SYM, "1m", a[(a["ts"] >= c[0]) & (a["ts"] < c[1])], complete=c)
    cov = st.coverage(SYM, "1m")
    for lo, hi in ((T0, T0 + 3_050 * M), (T0 + 850 * M, T0 + 2_100 * M), (T0 + 1_500 * M, T0 + 1_502 * M)):
        got = [(g.start, g.end, g.kind) for g in st.gaps(SYM, "1m", start=lo, end=hi)]
        assert got == _brute_gaps(a["ts"], cov, lo, hi)
    assert {g.kind for g in st.gaps(SYM, "1m")} == {"missing", "no_trades"}
    st.close()


# ---------------------------------------------------------------------------------------------
# Ctrl-C while a Layer 1 call is in flight
# ---------------------------------------------------------------------------------------------
_CTRL_C = """
import asyncio, os, signal, threading, sys
import mds

class SlowLayer1:
    # a Layer 1 whose answers take longer than the user waits
    async def _slow(self, *args, **kwargs):
        await asyncio.sleep(30)
        return {"success": True, "data": [], "metadata": {}}

    get_candle_data = get_ticker_data = get_orderbook_data = get_trades = _slow

st = mds.open(sys.argv[1], layer1=SlowLayer1(), config=mds.Config(layer1_timeout_s=60))
threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()  # the user's Ctrl-C
try:
    st.candles("KRW-BTC", "1m", count=10)
except KeyboardInterrupt:
    print("interrupted", flush=True)
st.close()
print("closed", flush=True)
"""


@pytest.mark.skipif(__import__("sys").platform == "win32", reason="SIGINT to oneself is POSIX")
def test_ctrl_c_during_a_layer1_call_closes_cleanly(tmp_path: Path) -> None:
    """The interrupted call is cancelled, close() winds the loop down: no "Task was destroyed
    but it is pending!", no "Exception ignored" at exit, and close() does not wait out the call."""
    import subprocess
    import sys
    import time

    t0 = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-c", _CTRL_C, str(tmp_path / "s")], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["interrupted", "closed"]
    assert "Task was destroyed" not in res.stderr and "Exception ignored" not in res.stderr, res.stderr
    assert time.monotonic() - t0 < 20  # not the 30 s the call would have taken


# ---------------------------------------------------------------------------------------------
# two writers on one directory (found by review): a write between another's steps
# ---------------------------------------------------------------------------------------------
def _version(a: np.ndarray, v: float) -> np.ndarray:
    a = a.copy()
    a["volume"] = v
    a["value"] = v * a["open"]
    return a


def _two_stores(tmp_path: Path) -> tuple[mds.Store, mds.Store, np.ndarray, Clock]:
    clock = Clock(T0 + 400 * M)
    hist = dense_candles(300, T0, seed=1)
    s1 = mds.open(tmp_path, clock=clock)
    s1.write_candles(SYM, "1m", hist)
    s1.candles(SYM, "1m", count=300)  # LMDB and memory hold the series
    s2 = mds.open(tmp_path, clock=clock)
    s2.candles(SYM, "1m", count=300)
    return s1, s2, hist, clock


def test_a_commit_between_anothers_commit_and_its_final_stamp_leaves_no_stale_copy(tmp_path: Path) -> None:
    """s1 corrects a minute LMDB holds and commits; s2 commits another value for it before s1
    stamps final (s1's final stamp then hides s2's). s1 must not fill LMDB or memory with its own
    row as committed: it reads the durable tier back."""
    s1, s2, hist, clock = _two_stores(tmp_path)
    t = 250
    w1 = s1._writer
    orig = w1.end_changes

    def end_changes_late() -> set[tuple[str, str]]:
        s2.write_candles(SYM, "1m", _version(hist[t : t + 1], 2.0))
        return orig()

    w1.end_changes = end_changes_late  # type: ignore[method-assign]
    s1.write_candles(SYM, "1m", _version(hist[t : t + 1], 1.0))
    w1.end_changes = orig  # type: ignore[method-assign]
    durable = s1._health.db().read_range(SYM, TF, T0, T0 + 300 * M)
    assert durable["volume"][t] == 2.0  # s2 committed last
    lm = s1._health.tier("disk").get_range(SYM, TF, T0 + t * M, T0 + (t + 1) * M)
    assert lm is None or lm.tobytes() == durable[t : t + 1].tobytes()
    assert s1.candles(SYM, "1m", count=100)["volume"][t - 200] == 2.0
    s3 = mds.open(tmp_path, clock=clock)
    assert s3.candles(SYM, "1m", start=T0 + t * M, end=T0 + (t + 1) * M)["volume"][0] == 2.0
    for st in (s1, s2, s3):
        st.close()


def test_a_commit_between_anothers_sync_and_its_begin_leaves_no_stale_memory(tmp_path: Path) -> None:
    s1, s2, hist, _ = _two_stores(tmp_path)
    slots = s1._writer.slots
    orig = slots.begin
    t = 250

    def begin_late(sym: str, tf: object) -> None:
        slots.begin = orig  # type: ignore[method-assign]
        s2.write_candles(SYM, "1m", _version(hist[t : t + 1], 2.0))
        orig(sym, tf)  # type: ignore[arg-type]

    slots.begin = begin_late  # type: ignore[method-assign]
    s1.write_candles(SYM, "1m", dense_candles(1, T0 + 300 * M, seed=9))  # an append elsewhere
    got = s1.candles(SYM, "1m", count=100)
    assert got["volume"][got["ts"] == T0 + t * M][0] == 2.0  # not the row s2 replaced
    s1.close()
    s2.close()


def test_a_memory_only_write_after_a_hole_keeps_the_older_candles(tmp_path: Path) -> None:
    clock = Clock(T0 + 100 * M)
    a = dense_candles(30, T0, seed=1)
    full = mds.open(tmp_path / "full", config=Config(tiers=("sqlite",)), clock=clock)
    mem = mds.open(tmp_path / "mem", config=Config(tiers=("memory",)), clock=clock)
    for st in (full, mem):
        st.write_candles(SYM, "1m", a[:10])
        st.write_candles(SYM, "1m", a[20:25])  # 10 minutes after the last: a hole
        st.write_candles(SYM, "1m", a[12:14])  # into the hole
    for st in (full, mem):
        assert st.candles(SYM, "1m", count=17).tobytes() == np.concatenate([a[:10], a[12:14], a[20:25]]).tobytes()
    assert mem.write_candles(SYM, "1m", a[:3]) == full.write_candles(SYM, "1m", a[:3])  # unchanged, both
    assert [(g.start, g.end) for g in mem.gaps(SYM, "1m")] == [(g.start, g.end) for g in full.gaps(SYM, "1m")]
    full.close()
    mem.close()


def _colliding_symbols() -> tuple[str, str]:
    """Two series of one timeframe whose change stamps share a slot (4,096 slots)."""
    from mds.store.changes import ChangeSlots

    cs = ChangeSlots()
    seen: dict[int, str] = {}
    for i in range(10_000):
        sym = f"KRW-C{i:04d}"
        slot = cs.slot((sym, "1m"))
        if slot in seen:
            return seen[slot], sym
        seen[slot] = sym
    raise AssertionError("no two symbols share a slot")


def test_series_sharing_a_stamp_slot_do_not_disturb_each_other(tmp_path: Path) -> None:
    """This process's write to one series must not look like another writer's change to a series
    that shares its slot: no memory dropped, nothing read back, every answer right."""
    a_sym, b_sym = _colliding_symbols()
    clock = Clock(T0 + 2_000 * M)
    st = mds.open(tmp_path, clock=clock)
    hist = {s: dense_candles(2_000, T0, seed=i) for i, s in enumerate((a_sym, b_sym))}
    for s, h in hist.items():
        st.write_candles(s, "1m", h)
        st.candles(s, "1m", count=1_000)
    mem = st._health.tier("memory")
    for k in range(3):
        clock.t = T0 + (2_001 + k) * M + 1_000
        new = {s: dense_candles(1, T0 + (2_000 + k) * M, seed=100 + i) for i, s in enumerate(hist)}
        with st.batch():
            for s in hist:
                st.write_candles(s, "1m", new[s])
        for s in hist:
            hist[s] = np.concatenate([hist[s], new[s]])
            held = mem.held(s, TF)
            assert held is not None and held[1] - held[0] >= 1_000 * M  # the window was kept
            assert st.candles(s, "1m", count=1_000).tobytes() == hist[s][-1_000:].tobytes()
    st.close()


# ---------------------------------------------------------------------------------------------
# the durable tier trusts the store's own validation, and only that
# ---------------------------------------------------------------------------------------------
def test_a_validated_tier_write_still_refuses_what_prepare_does_not_promise(tmp_path: Path) -> None:
    """``validated=True`` (the store's write path: rows from the prepare kernel) skips the
    per-row check in the durable tier, not the checks of shape, order and ts range; without
    it every row is checked. An invalid candle through the store is refused before either."""
    from mds.errors import InvalidCandleError
    from mds.tiers.durable import open_durable

    db = open_durable(tmp_path / "tier", Config(), readonly=False, clock=lambda: T0 + 100 * M)
    c = dense_candles(3, T0)
    bad = c.copy()
    bad["low"][1] = bad["high"][1] + 1.0  # low above the body
    with pytest.raises(InvalidCandleError):
        db.write(SYM, TF, bad)
    with pytest.raises(InvalidCandleError, match="sorted"):
        db.write(SYM, TF, c[::-1].copy(), validated=True)
    far = c[:1].copy()
    far["ts"] = 2**62
    with pytest.raises(InvalidCandleError, match="out of range"):
        db.write(SYM, TF, far, validated=True)
    assert db.read_range(SYM, TF, T0, T0 + 10 * M).tobytes() == b""  # nothing stored
    assert db.write(SYM, TF, c, validated=True) == (3, 0, 0)
    db.close()
    with mds.open(tmp_path / "store", clock=Clock(T0 + 100 * M)) as st:
        with pytest.raises(InvalidCandleError, match="low_above_body"):
            st.write_candles(SYM, "1m", bad)
        assert len(st.candles(SYM, "1m", start=T0, end=T0 + 10 * M)) == 0


@pytest.mark.parametrize("tiers", [("memory", "disk", "sqlite"), ("memory", "sqlite"), ("memory", "disk")])
def test_a_write_longer_than_memory_keeps_no_window_it_made_stale(tmp_path: Path, tiers: tuple[str, ...]) -> None:
    """Memory takes only the newest ``memory_candles`` of a longer write: a window it held from
    before, proven empty where the write put candles, must not answer that part any more."""
    rows = dense_candles(67, T0 + 274 * M, M, seed=5)
    with mds.open(tmp_path, config=Config(tiers=tiers, memory_candles=50), clock=lambda: T0 + 400 * M + 30_000) as st:
        st.write_candles(SYM, "1m", rows[:0], complete=(T0 + 274 * M, T0 + 300 * M))  # no trades there
        st.write_candles(SYM, "1m", rows)  # late candles there, and more: longer than memory keeps
        got = st.candles(SYM, "1m", start=T0 + 274 * M, end=T0 + 291 * M)
        assert got.tobytes() == rows[:17].tobytes()
