"""Checking the audit trail's hash chain (``wedefi-dr audit verify``).

Two proofs, both from what is stored, recomputed here rather than asked of the server:

1. the chain: ``seq`` runs 1, 2, 3 … with no gap, each event's ``prev_hash`` is the hash
   of the one before, and ``sha256(prev_hash || payload)`` is its stored hash, with the
   payload naming the same seq, log, row and event as the columns. A deleted event
   breaks the link after it, an edited one its own hash, a reordered pair their links.
2. the rows: every row of the three tables equals the row its latest chain event
   recorded, and every row the chain names still exists. An edited row, a deleted row
   and a row inserted around the audit functions are each named.

An unkeyed chain proves nothing against whoever rewrites the whole chain from the first
changed event on, which only a superuser can; ``head`` (``seq:hash``) is what to keep
elsewhere and pass back as ``expect_head`` to catch that too.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from wedefi_dr.observability.audit_schema import GENESIS, LOGS
from wedefi_dr.postgres.tools import connect


@dataclass
class ChainReport:
    """What :func:`verify` found: ``problems`` in chain order, the first one first."""

    events: int = 0
    rows: int = 0
    head: str = f"0:{GENESIS}"
    problems: list[str] = field(default_factory=list)

    @property
    def intact(self) -> bool:
        return not self.problems


def event_hash(prev_hash: str, payload: str) -> str:
    return hashlib.sha256((prev_hash + payload).encode()).hexdigest()


def _walk(events: list[tuple], report: ChainReport) -> dict[str, tuple[int, dict]]:
    """Check the links; returns each row id's latest recorded row (with its seq)."""
    latest: dict[str, tuple[int, dict]] = {}
    expected_seq, prev = 1, GENESIS
    for seq, log_name, row_id, event, payload, prev_hash, stored in events:
        where = f"chain event {seq} ({event} of {log_name} row {row_id})"
        if seq != expected_seq:
            report.problems.append(
                f"{where}: expected event {expected_seq} here; events "
                f"{expected_seq}..{seq - 1} were deleted"
                if seq > expected_seq
                else f"{where}: out of order after event {expected_seq - 1}"
            )
        if prev_hash != prev:
            report.problems.append(
                f"{where}: its prev_hash does not match the hash of the event before it "
                "(an event before it was deleted, edited or reordered)"
            )
        if event_hash(prev_hash, payload) != stored:
            report.problems.append(f"{where}: its hash does not match its content (edited)")
        try:
            doc = json.loads(payload)
        except ValueError:
            doc = {}
        if (doc.get("seq"), doc.get("log"), doc.get("row_id"), doc.get("event")) != (
            seq,
            log_name,
            row_id,
            event,
        ):
            report.problems.append(f"{where}: its columns differ from its hashed content")
        latest[row_id] = (seq, doc.get("row") or {})
        expected_seq, prev = seq + 1, stored
        report.events += 1
        report.head = f"{seq}:{stored}"
    return latest


def verify(ops_dsn: str, expect_head: str | None = None) -> ChainReport:
    """Walk the whole chain and compare every audit row with it (read-only)."""
    report = ChainReport()
    with connect(ops_dsn) as conn, conn.cursor() as cur:
        cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")  # one consistent view
        cur.execute(
            "SELECT seq, log, row_id::text, event, payload, prev_hash, hash "
            "FROM audit_chain ORDER BY seq"
        )
        events = cur.fetchall()
        rows: dict[str, tuple[str, dict]] = {}
        for name, table in LOGS.items():
            cur.execute(f"SELECT id::text, to_jsonb(t)::text FROM {table} t")
            for row_id, doc in cur.fetchall():
                rows[row_id] = (name, json.loads(doc))
    latest = _walk(events, report)
    if expect_head:
        seq_text, _, want = expect_head.partition(":")
        kept = {str(e[0]): e[6] for e in events}
        if kept.get(seq_text.strip()) != want.strip():
            report.problems.append(
                f"chain event {seq_text} no longer has the hash {want} kept for it: the chain "
                "was rewritten from there on (or truncated)"
            )
    for row_id, (seq, recorded) in sorted(latest.items(), key=lambda item: item[1][0]):
        if row_id not in rows:
            report.problems.append(
                f"audit row {row_id} (recorded by chain event {seq}) is missing: deleted"
            )
            continue
        name, actual = rows[row_id]
        if actual != recorded:
            changed = sorted(
                k for k in set(actual) | set(recorded) if actual.get(k) != recorded.get(k)
            )
            report.problems.append(
                f"{LOGS[name]} row {row_id} differs from chain event {seq} in "
                f"{', '.join(changed)}: edited outside the audit functions"
            )
    for row_id, (name, _) in sorted(rows.items()):
        if row_id not in latest:
            report.problems.append(
                f"{LOGS[name]} row {row_id} has no chain event: inserted outside the audit "
                "functions"
            )
    report.rows = len(rows)
    return report
