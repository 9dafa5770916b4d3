"""A shared history server that lost acknowledged writes is reported by the store directories that
wrote them (mds.store.changes.SharedAcks): the server keeps a ledger of each directory's latest
commit, restored with everything else; a directory compares it with its own record.

Restores are played by putting the rows, the commit counter and the ledger back as a backup held
them (test_pg_review's helpers), or by a database dropped and created again at the same URL.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import psycopg
import pytest
from pg_cluster import Cluster, fresh_database
from test_pg_review import MIN, SYM, T0, _backup_meta, _open, _restore_meta, _rows

from mds.tiers.postgres import PostgresTier


def _lost(report_problems: tuple[str, ...]) -> list[str]:
    return [p for p in report_problems if "acknowledged" in p]


def test_a_restore_stays_reported_after_the_directory_writes_again(tmp_path: Path, pg_url: str) -> None:
    """A's next commit moves its ledger entry past the record: the evidence is taken at that
    commit (the entry before it was behind), so check() still reports the loss afterwards."""
    rows = _rows()
    with _open(tmp_path / "a", pg_url) as a:
        a.write_candles(SYM, "1m", rows[:10])
        backup = _backup_meta(pg_url)
        a.write_candles(SYM, "1m", rows[10:20])
        with PostgresTier(pg_url, compress_after_days=None) as t:
            t.delete(SYM, "1m", T0 + 10 * MIN, None)
        _restore_meta(pg_url, backup)
        a.write_candles("KRW-ETH", "1m", _rows(5, seed=3))  # acknowledged: the ledger moves on
        assert _lost(a.check().problems), a.check().problems
    with _open(tmp_path / "a", pg_url) as a:  # kept in changes.bin, for every process of the path
        assert _lost(a.check().problems)
    (tmp_path / "a" / "changes.bin").unlink()  # accepted, as the message says
    with _open(tmp_path / "a", pg_url) as a:
        assert a.check().ok, a.check().problems


def test_a_database_created_again_at_the_same_url_is_reported_at_open(
    tmp_path: Path, pg_cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    """The server's disk was replaced and the database created again, empty: the directory's
    record says it had commits acknowledged there, the ledger has no entry for it."""
    with fresh_database(pg_cluster) as url:
        with _open(tmp_path / "a", url) as a:
            a.write_candles(SYM, "1m", _rows(10))
        name = psycopg.conninfo.conninfo_to_dict(url)["dbname"]
        with psycopg.connect(pg_cluster.url(), autocommit=True) as admin:
            admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
            admin.execute(f"CREATE DATABASE {name}")
        with caplog.at_level(logging.WARNING, logger="mds"), _open(tmp_path / "a", url) as a:
            assert any("acknowledged" in r.getMessage() for r in caplog.records), caplog.text
            assert _lost(a.check().problems)


def test_a_directory_moved_to_another_database_reports_nothing(tmp_path: Path, pg_cluster: Cluster) -> None:
    """The record is kept for one server: pointing the directory at another database (another
    URL) is a choice, not a loss; the record then follows the new server."""
    with fresh_database(pg_cluster) as one, fresh_database(pg_cluster) as two:
        with _open(tmp_path / "a", one) as a:
            a.write_candles(SYM, "1m", _rows(10))
        with _open(tmp_path / "a", two) as a:
            assert a.check().ok, a.check().problems
            a.write_candles(SYM, "1m", _rows(10))
            assert a.check().ok, a.check().problems


_WRITER = """
import sys, mds
from mds.testing import generate_market
path, url, sym, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
t0 = 1736121600000
cfg = mds.Config(lookup="storage_first")
with mds.open(path, config=cfg, clock=lambda: t0 + 86_400_000, history=url) as s:
    rows = generate_market(sym, "1m", t0, t0 + n * 60_000, seed=len(sym))
    for i in range(n):
        s.write_candles(sym, "1m", rows[i : i + 1])
    print(s.check().problems)
"""


def test_concurrent_writers_of_one_directory_and_other_hosts_report_no_loss(tmp_path: Path, pg_url: str) -> None:
    """Two processes of one store directory commit 60 times each, interleaved, while another
    directory commits too: every commit is acknowledged in an order only the server knows, and
    none of it is a loss (the record is read before each transaction, the ledger in it)."""
    path = tmp_path / "a"
    with _open(path, pg_url) as a:  # the directory exists before the processes race for it
        a.write_candles(SYM, "1m", _rows(1))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(path), pg_url, sym, "60"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for sym in ("KRW-ETH", "KRW-XRP")
    ]
    with _open(tmp_path / "b", pg_url) as b:
        rows = _rows(60, seed=5)
        for i in range(60):
            b.write_candles("KRW-SOL", "1m", rows[i : i + 1])
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
        assert out.strip() == "()", out  # each process's check() after its own writes
    with _open(path, pg_url) as a:
        assert a.check().ok, a.check().problems
        got = a.candles("KRW-ETH", "1m", start=T0, end=T0 + 60 * MIN)
        assert len(got) == 60 and np.all(np.diff(got["ts"]) == MIN)


def test_a_role_that_may_not_create_the_ledger_writes_without_it(
    tmp_path: Path, pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A database of schema 2 from before the ledger, used by a role with data rights only: it
    opens and writes (a warning says losses will not be noticed), and reports nothing lost."""
    with PostgresTier(pg_url, compress_after_days=None) as t:  # the tables, as an older mds left them
        t.write(SYM, "1m", _rows(5))
    role = "limited_" + psycopg.conninfo.conninfo_to_dict(pg_url)["dbname"]
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute("DROP TABLE mds_acks")
        admin.execute(f"CREATE ROLE {role} LOGIN")
        admin.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}")
        admin.execute(f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {role}")
        admin.execute(f"REVOKE CREATE ON SCHEMA public FROM PUBLIC, {role}")
    url = pg_url.replace("postgres@", f"{role}@")
    try:
        with caplog.at_level(logging.WARNING, logger="mds"), _open(tmp_path / "a", url) as a:
            assert any("ledger" in r.getMessage() for r in caplog.records), caplog.text
            a.write_candles(SYM, "1m", _rows(20)[5:])
            assert len(a.candles(SYM, "1m", start=T0, end=T0 + 20 * MIN)) == 20
            assert a.check().ok, a.check().problems
    finally:
        with psycopg.connect(pg_url, autocommit=True) as admin:
            admin.execute(f"DROP OWNED BY {role}")
            admin.execute(f"DROP ROLE {role}")
