"""Restore a backup into a DR environment: the verified logical restore, then what a copy
needs before it could take traffic (fresh planner statistics, the application's grants).

All of it counts toward the RTO, so it is one step of the DR test.
"""

from __future__ import annotations

from wedefi_dr.config import Settings
from wedefi_dr.drtest.environments import DREnvironment, grant_read_only
from wedefi_dr.logical import restore
from wedefi_dr.postgres.tools import connect


def restore_into(
    settings: Settings, backup_id: str, env: DREnvironment, operator: str, justification: str
) -> dict[str, int]:
    """Validated request, verified download, ``gpg -d | pg_restore --clean --if-exists
    --single-transaction``, exact row counts and content hashes (the tables' proved inside
    the restore transaction, not read a second time), then ANALYZE and read-only grants for
    the application role. Returns the verified counts."""
    target = env.admin
    request = restore.RestoreRequest(backup_id, target, operator, justification)
    manifest = restore.validate(settings, request)
    ciphertext = restore.fetch_verified(settings, manifest, settings.spool_path)
    try:
        restored = restore.decrypt_and_restore(settings, manifest, ciphertext, target)
    finally:
        ciphertext.unlink(missing_ok=True)
    counts = restore.verify(manifest, target, restored)
    with connect(env.admin_dsn, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("ANALYZE")
    grant_read_only(env.admin_dsn, env.app_role)
    return counts
