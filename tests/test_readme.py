"""The README's quick start runs as written (on a temporary directory)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def quick_start() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Quick start", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "no python block under 'Quick start'"
    return match.group(1)


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
