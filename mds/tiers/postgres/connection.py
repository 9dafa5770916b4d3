"""The PostgreSQL tier's connections: opening one (bounded connect timeout, session settings),
naming the server without its password, and translating psycopg errors into
:class:`~mds.errors.StorageUnavailableError` messages that say what went wrong.
"""

from __future__ import annotations

import logging
import math
from contextlib import suppress
from typing import Any

import psycopg

from mds.errors import StorageUnavailableError
from mds.tiers.durable import redact

logger = logging.getLogger(__name__)

#: How long a write waits for another host's lock on the same series before it fails.
LOCK_TIMEOUT_MS = 30_000

#: Run once on every new connection: the server process allocates and frees a 4 MiB value.
#: A chunk (56 KiB) is read into memory the server allocates outside its pools; on glibc, a new
#: server process gives such memory back to the system after every statement (its trim threshold
#: starts at 128 KiB) and takes it again at the next one, page faults and all. Freeing one large
#: block raises that threshold for the life of the process (glibc's dynamic mmap threshold, to
#: 2x the block: 8 MiB kept at most). Measured on PostgreSQL 15 here: a 1,000-candle range
#: statement on a new connection 113-118 us, after this statement 75-80 us (as on a connection
#: that had written a large batch); it costs about 0.3 ms once. Harmless elsewhere.
_SQL_WARM = "SELECT length(repeat('x', 4194304))"


def translate(exc: BaseException, where: str) -> StorageUnavailableError:
    """The StorageUnavailableError for a psycopg error raised while talking to ``where``."""
    if isinstance(exc, StorageUnavailableError):
        return exc
    text = " ".join(str(exc).split()) or type(exc).__name__
    low = text.lower()
    if isinstance(exc, psycopg.errors.QueryCanceled):
        hint = "the statement ran longer than the session's statement_timeout (Config.history_timeout_s); retry"
    elif isinstance(exc, psycopg.errors.LockNotAvailable):
        hint = "another host held the series' write lock too long (lock_timeout); retry"
    elif isinstance(exc, psycopg.errors.DeadlockDetected):
        hint = "two transactions locked the same series in opposite orders; this one was rolled back: retry"
    elif isinstance(exc, psycopg.errors.ReadOnlySqlTransaction):
        hint = "the connection is read-only (opened readonly, or a standby server)"
    elif "password" in low or "authentication" in low or ("role" in low and "does not exist" in low):
        hint = "the server refused the credentials: check the user name and password in the URL"
    elif "database" in low and "does not exist" in low:
        hint = "the database does not exist: create it (CREATE DATABASE) or fix the URL"
    elif ("invalid" in low and ("connection option" in low or "uri" in low or "dsn" in low)) or "missing" in low:
        hint = "the URL is not a valid PostgreSQL connection string"
    elif "timeout" in low or "timed out" in low:
        hint = "the server did not answer within the connect timeout: check the host and port"
    elif isinstance(exc, psycopg.OperationalError):
        hint = "cannot reach the server or the connection was lost (is it running? host, port, network)"
    elif isinstance(exc, psycopg.InterfaceError):
        hint = "the connection is closed or broken; the next call reconnects"
    else:
        hint = "the server reported an error; the transaction was rolled back"
    return StorageUnavailableError(f"PostgreSQL tier {where}: {hint} ({text})")


def connect(
    url: str,
    *,
    timeout_s: float,
    readonly: bool,
    application: str = "mds",
    statement_timeout_s: float | None = None,
) -> psycopg.Connection[Any]:
    """A new autocommit connection to ``url`` (transactions are opened explicitly), failing
    within ``timeout_s`` (rounded up to whole seconds, at least 1, as libpq counts them).

    Sessions get a ``statement_timeout`` of ``statement_timeout_s`` (unless the URL's options
    set one), a ``lock_timeout`` (see :data:`LOCK_TIMEOUT_MS`, at most ``statement_timeout_s``:
    a write waiting for another host's lock says so), TCP keepalives (a silently lost server is
    noticed), and ``default_transaction_read_only`` when ``readonly``.

    Raises
    ------
    StorageUnavailableError
        Naming the problem: a malformed URL, an unknown host, refused credentials, a missing
        database, or no answer within the timeout.
    """
    lock_ms = LOCK_TIMEOUT_MS
    first = ""  # settings the URL's own options may override
    if statement_timeout_s is not None:
        limit_ms = max(1, math.ceil(statement_timeout_s * 1000))
        first = f"-c statement_timeout={limit_ms}"
        lock_ms = min(lock_ms, max(1, limit_ms * 4 // 5))
    options = f"-c lock_timeout={lock_ms}"
    if readonly:
        options += " -c default_transaction_read_only=on"
    try:
        # the URL's own options (a search_path, a statement_timeout) are kept: the statement
        # bound before them, ours after
        given = str(psycopg.conninfo.conninfo_to_dict(url).get("options") or "")
        options = " ".join(o for o in (first, given, options) if o)
        conn = psycopg.connect(
            url,
            autocommit=True,
            connect_timeout=max(1, math.ceil(timeout_s)),
            options=options,
            application_name=application,
            keepalives=1,
            keepalives_idle=10,
            keepalives_interval=5,
            keepalives_count=3,
        )
    except psycopg.Error as exc:
        raise translate(exc, redact(url)) from exc
    try:
        conn.execute(_SQL_WARM, prepare=False)
    except psycopg.Error as exc:
        close_quietly(conn)
        raise translate(exc, redact(url)) from exc
    conn.prepare_threshold = 1  # the few statements of the hot paths run prepared from their 2nd use
    return conn


def close_quietly(conn: psycopg.Connection[Any] | None) -> None:
    if conn is None:
        return
    with suppress(psycopg.Error, OSError):
        conn.close()


def rollback_quietly(conn: psycopg.Connection[Any] | None, where: str) -> None:
    """End the connection's open transaction, if any; a lost connection is left for reconnecting."""
    if conn is None or conn.closed:
        return
    try:
        if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            conn.execute("ROLLBACK")
    except psycopg.Error as exc:
        logger.warning("PostgreSQL tier %s: rollback failed: %s", where, exc)
