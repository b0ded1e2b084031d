"""The audit trail: ``backup_audit_log``, ``recovery_audit_log`` and ``retention_audit_log``
in the ops database.

The tables carry the plan's columns plus the backup id and an error message. They are
append-only for the application role: it may insert a row and move it once from
``running`` to a final state, never delete or rewrite history (a trigger refuses, and the
role has no DELETE/TRUNCATE privilege). Secrets never go in: targets are stored as
redacted DSNs and error messages are passed through :func:`scrub`.
"""

from __future__ import annotations

import json
import re
import uuid
from datetime import UTC, datetime

from psycopg2.extensions import encrypt_password

from wedefi_dr.postgres.tools import connect

APP_ROLE = "wedefi_dr_app"
# 'refused': a recovery request turned down before anything changed (recovery log only).
FINAL_STATUSES = ("success", "failed", "refused")

DDL = f"""
CREATE EXTENSION IF NOT EXISTS pgcrypto;

CREATE TABLE IF NOT EXISTS backup_audit_log (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  backup_type VARCHAR(50) NOT NULL,
  backup_id VARCHAR(100),
  start_time TIMESTAMP NOT NULL,
  end_time TIMESTAMP,
  status VARCHAR(20) NOT NULL CHECK (status IN ('running', 'success', 'failed')),
  size_bytes BIGINT,
  checksum VARCHAR(128),
  operator_id VARCHAR(100),
  error_message TEXT,
  created_at TIMESTAMP DEFAULT NOW()
);

CREATE TABLE IF NOT EXISTS recovery_audit_log (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  recovery_type VARCHAR(50) NOT NULL,
  backup_id VARCHAR(100),
  target VARCHAR(300),
  target_time TIMESTAMP,
  start_time TIMESTAMP NOT NULL,
  end_time TIMESTAMP,
  status VARCHAR(20) NOT NULL,
  operator_id VARCHAR(100) NOT NULL CHECK (btrim(operator_id) <> ''),
  justification TEXT NOT NULL CHECK (btrim(justification) <> ''),
  error_message TEXT,
  created_at TIMESTAMP DEFAULT NOW()
);

ALTER TABLE recovery_audit_log DROP CONSTRAINT IF EXISTS recovery_audit_log_status_check;
ALTER TABLE recovery_audit_log ADD CONSTRAINT recovery_audit_log_status_check
  CHECK (status IN ('running', 'success', 'failed', 'refused'));

CREATE OR REPLACE FUNCTION audit_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP = 'DELETE' OR TG_OP = 'TRUNCATE' THEN
    RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP;
  END IF;
  IF OLD.status <> 'running' THEN
    RAISE EXCEPTION '% row % is final (%): history is not rewritten',
      TG_TABLE_NAME, OLD.id, OLD.status;
  END IF;
  IF NEW.id <> OLD.id OR NEW.start_time <> OLD.start_time
     OR NEW.operator_id IS DISTINCT FROM OLD.operator_id THEN
    RAISE EXCEPTION '% row %: id, start_time and operator are immutable', TG_TABLE_NAME, OLD.id;
  END IF;
  RETURN NEW;
END $$;

DO $$
DECLARE t text;
BEGIN
  FOREACH t IN ARRAY ARRAY['backup_audit_log', 'recovery_audit_log'] LOOP
    EXECUTE format('DROP TRIGGER IF EXISTS %I_guard ON %I', t, t);
    EXECUTE format('CREATE TRIGGER %I_guard BEFORE UPDATE OR DELETE ON %I '
                   'FOR EACH ROW EXECUTE FUNCTION audit_guard()', t, t);
    EXECUTE format('DROP TRIGGER IF EXISTS %I_no_truncate ON %I', t, t);
    EXECUTE format('CREATE TRIGGER %I_no_truncate BEFORE TRUNCATE ON %I '
                   'FOR EACH STATEMENT EXECUTE FUNCTION audit_guard()', t, t);
  END LOOP;
END $$;

DO $$ BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{APP_ROLE}') THEN
    CREATE ROLE {APP_ROLE} LOGIN;
  END IF;
END $$;
REVOKE ALL ON backup_audit_log, recovery_audit_log FROM {APP_ROLE};
GRANT SELECT, INSERT ON backup_audit_log, recovery_audit_log TO {APP_ROLE};
GRANT UPDATE (end_time, status, size_bytes, checksum, error_message)
  ON backup_audit_log TO {APP_ROLE};
GRANT UPDATE (end_time, status, error_message) ON recovery_audit_log TO {APP_ROLE};

-- Data retention: one row per table per run, same append-only guard as above.
CREATE TABLE IF NOT EXISTS retention_audit_log (
  id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  run_id VARCHAR(100) NOT NULL,
  database_name VARCHAR(100) NOT NULL,
  table_name VARCHAR(100) NOT NULL,
  action VARCHAR(20) NOT NULL CHECK (action IN ('delete', 'archive', 'summarize')),
  cutoff TIMESTAMP NOT NULL,
  start_time TIMESTAMP NOT NULL,
  end_time TIMESTAMP,
  status VARCHAR(20) NOT NULL CHECK (status IN ('running', 'success', 'failed')),
  rows_removed BIGINT,
  rows_archived BIGINT,
  rows_summarized BIGINT,
  rows_cascaded JSONB,
  batches INTEGER,
  operator_id VARCHAR(100) NOT NULL CHECK (btrim(operator_id) <> ''),
  error_message TEXT,
  created_at TIMESTAMP DEFAULT NOW()
);

DROP TRIGGER IF EXISTS retention_audit_log_guard ON retention_audit_log;
CREATE TRIGGER retention_audit_log_guard BEFORE UPDATE OR DELETE ON retention_audit_log
  FOR EACH ROW EXECUTE FUNCTION audit_guard();
DROP TRIGGER IF EXISTS retention_audit_log_no_truncate ON retention_audit_log;
CREATE TRIGGER retention_audit_log_no_truncate BEFORE TRUNCATE ON retention_audit_log
  FOR EACH STATEMENT EXECUTE FUNCTION audit_guard();
REVOKE ALL ON retention_audit_log FROM {APP_ROLE};
GRANT SELECT, INSERT ON retention_audit_log TO {APP_ROLE};
GRANT UPDATE (end_time, status, rows_removed, rows_archived, rows_summarized, rows_cascaded,
              batches, error_message) ON retention_audit_log TO {APP_ROLE};
"""


