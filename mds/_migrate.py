"""Copying a durable tier into another (``mds migrate``): series by series in bounded windows,
each window's candles and coverage in one transaction, resumable, then verified.

Only :class:`~mds.tiers.durable.DurableTier` methods are used, so any implementation can be the
source or the destination (SQLite into PostgreSQL is what the command does).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from mds import _kernels as K
from mds._checksum import row_checksums
from mds.tiers.durable import DurableTier
from mds.timeframes import Timeframe, parse_timeframe
from mds.timeutil import iso_utc_z

#: Candles per transaction of ``mds migrate`` (about 5.6 MB of rows in memory per side).
WINDOW = 100_000


@dataclass(slots=True)
class SeriesSpan:
    """One series of the source and the span a migration copies: ``[lo, hi)`` holds every
    candle and every covered range of it."""

    symbol: str
    tf: Timeframe
    candles: int
    lo: int
    hi: int
    coverage: np.ndarray


@dataclass(slots=True)
class Copied:
    """What a migration did, over every series."""

    series: int = 0
    candles: int = 0  # copied by this run
    present: int = 0  # already in the destination, identical
    ranges: int = 0  # source coverage ranges written (whole or in part)
    windows: int = 0  # transactions committed


def source_series(src: DurableTier) -> list[SeriesSpan]:
    """Every series of ``src`` with candles or coverage, and its span, by symbol and timeframe.

    ``DurableTier.series()`` lists series with candles only; a series that holds coverage alone
    (a span of an illiquid market fetched when nothing traded) is in ``known_series()``.
    """
    counts = {(sym, tfname): int(n) for sym, tfname, n, *_ in src.series()}
    names = set(counts) | set(src.known_series())
    out = []
    for sym, tfname in sorted(names):
        tf = parse_timeframe(tfname)
        cov = np.asarray(src.coverage(sym, tf), dtype=np.int64).reshape(-1, 2)
        first = src.read_from(sym, tf, 0, 1)
        last = src.last_ts(sym, tf)
        bounds = [(int(a), int(b)) for a, b in cov[[0, -1]].tolist()] if len(cov) else []
        if len(first) and last is not None:
            bounds.append((int(first["ts"][0]), tf.add(int(last), 1)))
        if bounds:
            lo, hi = min(b[0] for b in bounds), max(b[1] for b in bounds)
            out.append(SeriesSpan(sym, tf, counts.get((sym, tfname), 0), lo, hi, cov))
    return out


def _windows(src: DurableTier, s: SeriesSpan, n: int) -> Iterator[tuple[int, int, np.ndarray]]:
    """``(start, end, candles)``: consecutive half-open windows over ``[s.lo, s.hi)``, ascending,
    each with the (at most ``n``) source candles in it. The boundaries depend on the source alone,
    so a second run (and the verification) walks the same windows."""
    start = s.lo
    while start < s.hi:
        rows = src.read_from(s.symbol, s.tf, start, n)
        end = min(s.tf.add(int(rows["ts"][-1]), 1), s.hi) if len(rows) == n else s.hi
        if len(rows) and int(rows["ts"][-1]) >= end:  # written since the span was taken
            rows = np.ascontiguousarray(rows[rows["ts"] < end])
        yield start, end, rows
        start = end


def _clip(ranges: np.ndarray, start: int, end: int) -> np.ndarray:
    """``ranges`` (``(k, 2)``, half-open) cut to ``[start, end)``; empty pieces dropped."""
    c = np.clip(ranges, start, end)
    return np.ascontiguousarray(c[c[:, 0] < c[:, 1]])


def _holds(held: np.ndarray, rows: np.ndarray) -> bool:
    """Whether ``held`` (sorted) contains every row of ``rows`` (sorted), byte for byte."""
    if not len(rows):
        return True
    same = held[np.isin(held["ts"], rows["ts"])]
    return len(same) == len(rows) and same.tobytes() == rows.tobytes()


def _checksum(rows: np.ndarray) -> int:
    """Order-free checksum of candle rows: the sum of their row checksums, modulo 2**64."""
    if not len(rows):
        return 0
    words = np.ascontiguousarray(rows).view(np.uint64).reshape(len(rows), -1)
    return int(row_checksums(words).sum(dtype=np.uint64))


def copy(
    src: DurableTier,
    dst: DurableTier,
    plan: Sequence[SeriesSpan],
    *,
    window: int = WINDOW,
    done: Copied | None = None,
    on_window: Callable[[int, SeriesSpan, int, Copied], None] | None = None,
    on_series: Callable[[int, SeriesSpan, Copied], None] | None = None,
) -> Copied:
    """Copy every series of ``plan`` from ``src`` into ``dst``, window by window.

    Each window's candles and coverage are written by one ``dst.write(..., covered=...)`` call
    (one transaction), so the destination never holds candles without their coverage or the
    reverse. A window the destination already holds (every source candle byte for byte, and its
    coverage) is skipped: a second run resumes where the first stopped and copies nothing twice.
    Rows the destination holds besides the source's are left alone (``verify`` reports them).
    ``on_window(i, series, candles_of_the_series_done, totals)`` is called after each window,
    ``on_series(i, series, totals)`` after each series (``i`` counts from 1).
    """
    done = done if done is not None else Copied()
    for i, s in enumerate(plan, 1):
        have_cov = np.asarray(dst.coverage(s.symbol, s.tf), dtype=np.int64).reshape(-1, 2)
        written: set[int] = set()
        seen = 0
        for start, end, rows in _windows(src, s, window):
            cov = _clip(s.coverage, start, end)
            held = dst.read_range(s.symbol, s.tf, start, end)
            if _holds(held, rows) and not len(K.interval_subtract(cov, have_cov)):
                done.present += len(rows)
            else:
                dst.write(s.symbol, s.tf, rows, covered=cov if len(cov) else None)
                done.candles += len(rows)
                done.windows += 1
                hit = (s.coverage[:, 0] < end) & (start < s.coverage[:, 1])
                written.update(np.nonzero(hit)[0].tolist())
            seen += len(rows)
            if on_window is not None:
                on_window(i, s, seen, done)
        done.ranges += len(written)
        done.series += 1
        if on_series is not None:
            on_series(i, s, done)
    return done


def verify(
    src: DurableTier,
    dst: DurableTier,
    plan: Sequence[SeriesSpan],
    *,
    window: int = WINDOW,
    on_series: Callable[[int, SeriesSpan], None] | None = None,
) -> list[str]:
    """The differences between ``dst`` and ``src`` over each series' span of ``plan`` (candle
    counts and checksums per window, coverage), one message per series that differs; [] when
    every series is equal."""
    problems = []
    for i, s in enumerate(plan, 1):
        name = f"{s.symbol} {s.tf.name}"
        for start, end, rows in _windows(src, s, window):
            held = dst.read_range(s.symbol, s.tf, start, end)
            mine, theirs = _checksum(rows), _checksum(held)
            if len(held) != len(rows) or mine != theirs:
                problems.append(
                    f"{name}: in [{iso_utc_z(start)}, {iso_utc_z(end)}) the source holds {len(rows)} candles "
                    f"(checksum {mine:016x}), the destination {len(held)} (checksum {theirs:016x})"
                )
                break
        else:
            want = _clip(s.coverage, s.lo, s.hi)
            have = _clip(np.asarray(dst.coverage(s.symbol, s.tf), dtype=np.int64).reshape(-1, 2), s.lo, s.hi)
            if not np.array_equal(want, have):
                lost, extra = K.interval_subtract(want, have), K.interval_subtract(have, want)
                first, side = (lost, "the destination lacks") if len(lost) else (extra, "the destination adds")
                problems.append(
                    f"{name}: coverage differs ({len(want)} ranges in the source, {len(have)} in the destination): "
                    f"{side} [{iso_utc_z(int(first[0, 0]))}, {iso_utc_z(int(first[0, 1]))})"
                )
        if on_series is not None:
            on_series(i, s)
    return problems
