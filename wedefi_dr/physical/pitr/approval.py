"""Who may recover what: the cluster name and the approval rule.

A recovery of anything that counts as production (the cluster's description says
``production: true``, or the recovered copy will archive into the production archive) is
break-glass: an emergency declared and two approvers other than the operator. Any other
recovery needs one approver other than the operator.
"""

from __future__ import annotations

import re

from wedefi_dr.errors import InvalidInput

CLUSTER_NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,40}$")
RESERVED_CLUSTERS = ("ops",)  # the audit cluster: a recovery never rewrites its own record


class ApprovalRefused(InvalidInput):
    """The approvals given do not meet the rule for this target."""


def check_approval(
    *,
    production: bool,
    approve: bool,
    approvers: list[str],
    emergency_declared: bool,
    operator: str,
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
                "recovering over the production cluster is break-glass: an emergency must be "
                "declared; nothing was changed"
            )
        if len(distinct) < 2:
            raise ApprovalRefused(
                "recovering over the production cluster needs two distinct approvers other "
                f"than the operator; got {distinct or 'none'}; nothing was changed"
            )
    elif not distinct:
        raise ApprovalRefused(
            "a recovery needs one approver other than the operator; nothing was changed"
        )
    return distinct


def validate_cluster_name(name: str) -> str:
    name = (name or "").strip()
    if not CLUSTER_NAME_RE.match(name):
        raise InvalidInput(f"cluster name {name!r}: lower-case letters, digits and '-' only")
    if name in RESERVED_CLUSTERS:
        raise InvalidInput(f"cluster {name!r} holds the audit tables: never a recovery target")
    return name
