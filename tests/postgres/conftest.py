"""Fixtures of the PostgreSQL tests: one throwaway cluster per session (see ``pg_cluster``) and a
fresh database per test."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator

import pytest
from pg_cluster import Cluster, fresh_database, running_cluster


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
