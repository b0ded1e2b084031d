"""Request approval and wait: the one pause every runbook that needs approval calls (PITR,
a restore over production, failover, deleting a backup by hand).

The run opens a request in the ops database, then pauses. Approvers answer with
``wedefi-dr approve RUN_ID`` (which connects as their own PostgreSQL role, inserts the
approval and resumes the run) or insert their approval as themselves and press Resume in
the UI. When the run resumes it reads the approvals from the database and decides with
:func:`wedefi_dr.approval.decide`: the form carries nothing trusted. Names typed into its
``approvers`` field must match authenticated approvals (or the run is refused as forged);
``approve: false`` stops the run. A pause that times out is audited and changes nothing.
"""

from __future__ import annotations

import time
import uuid

from prefect.client.orchestration import get_client
from prefect.exceptions import FlowPauseTimeout, Pause
from prefect.flow_runs import pause_flow_run, resume_flow_run
from prefect.input import RunInput
from prefect.input.run_input import keyset_from_paused_state
from prefect.runtime import flow_run

from tasks import approval as steps
from tasks.common import attempt_scoped_uuid
from wedefi_dr.approval import ApprovalTimedOut


class Approval(RunInput):
    """The paused run's form. Nothing here is trusted: who approved is what the ops
    database recorded for each approver's own login role."""

    approve: bool = True
    approvers: list[str] = []
    emergency_declared: bool = False
    note: str = ""


def request_approval_and_wait(
    *,
    operation: str,
    subject: str,
    question: str,
    production: bool,
    operator: str,
    justification: str,
    timeout_seconds: int,
    key: str,
) -> list[str]:
    """Open the request, pause up to ``timeout_seconds``, then decide from the database.

    ``production`` makes it break-glass (a declared emergency and two distinct approvers
    other than ``operator``). Returns the approvers' roles; raises ``ApprovalRefused`` or
    ``ApprovalTimedOut`` (each audited, the request closed) for the caller's failure path.
    Call it inside the flow, before anything changes.
    """
    run_id = str(flow_run.get_id())
    request_id = steps.open_request(
        attempt_scoped_uuid(f"approval-request:{key}"),
        run_id,
        operation,
        subject,
        production,
        operator,
        justification,
        timeout_seconds,
    )
    how = (
        f" Approvers: `wedefi-dr approve {run_id} --justification ...` "
        "(two, and an emergency declared)"
        if production
        else f" Approver: `wedefi-dr approve {run_id} --justification ...`"
    )
    try:
        answer = _pause(
            Approval.with_initial_data(description=question + how), timeout_seconds, key
        )
    except FlowPauseTimeout as exc:
        steps.expire(request_id, run_id, subject, operator, timeout_seconds)
        raise ApprovalTimedOut(
            f"approval timed out after {timeout_seconds} s; nothing was changed"
        ) from exc
    return steps.decide(
        request_id,
        run_id,
        subject,
        production,
        operator,
        list(answer.approvers),
        not answer.approve,
    )


def _pause(form: type[Approval], timeout_seconds: int, key: str) -> Approval:
    """Prefect's pause, which waits for the form to be submitted and returns it.

    When the server's answer to the pause is lost (a timeout, a reset connection), Prefect's
    HTTP client sends the same transition again; the server refuses the copy as already
    made and ``pause_flow_run`` raises ``Pause``, although the run *is* paused under
    ``key``. Then the rest of the pause happens here: the form's schema is saved (the UI
    and ``resume_flow_run`` need it) and the resume is waited for, up to the same timeout.
    """
    try:
        return pause_flow_run(
            wait_for_input=form, timeout=timeout_seconds, poll_interval=1, key=key
        )
    except Pause as exc:
        paused = exc.state
        if paused is None or not paused.is_paused() or paused.state_details.pause_key != key:
            raise
    keyset = keyset_from_paused_state(paused)
    form.save(keyset)
    run_id = flow_run.get_id()
    deadline = time.monotonic() + timeout_seconds
    with get_client(sync_client=True) as client:
        while True:
            state = client.read_flow_run(run_id).state
            if state is not None and state.is_running():
                return form.load(keyset)
            if time.monotonic() >= deadline:
                raise FlowPauseTimeout("Flow run was paused and never resumed.")
            time.sleep(1)


def resume_with_answer(run_id: uuid.UUID, answer: dict, wait_seconds: float = 30) -> None:
    """Resume the paused run ``run_id`` with ``answer`` as its form: what ``wedefi-dr
    approve`` does once the rule is met.

    Prefect sets Paused first and saves the form's schema after, so a resume in between is
    refused with "Run input schema not found": it is tried again for up to
    ``wait_seconds``. (A resume whose answer is lost is harmless: Prefect's client sends it
    again and the server's refusal of a run no longer paused is not raised.)
    """
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            resume_flow_run(run_id, run_input=answer)
            return
        except RuntimeError as exc:
            if "schema not found" not in str(exc) or time.monotonic() > deadline:
                raise
        time.sleep(0.2)
