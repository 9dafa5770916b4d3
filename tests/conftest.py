"""Shared set-up for the test suite.

Subprocesses started by tests (``python -m mds.cli``, ``python -c``) must import the same ``mds``
as this process: the installed wheel in CI (with its compiled core), the source tree in a
development checkout. Running every test from a scratch working directory keeps the source tree
from shadowing an installed package, and PYTHONPATH points children at the package under test.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import mds


@pytest.fixture(scope="session", autouse=True)
def _children_import_the_package_under_test(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    root = str(Path(mds.__file__).resolve().parent.parent)
    old_cwd = os.getcwd()
    old_pp = os.environ.get("PYTHONPATH")
    old_budget = os.environ.get("MDS_BUDGET_DIR")
    os.chdir(tmp_path_factory.mktemp("cwd"))
    os.environ["PYTHONPATH"] = root if not old_pp else root + os.pathsep + old_pp
    # the routers of this run (and the processes it starts) share request budgets with each
    # other only, never with a developer's own routers or another run's
    os.environ["MDS_BUDGET_DIR"] = str(tmp_path_factory.mktemp("budget"))
    try:
        yield
    finally:
        os.chdir(old_cwd)
        for name, old in (("PYTHONPATH", old_pp), ("MDS_BUDGET_DIR", old_budget)):
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


@pytest.fixture(autouse=True)
def _no_shared_history_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's MDS_HISTORY must not send the commands tests start into a shared database."""
    monkeypatch.delenv("MDS_HISTORY", raising=False)
