"""The approval rule shared by every operation that can change production.

Anything that counts as production (a PITR over the production cluster, failover, a
restore that overwrites a production database, deleting a backup by hand) is break-glass:
an emergency declared and two approvers other than the operator. Any other approved
operation needs one approver other than the operator. One rule, so that a restore cannot be
approved more cheaply than a recovery.

Who approved is what the ops database says (:func:`decide` takes the rows of
:mod:`wedefi_dr.approval_records`, each written by the approver's own login role), never a
list of names typed into a form.
"""

from __future__ import annotations

from dataclasses import dataclass

from wedefi_dr.errors import DRError, InvalidInput


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


class ApprovalTimedOut(DRError):
    """Nobody approved within the pause's timeout; nothing was changed."""


@dataclass(frozen=True)
class Approval:
    """One approval as the ops database recorded it: ``approver`` is the PostgreSQL role
    that connected and inserted it (``session_user``), never a name someone typed."""

    approver: str
    approve: bool
    emergency_declared: bool
    justification: str


def decide(
    *,
    production: bool,
    approvals: list[Approval],
    operator: str,
    claimed: list[str] | tuple[str, ...] = (),
    rejected_in_form: bool = False,
    subject: str = "recovering over the production cluster",
) -> list[str]:
    """:func:`check_approval` applied to authenticated approvals only.

    The emergency counts as declared when every approver declared it. ``claimed`` are
    names a form or a flow input gave: each must be one of the authenticated approvers,
    otherwise it is a forged identity and the whole request is refused. A rejection,
    from an approver or from the form, always stops the run (refusing is safe).
    """
    approvers = [a.approver for a in approvals]
    approved = check_approval(
        production=production,
        approve=not rejected_in_form and all(a.approve for a in approvals),
        approvers=approvers,
        emergency_declared=bool(approvals) and all(a.emergency_declared for a in approvals),
        operator=operator,
        subject=subject,
    )
    known = {a.strip().lower() for a in approvers}
    forged = sorted({c.strip().lower() for c in claimed if c.strip()} - known)
    if forged:
        raise ApprovalRefused(
            f"the approval names {', '.join(forged)}, who did not approve with their own "
            "credentials (a name typed in a form is not an approval); nothing was changed"
        )
    return approved
