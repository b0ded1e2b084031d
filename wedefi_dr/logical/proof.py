"""The proof of a database that ``pg_restore --jobs`` builds, taken while it still loads.

Why: the load spends much of its time writing pages and WAL, and while the largest
table's COPY runs on one session, the other tables are already loaded and a CPU has little
to do. Fingerprinting those tables then leaves only the rest of the proof for after
``pg_restore`` exits, which is what the restore's wall clock pays for.

A table's rows are final once ``pg_restore --verbose`` reports its ``TABLE DATA`` item
finished (the worker's COPY has committed): what follows (indexes, constraints, triggers,
grants) does not change rows. So :class:`LoadingProof` reads that report line by line and
fingerprints each such table in one session, each table in a transaction of its own (no
lock held past it) with a short ``lock_timeout``: a table that ``pg_restore`` is altering
(``ADD PRIMARY KEY`` holds ACCESS EXCLUSIVE) is not waited on but tried again when the
next item finishes (an index build after it takes a lock that reads may share), and a name
the report cannot tell apart (the same table name in two schemas) is left for later.
:func:`prove_the_rest` then fingerprints every table not yet done over ``jobs`` sessions,
largest first, and the large objects and sequences.
"""

from __future__ import annotations

import logging
import queue
import re
import threading

import psycopg2
from psycopg2 import errorcodes

from wedefi_dr.postgres.conninfo import ConnTarget
from wedefi_dr.postgres.fingerprint import (
    FINGERPRINT_SETTINGS,
    Fingerprints,
    fingerprint_extras,
    table_entry,
    table_queries_sql,
)
from wedefi_dr.postgres.tools import connect

log = logging.getLogger(__name__)

# pg_restore --verbose, once every table exists and the parallel items start.
PARALLEL_START = "pg_restore: entering main parallel loop"
# ... and when a worker's item is done: its dump id, description and tag (for TABLE DATA,
# the table's name).
_FINISHED = re.compile(r"pg_restore: finished item \d+ (?P<what>.+)")
_DATA = "TABLE DATA "
# Long enough to pass a moment's catalog lock, short against any index build.
LOCK_TIMEOUT = "SET LOCAL lock_timeout = '50ms'"


def _tables_sql(method: str, *, by_size: bool) -> str:
    """Every table's fingerprint name, query and own name (what pg_restore's report says);
    ``by_size``: largest first (reading a size waits for the table's lock, so only once
    pg_restore has exited)."""
    return (
        "SELECT q.name, q.query, c.relname FROM ("
        + table_queries_sql(method)
        + ") AS q(name, query) LEFT JOIN pg_class c ON c.oid = "
        "to_regclass(regexp_replace(q.query, '^.* FROM (.*) t$', '\\1')) "
        + ("ORDER BY pg_relation_size(c.oid) DESC NULLS LAST, 1" if by_size else "ORDER BY 1")
    )


def _fingerprint(cur, query: str, method: str) -> dict[str, object]:  # noqa: ANN001
    cur.execute(query)
    rows, total = cur.fetchone()
    return table_entry(rows, total, method)


class LoadingProof:
    """One session that fingerprints, during the load, every table whose data pg_restore
    reports committed. :meth:`feed` it each line of pg_restore's stderr, then
    :meth:`finish` once pg_restore has exited."""

    def __init__(self, target: ConnTarget, method: str) -> None:
        self.target, self.method = target, method
        self.found: Fingerprints = {}
        self.error: Exception | None = None
        self._finished: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loading-proof", daemon=True)

    def feed(self, line: str) -> None:
        if line.startswith(PARALLEL_START) and not self._thread.is_alive():
            self._thread.start()
        elif match := _FINISHED.fullmatch(line):
            what = match["what"]
            self._finished.put(what.removeprefix(_DATA) if what.startswith(_DATA) else "")

    def finish(self) -> Fingerprints:
        """Take no more tables, wait for the one in progress; the fingerprints taken.

        A failure here (no connection slot left beside pg_restore's, a query error) loses
        nothing: it is logged, and every table not proven here is proven after the load,
        where the same error, if it is one, stops the restore."""
        self._stopped.set()
        self._finished.put(None)
        if self._thread.is_alive():
            self._thread.join()
        if self.error is not None:
            log.warning(
                "the proof during the load stopped after %d table(s), the rest is proven "
                "after it: %s: %s",
                len(self.found),
                type(self.error).__name__,
                str(self.error).strip(),
            )
        return self.found

    def _run(self) -> None:
        try:
            with connect(self.target.conninfo) as conn, conn.cursor() as cur:
                cur.execute(_tables_sql(self.method, by_size=False))
                by_table: dict[str, list[tuple[str, str]]] = {}
                for name, query, relname in cur.fetchall():
                    by_table.setdefault(relname, []).append((name, query))
                conn.commit()
                waiting: dict[str, str] = {}  # loaded, but locked by pg_restore when tried
                while (table := self._finished.get()) is not None and not self._stopped.is_set():
                    named = by_table.get(table, [])
                    if len(named) == 1:
                        waiting.setdefault(*named[0])
                    # Any item done may have released a lock: try every waiting table.
                    for name, query in list(waiting.items()):
                        if self._stopped.is_set():
                            break
                        entry = self._try(conn, cur, query)
                        if entry is not None:
                            self.found[name] = entry
                            del waiting[name]
        except Exception as exc:  # noqa: BLE001 - reported by finish()
            self.error = exc

    def _try(self, conn, cur, query: str) -> dict[str, object] | None:  # noqa: ANN001
        """The table's fingerprint, or None when pg_restore holds a lock on it."""
        try:
            cur.execute(FINGERPRINT_SETTINGS + "; " + LOCK_TIMEOUT)
            entry = _fingerprint(cur, query, self.method)
            conn.commit()
        except psycopg2.Error as exc:
            conn.rollback()
            if exc.pgcode != errorcodes.LOCK_NOT_AVAILABLE:
                raise
            return None
        return entry


def prove_the_rest(target: ConnTarget, method: str, jobs: int, done: set[str]) -> Fingerprints:
    """Every table not in ``done`` fingerprinted over ``jobs`` sessions, largest first (so
    the longest starts at once), then the large objects and sequences."""
    with connect(target.conninfo) as conn, conn.cursor() as cur:
        cur.execute(_tables_sql(method, by_size=True))
        work: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()
        for name, query, _ in cur.fetchall():
            if name not in done:
                work.put((name, query))
        found: Fingerprints = fingerprint_extras(conn, method)
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            with connect(target.conninfo) as session, session.cursor() as cur:
                cur.execute(FINGERPRINT_SETTINGS)
                while True:
                    try:
                        name, query = work.get_nowait()
                    except queue.Empty:
                        return
                    found[name] = _fingerprint(cur, query, method)
        except BaseException as exc:  # noqa: BLE001 - re-raised by the caller below
            errors.append(exc)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return found
