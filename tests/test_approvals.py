"""Approvals whose identity PostgreSQL checks: refused where the rule says no, nothing
changed, every decision audited.

The engine tests talk to the ops database as the roles involved (the flows' application
role, demo approvers with their own password files, a login outside ``dr_approver``, the
superuser). The flow tests run a small guarded flow through the one shared entry point
(``flows.approval.request_approval_and_wait``) on the session's Prefect API: its change
(a file written) happens only after an approval the database accepted.
"""

from __future__ import annotations

import http.server
import json
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import psycopg2
import pytest
from prefect import flow, tags
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
from prefect.events.clients import PrefectEventsClient
from prefect.events.worker import EventsWorker
from prefect.logging.handlers import APILogWorker
from prefect.settings import PREFECT_API_URL, temporary_settings
from typer.testing import CliRunner

from flows.approval import request_approval_and_wait
from tests.helpers import approve_as, approve_when_paused
from wedefi_dr.approval import ApprovalRefused, ApprovalTimedOut
from wedefi_dr.approval_records import approvals, open_request
from wedefi_dr.postgres.tools import connect
from wedefi_dr_cli.app import app
from wedefi_dr_cli.common import exit_code
from wedefi_dr_dev.stack import OPS_DB


@flow(name="approval-drill")
def guarded_change(marker: str, production: bool, operator: str, timeout: int = 120) -> list[str]:
    """Writes ``marker`` only once approved: the change a refusal must prevent."""
    approvers = request_approval_and_wait(
        operation="drill",
        subject=f"approval drill ({'production' if production else 'scratch'})",
        question="Approve the drill?",
        production=production,
        operator=operator,
        justification="approval test",
        timeout_seconds=timeout,
        key="approval",
    )
    Path(marker).write_text(",".join(approvers))
    return approvers


def _drill(
    tmp_path: Path,
    run_input: dict | None,
    *,
    production: bool,
    operator: str = "carol",
    authenticate: list[str] | None = None,
    timeout: int = 120,
) -> tuple[Path, dict, object]:
    marker = tmp_path / f"changed-{uuid.uuid4().hex[:6]}"
    tag = f"approval-{uuid.uuid4().hex[:8]}"
    box: dict = {}
    helper = approve_when_paused(tag, run_input, box, authenticate) if run_input else None
    try:
        with tags(tag):
            outcome: object = guarded_change(str(marker), production, operator, timeout)
    except Exception as exc:
        outcome = exc
    finally:
        if helper is not None:
            helper.join(timeout=10)
    assert "error" not in box, box.get("error")
    return marker, box, outcome


def _approval_audit(ops_dsn: str, run_id: str) -> list[tuple]:
    with connect(ops_dsn) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT status, operator_id, error_message FROM recovery_audit_log"
            " WHERE recovery_type = 'approval' AND justification LIKE %s ORDER BY start_time",
            (f"approval of run {run_id} %",),
        )
        return cur.fetchall()


@pytest.fixture(scope="module")
def mallory(stack) -> str:
    """A login role of the ops cluster that is not an approver."""
    stack.add_approver("mallory", approver=False)
    return "mallory"


