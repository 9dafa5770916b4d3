"""Reliability suite: shared fixtures and the run's coverage summary."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import _relutil as R

_T_START = time.monotonic()


@pytest.fixture
def clock() -> R.Clock:
    return R.Clock()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not R.TALLY:
        return
    R.TALLY["suite_seconds"] = round(time.monotonic() - _T_START)
    base = terminalreporter.config._tmp_path_factory.getbasetemp()  # type: ignore[attr-defined]
    data = R.write_report(Path(base) / "reliability_report.json")
    terminalreporter.section("mds reliability coverage")
    for k, v in data.items():
        terminalreporter.write_line(f"{k:>28}: {v}")
    terminalreporter.write_line(f"(also written to {base}/reliability_report.json)")
