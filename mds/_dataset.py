"""Parquet datasets of stored series: ``Store.export_dataset`` and ``Store.import_dataset``
(DESIGN.md section 9).

Layout (Hive partitioning, read as it is by ``pyarrow.dataset``, DuckDB and Polars)::

    DIR/_mds_dataset.json                                   the manifest, written last
    DIR/symbol=KRW-BTC/timeframe=1m/year=2024/part-0.parquet
    DIR/symbol=KRW-BTC/timeframe=1m/year=2025/part-0.parquet

Each Parquet file holds the candles of one series whose open time falls in one UTC year, in
ascending ``ts``: ``ts`` timestamp[ms, UTC] and ``open high low close volume value`` float64
(the partition columns are in the path only). The manifest names every file with its row count,
first and last open time, size and SHA-256, and carries each series' coverage (the ranges whose
every candle the store held: absent candles inside are no-trade intervals), so an export and an
import restore the series and its gap kinds exactly. It is JSON, not Parquet, so that a reader's
``DIR/**/*.parquet`` sees candles only.

Crash safety: the export writes into a hidden sibling directory and renames it to ``DIR`` only
after the manifest (written last, fsynced with every file) is in place. A crash leaves the hidden
directory, never ``DIR``; and a directory without a manifest, or whose files do not match it,
does not import.

Import checks everything before it stores anything: the manifest, every file against it (size,
SHA-256, schema, rows), the Hive path against the series, every candle through the store's own
validation (``mds._kernels.prepare``), strictly ascending times inside each year, and coverage
ranges on the grid. Then one ``store.batch()`` writes it all through the write path: a bad
dataset raises a typed error with nothing stored.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mds import _kernels as K
from mds._dtypes import CANDLE_DTYPE, EMPTY_CANDLES
from mds.errors import InvalidCandleError, InvalidRequestError, StorageUnavailableError
from mds.frames import to_arrow
from mds.models import SeriesInfo
from mds.store.changes import ChangeSlots
from mds.store.coverage import EMPTY_RANGES, HISTORY_START, Coverage
from mds.store.health import StorageDown, Tiers
from mds.store.series import covered_share, list_series, series_stamp, stored_rows
from mds.store.writes import Writer
from mds.symbols import validate_symbol
from mds.timeframes import TIMEFRAMES, Timeframe
from mds.timeutil import iso_utc_z

__all__ = ["MANIFEST", "export_dataset", "import_dataset", "require_pyarrow", "verify_dataset"]

logger = logging.getLogger(__name__)

#: The manifest's file name; its presence (written last) is what makes a directory a dataset.
MANIFEST = "_mds_dataset.json"
_FORMAT = "mds-dataset"
_VERSION = 1
#: Candles read from the store, or from a Parquet file, at a time.
CHUNK = 100_000
_FIELDS = ("open", "high", "low", "close", "volume", "value")
_NEVER = 2**62


def require_pyarrow() -> tuple[Any, Any]:
    """``(pyarrow, pyarrow.parquet)``; an ImportError naming the extra when pyarrow is missing."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ImportError(
            f"Parquet datasets need pyarrow: pip install 'upbit-mds[parquet]' (or the arrow extra) ({exc})"
        ) from exc
    return pa, pq


def _schema(pa: Any) -> Any:
    return pa.schema([("ts", pa.timestamp("ms", tz="UTC")), *((f, pa.float64()) for f in _FIELDS)])


@dataclass
class _File:
    path: str  # relative to the dataset directory, with "/"
    year: int
    rows: int
    first: int
    last: int
    bytes: int = 0
    sha256: str = ""


@dataclass
class _Series:
    symbol: str
    tf: Timeframe
    coverage: np.ndarray
    files: list[_File] = field(default_factory=list)

    @property
    def count(self) -> int:
        return sum(f.rows for f in self.files)

    def info(self) -> SeriesInfo:
        first = self.files[0].first if self.files else None
        last = self.files[-1].last if self.files else None
        return SeriesInfo(
            self.symbol, self.tf.name, first, last, self.count, covered_share(self.coverage, self.tf, first, last)
        )


