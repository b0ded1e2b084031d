"""Restore a backup into a DR environment: the verified logical restore, then what a copy
needs before it could take traffic (fresh planner statistics, the application's grants).

All of it counts toward the RTO, so it is one step of the DR test. All of it runs as the
copy's owner, a login that is no superuser (see :mod:`wedefi_dr.drtest.environments`):
the archive's SQL, and the source database's functions it calls (an index expression
during CREATE INDEX, again during ANALYZE), run with that login's rights.
"""

from __future__ import annotations

from wedefi_dr.config import Settings
from wedefi_dr.drtest.environments import DREnvironment, grant_read_only
from wedefi_dr.errors import TargetRefused
from wedefi_dr.logical import restore
from wedefi_dr.postgres.tools import connect


def restore_into(
    settings: Settings, backup_id: str, env: DREnvironment, operator: str, justification: str
) -> dict[str, int]:
    """Validated request, verified download, ``gpg -d | pg_restore --clean --if-exists
    --no-owner | psql --single-transaction`` as the copy's owner, exact row counts and
    content hashes (the tables' proved inside the restore transaction, not read a second
    time), then ANALYZE and read-only grants for the application role. Returns the
    verified counts.

    An environment provisioned with an owner whose login is privileged is refused before
    anything is downloaded; one provisioned without an owner (an existing database on a
    ``dsn`` server) restores as its admin, with the target policy's warning."""
    target = env.owner
    privileged = restore.privileged_login(target) if env.owner_dsn else ""
    if privileged:
        raise TargetRefused(
            f"refusing to restore into {env.describe()}: the copy's owner must not be able "
            f"to reach the host, and {privileged}; nothing was downloaded or changed"
        )
    request = restore.RestoreRequest(backup_id, target, operator, justification)
    manifest = restore.validate(settings, request)
    ciphertext = restore.fetch_verified(settings, manifest, settings.spool_path)
    try:
        restored = restore.decrypt_and_restore(
            settings, manifest, ciphertext, target, no_owner=bool(env.owner_dsn)
        )
    finally:
        ciphertext.unlink(missing_ok=True)
    counts = restore.verify(manifest, target, restored)
    with connect(target.conninfo, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("ANALYZE")
    grant_read_only(target, env.app_role)
    return counts