# ---- the engine ------------------------------------------------------------------------
def test_the_database_refuses_what_the_rule_forbids(stack, settings, mallory):
    ops = settings.ops_dsn.get_secret_value()
    run_id = str(uuid.uuid4())
    request_id = str(uuid.uuid4())
    open_request(
        ops,
        request_id=request_id,
        run_id=run_id,
        operation="drill",
        subject="engine drill",
        production=True,
        operator="carol",
        justification="engine test",
        timeout_seconds=300,
    )
    assert "carol requested run" in approve_as("carol", run_id)  # the operator
    assert "permission denied" in approve_as(mallory, run_id)  # not in dr_approver
    assert "no pending approval request" in approve_as("alice", str(uuid.uuid4()))
    assert approve_as("alice", run_id, emergency=True) == "ok"
    assert "alice already answered" in approve_as("alice", run_id, emergency=True)
    insert = (
        "INSERT INTO approval (request_id, approve, emergency_declared, justification)"
        " VALUES (%s, true, true, 'x')"
    )
    # The flows' own role (the requester) cannot approve at all.
    with pytest.raises(psycopg2.errors.InsufficientPrivilege), connect(ops) as c, c.cursor() as cur:
        cur.execute(insert, (request_id,))
    # Nor can the superuser, who bypasses privileges and row security but not the trigger.
    admin = stack.ops.admin_dsn(OPS_DB)
    with pytest.raises(psycopg2.Error, match="not a dr_approver"), connect(admin) as c:
        c.cursor().execute(insert, (request_id,))
    # An approver cannot write a row in someone else's name.
    bob = f"{stack.approver_dsn('bob')} passfile={stack.approver_passfile('bob')}"
    with pytest.raises(psycopg2.errors.InsufficientPrivilege), connect(bob) as c:
        c.cursor().execute(
            "INSERT INTO approval (request_id, approver, approve, justification)"
            " VALUES (%s, 'alice', true, 'x')",
            (request_id,),
        )
    # What was recorded is history: nobody rewrites it.
    with pytest.raises(psycopg2.Error, match="never changed"), connect(admin) as c:
        c.cursor().execute(
            "UPDATE approval SET approve = false WHERE request_id = %s", (request_id,)
        )
    [only] = approvals(ops, request_id)
    assert (only.approver, only.approve, only.emergency_declared) == ("alice", True, True)


def test_an_expired_request_cannot_be_approved(settings):
    ops = settings.ops_dsn.get_secret_value()
    run_id = str(uuid.uuid4())
    open_request(
        ops,
        request_id=str(uuid.uuid4()),
        run_id=run_id,
        operation="drill",
        subject="expiry drill",
        production=False,
        operator="carol",
        justification="expiry test",
        timeout_seconds=1,
    )
    time.sleep(1.2)
    assert "expired" in approve_as("alice", run_id)


# ---- through the flow ------------------------------------------------------------------
def test_self_approval_and_a_role_that_is_not_an_approver_are_refused(
    prefect_api, settings, tmp_path, mallory
):
    """The operator (carol) and a login outside dr_approver (mallory) both try: the server
    refuses each, so no approval exists and the run is refused."""
    run_input = {"approve": True, "approvers": ["carol", mallory]}
    marker, box, outcome = _drill(tmp_path, run_input, production=False)
    assert isinstance(outcome, ApprovalRefused) and "one approver other than" in str(outcome)
    assert "carol requested run" in box["refused"][0]
    assert "permission denied" in box["refused"][1]
    assert not marker.exists()
    [(status, _, error)] = _approval_audit(settings.ops_dsn.get_secret_value(), box["run_id"])
    assert status == "refused" and "no authenticated approval" in error


def test_one_approver_is_not_enough_for_production(prefect_api, settings, tmp_path):
    run_input = {"approve": True, "approvers": ["alice"], "emergency_declared": True}
    marker, box, outcome = _drill(tmp_path, run_input, production=True)
    assert isinstance(outcome, ApprovalRefused) and "two distinct approvers" in str(outcome)
    assert not marker.exists()
    [(status, who, error)] = _approval_audit(settings.ops_dsn.get_secret_value(), box["run_id"])
    assert (status, who) == ("refused", "alice") and "alice approved" in error


def test_a_forged_identity_is_refused(prefect_api, settings, tmp_path):
    """The form names bob, who never authenticated: the run is refused although alice's
    own approval would have been enough for a scratch target."""
    run_input = {"approve": True, "approvers": ["alice", "bob"]}
    marker, box, outcome = _drill(tmp_path, run_input, production=False, authenticate=["alice"])
    assert isinstance(outcome, ApprovalRefused)
    assert "names bob, who did not approve with their own credentials" in str(outcome)
    assert not marker.exists()
    [(status, _, _)] = _approval_audit(settings.ops_dsn.get_secret_value(), box["run_id"])
    assert status == "refused"


