"""What an approver fills in to let a paused run continue: one form for every runbook
that needs approval (PITR, a restore over production), checked by
:func:`wedefi_dr.approval.check_approval`."""

from __future__ import annotations

from prefect.input import RunInput


class Approval(RunInput):
    """The paused run's form: approve, who approves, and whether an emergency is declared."""

    approve: bool
    approvers: list[str] = []
    emergency_declared: bool = False
    note: str = ""
