"""The approval rule shared by every operation that can change production.

Anything that counts as production (a PITR over the production cluster, a restore that
overwrites a production database) is break-glass: an emergency declared and two approvers
other than the operator. Any other approved operation needs one approver other than the
operator. One rule, so that a restore cannot be approved more cheaply than a recovery.
"""

from __future__ import annotations

from wedefi_dr.errors import InvalidInput


class ApprovalRefused(InvalidInput):
    """The approvals given do not meet the rule for this target."""


def check_approval(
    *,
    production: bool,
    approve: bool,
    approvers: list[str],
    emergency_declared: bool,
    operator: str,
    subject: str = "recovering over the production cluster",
) -> list[str]:
    """The approval rule: scratch needs one approver, production is break-glass.

    Approvers are people other than the operator (four eyes), counted once each.
    Returns the distinct approvers; raises ApprovalRefused otherwise.
    """
    if not approve:
        raise ApprovalRefused("the recovery was rejected at the approval step; nothing changed")
    me = operator.strip().lower()
    distinct = sorted({a.strip().lower() for a in approvers if a.strip()} - {me})
    if production:
        if not emergency_declared:
            raise ApprovalRefused(
                f"{subject} is break-glass: an emergency must be declared; nothing was changed"
            )
        if len(distinct) < 2:
            raise ApprovalRefused(
                f"{subject} needs two distinct approvers other "
                f"than the operator; got {distinct or 'none'}; nothing was changed"
            )
    elif not distinct:
        raise ApprovalRefused(
            "a recovery needs one approver other than the operator; nothing was changed"
        )
    return distinct
