"""One lock per operation and target, held for a run, visible to every way of starting it.

Runs start from the CLI, the Prefect UI or a schedule, and only deployment runs share
Prefect's concurrency limit; all of them share the ops database. So the lock is a
PostgreSQL session advisory lock there, on a connection of its own held for the whole
run: a second run of the same operation on the same target is refused at once with
:class:`OperationBusy` naming the holder, and a crashed run's lock goes with its
connection, so no stale lock ever needs cleaning up.

Keys are the two-int form ``(LOCK_CLASS, hash of "<operation>:<target>")``, so they never
collide with the single-bigint locks retention takes per table.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg2

from wedefi_dr.errors import OperationBusy, ServerUnreachable

log = logging.getLogger(__name__)

LOCK_CLASS = 0x57444452  # "WDDR": this system's namespace among advisory locks
APPLICATION_PREFIX = "wedefi-dr lock"


def lock_key(operation: str, target: str) -> int:
    """A signed int4 from ``<operation>:<target>``: stable across processes and hosts."""
    digest = hashlib.sha256(f"{operation}:{target}".encode()).digest()
    return int.from_bytes(digest[:4], "big", signed=True)


def application_name(operation: str) -> str:
    """What pg_stat_activity shows for the holder: the operation, host and OS pid, so the
    refusal names who to look at (PostgreSQL keeps the first 63 bytes)."""
    return f"{APPLICATION_PREFIX} {operation} {socket.gethostname()} pid {os.getpid()}"[:63]


def holder(conn, key: int) -> str:  # noqa: ANN001 - a psycopg2 connection
    """Who holds ``key``: its backend pid, application_name and since when."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT a.pid, a.application_name, a.backend_start"
            " FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
            " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2"
            " AND l.classid::bigint = %s AND l.objid::bigint = %s",
            (LOCK_CLASS, key & 0xFFFFFFFF),
        )
        row = cur.fetchone()
    if row is None:
        return "a run that has just finished"
    pid, app, since = row
    app = app or "no application_name"
    return f"backend pid {pid} ({app}, connected {since:%Y-%m-%d %H:%M:%S %Z})"


@contextmanager
def operation_lock(ops_dsn: str, operation: str, target: str) -> Iterator[None]:
    """Hold the lock of ``operation`` on ``target`` for the ``with`` block, or raise
    :class:`OperationBusy` before anything else happens."""
    key = lock_key(operation, target)
    try:
        conn = psycopg2.connect(
            ops_dsn, application_name=application_name(operation), connect_timeout=10
        )
    except psycopg2.OperationalError as exc:
        raise ServerUnreachable(
            f"cannot reach the ops database to lock {operation} of {target}: {str(exc).strip()}"
        ) from exc
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT pg_try_advisory_lock(%s, %s)", (LOCK_CLASS, key))
            (acquired,) = cur.fetchone()
        if not acquired:
            raise OperationBusy(
                f"{operation} of {target} is already running, held by {holder(conn, key)}: "
                "refused; wait for it to finish (or end that run) and start again"
            )
        log.info("lock held: %s of %s", operation, target)
        yield
    finally:
        conn.close()  # the session ends, and with it the lock
