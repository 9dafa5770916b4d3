"""The ``mds`` command: demo, backfill, list, get, gaps, import, export, delete, stats, maintain,
check, plot, fake-upbit, watch, migrate.

Every command but ``fake-upbit`` and ``watch`` takes ``--path`` (default ``$MDS_HOME``, else ``~/.mds``; the
demo's default is a temporary directory). Reading commands need a store there and never create
one; ``import``, ``backfill`` and ``demo`` create one in a new or empty directory, never in one
holding something else. Every command that opens a store also takes ``--history URL`` (default
``$MDS_HISTORY``): a ``postgresql://`` URL puts the history there instead of the SQLite file under
``--path`` (memory and LMDB stay under ``--path``). The demo never does (its candles are
generated, they have no place in a shared history). ``migrate`` copies the SQLite history under
``--path`` into a PostgreSQL database. Times on the command line are ISO-8601 dates or times (UTC
unless an offset is given) or epoch milliseconds. Errors are one line on stderr: exit 2 for bad
input (arguments, symbols, timeframes, ranges, series that are not stored, unreadable or invalid
import files, output files of an unknown format or that exist, a history that is not a
postgresql:// URL), 1 for everything else (storage, server or Layer 1 failures, ``check``
problems, a ``migrate`` whose verification found differences), 130 after Ctrl-C. Progress (on
stderr) and tables are drawn by rich on a terminal and are plain lines otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import itertools
import json
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO

import numpy as np

from mds import _importers, _kernels as K
from mds._cli_output import Progress, fmt_bytes, number_column, out_path, print_table, write_atomically
from mds._dtypes import CANDLE_DTYPE
from mds._files import STORE_ENTRIES
from mds._importers import IMPORT_FORMATS, BadInput, CandleFile
from mds._migrate import WINDOW as MIGRATE_WINDOW
from mds.convert import candles_to_upbit
from mds.errors import InvalidCandleError, InvalidRequestError, MdsError, StorageUnavailableError
from mds.symbols import validate_symbol
from mds.tiers.durable import is_server_url, shown_url
from mds.timeframes import DAY_MS, Timeframe, parse_timeframe
from mds.timeutil import iso_utc_z, now_ms, to_ms

__all__ = ["main"]

logger = logging.getLogger(__name__)

_PAGE = 200
_PRICE_FIELDS = ("open", "high", "low", "close", "volume", "value")
_NO_CANDLES = np.empty(0, dtype=CANDLE_DTYPE)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2) instead of usage + error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ---------------------------------------------------------------------------------------------
# argument helpers
# ---------------------------------------------------------------------------------------------


def parse_time(text: str) -> int:
    """A command-line time: epoch ms (digits) or ISO-8601 (UTC unless an offset is given)."""
    t = text.strip()
    if t.lstrip("-").isdigit():
        return to_ms(int(t), name="time")
    return to_ms(t, name="time")


def _time_arg(text: str) -> int:
    try:
        return parse_time(text)
    except InvalidRequestError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return v


def _series(symbol: str, timeframe: str) -> tuple[str, Timeframe]:
    """Validate a series named on the command line before any store is opened."""
    return validate_symbol(symbol), parse_timeframe(timeframe)


def _check_range(start: int | None, end: int | None) -> None:
    if start is not None and end is not None and end <= start:
        raise InvalidRequestError(f"--end ({_fmt_time(end)}) must be after --start ({_fmt_time(start)})")


def _store_path(args: argparse.Namespace) -> Path:
    if getattr(args, "path", None):
        return Path(args.path).expanduser()
    from mds.store import default_path

    return default_path()


def _history(args: argparse.Namespace) -> str | None:
    """The history URL: ``--history``, else ``$MDS_HISTORY``; None (SQLite under --path) without."""
    given = getattr(args, "history", None)
    url = given if given is not None else os.environ.get("MDS_HISTORY", "")
    url = url.strip()
    if not url:
        if given is not None:
            raise BadInput("--history is empty (give a postgresql:// URL, or leave it out for SQLite under --path)")
        return None
    if not is_server_url(url):
        origin = "--history" if given is not None else "MDS_HISTORY"
        raise BadInput(f"{origin} must be a postgresql:// URL, not {shown_url(url)}")
    return url


def _store_state(path: Path) -> str:
    """``"missing"``, ``"empty"`` (an empty directory), ``"store"`` (a directory holding an mds
    store's files) or ``"other"`` (a file, or a directory holding something else)."""
    try:
        names = set(os.listdir(path))
    except FileNotFoundError:
        return "missing"
    except NotADirectoryError:
        return "other"
    except OSError:
        return "store"  # unreadable: mds.open says why, in its own words
    if not names:
        return "empty"
    return "store" if any(name in names for name in STORE_ENTRIES if "/" not in name) else "other"


def _checked_path(args: argparse.Namespace, *, create: bool) -> Path:
    """The store path of a command, checked before anything is opened or created there.

    Reading commands need a store there. Writing commands (``create``) may also create one in a
    new or empty directory, never in a directory holding something else (a home directory).
    With a history on a server the path holds only the local tiers: a reading command may
    create it too, but not in a directory holding something else either.
    """
    path = _store_path(args)
    state = _store_state(path)
    if state == "store" or (state in ("missing", "empty") and (create or _history(args) is not None)):
        return path
    if create and state == "other":
        what = "is not a directory" if path.exists() and not path.is_dir() else "is not empty and holds no mds store"
        raise BadInput(f"{path} {what}: give --path a new or empty directory, or an mds store")
    raise BadInput(f"no store at {path} (create one with 'mds backfill' or 'mds import', or give --path)")


def _open_store(args: argparse.Namespace, *, create: bool = False, layer1: Any = None, **kw: Any) -> Any:
    """The one place the commands open a store: ``--path`` and ``--history`` (or ``$MDS_HISTORY``).

    Only writing commands pass ``create`` (see :func:`_checked_path`). With a history on a
    server, a server that cannot be reached fails here, with one line, rather than leaving the
    command a store whose history tier is degraded.
    """
    import mds

    path = _checked_path(args, create=create)
    history = _history(args)
    store = mds.open(path, layer1=layer1, history=history, **kw)
    if history is not None:
        state = store.stats()["tiers"].get("sqlite", {})
        if state.get("degraded"):
            store.close()
            error = str(state.get("error") or "unavailable").removeprefix("StorageUnavailableError: ")
            raise _history_error(history, error)
    return store


def _stored_series(args: argparse.Namespace) -> list[Any]:
    """Every series of the store, sorted (:meth:`mds.Store.series`: with candles, or with
    coverage alone), as :class:`mds.SeriesInfo`."""
    with _open_store(args) as store:
        return list(store.series())


def _shown_series(series: Sequence[Any], symbol: str | None = None) -> str:
    names = [f"{i.symbol} {i.timeframe}" for i in series if symbol is None or i.symbol == symbol]
    if not names:
        return "none" if symbol is None else f"no series of {symbol}"
    more = f" and {len(names) - 12} more" if len(names) > 12 else ""
    return ", ".join(names[:12]) + more


def _resolve_series(args: argparse.Namespace) -> tuple[str, Timeframe]:
    """The series a reading command names; it must be stored (candles or coverage).

    Without ``--timeframe`` the symbol's one stored timeframe is used (said on stderr): reading
    the only series there is is what a user asks for, while a guess among several would print
    candles of a timeframe nobody named. Several, or none: exit 2, naming what is stored.
    """
    sym = validate_symbol(args.symbol)
    tf = parse_timeframe(args.timeframe) if args.timeframe is not None else None
    series = _stored_series(args)
    if tf is not None:
        if any(i.symbol == sym and i.timeframe == tf.name for i in series):
            return sym, tf
        raise BadInput(f"no such series: {sym} {tf.name} (no stored candles); stored: {_shown_series(series)}")
    mine = [i.timeframe for i in series if i.symbol == sym]
    if len(mine) == 1:
        sys.stderr.write(f"mds: {sym}: using {mine[0]}, its only stored timeframe (give -t to choose)\n")
        return sym, parse_timeframe(mine[0])
    if mine:
        raise BadInput(f"{sym} is stored in several timeframes ({', '.join(mine)}): give -t TIMEFRAME")
    raise BadInput(f"no such series: {sym} (no stored candles); stored: {_shown_series(series)}")


def _history_error(url: str, error: str) -> StorageUnavailableError:
    """The error of a history that cannot be used, naming it (without its password) once."""
    shown = shown_url(url)
    return StorageUnavailableError(error if shown in error else f"history at {shown}: {error}")


def _fmt_time(ms: int) -> str:
    return iso_utc_z(ms)


# ---------------------------------------------------------------------------------------------
# backfill
# ---------------------------------------------------------------------------------------------


class _Interrupted(Exception):
    """Ctrl-C was pressed during a command that stops at its next safe point."""


@contextlib.contextmanager
def _deferred_interrupt() -> Iterator[threading.Event]:
    """While inside, the first Ctrl-C (SIGINT) only sets the event it yields: the command stops
    at its next safe point, between two store calls, so no Layer 1 request or store write is cut
    in the middle (a KeyboardInterrupt raised inside a store call would leave its event-loop
    tasks pending). A second Ctrl-C interrupts at once. Outside the main thread: a plain event."""
    event = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield event
        return

    def handler(signum: int, frame: Any) -> None:
        if event.is_set():
            raise KeyboardInterrupt
        event.set()

    old = signal.signal(signal.SIGINT, handler)
    try:
        yield event
    finally:
        signal.signal(signal.SIGINT, old)


def cmd_backfill(args: argparse.Namespace) -> int:
    """Fetch and store a time range for each symbol; covered parts are skipped (resumable).

    Ctrl-C stops after the current step (at most ten requests): the progress display ends its
    line, ``interrupted`` is said once on stderr with what was stored, and the exit status is
    130. What was stored is kept and covered; the same command resumes.
    """
    from mds.layer1.router import UpbitRouter
    from mds.models import Config

    tf = parse_timeframe(args.timeframe)
    symbols = [validate_symbol(s) for s in args.symbols]
    now = now_ms()
    if args.days is not None:
        if args.until is not None:
            raise BadInput("--until goes with --since, not with --days")
        end = tf.floor(now)
        start = end - int(args.days * DAY_MS)
    else:
        start = args.since
        end = tf.floor(now) if args.until is None else min(args.until, tf.floor(now))
    _check_range(start, args.until if args.until is not None else end)
    start = tf.ceil(start)
    if end <= start:
        raise BadInput("the range holds no closed candle yet")
    router = UpbitRouter(base_url=args.base_url)
    chunk = _PAGE * 10  # ten requests between progress updates (and chances to stop)
    with contextlib.ExitStack() as stack:
        stop = stack.enter_context(_deferred_interrupt())
        store = stack.enter_context(
            _open_store(args, create=True, layer1=router, config=Config(lookup="storage_first"))
        )
        progress = stack.enter_context(Progress(sys.stderr))
        try:
            for sym in symbols:
                cov = np.asarray(store.coverage(sym, tf), dtype=np.int64).reshape(-1, 2)
                todo = K.interval_subtract(np.array([[start, end]], dtype=np.int64), cov)
                todo_n = sum(tf.count(int(a), int(b)) for a, b in todo.tolist())
                span = tf.count(start, end)
                st0 = store.stats()["layer1"]
                label = f"{sym} {tf.name}"
                done = got = 0
                progress.update(label, 0, span, 0)
                t = end
                while t > start:  # newest first, as Upbit pages; covered chunks cost no request
                    if stop.is_set():
                        raise _Interrupted
                    s = max(start, tf.add(t, -chunk))
                    got += len(store.candles(sym, tf, start=s, end=t))
                    done += tf.count(s, t)
                    progress.update(label, done, span, got)
                    t = s
                progress.update(label, span, span, got, final=True)
                st1 = store.stats()["layer1"]
                sys.stdout.write(
                    f"{sym} {tf.name}: {got} candles in [{_fmt_time(start)}, {_fmt_time(end)}); "
                    f"{span - todo_n} of {span} intervals were already covered; "
                    f"{st1['candles_fetched'] - st0['candles_fetched']} candles fetched in "
                    f"{st1['calls'] - st0['calls']} Layer 1 calls\n"
                )
        except _Interrupted:
            progress.close()  # the display ends its line before the message
            fetched = store.stats()["layer1"]["candles_fetched"]
            sys.stdout.flush()
            sys.stderr.write(
                f"mds backfill: interrupted; {fetched} candles fetched and stored in this run are kept "
                "(run the same command again to resume)\n"
            )
            return 130
    return 0


# ---------------------------------------------------------------------------------------------
# get, gaps
# ---------------------------------------------------------------------------------------------


def _read_args(args: argparse.Namespace, default_count: int | None = None) -> tuple[int | None, int | None, int | None]:
    """``(count, start, end)`` of a reading command, checked before any store is opened."""
    start, end, count = args.start, args.end, getattr(args, "count", None)
    _check_range(start, end)
    if count is None and start is None:
        if default_count is None:
            raise BadInput("give --count N or --start (with an optional --end)")
        count = default_count
    return count, start, end


def cmd_get(args: argparse.Namespace) -> int:
    """Print stored candles as a table, CSV or JSON (Upbit field names)."""
    count, start, end = _read_args(args)
    sym, tf = _resolve_series(args)
    with _open_store(args) as store:
        arr = store.candles(sym, tf, count=count, start=start, end=end)
    out = sys.stdout
    if args.format == "json":
        json.dump(candles_to_upbit(arr, sym, tf), out, indent=1)
        out.write("\n")
    elif args.format == "csv":
        _write_csv(arr, out)
    else:
        cols = [number_column(arr[f].tolist()) for f in _PRICE_FIELDS]
        rows = [[_fmt_time(int(t)), *(c[i] for c in cols)] for i, t in enumerate(arr["ts"].tolist())]
        print_table(["time_utc", *_PRICE_FIELDS], rows, out)
        out.write(f"{sym} {tf.name}: {len(arr)} candles\n")
    return 0


def cmd_gaps(args: argparse.Namespace) -> int:
    """List runs of absent candles: missing (never fetched) or no_trades (fetched, nothing traded)."""
    _check_range(args.start, args.end)
    sym, tf = _resolve_series(args)
    with _open_store(args) as store:
        gaps = store.gaps(sym, tf, start=args.start, end=args.end)
    rows = [[_fmt_time(g.start), _fmt_time(g.end), g.kind, tf.count(g.start, g.end)] for g in gaps]
    out = sys.stdout
    if rows:
        print_table(["start", "end", "kind", "candles"], rows, out)
    totals = {k: sum(r[3] for r in rows if r[2] == k) for k in ("missing", "no_trades")}
    runs = {k: sum(1 for r in rows if r[2] == k) for k in ("missing", "no_trades")}
    out.write(
        f"{sym} {tf.name}: {runs['missing']} missing runs ({totals['missing']} candles), "
        f"{runs['no_trades']} no_trades runs ({totals['no_trades']} candles)\n"
    )
    return 0


# ---------------------------------------------------------------------------------------------
# import
# ---------------------------------------------------------------------------------------------


def cmd_import(args: argparse.Namespace) -> int:
    """Validate, deduplicate and store candles from a file, streamed in batches.

    The file is read in batches of at most ``_importers.BATCH_ROWS`` rows, so memory does not
    grow with the file. Every batch is written inside one ``store.batch()`` (one SQLite
    transaction): a bad row anywhere leaves every tier as it was. The first batch is read before
    the store is opened, so a file refused at once creates no store.
    """
    if os.path.isdir(args.file):
        from mds._dataset import MANIFEST

        # a dataset, or a directory given without the options of a file (said not to be a dataset);
        # a directory given as a candle file is a file that cannot be read, as before
        if os.path.exists(os.path.join(args.file, MANIFEST)) or (args.symbol is None and args.timeframe is None):
            return _import_dataset(args)
    if args.symbol is None or args.timeframe is None:
        raise BadInput(f"{args.file}: a candle file needs --symbol and --timeframe")
    args.format = args.format or "auto"
    sym, tf = _series(args.symbol, args.timeframe)
    if args.file.lower().endswith(".parquet"):
        raise BadInput(
            f"{args.file}: mds import reads Upbit JSON, JSON Lines and CSV files, not Parquet "
            "(write the table as CSV first)"
        )
    _checked_path(args, create=True)  # a path that can hold no store is said before the file is read
    with CandleFile(args.file, args.format, sym, tf) as src:
        batches = src.batches()
        first = next(batches, None)
        if first is None:
            raise BadInput(f"{args.file} holds no candles")
        ins = upd = unch = candles = dups = 0
        lo = hi = None
        spans = np.empty((0, 2), dtype=np.int64)  # [first, last + 1 interval) of every batch written
        overlap = False
        todo = itertools.chain([first], batches)
        del first  # the chain holds it only until it has been written
        with _open_store(args, create=True) as store, store.batch():
            for arr, where in todo:
                ts = arr["ts"]
                b_lo, b_hi = int(ts.min()), int(ts.max())
                span = np.array([[b_lo, tf.add(b_hi, 1)]], dtype=np.int64)
                if len(spans) and bool(np.any((spans[:, 0] < span[0, 1]) & (span[0, 0] < spans[:, 1]))):
                    overlap = True  # a time may repeat across batches: the store resolves it (last wins)
                try:
                    res = store.write_candles(sym, tf, arr, complete=(b_lo, tf.add(b_hi, 1)) if args.complete else None)
                except InvalidCandleError as exc:
                    raise BadInput(_invalid_rows(args.file, src.where, exc, where)) from None
                n = len(np.unique(ts))
                candles += n
                dups += len(arr) - n
                ins, upd, unch = ins + res.inserted, upd + res.updated, unch + res.unchanged
                lo = b_lo if lo is None else min(lo, b_lo)
                hi = b_hi if hi is None else max(hi, b_hi)
                spans = K.interval_normalize(np.concatenate([spans, span]))
            assert lo is not None and hi is not None
            if args.complete:
                # the file holds every candle of [lo, hi]: the stretches between batches too
                holes = K.interval_subtract(np.array([[lo, tf.add(hi, 1)]], dtype=np.int64), spans)
                for s, e in holes.tolist():
                    store.write_candles(sym, tf, _NO_CANDLES, complete=(s, e))
        dups += src.superseded
    out = sys.stdout
    out.write(
        f"{sym} {tf.name}: {candles} candles from {args.file} ({src.fmt}), "
        f"{_fmt_time(lo)} to {_fmt_time(hi)}: "
        f"{ins} inserted, {upd} updated, {unch} unchanged"
        + (f", {dups} duplicate rows dropped (last wins)" if dups else "")
        + "\n"
    )
    if overlap:
        out.write(
            f"note: the file is not in time order: a time that repeats in another batch of {src.batch_rows} "
            "rows is counted above twice (inserted, then updated or unchanged); the last row wins\n"
        )
    if src.value_estimated:
        out.write("note: the file has no quote volume; value estimated as close * volume\n")
    out.write(
        "span marked covered (absent minutes count as no_trades)\n"
        if args.complete
        else "span not marked covered (use --complete if the file holds every candle of its span)\n"
    )
    return 0


def _import_dataset(args: argparse.Namespace) -> int:
    """``mds import DIR``: a dataset written by ``mds export --dataset``, checked whole first."""
    given = [o for o, v in (("--symbol", args.symbol), ("--timeframe", args.timeframe), ("--format", args.format)) if v]
    if args.complete:
        given.append("--complete")
    if given:
        raise BadInput(f"{args.file} is a dataset directory: {', '.join(given)} apply to candle files only")
    from mds._dataset import require_pyarrow

    _pyarrow_or_bad_input(require_pyarrow)
    _checked_path(args, create=True)
    with _open_store(args, create=True) as store:
        infos = store.import_dataset(args.file)
    total = sum(i.count for i in infos)
    for i in infos:
        span = "no candles" if i.first is None else f"{_fmt_time(i.first)} to {_fmt_time(i.last or i.first)}"
        sys.stdout.write(f"{i.symbol} {i.timeframe}: {i.count} candles, {span}, with its coverage\n")
    sys.stdout.write(f"imported {len(infos)} series, {total} candles from the dataset {args.file}\n")
    return 0


def _pyarrow_or_bad_input(require: Any) -> None:
    """A missing pyarrow is a one-line error (exit 2) naming the extra, before a store is opened."""
    try:
        require()
    except ImportError as exc:
        raise BadInput(str(exc)) from None


def _invalid_rows(path: str, what: str, exc: InvalidCandleError, where: np.ndarray) -> str:
    """The store refused a batch: say which line (or candle) of the file, and why."""
    if exc.rows and 0 <= exc.rows[0] < len(where):
        reason = exc.reasons[0] if exc.reasons else "invalid"
        more = f" (and {len(exc.rows) - 1} more in this batch)" if len(exc.rows) > 1 else ""
        return f"{path}: {what} {int(where[exc.rows[0]])}: invalid candle: {reason}{more}; nothing was stored"
    return f"{path}: {exc}"


# ---------------------------------------------------------------------------------------------
# export, stats, maintain, check, plot
# ---------------------------------------------------------------------------------------------


def _write_csv(arr: np.ndarray, out: TextIO) -> None:
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["timestamp", "time_utc", *_PRICE_FIELDS])
    ts = arr["ts"].tolist()
    cols = [arr[f].tolist() for f in _PRICE_FIELDS]
    for i, t in enumerate(ts):
        w.writerow([t, _fmt_time(t), *(repr(c[i]) for c in cols)])


