"""What a store holds, series by series: the list behind ``Store.series()``, the rows of a span
as they are stored (no Layer 1), and a series' change stamp (for readers that must see a series
unchanged across several reads, such as a dataset export).

With a durable tier it is the whole truth and the only place asked. Without one (a memory-only
or memory + LMDB store) the fast tiers are the store: what they hold now is what is listed, and
coverage proves only what they still hold (see :meth:`mds.store.coverage.Coverage.of`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mds.errors import StorageUnavailableError
from mds.models import SeriesInfo
from mds.store.changes import ChangeSlots
from mds.store.coverage import Coverage, fast_rows, usable_fast
from mds.store.health import StorageDown, Tiers
from mds.timeframes import TIMEFRAMES, Timeframe

__all__ = ["covered_share", "list_series", "series_stamp", "stored_rows"]

_ORDER = {name: i for i, name in enumerate(TIMEFRAMES)}


def covered_share(cov: np.ndarray, tf: Timeframe, first: int | None, last: int | None) -> float | None:
    """The share of the intervals ``first .. last`` (both included) inside the coverage ``cov``;
    None without candles (``first`` None)."""
    if first is None or last is None:
        return None
    end = tf.add(last, 1)
    total = tf.count(first, end)
    if total <= 0:
        return None
    inside = 0
    for a, b in np.asarray(cov, dtype=np.int64).reshape(-1, 2).tolist():
        lo, hi = max(a, first), min(b, end)
        if hi > lo:
            inside += tf.count(lo, hi)
    return min(1.0, inside / total)


def list_series(tiers: Tiers, coverage: Coverage) -> list[SeriesInfo]:
    """Every stored series (candles, or coverage alone), sorted by symbol and timeframe
    (finest first). Call under the store lock.

    Raises
    ------
    StorageUnavailableError
        The durable tier cannot answer (never a shorter list).
    """
    try:
        db = tiers.db()
        found: dict[tuple[str, str], tuple[int, int | None, int | None]] = {}
        if db is not None:
            for sym, tfname, n, first, last in tiers.ask_db(db.series):
                found[(str(sym), str(tfname))] = (int(n), int(first), int(last))
            for key in tiers.ask_db(db.known_series):
                found.setdefault((str(key[0]), str(key[1])), (0, None, None))
        else:
            for key in _fast_series(tiers):
                tf = TIMEFRAMES.get(key[1])
                if tf is None:
                    continue
                coverage.sync(key[0], tf)  # another process may have changed it: not from memory
                ts = stored_rows(tiers, key[0], tf, -(2**62), 2**62)["ts"]
                found[key] = (len(ts), int(ts[0]), int(ts[-1])) if len(ts) else (0, None, None)
        out: list[SeriesInfo] = []
        for (sym, tfname), (n, lo, hi) in sorted(found.items(), key=lambda kv: (kv[0][0], _ORDER.get(kv[0][1], 99))):
            tf = TIMEFRAMES.get(tfname)
            if tf is None:  # a name this version does not know: not ours to describe
                continue
            coverage.sync(sym, tf)
            cov = coverage.of(sym, tf)
            if not n and not len(cov):
                continue  # a catalog entry whose candles and coverage were all deleted
            out.append(SeriesInfo(sym, tfname, lo, hi, n, covered_share(cov, tf, lo, hi)))
        return out
    except StorageDown as down:
        raise StorageUnavailableError(f"cannot list the stored series: {down.reason}") from None


def _fast_series(tiers: Tiers) -> set[tuple[str, str]]:
    """The series memory and LMDB hold a range of (the store has no durable tier)."""
    keys: set[tuple[str, str]] = set()
    try:
        mem, disk = usable_fast(tiers)
    except StorageDown as down:
        raise StorageUnavailableError(f"cannot list the stored series: {down.reason}") from None
    if disk is not None:
        listed = tiers.guard("disk", disk.series)
        if listed is None:
            raise StorageUnavailableError("the LMDB tier cannot list its series")
        keys.update((str(s), str(t)) for s, t in listed)
    if mem is not None:
        keys.update(mem.series())
    return keys


def stored_rows(tiers: Tiers, sym: str, tf: Timeframe, lo: int, hi: int) -> np.ndarray:
    """The candles a store holds in ``[lo, hi)``, ascending, without asking Layer 1.

    The durable tier's rows when the store has one; otherwise every candle memory or LMDB holds
    (:func:`mds.store.coverage.fast_rows`). :class:`StorageDown` when a tier cannot answer.
    """
    db = tiers.db()
    if db is not None:
        rows: np.ndarray = tiers.ask_db(db.read_range, sym, tf, lo, hi)
        return rows
    return fast_rows(tiers, sym, tf, lo, hi)[0]


def series_stamp(slots: ChangeSlots, key: tuple[str, str]) -> Any:
    """The series' change stamp now (None without change slots): it moves with every write to
    the series by any process on this host and, with a shared history, by other hosts."""
    words = slots.words
    return None if words is None else int(words[slots.slot(key)])
