"""Fixtures of the PostgreSQL tests: one throwaway cluster per session (see ``pg_cluster``) and a
fresh database per test."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator

import pytest
from pg_cluster import REQUIRE_ENV, Cluster, fresh_database, running_cluster

try:
    import psycopg  # noqa: F401  (the driver of the tier these modules test)
except ImportError as exc:  # a developer machine without the postgres extra
    if os.environ.get(REQUIRE_ENV) == "1":
        raise
    _NO_DRIVER = f"psycopg is not installed ({exc}): pip install -e '.[test]' or 'upbit-mds[postgres]'"
else:
    _NO_DRIVER = ""


class _WithoutDriver(pytest.Module):
    """A test module of this directory where psycopg is missing: skipped with the reason, not an
    error at import (its imports need the driver)."""

    def collect(self) -> list[pytest.Item]:
        raise pytest.skip.Exception(_NO_DRIVER, allow_module_level=True)


def pytest_pycollect_makemodule(module_path: os.PathLike[str], parent: pytest.Collector) -> pytest.Module | None:
    return _WithoutDriver.from_parent(parent, path=module_path) if _NO_DRIVER else None


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Cluster]:
    with running_cluster() as cluster:
        yield cluster


@pytest.fixture
def pg_url(pg_cluster: Cluster) -> Iterator[str]:
    """The URL of a new, empty database."""
    with fresh_database(pg_cluster) as url:
        yield url


@pytest.fixture
def stopped() -> Iterator[list[int]]:
    """Server processes a test SIGSTOPs (a hung server); continued at the end whatever happens."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGCONT)