#: ``export --out`` formats, by the file name's extension.
_EXPORT_FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "jsonl", ".parquet": "parquet"}
#: ``plot --out`` formats (what matplotlib writes without extra packages), by extension.
_PLOT_FORMATS = (".png", ".svg", ".pdf")


def _series_filter(args: argparse.Namespace) -> tuple[list[str] | None, list[str] | None]:
    """The SYMBOLs and -t timeframes of ``export --dataset`` and ``archive`` (None: all)."""
    syms = [validate_symbol(x) for x in args.symbols] or None
    tfs = [parse_timeframe(x).name for x in args.timeframe] if args.timeframe else None
    return syms, tfs


def _export_dataset(args: argparse.Namespace) -> int:
    from mds._dataset import require_pyarrow

    if args.force:
        raise BadInput("--force goes with --out; a dataset is written to a new or empty directory only")
    syms, tfs = _series_filter(args)
    _pyarrow_or_bad_input(require_pyarrow)
    with _open_store(args) as store:
        infos = store.export_dataset(args.dataset, syms, tfs, start=args.start, end=args.end)
    total = sum(i.count for i in infos)
    sys.stdout.write(f"{len(infos)} series, {total} candles written to the dataset {args.dataset}\n")
    return 0


def cmd_archive(args: argparse.Namespace) -> int:
    """Export the span before ``--before`` to a dataset, verify it, then delete it from the store
    in one transaction (undone if the store holds other counts than the archive)."""
    from mds._dataset import require_pyarrow, verify_dataset

    syms, tfs = _series_filter(args)
    before = _fmt_time(args.before)
    if not args.yes and not sys.stdin.isatty():
        raise BadInput(f"archive deletes what it exports (candles before {before}): give --yes")
    _pyarrow_or_bad_input(require_pyarrow)
    import pyarrow.dataset as pads

    with _open_store(args) as store:
        infos = store.export_dataset(args.to, syms, tfs, end=args.before)
        total = sum(i.count for i in infos)
        # the archive is read back whole before anything is deleted: manifest, checksums, candles
        checked = {(i.symbol, i.timeframe): i.count for i in verify_dataset(args.to, now_ms())}
        readable = pads.dataset(args.to, format="parquet", partitioning="hive").count_rows() if total else 0
        if checked != {(i.symbol, i.timeframe): i.count for i in infos} or readable != total:
            raise MdsError(f"the archive at {args.to} does not read back as written; nothing was deleted")
        sys.stdout.write(f"{len(infos)} series, {total} candles before {before} archived to {args.to} (verified)\n")
        if not infos:
            return 0
        if not args.yes:
            sys.stderr.write(f"delete these {total} candles (and their coverage) from the store? [y/N] ")
            sys.stderr.flush()
            if sys.stdin.readline().strip().lower() not in ("y", "yes"):
                sys.stderr.write("mds archive: nothing deleted (the archive is kept)\n")
                return 1
        with store.batch():
            for i in infos:
                n = store.delete(i.symbol, i.timeframe, end=args.before)
                if n != i.count:
                    raise StorageUnavailableError(
                        f"{i.symbol} {i.timeframe}: the store holds {n} candles before {before}, the archive "
                        f"{i.count} (written meanwhile?); nothing was deleted"
                    )
    sys.stdout.write(f"deleted {total} candles before {before} from the store; 'mds import {args.to}' restores them\n")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Write a series (or a range of it) to CSV, Upbit JSON, JSON Lines or Parquet, by extension;
    or, with ``--dataset``, stored series to a Parquet dataset."""
    _check_range(args.start, args.end)
    if args.dataset is not None:
        return _export_dataset(args)
    if len(args.symbols) != 1:
        raise BadInput("--out writes one series: give one SYMBOL (or use --dataset DIR for several)")
    if args.timeframe is not None and len(args.timeframe) > 1:
        raise BadInput("--out writes one series: give at most one -t")
    args.symbol = args.symbols[0]
    args.timeframe = args.timeframe[0] if args.timeframe else None
    path = out_path(args.out, tuple(_EXPORT_FORMATS), "export", args.force)
    fmt = _EXPORT_FORMATS[path.suffix.lower()]
    if fmt == "parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise BadInput(
                "Parquet export needs pyarrow: pip install 'upbit-mds[parquet]' (or export to .csv, .json or .jsonl)"
            ) from None
    sym, tf = _resolve_series(args)
    existed = path.exists()
    with _open_store(args) as store:
        start = args.start if args.start is not None else 0
        arr = store.candles(sym, tf, start=start, end=args.end)

    def write(tmp: str) -> None:
        if fmt == "parquet":
            pq.write_table(pa.table({"ts": arr["ts"], **{f: arr[f] for f in _PRICE_FIELDS}}), tmp)
            return
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            if fmt == "csv":
                _write_csv(arr, fh)
            elif fmt == "json":
                json.dump(candles_to_upbit(arr, sym, tf), fh, indent=1)
                fh.write("\n")
            else:
                for row in candles_to_upbit(arr, sym, tf):
                    fh.write(json.dumps(row) + "\n")

    write_atomically(path, write)
    sys.stdout.write(
        f"{sym} {tf.name}: {len(arr)} candles written to {path} ({fmt}{', overwritten' if existed else ''})\n"
    )
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    """Print the store's figures (sizes per tier) as JSON."""
    with _open_store(args) as store:
        st = store.stats()
    json.dump(st, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
    return 0


def cmd_maintain(args: argparse.Namespace) -> int:
    """Run maintenance now (VACUUM past the threshold, or always with --force); say what was done
    and the sizes before and after."""
    with _open_store(args) as store:
        before = store.stats()["tiers"]
        rep = store.maintain(force=args.force)
        after = store.stats()["tiers"]
    out = sys.stdout
    db0, db1 = before.get("sqlite", {}), after.get("sqlite", {})
    if db0:
        raw0, raw1 = int(db0.get("chunks_raw", 0)), int(db1.get("chunks_raw", 0))
        packed = int(db1.get("chunks_compressed", 0))
        out.write(
            f"history: {max(0, raw0 - raw1)} chunks compressed now ({packed} compressed, {raw1} raw in all); "
            f"size {fmt_bytes(db0.get('size_bytes', 0))} -> {fmt_bytes(db1.get('size_bytes', 0))}; "
            f"vacuumed: {'yes' if rep.vacuumed else 'no'}"
            f"{'' if rep.vacuumed or args.force else ' (few free pages; --force vacuums anyway)'}; "
            f"analyzed: {'yes' if rep.analyzed else 'no'}; free pages {100 * rep.fragmentation_before:.1f} % -> "
            f"{100 * rep.fragmentation_after:.1f} %\n"
        )
    if "disk" in after:
        out.write(
            f"disk (LMDB): {rep.disk_entries_purged} expired entries purged, "
            f"{fmt_bytes(before.get('disk', {}).get('bytes', 0))} -> {fmt_bytes(after['disk'].get('bytes', 0))}\n"
        )
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Check the integrity of every tier; exit 1 when there are problems."""
    with _open_store(args) as store:
        rep = store.check()
    if rep.ok:
        sys.stdout.write("ok\n")
        return 0
    for p in rep.problems:
        sys.stdout.write(f"problem: {p}\n")
    sys.stderr.write(f"mds check: {len(rep.problems)} problem(s)\n")
    return 1


def cmd_plot(args: argparse.Namespace) -> int:
    """Draw candles with missing and no-trade intervals shaded."""
    count, start, end = _read_args(args, default_count=300)
    path = out_path(args.out, _PLOT_FORMATS, "plot", args.force, default_ext=".png")
    sym, tf = _resolve_series(args)
    existed = path.exists()
    with _open_store(args) as store:
        arr = store.candles(sym, tf, count=count, start=start, end=end)
        if not len(arr):
            raise BadInput(f"no stored candles of {sym} {tf.name} in that range")
        lo = int(arr["ts"][0]) if args.start is None else tf.ceil(args.start)
        hi = tf.add(int(arr["ts"][-1]), 1) if args.end is None else args.end
        gaps = store.gaps(sym, tf, start=lo, end=hi)
    try:  # after the input checks: bad input is exit 2 whether or not matplotlib is there
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MdsError("mds plot needs matplotlib (pip install 'upbit-mds[plot]' or pip install matplotlib)") from None
    day = 86_400_000.0
    x = arr["ts"] / day  # matplotlib date numbers: days since 1970-01-01
    width = (tf.interval_ms / day) * 0.7
    up = arr["close"] >= arr["open"]
    fig, ax = plt.subplots(figsize=(12, 5), dpi=100)
    shade = {"missing": ("tab:red", 0.25), "no_trades": ("0.6", 0.25)}
    seen: set[str] = set()
    for g in gaps:
        color, alpha = shade[g.kind]
        ax.axvspan(g.start / day, g.end / day, color=color, alpha=alpha, lw=0, label=None if g.kind in seen else g.kind)
        seen.add(g.kind)
    for mask, color in ((up, "tab:green"), (~up, "tab:red")):
        ax.vlines(x[mask], arr["low"][mask], arr["high"][mask], color=color, linewidth=0.6)
        body_lo = np.minimum(arr["open"][mask], arr["close"][mask])
        body_h = np.abs(arr["close"][mask] - arr["open"][mask])
        ax.bar(x[mask], np.maximum(body_h, 1e-12), width, bottom=body_lo, color=color, linewidth=0)
    ax.xaxis_date()
    ax.set_title(f"{sym} {tf.name}: {len(arr)} candles, {len(gaps)} gaps (UTC)")
    ax.set_ylabel(sym.split("-", 1)[0])
    if seen:
        ax.legend(loc="upper left")
    fig.autofmt_xdate()
    fig.tight_layout()
    try:
        write_atomically(path, lambda tmp: fig.savefig(tmp, format=path.suffix[1:].lower()))
    except ValueError as exc:
        raise MdsError(f"cannot write {path}: {exc}") from None
    finally:
        plt.close(fig)
    sys.stdout.write(
        f"{sym} {tf.name}: {len(arr)} candles, {len(gaps)} gaps, plot written to {path}"
        f"{' (overwritten)' if existed else ''}\n"
    )
    return 0


# ---------------------------------------------------------------------------------------------
# list, delete
# ---------------------------------------------------------------------------------------------


def cmd_list(args: argparse.Namespace) -> int:
    """Print the series stored: symbol, timeframe, first and last candle, candles, and the
    covered share of the intervals from the first to the last candle."""
    sym = None if args.symbol is None else validate_symbol(args.symbol)
    series = [i for i in _stored_series(args) if sym is None or i.symbol == sym]
    rows = [
        [
            i.symbol,
            i.timeframe,
            "-" if i.first is None else _fmt_time(i.first),
            "-" if i.last is None else _fmt_time(i.last),
            i.count,
            "-" if i.covered is None else _fmt_share(i.covered),
        ]
        for i in series
    ]
    out = sys.stdout
    if rows:
        print_table(["symbol", "timeframe", "first", "last", "candles", "covered"], rows, out)
    total = sum(i.count for i in series)
    out.write(f"{len(series)} series, {total} candles\n")
    return 0


def _fmt_share(share: float) -> str:
    """A covered share as a percentage that says 100 % only when it is whole, 0 % only when none."""
    pct = 100.0 * share
    shown = f"{pct:.1f}"
    if shown == "100.0" and share < 1.0:
        shown = "99.9"
    elif shown == "0.0" and share > 0.0:
        shown = "0.1"
    return f"{shown}%"


def cmd_delete(args: argparse.Namespace) -> int:
    """Delete a series (every timeframe of the symbol without -t), or a range of it, from every
    tier; its coverage goes with it. Asks first unless --yes (and refuses to ask a non-terminal)."""
    _check_range(args.start, args.end)
    sym = validate_symbol(args.symbol)
    series = _stored_series(args)
    tfs = [i.timeframe for i in series if i.symbol == sym]
    if args.timeframe is not None:
        tf = parse_timeframe(args.timeframe)
        if tf.name not in tfs:
            raise BadInput(f"no such series: {sym} {tf.name}; stored: {_shown_series(series)}")
        tfs = [tf.name]
    elif not tfs:
        raise BadInput(f"no such series: {sym}; stored: {_shown_series(series)}")
    counts = {i.timeframe: i.count for i in series if i.symbol == sym and i.timeframe in tfs}
    span = "" if args.start is None and args.end is None else " in the range given"
    what = ", ".join(f"{sym} {t} ({counts[t]} candles)" for t in tfs)
    if not args.yes:
        if not sys.stdin.isatty():
            raise BadInput(f"would delete {what}{span}: give --yes to delete without asking")
        sys.stderr.write(f"delete {what}{span}, with its coverage? [y/N] ")
        sys.stderr.flush()
        if sys.stdin.readline().strip().lower() not in ("y", "yes"):
            sys.stderr.write("mds delete: nothing deleted\n")
            return 1
    with _open_store(args) as store:
        for t in tfs:
            n = store.delete(sym, t, start=args.start, end=args.end)
            sys.stdout.write(f"{sym} {t}: {n} candles deleted{span}, with their coverage\n")
    return 0


# ---------------------------------------------------------------------------------------------
# migrate
# ---------------------------------------------------------------------------------------------

#: Tests only: after this many committed windows, ``migrate`` says so on stderr and waits for its
#: stdin to close, so that a test can kill it at a known point (a real interruption).
_MIGRATE_PAUSE_ENV = "MDS_MIGRATE_TEST_PAUSE_AFTER"


def cmd_migrate(args: argparse.Namespace) -> int:
    """Copy the SQLite history under --path into PostgreSQL, resumably; then verify it."""
    from mds import _migrate as migration
    from mds.models import Config
    from mds.tiers.durable import open_durable
    from mds.tiers.sqlite import SqliteStore

    env = os.environ.get("MDS_HISTORY", "").strip()
    url = args.to.strip() if args.to is not None else env
    if not url:
        raise BadInput("give --to postgresql://... (or set MDS_HISTORY)")
    if not is_server_url(url):
        raise BadInput(f"--to must be a postgresql:// URL, not {shown_url(url)}")
    path = _store_path(args)
    db = path / "candles.sqlite3"
    if not db.is_file():
        raise BadInput(f"no SQLite history at {db} (give --path)")
    shown = shown_url(url)
    pause_after = int(os.environ.get(_MIGRATE_PAUSE_ENV, "0") or 0)
    progress = Progress(sys.stderr)
    done = migration.Copied()
    t0 = time.perf_counter()

    def show(i: int, s: migration.SeriesSpan, seen: int, totals: migration.Copied, final: bool = False) -> None:
        rate = totals.candles / max(time.perf_counter() - t0, 1e-9)
        label = f"series {i}/{len(plan)} {s.symbol} {s.tf.name}"
        extra = f"; in all {totals.candles} copied, {totals.present} already there, {rate:,.0f} candles/s"
        progress.update(label, seen, s.candles, seen, final=final, extra=extra)

    def on_window(i: int, s: migration.SeriesSpan, seen: int, totals: migration.Copied) -> None:
        show(i, s, seen, totals)
        if pause_after and totals.windows == pause_after:
            sys.stderr.write(f"mds migrate: paused after {totals.windows} windows ({_MIGRATE_PAUSE_ENV})\n")
            sys.stderr.flush()
            sys.stdin.read()  # until the test kills this process (or closes stdin: then go on)

    with contextlib.ExitStack() as stack:
        stack.enter_context(progress)
        src = SqliteStore(db, readonly=True)
        stack.callback(src.close)
        origin = f"{socket.gethostname()}:mds-migrate:{os.getpid()}"
        try:
            dst = open_durable(path, Config(), readonly=False, clock=now_ms, history=url, origin=origin)
        except StorageUnavailableError as exc:
            raise _history_error(url, str(exc)) from exc
        stack.callback(dst.close)
        plan = migration.source_series(src)
        if not plan:
            sys.stdout.write(f"nothing to copy: {db} holds no series\n")
            return 0
        try:
            migration.copy(
                src,
                dst,
                plan,
                window=args.window,
                done=done,
                on_window=on_window,
                on_series=lambda i, s, totals: show(i, s, s.candles, totals, final=True),
            )
        except KeyboardInterrupt:
            progress.close()
            sys.stderr.write(
                f"mds migrate: interrupted after {done.candles} candles copied; run the same command again to resume\n"
            )
            return 130
        secs = time.perf_counter() - t0
        out = sys.stdout
        if done.windows == 0:
            out.write(
                f"nothing to copy: {shown} already holds all {len(plan)} series of {db} ({done.present} candles)\n"
            )
        else:
            out.write(
                f"migrated {len(plan)} series from {db} to {shown}: {done.candles} candles copied"
                f" ({done.present} already there), {done.ranges} coverage ranges, "
                f"{done.windows} transactions, {secs:.1f} s\n"
            )
        problems = migration.verify(
            src,
            dst,
            plan,
            window=args.window,
            on_series=lambda i, s: progress.update(
                f"verify {i}/{len(plan)} {s.symbol} {s.tf.name}", s.candles, s.candles, s.candles, final=True
            ),
        )
    if problems:
        for p in problems:
            out.write(f"problem: {p}\n")
        sys.stderr.write(f"mds migrate: verification found {len(problems)} series that differ\n")
        return 1
    out.write(f"verified: {len(plan)} series equal (candle counts, checksums, coverage)\n")
    return 0


# ---------------------------------------------------------------------------------------------
# parser and entry point
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The ``mds`` argument parser."""
    common = _Parser(add_help=False)
    common.add_argument("--path", default=argparse.SUPPRESS, help="store directory (default: $MDS_HOME, else ~/.mds)")
    p = _Parser(
        prog="mds",
        description="mds: embedded market-data storage for Upbit candles. Times: ISO-8601 "
        "(UTC unless an offset is given) or epoch ms.",
    )
    p.add_argument("--path", default=None, help="store directory (default: $MDS_HOME, else ~/.mds)")
    p.add_argument("-v", "--verbose", action="store_true", help="log what the store does (to stderr)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    history = _Parser(add_help=False)
    history.add_argument(
        "--history",
        metavar="URL",
        default=None,
        help="keep the history (candles, coverage) in this PostgreSQL database, postgresql://user@host/db, "
        "instead of the SQLite file under --path; memory and LMDB stay under --path "
        "(default: $MDS_HISTORY, else SQLite)",
    )

    def add(
        name: str, help_: str, description: str | None = None, *, opens_store: bool = True
    ) -> argparse.ArgumentParser:
        parents = [common, history] if opens_store else [common]
        return sub.add_parser(name, parents=parents, help=help_, description=description or help_)

    def series(sp: argparse.ArgumentParser, ranged: bool = True) -> None:
        sp.add_argument("symbol", metavar="SYMBOL", help="Upbit market code, e.g. KRW-BTC")
        sp.add_argument(
            "--timeframe",
            "-t",
            default=None,
            help="1s, 1m 3m 5m 10m 15m 30m, 1h, 4h, 1d, 1w, 1M (default: the symbol's only stored timeframe)",
        )
        if ranged:
            sp.add_argument("--start", type=_time_arg, help="range start (inclusive)")
            sp.add_argument("--end", type=_time_arg, help="range end (exclusive)")

    d = sub.add_parser(
        "demo",
        help="offline demo: FakeUpbit, backfill, strategy-like reads, gaps, statistics",
        description="Runs offline: a local FakeUpbit with seeded liquid and illiquid markets, a store in a "
        "temporary directory (or --path), a backfill of 1m candles through UpbitRouter, strategy-like reads "
        "while a simulated clock moves on, then a table of hit rates, latencies, Layer 1 requests, gaps and "
        "sizes. Its history is always SQLite (generated candles never go to a shared history: MDS_HISTORY is "
        "ignored).",
    )
    d.add_argument(
        "--path",
        default=argparse.SUPPRESS,
        help="keep the demo's store in this new or empty directory (default: a temporary directory, removed "
        "at the end; $MDS_HOME is not used)",
    )
    d.add_argument("--days", type=_positive_int, default=3, help="days of 1m candles to backfill (default 3)")
    d.add_argument("--markets", type=_positive_int, default=5, help="number of markets (default 5, at most 8)")
    d.add_argument("--seed", type=int, default=7, help="seed of the generated markets (default 7)")
    d.add_argument("--minutes", type=_positive_int, default=20, help="simulated minutes of reads (default 20)")
    d.add_argument(
        "--reads-per-minute", type=_positive_int, default=60, help="strategy ticks a minute (default 60: every second)"
    )
    d.set_defaults(func=_demo)

    b = add("backfill", "fetch and store history from Upbit (resumable)")
    b.add_argument("symbols", nargs="+", metavar="SYMBOL", help="Upbit market codes")
    b.add_argument("--timeframe", "-t", default="1m", help="timeframe (default 1m)")
    g = b.add_mutually_exclusive_group(required=True)
    g.add_argument("--days", type=_positive_float, help="the last N days")
    g.add_argument("--since", type=_time_arg, help="range start")
    b.add_argument("--until", type=_time_arg, help="range end (exclusive; default now)")
    b.add_argument("--base-url", default="https://api.upbit.com", help="Upbit REST base URL")
    b.set_defaults(func=cmd_backfill)

    gt = add("get", "print stored candles")
    series(gt)
    gt.add_argument("--count", "-n", type=_positive_int, help="latest N closed candles (with --start: first N)")
    gt.add_argument("--format", "-f", choices=("table", "csv", "json"), default="table")
    gt.set_defaults(func=cmd_get)

    gp = add("gaps", "list missing and no-trade intervals")
    series(gp)
    gp.set_defaults(func=cmd_gaps)

    im = add(
        "import",
        "import candles from a file",
        "Import candles from a file, validated and deduplicated (last row wins). Formats: upbit-json "
        "(Upbit REST pages: a candle object, a list of them or a list of lists), upbit-csv (CSV with Upbit "
        "field names), pyupbit-csv (naive KST index; open,high,low,close,volume,value), ccxt-csv (timestamp "
        "as epoch ms or naive UTC; open,high,low,close,volume; the quote volume 'value' is estimated as "
        "close * volume unless a value column is present). The file is streamed in batches of "
        f"{_importers.BATCH_ROWS:,} rows, all written in one transaction: a bad row anywhere stores nothing. "
        f"Lines and JSON values longer than {_importers.MAX_LINE // 1024} KiB, NUL bytes and text that is not UTF-8 "
        "are refused. The "
        "file's span is marked covered only with --complete.",
    )
    im.add_argument(
        "file",
        metavar="FILE",
        help="the candle file (.json, .jsonl or .csv), or a dataset directory written by mds export --dataset "
        "(every file is checked before anything is stored; its coverage comes with it)",
    )
    im.add_argument("--symbol", "-s", default=None, help="Upbit market code (a file: required)")
    im.add_argument("--timeframe", "-t", default=None, help="timeframe of the candles in the file (a file: required)")
    im.add_argument("--format", "-f", choices=IMPORT_FORMATS, default=None, help="the file's format (default auto)")
    im.add_argument(
        "--complete", action="store_true", help="the file holds every candle of its span (absent = no trades)"
    )
    im.set_defaults(func=cmd_import)

    ex = add(
        "export",
        "write a series to a file (--out; the extension picks the format: .csv, .json (Upbit JSON), .jsonl "
        "(one Upbit candle a line), .parquet) or stored series to a Parquet dataset (--dataset DIR)",
        "Write one series to a file with --out FILE (the extension picks the format: .csv, .json (Upbit "
        "JSON), .jsonl (one Upbit candle a line), .parquet), or stored series (every one, or those of the "
        "SYMBOLs and -t timeframes given) to a new or empty directory with --dataset DIR: Parquet files "
        "partitioned symbol=.../timeframe=.../year=..., as pyarrow, DuckDB and Polars read them, with the "
        "coverage in _mds_dataset.json, so that 'mds import DIR' restores the series and their gaps "
        "exactly. The dataset appears whole or not at all. Parquet needs the parquet extra.",
    )
    ex.add_argument(
        "symbols", metavar="SYMBOL", nargs="*", help="Upbit market code (one with --out; with --dataset default all)"
    )
    ex.add_argument(
        "--timeframe",
        "-t",
        action="append",
        default=None,
        help="timeframe (with --out default the symbol's only stored one; with --dataset repeat it, default all)",
    )
    ex.add_argument("--start", type=_time_arg, help="range start (inclusive)")
    ex.add_argument("--end", type=_time_arg, help="range end (exclusive)")
    dest = ex.add_mutually_exclusive_group(required=True)
    dest.add_argument("--out", "-o", metavar="FILE", help="the file to write (.csv .json .jsonl .parquet)")
    dest.add_argument("--dataset", metavar="DIR", help="write a Parquet dataset to this new or empty directory")
    ex.add_argument("--force", action="store_true", help="overwrite FILE if it exists (--out only)")
    ex.set_defaults(func=cmd_export)

    ar = add(
        "archive",
        "export candles older than a date to a Parquet dataset, verify it, then delete them from the store",
        "Archive old history: export the candles (and coverage) before --before of every stored series (or "
        "of the SYMBOLs and -t timeframes given) to a new or empty directory as 'mds export --dataset' "
        "does, read the dataset back whole (manifest, SHA-256 of every file, every candle, and a count "
        "through pyarrow.dataset), and only then delete that span from the store, in one transaction that "
        "is undone if the store no longer holds exactly what was archived. 'mds import DIR' brings it "
        "back. Asks first; --yes does not (needed without a terminal).",
    )
    ar.add_argument("symbols", metavar="SYMBOL", nargs="*", help="only these markets (default all)")
    ar.add_argument("--timeframe", "-t", action="append", default=None, help="only this timeframe (repeatable)")
    ar.add_argument("--before", type=_time_arg, required=True, help="archive candles that open before this time")
    ar.add_argument("--to", metavar="DIR", required=True, help="the new or empty directory of the dataset")
    ar.add_argument("--yes", "-y", action="store_true", help="delete the archived span without asking")
    ar.set_defaults(func=cmd_archive)

    add("stats", "print store figures as JSON").set_defaults(func=cmd_stats)
    mt = add("maintain", "run maintenance (VACUUM, ANALYZE, purge)")
    mt.add_argument("--force", action="store_true", help="VACUUM whatever the fragmentation")
    mt.set_defaults(func=cmd_maintain)
    add("check", "check the integrity of every tier (exit 1 on problems)").set_defaults(func=cmd_check)

    pl = add("plot", "draw candles with gaps shaded to a PNG (needs matplotlib)")
    series(pl)
    pl.add_argument("--count", "-n", type=_positive_int, help="latest N closed candles (default 300)")
    pl.add_argument(
        "--out", "-o", required=True, metavar="FILE", help="the image to write: .png, .svg or .pdf (none given: .png)"
    )
    pl.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    pl.set_defaults(func=cmd_plot)

    ls = add(
        "list",
        "list the series stored: symbol, timeframe, first and last candle, candles, covered share",
        "List the series stored: symbol, timeframe, first and last candle, candles, and 'covered': the "
        "share of the intervals from the first to the last candle that the store knows in full (a candle, "
        "or no trades); below 100%% some of that span is missing (see mds gaps).",
    )
    ls.add_argument("symbol", metavar="SYMBOL", nargs="?", help="only this market")
    ls.set_defaults(func=cmd_list)

    dl = add(
        "delete",
        "delete a series (every timeframe of SYMBOL without -t) and its coverage",
        "Delete the candles of a series (or of --start/--end only) from every tier, with their coverage, "
        "e.g. after an import with the wrong symbol. Asks first; --yes does not (needed without a terminal).",
    )
    dl.add_argument("symbol", metavar="SYMBOL", help="Upbit market code")
    dl.add_argument("--timeframe", "-t", default=None, help="only this timeframe (default: every stored one)")
    dl.add_argument("--start", type=_time_arg, help="range start (inclusive; default: the first candle)")
    dl.add_argument("--end", type=_time_arg, help="range end (exclusive; default: after the last candle)")
    dl.add_argument("--yes", "-y", action="store_true", help="delete without asking")
    dl.set_defaults(func=cmd_delete)

    fk = sub.add_parser(
        "fake-upbit",
        help="serve FakeUpbit (a local Upbit quotation API) on 127.0.0.1 until Ctrl-C",
        description="Serve FakeUpbit on 127.0.0.1 and print its URL: seeded markets in every timeframe "
        "(the market list, candles, tickers, orderbooks, trades, with Upbit's shapes, Remaining-Req headers "
        "and 10 requests a second per group), so that Upbit clients can be pointed at it. Runs until Ctrl-C.",
    )
    fk.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default 0: any free port, printed)")
    fk.add_argument("--markets", type=_positive_int, default=5, help="number of markets (default 5, at most 8)")
    fk.add_argument("--days", type=_positive_float, default=2.0, help="days of minute candles (default 2)")
    fk.add_argument("--seed", type=int, default=7, help="seed of the generated markets (default 7)")
    fk.set_defaults(func=_fake_upbit)

    from mds._cli_watch import _RATE_WINDOW_S, WATCH_KINDS
    from mds.layer1.stream import DEFAULT_WS_URL

    wt = sub.add_parser(
        "watch",
        help="show Upbit's live feed (last price, change, spread, trades/s, lag) until Ctrl-C",
        description="Subscribe to Upbit's WebSocket feed for the markets given and show, per market, the last "
        "price, the change against the previous close, the spread of the best orderbook level, trades a second "
        f"(over the last {_RATE_WINDOW_S:.0f} s) and the lag (receipt minus Upbit's timestamp, median of the latest "
        "messages), redrawn on a terminal and as plain lines (one per market a second) otherwise, until "
        "Ctrl-C (exit 130) or --seconds. No store is opened. --record FILE writes every frame received as "
        'JSON Lines ({"received": epoch ms, "binary": bool, "frame": text}) for a replay. '
        "'mds fake-upbit' prints a ws:// URL to watch offline.",
    )
    wt.add_argument("markets", nargs="+", metavar="MARKET", help="Upbit market codes, e.g. KRW-BTC KRW-ETH")
    wt.add_argument(
        "--kinds",
        default=",".join(WATCH_KINDS),
        help=f"comma-separated message kinds to subscribe to (default {','.join(WATCH_KINDS)})",
    )
    wt.add_argument(
        "--format", choices=("DEFAULT", "SIMPLE"), default="DEFAULT", help="Upbit's message format (default DEFAULT)"
    )
    wt.add_argument("--url", default=DEFAULT_WS_URL, help=f"the WebSocket endpoint (default {DEFAULT_WS_URL})")
    wt.add_argument("--record", metavar="FILE", default=None, help="write every frame received to FILE (JSON Lines)")
    wt.add_argument("--force", action="store_true", help="overwrite the --record FILE if it exists")
    wt.add_argument("--seconds", type=_positive_float, default=None, help="stop after N seconds (default: Ctrl-C)")
    wt.set_defaults(func=_watch)

    mg = add(
        "migrate",
        "copy the SQLite history under --path into PostgreSQL (resumable)",
        "Copy the SQLite history under --path (candles and coverage, every series) into the PostgreSQL "
        "database at --to, series by series in windows of --window candles: each window's candles and "
        "coverage are one transaction, so an interrupted run leaves no candles without their coverage. "
        "Run it again to resume: windows the database already holds are skipped, nothing is copied twice. "
        "Where the database already holds a candle of the same time, the SQLite one replaces it. "
        "Then every series is verified (candle counts, checksums, coverage); exit 1 on a difference. "
        "The SQLite file is only read.",
        opens_store=False,
    )
    mg.add_argument(
        "--to", metavar="URL", default=None, help="the PostgreSQL database, postgresql://... (default: $MDS_HISTORY)"
    )
    mg.add_argument(
        "--window",
        type=_positive_int,
        default=MIGRATE_WINDOW,
        metavar="N",
        help=f"candles per transaction (default {MIGRATE_WINDOW:,})",
    )
    mg.set_defaults(func=cmd_migrate)
    return p


def _fake_upbit(args: argparse.Namespace) -> int:
    from mds._cli_demo import cmd_fake_upbit

    return cmd_fake_upbit(args)


def _watch(args: argparse.Namespace) -> int:
    from mds._cli_watch import cmd_watch

    return cmd_watch(args)


def _demo(args: argparse.Namespace) -> int:
    from mds._cli_demo import cmd_demo

    path = _checked_path(args, create=True) if getattr(args, "path", None) else None
    return cmd_demo(args, path)


def _one_line(exc: BaseException) -> str:
    """An error message on one line (a driver's message may span several)."""
    return " ".join(ln.strip() for ln in str(exc).splitlines() if ln.strip()) or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``mds`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.ERROR, format="mds: %(name)s: %(message)s", stream=sys.stderr
    )
    prog = f"mds {args.command}"
    try:
        return int(args.func(args))
    except BrokenPipeError:  # e.g. piped into head: stop quietly, as other tools do
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 0
    except (BadInput, InvalidRequestError, InvalidCandleError) as exc:
        sys.stderr.write(f"{prog}: error: {_one_line(exc)}\n")
        return 2
    except MdsError as exc:
        sys.stderr.write(f"{prog}: error: {_one_line(exc)}\n")
        return 1
    except OSError as exc:
        sys.stderr.write(f"{prog}: error: {_one_line(exc)}\n")
        return 1
    except ValueError as exc:
        sys.stderr.write(f"{prog}: error: {_one_line(exc)}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog}: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
