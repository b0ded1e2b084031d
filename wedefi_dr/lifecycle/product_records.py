"""The product's own records under the plan's last two classification rows.

"System logs, 90 days": DR reports and their Data Docs stored beside the backups (and the
Prefect run history, pruned by the flow's task: the core does not talk to Prefect).
"Temporary calculations, 7 days": spool files a killed restore left, and local DR
environments kept for a retry that never came. The audit tables are not among them: they
are append-only and kept for as long as the backups they describe can exist (README).

Only what this system made is touched: spool files by their exact naming pattern, DR
environments only through the DR test's own marker check and teardown.
"""

from __future__ import annotations

import re
import time
import uuid
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from wedefi_dr.catalog import listing
from wedefi_dr.config import Settings
from wedefi_dr.drtest import environments
from wedefi_dr.observability import audit
from wedefi_dr.storage.repository import Repository, open_store

_ID = r"\d{8}T\d{6}Z-[0-9a-f]{6}"
SPOOL_RE = re.compile(rf"^{_ID}\.([0-9a-f]{{12}}\.pgc|base\.tar\.gz)\.gpg$")


def plan_records(settings: Settings, now: datetime) -> dict[str, Any]:
    """What is older than its class allows: report keys, spool files, DR environments."""
    logs_before = now - timedelta(days=settings.records_log_days)
    temp_before = (now - timedelta(days=settings.records_temp_days)).timestamp()
    store = open_store(settings)
    reports = [
        o["Key"]
        for o in store.list_keys(store.key(listing.KIND) + "/")
        if "/dr-tests/" in o["Key"] and o["LastModified"] < logs_before
    ]
    spool = settings.spool_path
    spool_files = sorted(
        str(p)
        for p in (spool.iterdir() if spool.is_dir() else [])
        if SPOOL_RE.match(p.name) and p.is_file() and p.stat().st_mtime < temp_before
    )
    base = environments.env_dir(settings)
    kept_envs = sorted(
        p.name
        for p in (base.iterdir() if base.is_dir() else [])
        if environments.ENV_NAME_RE.match(p.name)
        and (p / environments.ENV_MARKER).is_file()
        and (p / environments.ENV_MARKER).stat().st_mtime < temp_before
    )
    return {
        "logs_before": logs_before.isoformat(),
        "temp_before": datetime.fromtimestamp(temp_before, now.tzinfo).isoformat(),
        "dr_reports": reports,
        "spool_files": spool_files,
        "dr_environments": kept_envs,
    }


def prune_records(
    settings: Settings, the_plan: dict[str, Any], store: Repository, *, operator: str
) -> dict[str, int]:
    """Remove what :func:`plan_records` listed; one audit row per class of record."""
    ops = settings.ops_dsn.get_secret_value()
    done = {"dr_reports": 0, "spool_files": 0, "dr_environments": 0}

    def audited(kind: str, action) -> None:  # noqa: ANN001 - a zero-argument callable
        audit_id = audit.backup_started(
            ops,
            audit_id=str(uuid.uuid4()),
            backup_type=f"expire-{kind}",
            backup_id=f"{kind} {time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}",
            operator=operator,
        )
        try:
            action()
        except Exception as exc:
            audit.backup_finished(ops, audit_id, status="failed", error=audit.scrub(str(exc)))
            raise
        audit.backup_finished(ops, audit_id, status="success")

    keys = the_plan["dr_reports"]
    if keys:

        def delete_reports() -> None:
            store.delete_many(keys)
            done["dr_reports"] = len(keys)

        audited("dr-reports", delete_reports)
    files = the_plan["spool_files"]
    if files:

        def delete_spool() -> None:
            for f in files:
                if SPOOL_RE.match(Path(f).name):
                    Path(f).unlink(missing_ok=True)
                    done["spool_files"] += 1

        audited("spool", delete_spool)
    names = the_plan["dr_environments"]
    if names:

        def teardown() -> None:
            base = environments.env_dir(settings)
            provider = environments.LocalClusterProvider(base, settings.dr_app_role)
            for name in names:
                home = environments.kept_environment(base, name)  # the marker check again
                provider.teardown(
                    environments.DREnvironment(
                        provider="local",
                        name=name,
                        admin_dsn="",
                        app_role=settings.dr_app_role,
                        home=str(home),
                    )
                )
                done["dr_environments"] += 1

        audited("dr-environments", teardown)
    return done
