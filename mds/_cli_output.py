"""What the ``mds`` command draws and writes: progress, tables, output files (private).

On a terminal both are drawn by rich (a progress bar with rate and time left, boxed tables);
anywhere else (a pipe, a file, a test) they degrade to plain lines that a script can read: a
progress line per finished series and one every :data:`PLAIN_EVERY_S` seconds, and tables as
columns separated by two spaces under a dashed rule.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from mds._importers import BadInput
from mds.errors import MdsError

__all__ = ["PLAIN_EVERY_S", "Progress", "fmt_bytes", "number_column", "out_path", "print_table", "write_atomically"]

#: Seconds between two plain progress lines of one long series.
PLAIN_EVERY_S = 30.0
#: Most decimals a number column shows (Upbit's volumes have 8).
_MAX_DECIMALS = 8


def _is_tty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def fmt_bytes(n: float) -> str:
    """``n`` bytes as B, KiB, MiB or GiB."""
    for unit in ("B", "KiB", "MiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def number_column(values: Sequence[float]) -> list[str]:
    """The numbers of one column in one format: fixed point with the fewest decimals (at most
    8) that show every value exactly, so ``6207460245`` and ``12854010490.5`` line up, and no
    value is shown in exponent form. Non-finite values are shown as ``nan``/``inf``."""
    finite = [v for v in values if math.isfinite(v)]
    decimals = 0
    for v in finite:
        while decimals < _MAX_DECIMALS and float(f"{v:.{decimals}f}") != v:
            decimals += 1
    return [f"{v:.{decimals}f}" if math.isfinite(v) else str(v) for v in values]


def print_table(
    headers: Sequence[str], rows: Sequence[Sequence[Any]], out: TextIO, *, title: str | None = None
) -> None:
    """A table: first column left-aligned, the others right-aligned. rich draws it on a
    terminal; elsewhere it is plain text (header, dashed rule, rows)."""
    cells = [[str(c) for c in r] for r in rows]
    if _is_tty(out):
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title, title_justify="left")
        for i, h in enumerate(headers):
            table.add_column(str(h), justify="left" if i == 0 else "right", no_wrap=True)
        for r in cells:
            table.add_row(*r)
        Console(file=out, highlight=False).print(table)
        return
    if title:
        out.write(title + "\n")
    grid = [[str(h) for h in headers], *cells]
    widths = [max(len(r[i]) for r in grid) for i in range(len(headers))]
    for n, r in enumerate(grid):
        parts = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
        out.write("  ".join(parts).rstrip() + "\n")
        if n == 0:
            out.write("  ".join("-" * w for w in widths) + "\n")


class Progress:
    """Progress of a long command, one task per series: a rich progress display (bar, share,
    candles, rate, time left) on a terminal, plain lines otherwise.

    Use it as a context manager: on exit the display stops and the cursor is on a fresh line,
    so whatever is written next (``interrupted``, an error) starts a line of its own.
    """

    def __init__(self, stream: TextIO, unit: str = "candles") -> None:
        self.stream = stream
        self.unit = unit
        self.tty = _is_tty(stream)
        self._last_line = time.monotonic()
        self._started: dict[str, float] = {}
        self._rich: Any = None
        self._tasks: dict[str, Any] = {}
        if self.tty:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress as RichProgress,
                TaskProgressColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._rich = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                TaskProgressColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[extra]}"),
                console=Console(file=stream, highlight=False),
                transient=False,
            )

    def __enter__(self) -> Progress:
        if self._rich is not None:
            self._rich.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the display (idempotent); the cursor is then at the start of a line."""
        if self._rich is not None:
            self._rich.stop()
            self._rich = None

    def update(self, label: str, done: int, total: int, count: int, final: bool = False, extra: str = "") -> None:
        """``done`` of ``total`` intervals of ``label`` are through, ``count`` items stored."""
        now = time.monotonic()
        t0 = self._started.setdefault(label, now)
        rate = count / (now - t0) if now > t0 else 0.0
        rate_text = f"{rate:,.0f} {self.unit}/s"
        if self._rich is not None:
            task = self._tasks.get(label)
            if task is None:
                task = self._tasks[label] = self._rich.add_task(label, total=max(total, 1), rate="", extra="")
            self._rich.update(task, completed=min(done, total), total=max(total, 1), rate=rate_text, extra=extra)
            return
        if final or now - self._last_line >= PLAIN_EVERY_S:
            share = min(1.0, done / total) if total else 1.0
            bar = "#" * int(share * 30)
            self.stream.write(f"{label} [{bar:<30}] {100 * share:5.1f} % {count} {self.unit}, {rate_text}{extra}\n")
            self.stream.flush()
            self._last_line = now


def out_path(text: str, allowed: Sequence[str], what: str, force: bool, default_ext: str | None = None) -> Path:
    """The file ``--out`` names, checked before anything is read: its extension picks the format
    (one of ``allowed``; ``default_ext`` is added to a name without one), and an existing file is
    refused unless ``force``."""
    path = Path(text).expanduser()
    ext = path.suffix.lower()
    if not ext and default_ext is not None:
        path, ext = path.with_name(path.name + default_ext), default_ext
    if ext not in allowed:
        shown = f"'{ext}'" if ext else "no extension"
        raise BadInput(
            f"{what} --out {text}: {shown} is not a format mds writes; end the name with {', '.join(allowed)}"
        )
    if path.is_dir():
        raise BadInput(f"{what} --out {path}: is a directory")
    if path.exists() and not force:
        raise BadInput(f"{path} exists: give --force to overwrite it, or another name")
    return path


def write_atomically(path: Path, write: Any) -> None:
    """``write(temporary path)``, then rename it to ``path``: a failed export leaves no partial file."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    except OSError as exc:
        raise MdsError(f"cannot write {path}: {exc.strerror or exc}") from None
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        raise MdsError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