# ---------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------


def export_dataset(
    directory: str | os.PathLike[str],
    tiers: Tiers,
    coverage: Coverage,
    slots: ChangeSlots,
    lock: Any,
    symbols: set[str] | None,
    timeframes: set[str] | None,
    start: int | None,
    end: int | None,
) -> list[SeriesInfo]:
    """Write the stored series (those of ``symbols`` and ``timeframes``, None: all) in
    ``[start, end)`` as a dataset at ``directory`` (missing or empty). See the module docstring."""
    pa, pq = require_pyarrow()
    target = Path(directory).expanduser()
    _check_target(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        with lock:
            listing = list_series(tiers, coverage)
        chosen = [
            i
            for i in listing
            if (symbols is None or i.symbol in symbols) and (timeframes is None or i.timeframe in timeframes)
        ]
        done: list[_Series] = []
        for info in chosen:
            for _ in range(3):  # a series written meanwhile is exported again, whole
                got = _export_series(tmp, pa, pq, info, tiers, coverage, slots, lock, start, end)
                if got is not None:
                    break
            else:
                raise StorageUnavailableError(
                    f"{info.symbol} {info.timeframe} kept changing during the export; nothing was exported"
                )
            if got.files or len(got.coverage):
                done.append(got)
        _write_manifest(tmp, done, start, end)
        _fsync_tree(tmp)
        os.rename(tmp, target)  # onto a missing or empty directory: the dataset appears whole
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("exported %d series to %s", len(done), target)
    return [s.info() for s in done]


def _check_target(target: Path) -> None:
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode) or os.listdir(target):
        raise InvalidRequestError(f"{target}: a dataset is written to a new or empty directory")


def _clip(ranges: np.ndarray, lo: int | None, hi: int | None) -> np.ndarray:
    out = np.asarray(ranges, dtype=np.int64).reshape(-1, 2).copy()
    if lo is not None:
        out[:, 0] = np.maximum(out[:, 0], lo)
    if hi is not None:
        out[:, 1] = np.minimum(out[:, 1], hi)
    return out[out[:, 1] > out[:, 0]]


def _year_start(year: int) -> int:
    return int(np.datetime64(f"{year:04d}-01-01", "ms").astype(np.int64))


def _year_of(ts: int) -> int:
    return int(np.datetime64(int(ts), "ms").astype("datetime64[Y]").astype(np.int64)) + 1970


def _export_series(
    tmp: Path,
    pa: Any,
    pq: Any,
    info: SeriesInfo,
    tiers: Tiers,
    coverage: Coverage,
    slots: ChangeSlots,
    lock: Any,
    start: int | None,
    end: int | None,
) -> _Series | None:
    """One series into ``tmp``; None when it changed while it was read (its files removed)."""
    tf = TIMEFRAMES[info.timeframe]
    key = (info.symbol, tf.name)
    with lock:
        stamp = series_stamp(slots, key)
        try:
            coverage.sync(info.symbol, tf)
            cov = _clip(coverage.of(info.symbol, tf), start, end)
        except StorageDown as down:
            raise StorageUnavailableError(f"export of {info.symbol} {tf.name}: {down.reason}") from None
    out = _Series(info.symbol, tf, cov)
    base = tmp / f"symbol={info.symbol}" / f"timeframe={tf.name}"
    if info.first is not None and info.last is not None:
        lo = info.first if start is None else max(info.first, tf.ceil(start))
        hi = tf.add(info.last, 1) if end is None else min(tf.add(info.last, 1), end)
        year = _year_of(lo) if hi > lo else 0
        while hi > lo and _year_start(year) < hi:
            y_lo, y_hi = max(lo, _year_start(year)), min(hi, _year_start(year + 1))
            f = _export_year(base, pa, pq, info.symbol, tf, year, y_lo, y_hi, tiers, lock)
            if f is not None:
                f.path = f"{base.relative_to(tmp).as_posix()}/year={year}/part-0.parquet"
                out.files.append(f)
            year += 1
    with lock:
        if series_stamp(slots, key) != stamp:
            shutil.rmtree(base, ignore_errors=True)
            return None
    return out


