"""Runbook: weekly data retention by classification (the plan's Sunday 01:00 UTC job).

fix the moment (never in the future) → validate the policy against the live schema →
preview what would go (table artifact) → [dry run stops here] → guard: no mass deletion
unless allowed, a recent verified backup → create the archive and summary tables →
apply retention, one table at a time, in policy order (batches; an audit row per table)
→ publish metrics.

A table that fails does not stop the others; the flow fails at the end naming them.
Committed batches stay done and nothing is half-moved, so a rerun finishes the job,
except for a table stopped by an archive conflict: that one needs a person first.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.runtime import flow_run

from tasks import retention as steps
from tasks.common import run_scoped_uuid
from wedefi_dr.config import get_settings
from wedefi_dr.errors import DRError
from wedefi_dr.retention.batches import ArchiveConflict


class RetentionIncomplete(DRError):
    """Some tables failed; the others were applied. The message says whether a rerun
    can finish the job or a conflict has to be resolved first."""


@flow(name="retention")
def retention(
    dry_run: bool = False,
    as_of: datetime | None = None,
    operator: str = "scheduler",
    policy_path: str | None = None,
    allow_mass_deletion: bool = False,
) -> dict[str, Any]:
    """Apply ``deployments/retention.yaml`` to the primary (or only count, with ``dry_run``).

    ``allow_mass_deletion`` lets a run remove more than the policy's ``max_share`` of a
    table, or Tier 1 rows; it never lifts the need for a recent verified backup.

    Args:
        dry_run: Only count what the policy would remove.
        as_of: The moment the policy's ages are measured from (default: now).
        operator: Who runs it, recorded in the audit row.
        policy_path: Another policy file than ``deployments/retention.yaml``.
        allow_mass_deletion: Allow more than a table's ``max_share``, or Tier 1 rows.
    """
    logger = get_run_logger()
    policy = str(policy_path or get_settings().retention_policy)
    moment = steps.fix_moment(as_of)
    steps.validate_policy(policy, moment)
    preview = steps.preview(policy, moment, "retention-preview")
    logger.info(
        "preview as of %s: %d rows in %d tables, %d more by cascade",
        moment,
        sum(p["rows"] for p in preview),
        sum(1 for p in preview if p["rows"]),
        sum(sum(p["cascaded"].values()) for p in preview),
    )
    if dry_run:
        return {
            "as_of": moment,
            "dry_run": True,
            "preview": preview,
            "results": [],
            "flow_run_id": flow_run.get_id(),
        }
    steps.guard_run(policy, moment, preview, allow_mass_deletion)
    steps.create_targets(policy, moment)
    run_id = run_scoped_uuid("retention-run")
    results, failed, conflicts = [], [], []
    for item in preview:
        state = steps.apply_table(
            policy, moment, item["table"], item["rows"], run_id, operator, return_state=True
        )
        if state.is_completed():
            results.append(state.result())
            continue
        failed.append(item["table"])
        if isinstance(state.result(raise_on_failure=False), ArchiveConflict):
            conflicts.append(item["table"])
        logger.error("%s failed: %s", item["table"], state.message)
    steps.publish_metrics(results)
    create_table_artifact(
        key="retention-result",
        table=[
            {
                "table": r["table"],
                "action": r["action"],
                "rows": r["removed"],
                "by cascade": ", ".join(f"{t}: {n}" for t, n in r["cascaded"].items()) or "-",
                "batches": r["batches"],
                "seconds": round(r["seconds"], 2),
            }
            for r in results
        ],
        description=f"retention as of {moment:%Y-%m-%d %H:%M:%S} UTC"
        + (f"; FAILED: {', '.join(failed)}" if failed else ""),
    )
    if failed:
        raise RetentionIncomplete(_incomplete(failed, conflicts))
    return {
        "as_of": moment,
        "dry_run": False,
        "preview": preview,
        "results": results,
        "flow_run_id": flow_run.get_id(),
    }


def _incomplete(failed: list[str], conflicts: list[str]) -> str:
    """The final word of a failed run: "rerun to finish" only where a rerun can finish."""
    message = f"retention failed for {', '.join(failed)} (the other tables were applied)"
    if conflicts:
        message += (
            f"; {', '.join(conflicts)}: rows already archived with a different copy (named "
            "in the table's error), so a rerun cannot finish until that conflict is resolved"
        )
    retry = [t for t in failed if t not in conflicts]
    if retry:
        message += f"; {', '.join(retry)}: rerun to finish, committed batches stay done"
    return message
