"""One request budget per machine (issue 18): every ``UpbitRouter``, in any thread, event loop or
process, draws from one sliding window per (server, rate-limit group), kept in a small file under
a lock; FakeUpbit counts what reaches it, so a violation shows as a 429 or 418 in its log."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np
import pytest

import mds
from mds.layer1 import UpbitRouter
from mds.layer1._budget import (
    _TOKENS,
    MAX_HOLD_S,
    SharedBudget,
    _State,
    budget_name,
    default_dir,
    open_budget,
)
from mds.testing import FakeUpbit, generate_market
from mds.timeutil import to_ms

fcntl = pytest.importorskip("fcntl")

T0 = to_ms("2025-01-01T00:00:00Z")
DAY = 86_400_000
M = 60_000
BTC = generate_market("KRW-BTC", "1m", T0, T0 + DAY, seed=31)
LIVENESS_S = 60.0  # a bound on waiting for the others to finish, not a speed assertion


def most_in_any_window(stamps: list[float], window: float) -> int:
    """The largest number of ``stamps`` inside any half-open window ``(t - window, t]`` (FakeUpbit's
    window: a request exactly ``window`` old no longer counts)."""
    ts = sorted(stamps)
    best = lo = 0
    for hi, t in enumerate(ts):
        while ts[lo] <= t - window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def budget(d: Path, base_url: str = "http://127.0.0.1:9", *, limit: int = 10, window: float = 0.2) -> SharedBudget:
    b = open_budget(str(d), base_url, "candles", window)
    assert b is not None
    b.limit = limit
    return b


def child(script: str, *args: str) -> subprocess.Popen[str]:
    """A Python process running ``script``; it prints one line when it is ready."""
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )


def kill(proc: subprocess.Popen[str]) -> None:
    proc.kill()
    proc.wait(timeout=LIVENESS_S)  # reaped: no zombie left to look alive


R = TypeVar("R")


def bounded(fn: Callable[[], R]) -> R:
    """``fn()`` in a daemon thread: fails (instead of hanging the suite) if it has not returned
    within ``LIVENESS_S``."""
    out: list[R] = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()
    t.join(LIVENESS_S)
    assert out, f"{fn} did not return within {LIVENESS_S} s"
    return out[0]


def hold_lock(directory: Path, base_url: str, group: str, window: float) -> subprocess.Popen[str]:
    """A process that takes the budget file's lock and keeps it (until killed)."""
    holder = child(
        """
        import sys, time
        from mds.layer1._budget import open_budget
        b = open_budget(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]))
        with b._locked(blocking=True):
            print("locked", flush=True)
            time.sleep(600)
        """,
        str(directory),
        base_url,
        group,
        str(window),
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked", holder.stderr
    return holder


def file_state(b: SharedBudget) -> _State:
    with open(b.path, "rb") as f:  # the lock is not needed to read: the header checks the body
        state = _State.load(f.read())
    assert state is not None
    return state


# -- the budget file -----------------------------------------------------------------------------


def test_budget_files_live_in_a_private_directory_one_per_server_and_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = tmp_path / "budgets"
    b = budget(d, "http://127.0.0.1:8080")
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(b.path).st_mode) == 0o600
    assert os.path.basename(b.path) == "http_127.0.0.1_8080_candles_0.2s.budget"
    # another port is another server (FakeUpbit instances); another group another budget
    assert budget_name("http://127.0.0.1:8081", "candles", 0.2) != os.path.basename(b.path)
    assert budget_name("http://127.0.0.1:8080", "ticker", 0.2) != os.path.basename(b.path)
    assert budget_name("https://api.upbit.com", "candles", 1.0) == "https_api.upbit.com_443_candles_1s.budget"
    monkeypatch.setenv("MDS_BUDGET_DIR", str(tmp_path / "env"))
    assert default_dir() == str(tmp_path / "env")
    monkeypatch.delenv("MDS_BUDGET_DIR")
    assert default_dir().endswith(("mds-budget", f"mds-budget-{os.geteuid()}"))


def test_a_response_stamp_counts_for_every_budget_object_on_the_file(tmp_path: Path) -> None:
    a, b = budget(tmp_path, limit=2), budget(tmp_path, limit=2)
    assert a.path == b.path
    assert b._try_take(next(_TOKENS)) is None  # b takes a slot ...
    ta = asyncio.run(a.acquire())  # ... a the other
    a.release(None, ta)
    delay = b._try_take(next(_TOKENS))
    assert delay is not None and delay > 0  # one in flight and one stamp: the window is full