def _export_year(
    base: Path, pa: Any, pq: Any, sym: str, tf: Timeframe, year: int, lo: int, hi: int, tiers: Tiers, lock: Any
) -> _File | None:
    folder = base / f"year={year}"
    path = folder / "part-0.parquet"
    schema = _schema(pa)
    writer = None
    rows = 0
    first = last = 0
    try:
        a = lo
        while a < hi:
            b = min(tf.add(a, CHUNK), hi)
            with lock:
                try:
                    got = stored_rows(tiers, sym, tf, a, b)
                except StorageDown as down:
                    raise StorageUnavailableError(f"export of {sym} {tf.name}: {down.reason}") from None
            a = b
            if not len(got):
                continue
            if writer is None:
                try:
                    folder.mkdir(parents=True, exist_ok=False)
                except FileExistsError:
                    # a case-insensitive file system folds timeframe=1M into timeframe=1m
                    raise InvalidRequestError(
                        f"{folder} exists already: the file system does not tell {tf.name} from another "
                        "timeframe (case-insensitive); export the series separately"
                    ) from None
                writer = pq.ParquetWriter(str(path), schema)
                first = int(got["ts"][0])
            writer.write_table(to_arrow(got))  # its schema is the dataset's (_schema), or this raises
            rows += len(got)
            last = int(got["ts"][-1])
    finally:
        if writer is not None:
            writer.close()
    if writer is None:
        return None
    return _File("", year, rows, first, last)


def _sha256(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
            n += len(block)
    return n, h.hexdigest()


def _write_manifest(tmp: Path, done: list[_Series], start: int | None, end: int | None) -> None:
    series = []
    for s in done:
        for f in s.files:
            f.bytes, f.sha256 = _sha256(tmp / f.path)
        series.append(
            {
                "symbol": s.symbol,
                "timeframe": s.tf.name,
                "count": s.count,
                "coverage": s.coverage.tolist(),
                "files": [
                    {
                        "path": f.path,
                        "year": f.year,
                        "rows": f.rows,
                        "first": f.first,
                        "last": f.last,
                        "bytes": f.bytes,
                        "sha256": f.sha256,
                    }
                    for f in s.files
                ],
            }
        )
    doc = {
        "format": _FORMAT,
        "version": _VERSION,
        "start": start,
        "end": end,
        "note": "times are epoch ms UTC; coverage ranges are half-open [start, end)",
        "series": series,
    }
    with open(tmp / MANIFEST, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=1)
        fh.write("\n")


def _fsync_tree(root: Path) -> None:
    for folder, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(folder))


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system syncs directories
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ---------------------------------------------------------------------------------------------
# verify and import
# ---------------------------------------------------------------------------------------------


def _bad(directory: Path, what: str) -> InvalidRequestError:
    return InvalidRequestError(f"dataset {directory}: {what}; nothing was imported")


def _regular_file(directory: Path, rel: str, missing: str) -> Path:
    """``directory / rel``, which must be a regular file (not a link planted in the dataset)."""
    path = directory / rel
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise _bad(directory, missing) from None
    if not stat.S_ISREG(st.st_mode):
        raise _bad(directory, f"{rel} is not a regular file")
    return path


