"""Issue 14 item 9: ``mds import`` is bounded and every hostile file is one line on stderr, exit 2.

The file is streamed in batches (memory depends on the batch size, not on the file), a batched
import stores exactly what a one-batch import stores, and a bad row in the last batch leaves every
tier as it was (the whole import is one ``store.batch()``).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import threading
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _relutil as R
import numpy as np
import pytest

import mds
from mds import cli
from mds.timeframes import parse_timeframe
from mds.timeutil import now_ms

MIN = 60_000
KST = 9 * 3_600_000
HEADER = "timestamp,open,high,low,close,volume,value\n"
ROW_TS = 1_611_999_960_000  # 2021-01-30T09:46:00Z, a whole minute
linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not hasattr(os, "wait4"), reason="ru_maxrss per child (wait4) in KiB"
)


# ---------------------------------------------------------------------------------------------
# helpers


def write_ccxt(path: Path, ts: np.ndarray, seed: int = 0) -> np.ndarray:
    """A ccxt CSV (with a value column) of valid candles at ``ts``, written row by row (streaming:
    no list of the whole file is ever built). Returns the candles in file order."""
    a = R.marked(ts, 1.5)
    rng = np.random.default_rng(seed)
    a["volume"] = np.round(rng.uniform(0.1, 9.0, len(a)), 3)
    a["value"] = a["volume"] * a["close"]
    with path.open("w", newline="") as fh:
        fh.write(HEADER)
        block = 100_000
        for i in range(0, len(a), block):
            b = a[i : i + block]
            fh.write(
                "".join(
                    f"{t},{o!r},{h!r},{lo!r},{c!r},{v!r},{val!r}\n"
                    for t, o, h, lo, c, v, val in zip(
                        b["ts"].tolist(),
                        b["open"].tolist(),
                        b["high"].tolist(),
                        b["low"].tolist(),
                        b["close"].tolist(),
                        b["volume"].tolist(),
                        b["value"].tolist(),
                    )
                )
            )
    return a


def upbit_dicts(a: np.ndarray, sym: str = "KRW-BTC") -> list[dict[str, Any]]:
    utc = np.datetime_as_string(a["ts"].astype("datetime64[ms]").astype("datetime64[s]")).tolist()
    kst = np.datetime_as_string((a["ts"] + KST).astype("datetime64[ms]").astype("datetime64[s]")).tolist()
    return [
        {
            "market": sym,
            "candle_date_time_utc": u,
            "candle_date_time_kst": k,
            "opening_price": float(r["open"]),
            "high_price": float(r["high"]),
            "low_price": float(r["low"]),
            "trade_price": float(r["close"]),
            "timestamp": int(r["ts"]) + 59_000,
            "candle_acc_trade_price": float(r["value"]),
            "candle_acc_trade_volume": float(r["volume"]),
            "unit": 1,
        }
        for u, k, r in zip(utc, kst, a)
    ]


def write_format(path: Path, fmt: str, a: np.ndarray) -> None:
    """``a`` (file order, duplicates allowed) in one of the import formats."""
    fields = ("open", "high", "low", "close", "volume", "value")
    if fmt == "ccxt-csv":
        with path.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["timestamp", *fields])
            w.writerows([int(r["ts"]), *(repr(float(r[f])) for f in fields)] for r in a)
    elif fmt == "pyupbit-csv":
        with path.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["", *fields])
            for r in a:
                kst = str(np.datetime64(int(r["ts"]) + KST, "ms").astype("datetime64[s]")).replace("T", " ")
                w.writerow([kst, *(repr(float(r[f])) for f in fields)])
    elif fmt == "upbit-csv":
        rows = upbit_dicts(a)
        with path.open("w", newline="") as fh:
            dw = csv.DictWriter(fh, fieldnames=list(rows[0]))
            dw.writeheader()
            dw.writerows(rows)
    elif fmt == "upbit-json":
        path.write_text(json.dumps(upbit_dicts(a), indent=1))
    else:  # upbit-json as pages of 13 candles
        rows = upbit_dicts(a)
        path.write_text(json.dumps([rows[i : i + 13] for i in range(0, len(rows), 13)]))


def run_main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """The CLI in this process: any exception that escapes main() fails the test."""
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def recent_start(days: int) -> int:
    """A minute ``days`` days before now: recent enough for the LMDB tier (31-day window)."""
    return (now_ms() // MIN - days * 1440) * MIN


def stored(home: Path, lo: int, hi: int) -> tuple[np.ndarray, list[tuple[int, int]], list[Any]]:
    """Every stored candle of KRW-BTC 1m, its coverage, and its gaps in [lo, hi)."""
    with mds.open(home, config=mds.Config(tiers=("sqlite",))) as st:
        rows = st.candles("KRW-BTC", "1m", start=0, end=now_ms() // MIN * MIN)
        return rows, st.coverage("KRW-BTC", "1m"), st.gaps("KRW-BTC", "1m", start=lo, end=hi)


def peak_child(
    args: list[str], tmp: Path, limit_bytes: int = 2 << 30, timeout: float = 300
) -> tuple[int, str, str, int]:
    """Run ``python -m mds.cli ARGS`` and return (exit code, stdout, stderr, peak RSS in bytes) of
    that child alone (wait4, not RUSAGE_CHILDREN: earlier children of this process would count).
    The child's data size is capped, so a regression fails with MemoryError instead of eating
    the machine."""

    import resource  # POSIX only; the tests that use this are Linux only

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_DATA, (limit_bytes, limit_bytes))

    out, err = tmp / "child.out", tmp / "child.err"
    with out.open("w") as fo, err.open("w") as fe:
        p = subprocess.Popen(
            [sys.executable, "-m", "mds.cli", *args], stdout=fo, stderr=fe, env=dict(os.environ), preexec_fn=cap
        )
        watchdog = threading.Timer(timeout, p.kill)  # a hang fails, it does not block the suite
        watchdog.start()
        try:
            _, status, usage = os.wait4(p.pid, 0)
        finally:
            watchdog.cancel()
        p.returncode = os.waitstatus_to_exitcode(status)
    return p.returncode, out.read_text(), err.read_text(), usage.ru_maxrss * 1024


# ---------------------------------------------------------------------------------------------
# memory is bounded by the batch, not by the file


@linux_only
def test_peak_memory_of_an_import_does_not_grow_with_the_file(tmp_path: Path) -> None:
    small, big = tmp_path / "small.csv", tmp_path / "big.csv"
    n_small, n_big = 50_000, 1_000_000
    write_ccxt(small, ROW_TS - MIN * (n_big + 10) + MIN * np.arange(n_small, dtype=np.int64))
    write_ccxt(big, ROW_TS - MIN * n_big + MIN * np.arange(n_big, dtype=np.int64), seed=1)
    peaks = {}
    for name, path, n in (("small", small, n_small), ("big", big, n_big)):
        home = tmp_path / f"store-{name}"
        code, out, err, peak = peak_child(
            ["import", str(path), "-s", "KRW-BTC", "-t", "1m", "--path", str(home)], tmp_path
        )
        assert code == 0, err
        assert f"{n} candles" in out and f"{n} inserted" in out, out
        peaks[name] = peak
    # The old import held the whole file (text, rows, lists): ~800 MiB more for the big file. Now
    # the big file costs at most SQLite's page cache (64 MiB, filled by a large transaction) more.
    grown = peaks["big"] - peaks["small"]
    assert grown < 128 * 2**20, (peaks, big.stat().st_size)
    R.TALLY["import_rows_streamed"] += n_big


@pytest.mark.parametrize("fmt", ["ccxt-csv", "upbit-json", "upbit-json-pages"])
def test_python_heap_of_an_import_is_bounded_by_the_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], fmt: str
) -> None:
    monkeypatch.setattr("mds._importers.BATCH_ROWS", 1600)
    warm = tmp_path / "warm.csv"  # the first import loads modules: not measured
    write_ccxt(warm, ROW_TS - MIN * 10 + MIN * np.arange(10, dtype=np.int64))
    assert run_main(capsys, "import", str(warm), "-s", "KRW-BTC", "-t", "1m", "--path", str(tmp_path / "w"))[0] == 0
    peaks = []
    for n in (8_000, 40_000):
        path = tmp_path / f"f{n}.{'json' if fmt.startswith('upbit-json') else 'csv'}"
        a = R.marked(ROW_TS - MIN * n + MIN * np.arange(n, dtype=np.int64), 2.0)
        write_format(path, fmt, a)
        del a
        tracemalloc.start()
        try:
            code, out, err = run_main(
                capsys, "import", str(path), "-s", "KRW-BTC", "-t", "1m", "--path", str(tmp_path / f"s{n}")
            )
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
        assert code == 0, err
        assert f"{n} inserted" in out
    # five times the rows in batches of the same size: the peak of Python's heap (numpy arrays
    # included) does not follow the file; the old import held all of it, several times over
    assert peaks[1] < peaks[0] * 1.25 + 2**20, peaks


def sparse(path: Path, head: bytes, size: int = 1 << 30) -> bool:
    """A file of ``size`` bytes that is ``head`` then a hole of NULs, then one byte. False when the
    filesystem allocated the hole (no sparse files here)."""
    with path.open("wb") as fh:
        fh.write(head)
        fh.seek(size - 1)
        fh.write(b"x")
    return path.stat().st_blocks * 512 < 64 << 20


@linux_only
@pytest.mark.parametrize(
    ("name", "head"),
    [
        ("holes.csv", b""),
        ("header-then-holes.csv", b"timestamp,open,high,low,close,volume\n1611999960000,1,2,0.5,1.5,3\n"),
        ("bracket-then-holes.json", b"["),
    ],
)
def test_a_sparse_gigabyte_ends_at_once_with_exit_2(tmp_path: Path, name: str, head: bytes) -> None:
    path = tmp_path / name
    if not sparse(path, head):
        path.unlink()
        pytest.skip("this filesystem does not keep sparse files")
    home = tmp_path / "store"
    code, out, err, peak = peak_child(["import", str(path), "-s", "KRW-BTC", "-t", "1m", "--path", str(home)], tmp_path)
    assert code == 2, (code, err[-2000:])
    assert "NUL bytes" in one_line(err) and out == ""
    # the old import read the whole gigabyte (and decoded it: 6 GB); now one block of text
    assert peak < 256 * 2**20, peak
    assert not home.exists()
    path.unlink()
    R.TALLY["import_hostile_files"] += 1


# ---------------------------------------------------------------------------------------------
# hostile files: one line on stderr, exit 2, nothing stored

_H = b"timestamp,open,high,low,close,volume\n"
_J = (
    b'[{"candle_date_time_utc": "2021-01-30T09:46:00", "opening_price": %s, "high_price": %s, '
    b'"low_price": 1, "trade_price": 1.5, "candle_acc_trade_volume": 1, "candle_acc_trade_price": 1.5}]'
)


def _csv_row(ts: str = "1611999960000", o: str = "1", h: str = "2", lo: str = "0.5", c: str = "1.5") -> bytes:
    return _H + f"{ts},{o},{h},{lo},{c},3\n".encode()


HOSTILE: dict[str, tuple[bytes | Callable[[Path], Path], str]] = {
    "binary garbage": (np.random.default_rng(14).integers(0, 256, 4096, dtype=np.uint8).tobytes(), "not UTF-8"),
    "NUL bytes in a header": (b"timestamp,open\x00,high,low,close,volume\n", "NUL bytes"),
    "NUL bytes in a row": (_H + b"1611999960000,1,2,0.5,1.5,\x003\n", "NUL bytes"),
    "a huge field": (_H + b'"' + b"9" * 300_000 + b'",1,2,0.5,1.5,3\n', "longer than"),
    "a quote left open": (_H + b'"1611999960000,1,2\n' + b"1,2,3\n" * 40_000, "a quote left open"),
    "20 MB without a newline": (b"1" * 20_000_000, "longer than"),
    "a list 100k deep": (b"[" * 100_000 + b"]" * 100_000, "nested deeper"),
    "an object 100k deep": (b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested deeper"),
    "a candle with a 100k deep value": (b'[{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}]", "nested deeper"),
    "a page nested in a page": (b"[[[{}]]]", "nested deeper"),
    "an unterminated JSON string": (b'[{"a": "' + b"x" * 5_000_000, "longer than"),
    "a huge JSON integer": (_J % (b"1" * 5000, b"2"), "not a finite number"),
    "ts 1e999": (_csv_row(ts="1e999"), "not a time"),
    "ts -1e999": (_csv_row(ts="-1e999"), "not a time"),
    "ts nan": (_csv_row(ts="nan"), "not a time"),
    "ts 99999999999999999999999": (_csv_row(ts="99999999999999999999999"), "outside the years"),
    "ts -99999999999999999999999": (_csv_row(ts="-99999999999999999999999"), "outside the years"),
    "ts before 1900": (_csv_row(ts="-9999999999999"), "outside the years"),
    "ts a fraction of a ms": (_csv_row(ts="1611999960000.5"), "not a time"),
    "price 1e999": (_csv_row(h="1e999"), "not a finite number"),
    "price -1e999": (_csv_row(lo="-1e999"), "not a finite number"),
    "price nan": (_csv_row(o="nan"), "not a finite number"),
    "price 99999999999999999999999 (above high)": (_csv_row(o="99999999999999999999999"), "invalid candle"),
    "price negative": (_csv_row(o="-1", h="-0.5", lo="-2", c="-1"), "not a positive price"),
    "price zero": (_csv_row(o="0", h="0", lo="0", c="0"), "not a positive price"),
    "JSON price 1e999": (_J % (b"1e999", b"2"), "not a finite number"),
    "JSON price NaN": (_J % (b"NaN", b"2"), "not a finite number"),
    "JSON price -Infinity": (_J % (b"-Infinity", b"2"), "not a finite number"),
    "JSON price zero": (_J % (b"0", b"0"), "not a positive price"),
    "latin-1": ("timestamp,open,high,low,close,volume\n# caf\xe9\n".encode("latin-1"), "not UTF-8"),
    "UTF-16": (_csv_row().decode().encode("utf-16"), "not UTF-8"),
    "an empty file": (b"", "is empty"),
    "only blanks": (b" \n\r\n\t \n" * 1000, "is empty"),
    "a header only": (_H, "holds no candles"),
    "an empty JSON list": (b"[ ]", "holds no candles"),
    "JSON cut short": (b'[{"market": "KRW-BTC", ', "not valid JSON"),
    "JSON with trailing garbage": (b"[] ]", "not valid JSON"),
    "a directory": (lambda tmp: tmp, "a directory"),
    "a file that does not exist": (lambda tmp: tmp / "nope.csv", "No such file"),
}


def _fifo(path: Path) -> Path:
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_file_is_one_line_exit_2_and_stores_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    content, needle = HOSTILE[case]
    if callable(content):
        path = content(tmp_path)
    else:
        path = tmp_path / ("bad.json" if content.lstrip()[:1] in (b"[", b"{") else "bad.csv")
        path.write_bytes(content)
    home = tmp_path / "store"
    code, out, err = run_main(capsys, "import", str(path), "-s", "KRW-BTC", "-t", "1m", "--path", str(home))
    assert code == 2, (code, err)
    line = one_line(err)
    assert line.startswith("mds import: error:") and needle in line, line
    assert len(line) < 600, line  # the file's content is not echoed
    assert out == ""
    assert not home.exists()  # refused before any store was created
    R.TALLY["import_hostile_files"] += 1


@linux_only
@pytest.mark.parametrize("kind", ["a FIFO", "/dev/zero"])
def test_a_fifo_or_a_device_is_refused_at_once(tmp_path: Path, kind: str) -> None:
    """In a child process, capped and watched: the old command blocked forever on a FIFO with no
    writer, and read /dev/zero until memory ran out."""
    path = _fifo(tmp_path / "fifo") if kind == "a FIFO" else Path(kind)
    if not path.exists():
        pytest.skip(f"no {kind} here")
    home = tmp_path / "store"
    code, out, err, _ = peak_child(
        ["import", str(path), "-s", "KRW-BTC", "-t", "1m", "--path", str(home)], tmp_path, timeout=60
    )
    assert code == 2, (code, err[-2000:])
    line = one_line(err)
    assert ("a FIFO" if kind == "a FIFO" else "not a regular file") in line, line
    assert out == "" and not home.exists()


def test_storage_failure_stays_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "ok.csv"
    write_ccxt(path, ROW_TS - MIN * 10 + MIN * np.arange(10, dtype=np.int64))
    home = tmp_path / "store"
    home.mkdir()
    (home / "candles.sqlite3").write_bytes(b"this is not a database" * 200)
    code, out, err = run_main(capsys, "import", str(path), "-s", "KRW-BTC", "-t", "1m", "--path", str(home))
    assert code == 1, (code, out, err)
    assert one_line(err).startswith("mds import: error:")


# ---------------------------------------------------------------------------------------------
# batches: the same result as one batch, and all or nothing


def messy_candles(seed: int, order: str) -> np.ndarray:
    """Candles with holes and duplicates (a later duplicate carries other values: it must win)."""
    rng = np.random.default_rng(seed)
    base = ROW_TS - 400 * MIN
    slots = np.sort(rng.choice(300, 200, replace=False)).astype(np.int64)
    a = R.marked(base + MIN * slots, 1.0)
    dup_at = np.sort(rng.choice(len(a), 25, replace=False))
    out = []
    for i, r in enumerate(a):
        out.append(r)
        if i in dup_at:  # right after the row: adjacent duplicates, as a sorted file has them
            d = r.copy()
            d["volume"] = 7.0 + i
            d["value"] = d["volume"] * d["close"]
            out.append(d)
    arr = np.array(out, dtype=a.dtype)
    if order == "descending":
        # newest first, as Upbit pages are; a run of duplicates keeps its order (the last still wins)
        groups = np.split(arr, np.flatnonzero(np.diff(arr["ts"])) + 1)
        arr = np.concatenate(groups[::-1])
    elif order == "shuffled":
        arr = arr[rng.permutation(len(arr))]
    return arr


def last_wins(arr: np.ndarray) -> np.ndarray:
    _, idx = np.unique(arr["ts"][::-1], return_index=True)
    return arr[::-1][idx]


@pytest.mark.parametrize("order", ["ascending", "descending", "shuffled"])
@pytest.mark.parametrize("fmt", ["ccxt-csv", "pyupbit-csv", "upbit-csv", "upbit-json", "upbit-json-pages"])
def test_a_batched_import_stores_what_one_batch_stores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], fmt: str, order: str
) -> None:
    arr = messy_candles(sum(map(ord, fmt + order)), order)
    path = tmp_path / ("f.json" if fmt.startswith("upbit-json") else "f.csv")
    write_format(path, fmt, arr)
    want = last_wins(arr)
    tf = parse_timeframe("1m")
    results = {}
    for batch_rows in (7, 10**6):
        monkeypatch.setattr("mds._importers.BATCH_ROWS", batch_rows)
        home = tmp_path / f"s{batch_rows}"
        code, out, err = run_main(
            capsys, "import", str(path), "-s", "KRW-BTC", "-t", "1m", "--complete", "--path", str(home)
        )
        assert code == 0, err
        lo, hi = int(want["ts"][0]), tf.add(int(want["ts"][-1]), 1)
        rows, cov, gaps = stored(home, lo, hi)
        assert rows.tobytes() == want.tobytes(), (batch_rows, fmt, order)
        # --complete: the whole span of the file, holes between batches included, is covered
        assert cov == [(lo, hi)], cov
        assert gaps and all(g.kind == "no_trades" for g in gaps), gaps
        results[batch_rows] = (out, gaps)
    assert results[7][1] == results[10**6][1]
    summary = f"{len(want)} candles from {path} "
    assert summary in results[10**6][0]
    assert f"{len(arr) - len(want)} duplicate rows dropped (last wins)" in results[10**6][0]
    if order == "shuffled":
        assert "not in time order" in results[7][0]
    else:  # a sorted file (either way) never splits a time across batches: the counts are exact
        assert results[7][0] == results[10**6][0]
    R.TALLY["import_batched_equals_single"] += 1


def tier_view(home: Path, lo: int, hi: int) -> dict[str, Any]:
    """What each tier of the store at ``home`` holds of KRW-BTC 1m, and what a reader gets."""
    tf = parse_timeframe("1m")
    with mds.open(home) as st:
        db, disk = st._health.states["sqlite"].obj, st._health.states["disk"].obj
        # A read fills LMDB over what it answered: read first, so that both views of a test see
        # LMDB after the same read, and the snapshot compares what the import left behind.
        read = st.candles("KRW-BTC", "1m", start=lo, end=hi).tobytes()
        held = np.asarray(disk.held("KRW-BTC", tf), dtype=np.int64).reshape(-1, 2).tolist()
        view = {
            "read": read,
            "sqlite rows": db.read_range("KRW-BTC", tf, -(1 << 60), 1 << 60).tobytes(),
            "sqlite coverage": db.coverage("KRW-BTC", tf).tolist(),
            "lmdb held": held,
            # whatever LMDB holds, it holds exactly what SQLite holds there
            "lmdb agrees": all(
                disk.get_range("KRW-BTC", tf, s, e).tobytes() == db.read_range("KRW-BTC", tf, s, e).tobytes()
                for s, e in held
            ),
        }
        view["gaps"] = st.gaps("KRW-BTC", "1m", start=lo, end=hi)
        view["check"] = st.check().problems
        return view


def refused_import(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], bad: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A store holding 3000 recent candles (in SQLite and LMDB); then an import of 5000 rows over
    the same span with other values, in five batches, whose very last row is bad. Returns the
    tier views before and after."""
    home = tmp_path / "store"
    start = recent_start(4)  # recent: LMDB holds it too
    lo, hi = start - 60 * MIN, start + 6000 * MIN
    first = tmp_path / "first.csv"
    write_ccxt(first, start + MIN * np.arange(3000, dtype=np.int64))
    code, _, err = run_main(
        capsys, "import", str(first), "-s", "KRW-BTC", "-t", "1m", "--complete", "--path", str(home)
    )
    assert code == 0, err
    with mds.open(home) as st:
        st.candles("KRW-BTC", "1m", start=start, end=start + 3000 * MIN)
    before = tier_view(home, lo, hi)
    assert before["lmdb held"] and before["lmdb agrees"] and not before["check"]

    second = tmp_path / "second.csv"
    write_ccxt(second, start + MIN * np.arange(5000, dtype=np.int64), seed=9)
    lines = second.read_text().splitlines(keepends=True)
    cells = lines[-1].rstrip("\n").split(",")
    if bad == "invalid candle":
        cells[3] = repr(float(cells[2]) * 10)  # low far above high
    else:
        cells[5] = "abc"
    lines[-1] = ",".join(cells) + "\n"
    second.write_text("".join(lines))
    monkeypatch.setattr("mds._importers.BATCH_ROWS", 1000)  # five batches, the bad row in the last
    code, out, err = run_main(
        capsys, "import", str(second), "-s", "KRW-BTC", "-t", "1m", "--complete", "--path", str(home)
    )
    assert code == 2, (out, err)
    line = one_line(err)
    assert f"line {len(lines)}:" in line and bad in line, line
    return before, tier_view(home, lo, hi)


@pytest.mark.parametrize("bad", ["invalid candle", "not a number"])
def test_a_bad_row_in_the_last_batch_leaves_the_store_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], bad: str
) -> None:
    before, after = refused_import(tmp_path, monkeypatch, capsys, bad)
    for key in ("sqlite rows", "sqlite coverage", "read", "gaps", "check"):
        assert after[key] == before[key], key
    assert after["lmdb agrees"]
    R.TALLY["import_refused_unchanged"] += 1


def test_a_refused_import_leaves_lmdb_holding_exactly_what_it_held(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    before, after = refused_import(tmp_path, monkeypatch, capsys, "invalid candle")
    assert after["lmdb held"] == before["lmdb held"]


def test_an_invalid_row_is_named_by_its_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "f.csv"
    path.write_bytes(_H + b"1611999960000,1,2,0.5,1.5,3\n\n1612000020000,1,2,0.5,1.5,3\n1612000080000,1,2,3,1.5,3\n")
    code, _, err = run_main(capsys, "import", str(path), "-s", "KRW-BTC", "-t", "1m", "--path", str(tmp_path / "s"))
    assert code == 2
    assert "line 5: invalid candle: low_above_body" in one_line(err)