def test_remaining_req_or_a_429_seen_by_one_fills_the_window_for_all(tmp_path: Path) -> None:
    a, b = budget(tmp_path), budget(tmp_path)
    a.release(0, asyncio.run(a.acquire()))  # the server says: nothing left this window (or a 429)
    assert a.corrections == 9
    delay = b._try_take(next(_TOKENS))
    assert delay is not None and delay > 0
    asyncio.run(b.acquire())  # it frees one window after the response
    assert b.waits == 1


def test_remaining_req_from_one_router_slows_another_router_in_another_thread(tmp_path: Path) -> None:
    """Another client on the IP used 8 of 10; router A reads ``sec=1`` and fills the shared window,
    so router B (its own thread and event loop) waits instead of sending into a 429."""
    d = tmp_path / "b"
    with FakeUpbit({("KRW-BTC", "1m"): BTC}, rate_window_s=1.0, ban_after=None) as up:
        with httpx.Client() as c:
            for _ in range(8):
                assert c.get(up.base_url + "/v1/candles/minutes/1", params={"market": "KRW-BTC"}).status_code == 200

        async def one(r: UpbitRouter, n: int) -> dict[str, Any]:
            async with r:
                ends = [T0 + DAY - i * M for i in range(n)]
                await asyncio.gather(*(r.get_candle_data("KRW-BTC", "1m", count=1, to=e) for e in ends))
                return r.get_performance_summary()

        a = asyncio.run(one(UpbitRouter(up.base_url, budget_dir=d), 1))
        out: list[dict[str, Any]] = []
        t = threading.Thread(target=lambda: out.append(asyncio.run(one(UpbitRouter(up.base_url, budget_dir=d), 3))))
        t.start()
        t.join(LIVENESS_S)
        assert up.status_counts() == {200: 12}
    assert a["budget"]["groups"]["candles"]["corrections"] == 8
    assert out[0]["budget"]["waits"] >= 1 and out[0]["budget"]["shared"] is True