def _read_manifest(directory: Path) -> list[_Series]:
    missing = f"no {MANIFEST} (not an mds dataset, or an export that did not finish)"
    path = _regular_file(directory, MANIFEST, missing)
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad(directory, f"{MANIFEST} cannot be read: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
        raise _bad(directory, f"{MANIFEST} is not an mds dataset manifest")
    if doc.get("version") != _VERSION:
        raise _bad(directory, f"dataset format version {doc.get('version')!r} is not {_VERSION}")
    out: list[_Series] = []
    seen: set[tuple[str, str]] = set()
    try:
        for s in doc["series"]:
            sym = validate_symbol(s["symbol"])
            tf = TIMEFRAMES.get(s["timeframe"])
            if tf is None:
                raise _bad(directory, f"unknown timeframe {s['timeframe']!r}")
            if (sym, tf.name) in seen:
                raise _bad(directory, f"{sym} {tf.name} is listed twice")
            seen.add((sym, tf.name))
            cov = _coverage_of(directory, sym, tf, s["coverage"])
            files = [
                _File(
                    str(f["path"]),
                    _int(f["year"]),
                    _int(f["rows"]),
                    _int(f["first"]),
                    _int(f["last"]),
                    _int(f["bytes"]),
                    str(f["sha256"]),
                )
                for f in s["files"]
            ]
            for f in files:  # the Hive path says the series and year: checked before any file is opened
                expected = f"symbol={sym}/timeframe={tf.name}/year={f.year}/part-0.parquet"
                if f.path != expected:
                    raise _bad(directory, f"{f.path!r}: the path must be {expected}")
            series = _Series(sym, tf, cov, files)
            if _int(s["count"]) != series.count:
                raise _bad(directory, f"{sym} {tf.name}: count {s['count']} is not the sum of its files' rows")
            out.append(series)
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, InvalidRequestError):
            raise
        raise _bad(directory, f"{MANIFEST} is malformed ({type(exc).__name__}: {exc})") from None
    return out


def _int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{v!r} is not an integer")
    return v


def _coverage_of(directory: Path, sym: str, tf: Timeframe, ranges: Any) -> np.ndarray:
    pairs = [(_int(a), _int(b)) for a, b in ranges]
    cov = np.array(pairs, dtype=np.int64).reshape(-1, 2) if pairs else EMPTY_RANGES.copy()
    for a, b in pairs:
        if not (a < b and (a == HISTORY_START or tf.ceil(a) == a) and tf.ceil(b) == b):
            raise _bad(directory, f"{sym} {tf.name}: coverage range [{a}, {b}) is empty or off the grid")
    if len(cov) > 1 and bool(np.any(cov[1:, 0] <= cov[:-1, 1])):
        raise _bad(directory, f"{sym} {tf.name}: coverage ranges overlap or are out of order")
    return cov


def _batches(directory: Path, series: _Series, f: _File, pa: Any, pq: Any) -> Iterator[np.ndarray]:
    """The candles of one file as CANDLE_DTYPE arrays of at most CHUNK rows."""
    try:
        pfile = pq.ParquetFile(str(directory / f.path))
        if not pfile.schema_arrow.equals(_schema(pa)):
            raise _bad(directory, f"{f.path}: columns {pfile.schema_arrow} are not the dataset's")
        for batch in pfile.iter_batches(batch_size=CHUNK):
            if any(c.null_count for c in batch.columns):
                raise _bad(directory, f"{f.path}: null values")
            arr = np.empty(batch.num_rows, dtype=CANDLE_DTYPE)
            arr["ts"] = batch.column(0).cast(pa.int64()).to_numpy()
            for i, name in enumerate(_FIELDS, start=1):
                arr[name] = batch.column(i).to_numpy()
            yield arr
    except (OSError, pa.ArrowException) as exc:
        raise _bad(directory, f"{f.path}: cannot be read ({exc})") from None


def verify_dataset(directory: str | os.PathLike[str], now: int) -> list[SeriesInfo]:
    """Check a dataset whole (see the module docstring) without storing anything; what it holds.

    ``now`` is the clock of the store it is meant for: candles and coverage must end by its last
    closed interval.
    """
    return [s.info() for s in _verified(Path(directory).expanduser(), now)]


