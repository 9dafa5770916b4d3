"""Throwaway PostgreSQL clusters for the tests: initdb into a temporary directory, a server that
listens on a Unix socket in that directory only (no TCP), stopped (``-m immediate``) and removed
at the end. Never a system server.

As root (initdb refuses to run as root) the server runs as ``nobody``, with the directory
handed to that user.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import pytest

REQUIRE_ENV = "MDS_REQUIRE_POSTGRES"
_START_TIMEOUT_S = 60


def find_bindir() -> str | None:
    """The directory holding initdb and pg_ctl: on PATH, else the newest /usr/lib/postgresql/*/bin."""
    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb"):
        return os.path.dirname(on_path)
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
        key=lambda p: int(p.split("/")[-3]) if p.split("/")[-3].isdigit() else 0,
    )
    return os.path.dirname(found[-1]) if found else None


def skip_or_fail(reason: str) -> None:
    """Skip (a developer machine without PostgreSQL) unless MDS_REQUIRE_POSTGRES=1 (CI): fail."""
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason} ({REQUIRE_ENV}=1)")
    pytest.skip(reason)


class Cluster:
    """One throwaway cluster: :meth:`url` of a database, :meth:`stop`, :meth:`start`."""

    def __init__(self, bindir: str) -> None:
        self.bindir = bindir
        self.dir = tempfile.mkdtemp(prefix="mds-pg-")
        self.data = os.path.join(self.dir, "data")
        self.user = "nobody" if os.geteuid() == 0 else None
        if self.user:
            shutil.chown(self.dir, user=self.user)
        self._run("initdb", "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync", "-D", self.data)

    def _run(self, tool: str, *args: str) -> None:
        proc = subprocess.run(
            [os.path.join(self.bindir, tool), *args],
            user=self.user,
            capture_output=True,
            text=True,
            timeout=_START_TIMEOUT_S,
            check=False,
        )
        if proc.returncode:
            raise RuntimeError(f"{tool} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")

    def start(self) -> None:
        # fsync=off is safe for a throwaway cluster (a killed server loses nothing the OS holds);
        # synchronous_commit stays on: an acknowledged commit must survive ``-m immediate``
        opts = (
            f"-c listen_addresses='' -k {self.dir} -c fsync=off "
            "-c full_page_writes=off -c max_connections=60 -c shared_buffers=32MB"
        )
        log = os.path.join(self.dir, "server.log")
        self._run("pg_ctl", "-D", self.data, "-l", log, "-w", "-t", str(_START_TIMEOUT_S), "-o", opts, "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop")

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@/{dbname}?host={self.dir}"

    def remove(self) -> None:
        with suppress(RuntimeError, subprocess.SubprocessError, OSError):
            self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextmanager
def running_cluster() -> Iterator[Cluster]:
    """A started throwaway cluster, stopped and removed on exit (also on failure); skips (or
    fails, see :func:`skip_or_fail`) when the binaries are missing or the server cannot start."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        skip_or_fail("psycopg is not installed (pip install 'psycopg[binary]')")
    bindir = find_bindir()
    if bindir is None:
        skip_or_fail("PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or under /usr/lib/postgresql")
    assert bindir is not None
    cluster = None
    try:
        cluster = Cluster(bindir)
        cluster.start()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        if cluster is not None:
            cluster.remove()
        skip_or_fail(f"cannot start a throwaway PostgreSQL cluster: {exc}")
    assert cluster is not None
    try:
        yield cluster
    finally:
        cluster.remove()


@contextmanager
def fresh_database(cluster: Cluster) -> Iterator[str]:
    """A new empty database on ``cluster`` (dropped afterwards); its URL."""
    import psycopg

    name = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(cluster.url(), autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    try:
        yield cluster.url(name)
    finally:
        with suppress(psycopg.Error), psycopg.connect(cluster.url(), autocommit=True, connect_timeout=5) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def hang(cluster: Cluster, url: str, stopped: list[int], application: str = "mds") -> list[int]:
    """Freeze the server as a hung host would, for the connections of a store: SIGSTOP the
    postmaster (a new connection waits) and every backend of ``url``'s database whose
    ``application_name`` is ``application`` (a store's own and read connections; its change feed
    has its own names and keeps hearing). The pids go to ``stopped`` (a fixture continues them);
    returns the backends'."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as admin:
        rows = admin.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND application_name = %s",
            (application,),
        ).fetchall()
    with open(os.path.join(cluster.data, "postmaster.pid")) as f:
        postmaster = int(f.readline())
    backends = [int(pid) for (pid,) in rows]
    for pid in [postmaster, *backends]:
        os.kill(pid, signal.SIGSTOP)
        stopped.append(pid)
    return backends