def test_a_pause_that_times_out_is_audited_and_changes_nothing(prefect_api, settings, tmp_path):
    marker, box, outcome = _drill(tmp_path, None, production=True, timeout=1)
    assert isinstance(outcome, ApprovalTimedOut)
    assert not marker.exists()
    with connect(settings.ops_dsn.get_secret_value()) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT status, error_message FROM recovery_audit_log WHERE recovery_type = 'approval'"
            " AND error_message LIKE 'approval timed out after 1 s%' ORDER BY start_time DESC"
        )
        assert cur.fetchone()[0] == "refused"


class _LosesOneAnswer(http.server.BaseHTTPRequestHandler):
    """Relays every request to the real Prefect API, but drops the server's answer to the
    first request to a path ending in ``lose_path`` whose body holds ``lose_body``, as a
    timeout or a reset connection drops it: the server has made the change, and the client
    does not know."""

    upstream = ""
    lose_path = ""
    lose_body = b""
    dropped: list[str] = []

    def relay(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        headers = {k: v for k, v in self.headers.items() if k.lower() not in {"host", "connection"}}
        reply = httpx.request(
            self.command, self.upstream + self.path, content=body, headers=headers, timeout=60
        )
        if self.path.endswith(self.lose_path) and self.lose_body in body and not self.dropped:
            self.dropped.append(self.path)
            self.close_connection = True
            return
        self.send_response(reply.status_code)
        for k, v in reply.headers.items():
            if k.lower() not in {"content-length", "content-encoding", "transfer-encoding"}:
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(reply.content)))
        self.end_headers()
        self.wfile.write(reply.content)

    do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = relay

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def _api_losing(path: str, body: bytes = b"") -> Iterator[type[_LosesOneAnswer]]:
    """This thread's Prefect client talks to the API through the relay; its events (a
    websocket the relay does not carry) go to the API directly, as other threads' calls do."""
    api = urlsplit(PREFECT_API_URL.value())
    handler = type(
        "Relay",
        (_LosesOneAnswer,),
        {"dropped": [], "lose_path": path, "lose_body": body},
    )
    handler.upstream = f"{api.scheme}://{api.netloc}"
    relay = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=relay.serve_forever, daemon=True).start()
    EventsWorker.set_client_override(PrefectEventsClient, api_url=PREFECT_API_URL.value())
    try:
        with temporary_settings(
            {PREFECT_API_URL: f"http://127.0.0.1:{relay.server_port}{api.path}"}
        ):
            yield handler
    finally:
        APILogWorker.drain_all(timeout=10)  # logs sent through the relay
        EventsWorker.set_client_override(None)
        relay.shutdown()
        relay.server_close()


def test_a_pause_whose_answer_is_lost_still_waits_for_the_approval(prefect_api, settings, tmp_path):
    """Prefect's client sends the pause again when the answer is lost; the server refuses
    the copy as a transition already made. The run is paused all the same, so it must
    wait for its approval, not fail."""
    run_input = {"approve": True, "approvers": ["alice"]}
    with _api_losing("/set_state", b'"PAUSED"') as relay:
        marker, box, outcome = _drill(tmp_path, run_input, production=False)
    assert relay.dropped, "the relay never saw the run pause"
    assert outcome == ["alice"] and marker.read_text() == "alice"
    [(status, who, _)] = _approval_audit(settings.ops_dsn.get_secret_value(), box["run_id"])
    assert (status, who) == ("success", "alice")


