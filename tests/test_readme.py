"""The README's quick start runs as written (on a temporary directory)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def python_block(title: str) -> str:
    """The first python code block under the README section ``## {title}``."""
    section = README.read_text(encoding="utf-8").split(f"## {title}", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, f"no python block under {title!r}"
    return match.group(1)


def quick_start() -> str:
    return python_block("Quick start")


@pytest.mark.skipif(not README.exists(), reason="README.md is not shipped with an installed wheel")
def test_quick_start_runs(tmp_path: Path) -> None:
    code = quick_start()
    assert "/tmp" not in code, "the quick start must not use a fixed name in a shared directory"
    scope: dict = {}
    import tempfile

    old_tempdir = tempfile.tempdir
    tempfile.tempdir = str(tmp_path)  # mkdtemp() in the quick start lands in this test's directory
    try:
        exec(compile(code, "README.md", "exec"), scope)
    finally:
        tempfile.tempdir = old_tempdir
    assert Path(scope["path"]).parent == tmp_path
    assert len(scope["latest"]) == 1000
    assert not scope["latest"].flags.writeable
    assert scope["resp"].success
    assert len(scope["resp"].arrays["KRW-BTC"]) == 200
    assert np.array_equal(scope["resp"].arrays["KRW-BTC"], scope["latest"][-200:])
    assert all(g.kind == "no_trades" for g in scope["gaps"])


@pytest.mark.skipif(not README.exists(), reason="README.md is not shipped with an installed wheel")
def test_backtesting_runs(tmp_path: Path) -> None:
    import tempfile

    scope: dict = {}
    old_tempdir = tempfile.tempdir
    tempfile.tempdir = str(tmp_path)
    try:
        exec(compile(python_block("Backtesting"), "README.md", "exec"), scope)
    finally:
        tempfile.tempdir = old_tempdir
    assert str(scope["df"].index.tz) == "Asia/Seoul" and len(scope["df"]) == len(scope["btc"])
    assert scope["table"].num_rows == len(scope["btc"])
    assert len(scope["six_hours"]) == 12 and scope["close"].shape == (36, 2)
    assert not np.isnan(scope["close"]).any() and scope["ts"][0] == scope["day0"]
    assert np.isfinite(scope["pnl"]).all() and (scope["pnl"] != 0).all()
