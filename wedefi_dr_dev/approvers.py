"""The approval tables and demo approvers of the local stack.

``sql/approvals.sql`` creates the ``dr_approver`` group, the request and approval tables,
their trigger and row security in the ops database. A demo approver is a LOGIN role in
that group whose generated password sits in its own libpq password file (mode 600) in the
stack's folder, so the demo and the tests can approve as a person would: with credentials
only that person holds.
"""

from __future__ import annotations

import re
import secrets
from pathlib import Path

from psycopg2 import sql
from psycopg2.extensions import encrypt_password

from wedefi_dr.postgres.tools import connect
from wedefi_dr.storage.secretfiles import replace_secret_file

SQL_FILE = Path(__file__).with_name("sql") / "approvals.sql"
APPROVER_GROUP = "dr_approver"
DEMO_APPROVERS = ("alice", "bob")
ROLE_RE = re.compile(r"^[a-z][a-z0-9_]{0,40}$")


def install(admin_dsn: str) -> None:
    """Apply ``approvals.sql`` (idempotent); the audit tables' app role must exist."""
    with connect(admin_dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_xact_lock(hashtext('wedefi_dr_approvals_install'))")
        cur.execute(SQL_FILE.read_text())


def create_login(admin_dsn: str, name: str, password: str, *, approver: bool = True) -> None:
    """A LOGIN role ``name`` with ``password`` (only its SCRAM verifier is sent), a member
    of ``dr_approver`` when ``approver``; an existing role gets the new password."""
    if not ROLE_RE.match(name):
        raise ValueError(f"role name {name!r}: lower-case letters, digits and '_' only")
    role = sql.Identifier(name)
    with connect(admin_dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,))
        if cur.fetchone() is None:
            cur.execute(sql.SQL("CREATE ROLE {} LOGIN").format(role))
        verifier = encrypt_password(password, name, conn, "scram-sha-256")
        cur.execute(sql.SQL("ALTER ROLE {} PASSWORD %s").format(role), (verifier,))
        if approver:
            cur.execute(sql.SQL("GRANT dr_approver TO {}").format(role))


def write_passfile(path: Path, host: str, port: int, dbname: str, user: str, password: str) -> Path:
    """One libpq password-file line in a new 0600 file swapped in (an existing file of a
    wider mode, or a link planted at the name, never sees the secret)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = f"{host}:{port}:{dbname}:{user}:{password}\n"
    return replace_secret_file(path.parent, path.name, line)


def new_password() -> str:
    return secrets.token_urlsafe(24)