def test_an_approval_whose_resume_answer_is_lost_still_succeeds(
    prefect_api, stack, settings, tmp_path
):
    """`wedefi-dr approve` resumes the run and the answer is lost; Prefect's client sends
    the resume again, which the server refuses because the run is running. The approval
    succeeded, so the command must say so and the run complete."""
    marker = tmp_path / "changed"
    tag = f"approval-{uuid.uuid4().hex[:8]}"
    out: dict = {}

    def run() -> None:
        try:
            with tags(tag):
                out["result"] = guarded_change(str(marker), False, "carol")
        except BaseException as exc:
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    run_id = _paused_run(tag)
    with _api_losing("/resume") as relay:
        approved = CliRunner().invoke(
            app,
            [
                "approve",
                run_id,
                "--as-dsn",
                stack.approver_dsn("alice"),
                "--approver-passfile",
                str(stack.approver_passfile("alice")),
                "--justification",
                "alice: scratch drill",
            ],
        )
    thread.join(timeout=60)
    assert relay.dropped, "the relay never saw the resume"
    assert approved.exit_code == 0 and "resumed" in approved.stdout, approved.output
    assert "error" not in out, out.get("error")
    assert out["result"] == ["alice"] and marker.read_text() == "alice"


def _paused_run(tag: str, timeout: float = 120) -> str:
    """The id of the run tagged ``tag``, once it is paused."""
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[tag]))
            )
            if runs and runs[0].state and runs[0].state.is_paused():
                return str(runs[0].id)
            assert time.monotonic() < deadline, f"no run tagged {tag} paused"
            time.sleep(0.5)


def test_break_glass_with_two_approvers_on_the_command_line(prefect_api, stack, settings, tmp_path):
    """`wedefi-dr runs pending` lists the run; alice's approval is recorded and the run
    stays paused; bob's completes the rule and resumes it; a forged login is refused."""
    runner = CliRunner()
    marker = tmp_path / "changed"
    tag = f"approval-{uuid.uuid4().hex[:8]}"
    out: dict = {}

    def approvers() -> None:
        try:
            run_id = _paused_run(tag)
            listed = runner.invoke(app, ["runs", "pending", "--json"])
            out["pending"] = [r["run_id"] for r in json.loads(listed.stdout)]
            out["run_id"] = run_id

            def approve(name: str, passfile_of: str | None = None) -> object:
                return runner.invoke(
                    app,
                    [
                        "approve",
                        run_id,
                        "--as-dsn",
                        stack.approver_dsn(name),
                        "--approver-passfile",
                        str(stack.approver_passfile(passfile_of or name)),
                        "--declare-emergency",
                        "--justification",
                        f"{name}: primary lost",
                    ],
                )

            out["forged"] = approve("bob", passfile_of="alice")
            out["alice"] = approve("alice")
            out["bob"] = approve("bob")
        except BaseException as exc:
            out["error"] = exc

    thread = threading.Thread(target=approvers, daemon=True)
    thread.start()
    with tags(tag):
        result = guarded_change(str(marker), True, "carol")
    thread.join(timeout=10)
    assert "error" not in out, out.get("error")
    assert out["run_id"] in out["pending"]
    # bob's role with alice's password file: the server refuses the login (exit status 5)
    assert exit_code(out["forged"].exception) == 5
    assert out["alice"].exit_code == 0 and "stays paused" in out["alice"].stdout
    assert out["bob"].exit_code == 0 and "resumed" in out["bob"].stdout
    assert result == ["alice", "bob"] and marker.read_text() == "alice,bob"
    [(status, who, _)] = _approval_audit(settings.ops_dsn.get_secret_value(), out["run_id"])
    assert (status, who) == ("success", "alice, bob")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["not-a-run-id", "--justification", "x"], "not a flow run id"),
        ([str(uuid.UUID(int=1)), "--as-dsn", "user=alice"], "--justification is required"),
        (
            [str(uuid.UUID(int=1)), "--justification", "x", "--as-dsn", "user=alice password=pw"],
            "must not carry a password",
        ),
    ],
)
def test_approve_refuses_bad_input_with_exit_2(stack, args, message):
    result = CliRunner().invoke(app, ["approve", *args])
    assert exit_code(result.exception) == 2 and message in str(result.exception)