def install(admin_dsn: str, app_password: str | None = None) -> None:
    """Create the audit tables, guard and application role (idempotent; needs an admin)."""
    with connect(admin_dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_xact_lock(hashtext('wedefi_dr_audit_install'))")
        cur.execute(DDL)
        if app_password is not None:
            # Only the SCRAM verifier travels: the password itself never reaches the server's
            # statement text, its log (an erroring statement is logged) or pg_stat_statements.
            verifier = encrypt_password(app_password, APP_ROLE, conn, "scram-sha-256")
            cur.execute(f"ALTER ROLE {APP_ROLE} PASSWORD %s", (verifier,))


_SECRETISH = re.compile(r"(password|passphrase|secret|aws_secret_access_key)\s*[=:]\s*\S+", re.I)


def scrub(message: str, secrets: tuple[str, ...] = ()) -> str:
    """Remove anything that looks like a credential, and every known secret, from a message."""
    message = _SECRETISH.sub(lambda m: f"{m.group(1)}=***", message)
    for secret in secrets:
        if secret:
            message = message.replace(secret, "***")
    return message[:2000]


def _require_final(status: str) -> None:
    if status not in FINAL_STATUSES:
        raise ValueError(f"final status must be one of {FINAL_STATUSES}, not {status!r}")


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def backup_started(
    ops_dsn: str, *, audit_id: str, backup_type: str, backup_id: str, operator: str
) -> str:
    """Insert the ``running`` row. Keyed by ``audit_id`` so a retried task inserts once."""
    with connect(ops_dsn) as conn, conn.cursor() as cur:
        cur.execute(
            """INSERT INTO backup_audit_log (id, backup_type, backup_id, start_time, status,
                                             operator_id)
               VALUES (%s, %s, %s, %s, 'running', %s) ON CONFLICT (id) DO NOTHING""",
            (audit_id, backup_type, backup_id, _now(), operator),
        )
    return audit_id


def backup_finished(
    ops_dsn: str,
    audit_id: str,
    *,
    status: str,
    size_bytes: int | None = None,
    checksum: str | None = None,
    error: str | None = None,
) -> None:
    """Move the row to its final state (only from ``running``; the trigger enforces it)."""
    _require_final(status)
    with connect(ops_dsn) as conn, conn.cursor() as cur:
        cur.execute(
            """UPDATE backup_audit_log SET end_time = %s, status = %s, size_bytes = %s,
                      checksum = %s, error_message = %s
               WHERE id = %s AND status = 'running'""",
            (_now(), status, size_bytes, checksum, error, audit_id),
        )


def recovery_started(
    ops_dsn: str,
    *,
    recovery_type: str,
    backup_id: str | None,
    target: str,
    operator: str,
    justification: str,
    target_time: datetime | None = None,
    audit_id: str | None = None,
) -> str:
    audit_id = audit_id or str(uuid.uuid4())
    with connect(ops_dsn) as conn, conn.cursor() as cur:
        cur.execute(
            """INSERT INTO recovery_audit_log (id, recovery_type, backup_id, target, target_time,
                   start_time, status, operator_id, justification)
               VALUES (%s, %s, %s, %s, %s, %s, 'running', %s, %s)
               ON CONFLICT (id) DO NOTHING""",
            (
                audit_id,
                recovery_type,
                backup_id,
                target,
                target_time,
                _now(),
                operator,
                justification,
            ),
        )
    return audit_id


def recovery_finished(
    ops_dsn: str, audit_id: str, *, status: str, error: str | None = None
) -> None:
    _require_final(status)
    with connect(ops_dsn) as conn, conn.cursor() as cur:
        cur.execute(
            """UPDATE recovery_audit_log SET end_time = %s, status = %s, error_message = %s
               WHERE id = %s AND status = 'running'""",
            (_now(), status, error, audit_id),
        )


def backup_counts(ops_dsn: str, backup_type: str) -> dict[str, float]:
    """Totals and the last success time of one kind of backup (``logical``, ``base``), from
    the audit log: metrics that survive restarts. Per kind, so that a good base backup can
    never make a failing logical backup look recent."""
    with connect(ops_dsn) as conn, conn.cursor() as cur:
        cur.execute(
            """SELECT count(*) FILTER (WHERE status = 'success'),
                      count(*) FILTER (WHERE status = 'failed'),
                      extract(epoch FROM max(end_time) FILTER (WHERE status = 'success'))
               FROM backup_audit_log WHERE backup_type = %s""",
            (backup_type,),
        )
        ok, failed, last = cur.fetchone()
    return {"success": ok, "failure": failed, "last_success": float(last or 0)}


# ---- data retention --------------------------------------------------------------------
def retention_started(
    ops_dsn: str,
    *,
    run_id: str,
    database: str,
    table: str,
    action: str,
    cutoff: datetime,
    operator: str,
    audit_id: str | None = None,
) -> str:
    """Insert the ``running`` row for one table of one retention run."""
    audit_id = audit_id or str(uuid.uuid4())
    with connect(ops_dsn) as conn, conn.cursor() as cur:
        cur.execute(
            """INSERT INTO retention_audit_log (id, run_id, database_name, table_name, action,
                   cutoff, start_time, status, operator_id)
               VALUES (%s, %s, %s, %s, %s, %s, %s, 'running', %s) ON CONFLICT (id) DO NOTHING""",
            (audit_id, run_id, database, table, action, cutoff, _now(), operator),
        )
    return audit_id


def retention_finished(
    ops_dsn: str,
    audit_id: str,
    *,
    status: str,
    removed: int = 0,
    archived: int = 0,
    summarized: int = 0,
    cascaded: dict[str, int] | None = None,
    batches: int = 0,
    error: str | None = None,
) -> None:
    """Move the row to its final state with what the table's batches did (committed work)."""
    _require_final(status)
    with connect(ops_dsn) as conn, conn.cursor() as cur:
        cur.execute(
            """UPDATE retention_audit_log SET end_time = %s, status = %s, rows_removed = %s,
                      rows_archived = %s, rows_summarized = %s, rows_cascaded = %s,
                      batches = %s, error_message = %s
               WHERE id = %s AND status = 'running'""",
            (
                _now(),
                status,
                removed,
                archived,
                summarized,
                json.dumps(cascaded or {}, sort_keys=True),
                batches,
                error,
                audit_id,
            ),
        )


def retention_totals(ops_dsn: str, database: str) -> list[dict[str, object]]:
    """Per table: rows removed/archived/summarized by successful runs, and failures.

    The durable source of the retention counters (same reason as :func:`backup_counts`).
    """
    with connect(ops_dsn) as conn, conn.cursor() as cur:
        cur.execute(
            """SELECT table_name, action,
                      coalesce(sum(rows_removed) FILTER (WHERE status = 'success'), 0),
                      coalesce(sum(rows_archived) FILTER (WHERE status = 'success'), 0),
                      coalesce(sum(rows_summarized) FILTER (WHERE status = 'success'), 0),
                      count(*) FILTER (WHERE status = 'failed'),
                      extract(epoch FROM max(end_time) FILTER (WHERE status = 'success'))
               FROM retention_audit_log WHERE database_name = %s
               GROUP BY table_name, action ORDER BY table_name""",
            (database,),
        )
        return [
            {
                "table": t,
                "action": a,
                "removed": int(rm),
                "archived": int(ar),
                "summarized": int(su),
                "failed": int(f),
                "last_success": float(last or 0),
            }
            for t, a, rm, ar, su, f, last in cur.fetchall()
        ]
