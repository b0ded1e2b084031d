"""Which cluster may be recovered; who must approve is :mod:`wedefi_dr.approval`.

A recovery of anything that counts as production (the cluster's description says
``production: true``, or the recovered copy will archive into the production archive) is
break-glass under that shared rule.
"""

from __future__ import annotations

import re

from wedefi_dr.approval import ApprovalRefused, check_approval
from wedefi_dr.errors import InvalidInput

__all__ = ["ApprovalRefused", "check_approval", "validate_cluster_name"]

CLUSTER_NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,40}$")
RESERVED_CLUSTERS = ("ops",)  # the audit cluster: a recovery never rewrites its own record


def validate_cluster_name(name: str) -> str:
    name = (name or "").strip()
    if not CLUSTER_NAME_RE.match(name):
        raise InvalidInput(f"cluster name {name!r}: lower-case letters, digits and '-' only")
    if name in RESERVED_CLUSTERS:
        raise InvalidInput(f"cluster {name!r} holds the audit tables: never a recovery target")
    return name
