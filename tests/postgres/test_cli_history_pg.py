"""``mds migrate`` and ``--history`` / ``MDS_HISTORY`` against a real PostgreSQL server (the
throwaway cluster of conftest.py; these tests skip, or fail under MDS_REQUIRE_POSTGRES=1, exactly
when it cannot start). The server-free half is tests/test_cli_history.py."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from test_cli import RAW_1M, assert_clean_error, run
from test_cli_history import (  # the autouse fixture applies here too
    SERIES,
    _no_history_from_the_environment,  # noqa: F401
    assert_same_history,
    seed_source,
)

from mds.tiers.sqlite import SqliteStore


def open_history(url: str) -> Any:
    """The database at ``url`` as a read-only durable tier (imported here: the cluster fixture
    has checked that the driver is installed)."""
    from mds.tiers.postgres import PostgresTier

    return PostgresTier(url, readonly=True)


def cli_answers(home: Path, *where: str) -> dict[str, str]:
    """What ``mds get`` (CSV) and ``mds gaps`` print for every seeded series over its span."""
    out = {}
    for (sym, tf), (lo, hi) in SERIES.items():
        rng = ("--start", str(lo), "--end", str(hi))
        for cmd in (("get", sym, "-t", tf, *rng, "--format", "csv"), ("gaps", sym, "-t", tf, *rng)):
            res = run(home, *cmd, *where)
            assert res.returncode == 0, res.stderr
            out[" ".join(cmd[:2])] = res.stdout
    return out


def migrate(home: Path, src: Path, url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return run(home, "migrate", "--path", str(src), "--to", url, "--window", "500", *extra, timeout=120)


def test_migrate_then_a_fresh_path_reads_the_same_history(tmp_path: Path, pg_url: str) -> None:
    seed_source(tmp_path / "src")
    res = migrate(tmp_path, tmp_path / "src", pg_url)
    assert res.returncode == 0, res.stderr
    assert "migrated 4 series" in res.stdout and "(0 already there), 4 coverage ranges" in res.stdout
    assert "verified: 4 series equal" in res.stdout
    # progress on stderr, plain lines when it is not a terminal: one per series
    assert [ln.split(" [")[0] for ln in res.stderr.splitlines()] == [
        f"{step} {i}/4 {sym} {tf}" for step in ("series", "verify") for i, (sym, tf) in enumerate(sorted(SERIES), 1)
    ]

    sqlite_answers = cli_answers(tmp_path, "--path", str(tmp_path / "src"))
    assert "no_trades" in sqlite_answers["gaps KRW-MED"] and "missing" in sqlite_answers["gaps KRW-BTC"]
    assert cli_answers(tmp_path, "--path", str(tmp_path / "fresh"), "--history", pg_url) == sqlite_answers

    again = migrate(tmp_path, tmp_path / "src", pg_url)
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("nothing to copy:") and "verified: 4 series equal" in again.stdout


def test_a_killed_migrate_resumes_to_the_same_history(tmp_path: Path, pg_url: str) -> None:
    seed_source(tmp_path / "src")
    cmd = [sys.executable, "-m", "mds.cli", "migrate", "--path", str(tmp_path / "src"), "--to", pg_url]
    env = {"MDS_MIGRATE_TEST_PAUSE_AFTER": "3"}
    proc = subprocess.Popen(
        [*cmd, "--window", "500"],
        env={**os.environ, **env},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    watchdog = threading.Timer(120, proc.kill)  # a bound, never a hang of the suite
    watchdog.start()
    try:
        assert proc.stderr is not None
        paused = any("paused after 3 windows" in line for line in proc.stderr)
        assert paused, "migrate ended without pausing"
    finally:
        proc.kill()  # SIGKILL: no clean-up runs in the child
        proc.communicate()
        watchdog.cancel()

    src = SqliteStore(tmp_path / "src" / "candles.sqlite3", readonly=True)
    dst = open_history(pg_url)
    try:
        total = sum(n for *_, n, _f, _l in src.series())
        held = sum(n for *_, n, _f, _l in dst.series())
        assert 0 < held < total  # three windows of 500 committed, not more
        assert held == 1500
    finally:
        dst.close()

    res = migrate(tmp_path, tmp_path / "src", pg_url)
    assert res.returncode == 0, res.stderr
    assert f"{total - 1500} candles copied (1500 already there)" in res.stdout
    assert "verified: 4 series equal" in res.stdout
    dst = open_history(pg_url)
    try:
        assert_same_history(src, dst)
        assert dst.integrity_problems() == []
    finally:
        dst.close()
        src.close()


def test_mds_history_works_like_the_flag(tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # host A imports through --history; host B (another path) reads it through MDS_HISTORY
    res = run(
        tmp_path,
        "import",
        str(RAW_1M),
        "-s",
        "KRW-BTC",
        "-t",
        "1m",
        "--complete",
        "--history",
        pg_url,
        "--path",
        str(tmp_path / "a"),
    )
    assert res.returncode == 0, res.stderr
    assert not (tmp_path / "a" / "candles.sqlite3").exists()  # the history went to the server
    flag = run(
        tmp_path, "get", "KRW-BTC", "-n", "200", "--format", "csv", "--path", str(tmp_path / "b"), "--history", pg_url
    )
    monkeypatch.setenv("MDS_HISTORY", pg_url)
    env = run(tmp_path, "get", "KRW-BTC", "-n", "200", "--format", "csv", "--path", str(tmp_path / "c"))
    assert flag.returncode == 0 and env.returncode == 0, (flag.stderr, env.stderr)
    assert len(env.stdout.splitlines()) == 201 and env.stdout == flag.stdout


def test_a_database_that_does_not_exist_is_one_line_exit_1(tmp_path: Path, pg_url: str) -> None:
    url = pg_url.replace("/t_", "/nosuch_", 1)
    res = run(tmp_path, "stats", "--history", url, "--path", str(tmp_path / "local"))
    assert_clean_error(res, 1, "PostgreSQL")
    seed_source(tmp_path / "src")
    assert_clean_error(migrate(tmp_path, tmp_path / "src", url), 1, "PostgreSQL")