@pytest.mark.parametrize("shared", [True, False])
def test_two_routers_in_two_threads_draw_from_one_budget(tmp_path: Path, shared: bool) -> None:
    """Shared: no 429 and never more than the limit in a window. Each in its own directory (the
    old per-process pacing): together they exceed it and get 429s, so the check bites (there each
    sends 40, four windows' worth: the two overlap even when one thread starts late on a busy
    machine)."""
    window = 0.25
    each = 15 if shared else 40
    go = threading.Barrier(2)
    summaries: list[dict[str, Any]] = []

    def worker(url: str, d: Path) -> None:
        async def run() -> None:
            async with UpbitRouter(url, rate_window_s=window, backoff_s=0.01, budget_dir=d) as r:
                go.wait(LIVENESS_S)
                await asyncio.gather(*(r.get_ticker_data("KRW-BTC", use_cache=False) for _ in range(each)))
                summaries.append(r.get_performance_summary())

        asyncio.run(run())

    with FakeUpbit({("KRW-BTC", "1m"): BTC}, rate_window_s=window, ban_after=None) as up:
        dirs = [tmp_path / "b", tmp_path / "b"] if shared else [tmp_path / "b1", tmp_path / "b2"]
        threads = [threading.Thread(target=worker, args=(up.base_url, d)) for d in dirs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(LIVENESS_S)
        counts = up.status_counts()
        stamps = [r.received for r in up.requests() if r.status == 200]
    assert len(summaries) == 2
    if shared:
        assert counts == {200: 30}
        assert most_in_any_window(stamps, window) <= 10
        assert all(s["budget"]["shared"] for s in summaries)
        assert sum(s["budget"]["waits"] for s in summaries) >= 10  # 30 requests, 10 a window
    else:
        assert counts.get(429, 0) > 0


def test_a_slot_of_a_process_killed_in_flight_expires(tmp_path: Path) -> None:
    holder = child(
        """
        import asyncio, sys, time
        from mds.layer1._budget import open_budget
        b = open_budget(sys.argv[1], "http://127.0.0.1:9", "candles", 0.2)
        b.limit, b.hold_s = 2, 3600.0  # its slots never time out: only its death frees them
        asyncio.run(b.acquire()); asyncio.run(b.acquire())
        print("holding", flush=True)
        time.sleep(600)
        """,
        str(tmp_path),
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding", holder.stderr
        b = budget(tmp_path, limit=2)
        delay = b._try_take(next(_TOKENS))
        assert delay is not None and delay > 0  # both slots are in flight in the other process
    finally:
        kill(holder)
    asyncio.run(asyncio.wait_for(b.acquire(), LIVENESS_S))
    assert b.reaped == 2
    with open(b.path, "rb") as f:
        state = _State.load(f.read())
    assert state is not None and all(pid != holder.pid for pid, *_ in state.slots)


def test_a_slot_held_past_the_request_timeout_expires(tmp_path: Path) -> None:
    b = budget(tmp_path, limit=1, window=0.05)
    b.hold_s = 0.05
    asyncio.run(b.acquire())  # never released (a stuck holder of this very process)
    asyncio.run(asyncio.wait_for(b.acquire(), LIVENESS_S))
    assert b.reaped == 1


def test_a_process_killed_while_holding_the_lock_stalls_nobody(tmp_path: Path) -> None:
    with FakeUpbit({("KRW-BTC", "1m"): BTC}) as up:
        holder = child(
            """
            import sys, time
            from mds.layer1._budget import open_budget
            b = open_budget(sys.argv[1], sys.argv[2], "candles", 1.0)
            with b._locked(blocking=True):
                print("locked", flush=True)
                time.sleep(600)
            """,
            str(tmp_path),
            up.base_url,
        )
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "locked", holder.stderr
            path = tmp_path / budget_name(up.base_url, "candles", 1.0)
            fd = os.open(path, os.O_RDWR)
            try:
                with pytest.raises(BlockingIOError):  # it does hold the lock
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            finally:
                os.close(fd)
        finally:
            kill(holder)

        async def read() -> dict[str, Any]:
            async with UpbitRouter(up.base_url, budget_dir=tmp_path) as r:
                return await asyncio.wait_for(r.get_candle_data("KRW-BTC", "1m", count=5, to=T0 + DAY), LIVENESS_S)

        assert len(asyncio.run(read())["data"]) == 5
        assert up.status_counts() == {200: 1}


def test_a_garbled_budget_file_counts_as_a_full_window(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    b = budget(tmp_path, limit=3, window=0.05)
    Path(b.path).write_bytes(b"MDSB" + b"\xff" * 40)
    with caplog.at_level(logging.WARNING, "mds.layer1._budget"):
        delay = b._try_take(next(_TOKENS))
    assert delay is not None and delay > 0
    assert any("unreadable" in r.getMessage() for r in caplog.records)
    asyncio.run(asyncio.wait_for(b.acquire(), LIVENESS_S))  # rewritten sound, it frees a window later
    with open(b.path, "rb") as f:
        assert _State.load(f.read()) is not None


def test_an_unusable_budget_directory_falls_back_to_pacing_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")

    async def go(url: str) -> dict[str, Any]:
        async with UpbitRouter(url, rate_window_s=0.1, budget_dir=not_a_dir) as r:
            await asyncio.gather(*(r.get_ticker_data("KRW-BTC", use_cache=False) for _ in range(15)))
            return r.get_performance_summary()

    with FakeUpbit({("KRW-BTC", "1m"): BTC}, rate_window_s=0.1) as up, caplog.at_level(logging.WARNING):
        perf = asyncio.run(go(up.base_url))
        assert up.status_counts() == {200: 15}  # still paced, in this process
    assert perf["budget"]["shared"] is False and perf["budget"]["waits"] >= 1
    assert any("no machine-wide request budget" in r.getMessage() for r in caplog.records)
    assert not_a_dir.read_text() == "x"


# -- a lock that another process keeps, and slots from a previous boot ------------------------------


def test_a_live_process_keeping_the_lock_does_not_stall_a_router(tmp_path: Path) -> None:
    """The holder takes the lock and is stopped (SIGSTOP): a router in another process waits a
    bounded time, then paces alone with a warning, and finishes its requests."""
    victim_script = """
        import asyncio, json, sys
        from mds.layer1 import UpbitRouter
        async def main():
            async with UpbitRouter(sys.argv[1], budget_dir=sys.argv[2], max_retries=0) as r:
                for _ in range(3):
                    answer = await r.get_ticker_data("KRW-BTC", use_cache=False)
                    assert answer["success"], answer
                print(json.dumps(r.get_performance_summary()["budget"]), flush=True)
        asyncio.run(main())
        """
    with FakeUpbit({("KRW-BTC", "1m"): BTC}, ban_after=None) as up:
        holder = hold_lock(tmp_path, up.base_url, "ticker", 1.0)
        victim: subprocess.Popen[str] | None = None
        try:
            holder.send_signal(signal.SIGSTOP)
            victim = child(victim_script, up.base_url, str(tmp_path))
            try:
                out, err = victim.communicate(timeout=LIVENESS_S)
            except subprocess.TimeoutExpired:
                pytest.fail("the router stalled while another process kept the budget's lock")
        finally:
            if victim is not None and victim.returncode is None:
                kill(victim)
            kill(holder)
        counts = up.status_counts()
    assert victim.returncode == 0, err
    assert counts == {200: 3}
    fig = json.loads(out)
    assert fig["shared"] is False  # still pacing alone: the holder kept the lock to the end
    assert fig["groups"]["ticker"]["lock_fallbacks"] == 1
    assert "held its lock" in err


def test_a_budget_paced_alone_while_the_lock_was_kept_shares_again_and_loses_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    b = budget(tmp_path, limit=10, window=60.0)  # nothing expires during the test
    b.lock_wait_s = b.lock_retry_s = 0.05
    t1 = asyncio.run(b.acquire())  # a slot in the file
    holder = hold_lock(tmp_path, "http://127.0.0.1:9", "candles", 60.0)
    try:
        bounded(lambda: b.release(None, t1))  # returns at once; its stamp waits for the lock
        assert [s[1] for s in file_state(b).slots] == [t1]  # the slot is kept, not lost
        with caplog.at_level(logging.WARNING, "mds.layer1._budget"):
            t2 = bounded(lambda: asyncio.run(b.acquire()))  # waits lock_wait_s, then paces alone
        assert not b.shared and b.lock_fallbacks == 1
        assert any("held its lock" in r.getMessage() for r in caplog.records)
        b.release(None, t2)
        t3 = bounded(lambda: asyncio.run(b.acquire()))  # the lock is still kept: alone again
        assert not b.shared
    finally:
        kill(holder)
    time.sleep(b.lock_retry_s)  # the next acquisition tries the file again
    t4 = asyncio.run(asyncio.wait_for(b.acquire(), LIVENESS_S))
    assert b.shared
    state = file_state(b)
    # t1's stamp written at last, t2's carried over from pacing alone, t3 still in flight (now a
    # slot of the file, so its release stamps it there), t4 taken from the file
    assert len(state.done) == 2
    assert sorted(s[1] for s in state.slots) == [t3, t4]
    b.release(None, t3)
    b.release(None, t4)
    state = file_state(b)
    assert len(state.done) == 4 and state.slots == []


def test_a_response_stamp_that_waited_for_the_lock_is_written_when_it_is_free(tmp_path: Path) -> None:
    """Released on a running event loop while another process keeps the lock: the release returns
    at once, and the stamp is written once the lock is free, without another request to carry it."""
    b = budget(tmp_path, limit=10, window=60.0)
    acquired, locked, released = threading.Event(), threading.Event(), threading.Event()
    out: list[_State] = []

    async def run() -> None:
        token = await b.acquire()
        acquired.set()
        await asyncio.to_thread(locked.wait, LIVENESS_S)
        b.release(None, token)
        released.set()
        deadline = time.monotonic() + LIVENESS_S
        while file_state(b).slots:
            assert time.monotonic() < deadline, "the stamp was never written"
            await asyncio.sleep(0.01)
        out.append(file_state(b))

    # The loop runs in its own thread so that this one can end the holder whatever happens.
    loop_thread = threading.Thread(target=lambda: asyncio.run(run()), daemon=True)
    loop_thread.start()
    assert acquired.wait(LIVENESS_S)
    holder = hold_lock(tmp_path, "http://127.0.0.1:9", "candles", 60.0)
    try:
        locked.set()
        assert released.wait(LIVENESS_S), "release() waited for the lock"
        assert len(file_state(b).slots) == 1  # kept in flight until the stamp can be written
    finally:
        kill(holder)
    loop_thread.join(LIVENESS_S)
    assert out and len(out[0].done) == 1 and b.shared


def test_slots_from_a_previous_boot_are_reaped(tmp_path: Path) -> None:
    """A persistent budget directory after a reboot: slots written by the old boot's monotonic
    clock (taken in this boot's future, or due beyond any hold), by pids that live again."""
    b = budget(tmp_path, limit=10, window=0.2)
    sleeper = subprocess.Popen(["sleep", "600"], text=True)
    try:
        pid = sleeper.pid  # alive: only the times can tell these slots are over
        now = time.monotonic()
        old = now + 6 * 86_400.0  # the old boot had been up six days longer
        stale = [(pid, 100 + i, old, old + 60.0) for i in range(5)]
        stale += [(pid, 200 + i, now - 1.0, now + 7 * 86_400.0) for i in range(5)]
        live = (pid, 300, now, now + 30.0)  # a request in flight now: kept
        Path(b.path).write_bytes(_State(slots=[*stale, live]).dump())
        token = asyncio.run(asyncio.wait_for(b.acquire(), LIVENESS_S))
        assert b.reaped == 10
        assert sorted(s[1] for s in file_state(b).slots) == sorted([300, token])
    finally:
        kill(sleeper)
    b.hold_s = 10 * MAX_HOLD_S
    assert b.hold_s == MAX_HOLD_S  # no slot of a budget is due further ahead


# -- the scenario: four processes, one FakeUpbit with Upbit's limits -------------------------

SYMS = ("KRW-BTC", "KRW-ETH", "KRW-XRP", "KRW-SOL")
SPAN = 5_000 * M  # 25 requests of 200 candles each per process


def backfill(home: Path, budget_dir: Path, symbol: str, url: str) -> subprocess.Popen[str]:
    env = dict(os.environ, MDS_BUDGET_DIR=str(budget_dir))
    return subprocess.Popen(
        [sys.executable, "-m", "mds.cli", "--path", str(home), "backfill", symbol,
         "--since", str(T0), "--until", str(T0 + SPAN), "--base-url", url],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def markets() -> dict[tuple[str, str], np.ndarray]:
    return {(s, "1m"): generate_market(s, "1m", T0, T0 + SPAN, seed=i) for i, s in enumerate(SYMS)}


def assert_full_history(home: Path, symbol: str, want: np.ndarray) -> None:
    with mds.open(home) as st:
        got = st.candles(symbol, "1m", start=T0, end=T0 + SPAN)
    assert np.array_equal(got["ts"], want["ts"]) and np.array_equal(got["close"], want["close"])


def test_four_processes_backfill_from_one_fakeupbit_without_a_429(tmp_path: Path) -> None:
    data = markets()
    with FakeUpbit(data, rate_limit=10, rate_window_s=1.0) as up:  # blocks after repeated 429s
        procs = [backfill(tmp_path / s, tmp_path / "budget", s, up.base_url) for s in SYMS]
        outs = [p.communicate(timeout=120) for p in procs]
        recs = up.requests()
        counts = up.status_counts()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err
    assert counts == {200: len(recs)}  # not one 429 or 418
    per_market = {s: sum(r.params.get("market") == s for r in recs) for s in SYMS}
    assert all(25 <= n <= 40 for n in per_market.values()), per_market
    assert most_in_any_window([r.received for r in recs], 1.0) <= 10
    for s in SYMS:
        assert_full_history(tmp_path / s, s, data[(s, "1m")])


def test_a_backfill_killed_mid_run_does_not_stall_the_others(tmp_path: Path) -> None:
    """The victim is stopped at a moment it holds a slot (seen in the budget file), then SIGKILLed:
    the others reap its slot and finish."""
    data = markets()
    budget_dir = tmp_path / "budget"
    with FakeUpbit(data, rate_limit=10, rate_window_s=1.0) as up:
        up.inject("latency", seconds=0.05, path_prefix="/v1/candles")  # slots stay in flight a while
        procs = [backfill(tmp_path / s, budget_dir, s, up.base_url) for s in SYMS]
        victim = procs[0]
        path = budget_dir / budget_name(up.base_url, "candles", 1.0)
        deadline = time.monotonic() + LIVENESS_S
        held = False
        while not held:
            assert time.monotonic() < deadline, "the victim never held a slot after its 8th request"
            if up.request_count() and sum(r.params.get("market") == SYMS[0] for r in up.requests()) >= 8:
                victim.send_signal(signal.SIGSTOP)
                state = _State.load(path.read_bytes())
                held = state is not None and any(pid == victim.pid for pid, *_ in state.slots)
                if not held:
                    victim.send_signal(signal.SIGCONT)
            time.sleep(0.002)
        kill(victim)
        outs = [p.communicate(timeout=LIVENESS_S) for p in procs[1:]]
        recs = up.requests()
        counts = up.status_counts()
        state = _State.load(path.read_bytes())
    for p, (_, err) in zip(procs[1:], outs):
        assert p.returncode == 0, err
    assert victim.returncode == -signal.SIGKILL
    assert counts == {200: len(recs)}
    assert most_in_any_window([r.received for r in recs], 1.0) <= 10
    assert state is not None and all(pid != victim.pid for pid, *_ in state.slots)  # reaped
    for s in SYMS[1:]:
        assert_full_history(tmp_path / s, s, data[(s, "1m")])