def _verified(directory: Path, now: int) -> list[_Series]:
    pa, pq = require_pyarrow()
    if not directory.is_dir():
        raise _bad(directory, "not a directory")
    plan = _read_manifest(directory)
    listed = {f.path for s in plan for f in s.files}
    for folder, dirs, files in os.walk(directory):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            rel = Path(folder, name).relative_to(directory).as_posix()
            if name.endswith(".parquet") and rel not in listed:
                raise _bad(directory, f"{rel} is not in {MANIFEST} (a file the export did not write)")
    for s in plan:
        prev = None
        for f in s.files:
            path = _regular_file(directory, f.path, f"{f.path} is missing")
            size, digest = _sha256(path)
            if (size, digest) != (f.bytes, f.sha256):
                raise _bad(directory, f"{f.path} differs from the file exported (size or SHA-256)")
            y_lo, y_hi = _year_start(f.year), _year_start(f.year + 1)
            n = 0
            for arr in _batches(directory, s, f, pa, pq):
                _check_rows(directory, s, f, arr, prev, now, y_lo, y_hi)
                prev = int(arr["ts"][-1]) if len(arr) else prev
                if n == 0 and len(arr) and int(arr["ts"][0]) != f.first:
                    raise _bad(directory, f"{f.path}: first candle is not the manifest's")
                n += len(arr)
            if n != f.rows or n == 0 or prev != f.last:
                raise _bad(directory, f"{f.path}: {n} rows, the manifest says {f.rows} (last {f.last})")
        if len(s.coverage) and int(s.coverage[-1, 1]) > s.tf.floor(now):
            raise _bad(directory, f"{s.symbol} {s.tf.name}: coverage reaches past this store's last closed interval")
    return plan


def _check_rows(
    directory: Path, s: _Series, f: _File, arr: np.ndarray, prev: int | None, now: int, y_lo: int, y_hi: int
) -> None:
    if not len(arr):
        return
    ts = arr["ts"]
    if bool(np.any(np.diff(ts) <= 0)) or (prev is not None and int(ts[0]) <= prev):
        raise _bad(directory, f"{f.path}: times are not strictly ascending (a duplicate or out-of-order candle)")
    if int(ts[0]) < y_lo or int(ts[-1]) >= y_hi:
        raise _bad(directory, f"{f.path}: a candle outside year {f.year}")
    if int(ts[-1]) >= s.tf.floor(now):
        raise _bad(directory, f"{f.path}: a candle at or after this store's last closed interval")
    rows, idx, reason = K.prepare(arr, *s.tf.kernel_args, now)
    if rows is None:
        names = [K.REASONS.get(int(r), str(int(r))) for r in reason]
        where = ", ".join(f"{iso_utc_z(int(ts[int(i)]))}: {n}" for i, n in zip(idx[:5], names[:5]))
        raise InvalidCandleError(
            f"dataset {directory}: {f.path}: {len(idx)} invalid candle(s) ({where}); nothing was imported",
            rows=[int(i) for i in idx],
            reasons=names,
        )


def import_dataset(
    directory: str | os.PathLike[str],
    writer: Writer,
    now: Callable[[], int],
) -> list[SeriesInfo]:
    """Check a dataset whole, then store it in one ``batch()`` through the write path with the
    coverage it carries; what it held. Rows of a time already stored replace them."""
    pa, pq = require_pyarrow()
    folder = Path(directory).expanduser()
    t = int(now())
    plan = _verified(folder, t)
    writer.check_writable()
    with writer.batch():
        for s in plan:
            for f in s.files:
                for arr in _batches(folder, s, f, pa, pq):
                    writer.store(s.symbol, s.tf, Writer.prepared(arr, s.tf, t), EMPTY_RANGES, t, prepared=True)
            if len(s.coverage):
                writer.store(s.symbol, s.tf, EMPTY_CANDLES, s.coverage, t)
    logger.info("imported %d series from %s", len(plan), folder)
    return [s.info() for s in plan]
