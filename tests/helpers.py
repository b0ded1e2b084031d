"""Small helpers the tests share: fingerprints, schema dumps, copies of backups."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import boto3
from prefect import tags
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterTags
from prefect.client.schemas.objects import TaskRun
from psycopg2 import sql

from flows.approval import resume_with_answer
from wedefi_dr.catalog import listing
from wedefi_dr.catalog.manifest import BackupManifest, new_backup_id
from wedefi_dr.postgres.conninfo import ConnTarget, with_dbname
from wedefi_dr.postgres.fingerprint import fingerprint_tables
from wedefi_dr.postgres.tools import connect, tool
from wedefi_dr.storage import authentication
from wedefi_dr.storage.s3 import ObjectStore


def fingerprint(dsn: str) -> dict[str, dict[str, object]]:
    with connect(dsn) as conn:
        return fingerprint_tables(conn)


def schema_of(dsn: str) -> str:
    """``pg_dump --schema-only`` without comments, settings and the per-run ``\\restrict``
    token lines (pg_dump 15.14+), for comparison."""
    target = ConnTarget.parse(dsn, allow_password=True)
    out = subprocess.run(
        [
            tool("pg_dump"),
            "--schema-only",
            "--no-owner",
            "--no-privileges",
            "--no-password",
            *target.tool_args(),
        ],
        capture_output=True,
        text=True,
        check=True,
        env=target.tool_env(),
    ).stdout
    lines = [ln for ln in out.splitlines() if ln and not ln.startswith("--")]
    return "\n".join(
        ln for ln in lines if not re.match(r"^(SET|SELECT pg_catalog|\\(un)?restrict )", ln)
    )


def clone_backup(
    store: ObjectStore, manifest: BackupManifest, mutate: Callable[[bytes], bytes] | None = None
) -> BackupManifest:
    """A copy of a good backup under a new id, its stored object optionally damaged.

    The manifest keeps the original size and checksums, as it would after damage at rest.
    """
    body = store.client.get_object(Bucket=store.bucket, Key=manifest.object.key)["Body"].read()
    new_id = new_backup_id()
    key = listing.data_key(store, new_id)
    store.client.put_object(Bucket=store.bucket, Key=key, Body=mutate(body) if mutate else body)
    copy = manifest.model_copy(
        update={"backup_id": new_id, "object": manifest.object.model_copy(update={"key": key})}
    )
    listing.put_manifest(store, listing.manifest_key(store, new_id), copy)
    return copy


def drop_backup(store: ObjectStore, backup_id: str) -> None:
    store.delete(listing.manifest_key(store, backup_id))
    store.delete(listing.data_key(store, backup_id))


@contextmanager
def planted_forged_backup(
    store: ObjectStore, good_backup: str, workdir: Path, *, mac: Literal["none", "zeros", "ours"]
) -> Iterator[str]:
    """A forged backup, planted for the block and removed after it: an unencrypted OpenPGP
    packet (``gpg --store``, which ``gpg --decrypt`` accepts with exit 0 under any
    passphrase) of a schema-only dump of the primary, under a manifest copied from
    ``good_backup`` whose sizes and checksums match the packet exactly. Yields its id.

    ``mac``: ``"none"`` an unsigned manifest, ``"zeros"`` our key id with a MAC the forger
    cannot compute (the real attack, both refused by the manifest check); ``"ours"`` signed
    with our key, to test the layer behind it (gpg's status).
    """
    settings = store.settings
    plaintext = workdir / "evil.pgc"
    src = ConnTarget.parse(settings.primary_dsn.get_secret_value(), allow_password=True)
    subprocess.run(
        [tool("pg_dump"), "--format=custom", "--schema-only", f"--file={plaintext}"]
        + src.tool_args(),
        env=src.tool_env(),
        check=True,
    )
    packet = subprocess.run(
        ["gpg", "--batch", "--homedir", str(workdir), "--store", "-o", "-", str(plaintext)],
        capture_output=True,
        check=True,
    ).stdout
    real = listing.resolve(store, good_backup)
    forged_id = new_backup_id()
    key = listing.data_key(store, forged_id)
    forged = real.model_copy(
        update={
            "backup_id": forged_id,
            "object": real.object.model_copy(
                update={
                    "key": key,
                    "size_bytes": len(packet),
                    "sha256": hashlib.sha256(packet).hexdigest(),
                }
            ),
            "plaintext": real.plaintext.model_copy(
                update={
                    "size_bytes": plaintext.stat().st_size,
                    "sha256": hashlib.sha256(plaintext.read_bytes()).hexdigest(),
                }
            ),
        }
    )
    manifest_key = listing.manifest_key(store, forged_id)
    store.client.put_object(Bucket=store.bucket, Key=key, Body=packet)
    try:
        if mac == "ours":
            listing.put_manifest(store, manifest_key, forged)
        else:
            document = forged.model_dump(mode="json")
            if mac == "zeros":
                document[authentication.FIELD] = {
                    "algorithm": authentication.ALGORITHM,
                    "key_id": authentication.keyring_of(settings).current.key_id,
                    "mac": "0" * 64,
                }
            store.put_json(manifest_key, document)
        yield forged_id
    finally:
        store.delete(manifest_key)
        store.delete(key)


def settled_task_runs(client, flow_run_id: uuid.UUID, timeout: float = 60) -> list[TaskRun]:  # noqa: ANN001
    """The flow run's task runs once each has a final state.

    The engine reports a task run's states as events, and the server writes them a moment
    later; read straight after the flow returns, a task that finished can still be Pending.
    """
    deadline = time.monotonic() + timeout
    while True:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
        unsettled = [f"{r.name}: {r.state.name}" for r in runs if not r.state.is_final()]
        if not unsettled:
            return runs
        assert time.monotonic() < deadline, f"task runs never settled: {unsettled}"
        time.sleep(0.5)


def recovery_audit_rows(ops_dsn: str) -> int:
    with connect(ops_dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM recovery_audit_log")
        return cur.fetchone()[0]


@contextmanager
def new_database(admin_dsn: str, name: str) -> Iterator[str]:
    """A database made for one test (its DSN), dropped afterwards whatever happened."""
    maintenance = with_dbname(admin_dsn, "postgres")
    with connect(maintenance, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield with_dbname(admin_dsn, name)
    finally:
        with connect(maintenance, autocommit=True) as conn, conn.cursor() as cur:
            cur.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def database_exists(admin_dsn: str, name: str) -> bool:
    with connect(with_dbname(admin_dsn, "postgres")) as conn, conn.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
        return cur.fetchone() is not None


def sns_inbox(settings, queue_name: str) -> Callable[[], list[dict]]:
    """An SQS queue subscribed to the stack's SNS topic: what a pager would receive.

    Returns a function that drains the queue and gives each notification's JSON body.
    """
    kwargs = {"endpoint_url": settings.aws_endpoint_url, "region_name": settings.aws_region}
    sqs, sns = boto3.client("sqs", **kwargs), boto3.client("sns", **kwargs)
    url = sqs.create_queue(QueueName=queue_name)["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    sns.subscribe(
        TopicArn=settings.sns_topic_arn,
        Protocol="sqs",
        Endpoint=arn,
        Attributes={"RawMessageDelivery": "true"},
    )

    def drain() -> list[dict]:
        found = []
        while True:
            batch = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1)
            if not batch.get("Messages"):
                return found
            for message in batch["Messages"]:
                sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
                found.append(json.loads(message["Body"]))

    return drain


def approve_as(name: str, run_id: str, *, approve: bool = True, emergency: bool = False) -> str:
    """Approve ``run_id`` as the login role ``name`` (created as a ``dr_approver`` of the
    test stack when missing), with that role's own password file. Returns what the server
    said: ``ok`` or the refusal."""
    from wedefi_dr.approval import ApprovalRefused
    from wedefi_dr.approval_records import approver_dsn, record_approval
    from wedefi_dr_dev.stack import Stack

    stack = Stack(Path(os.environ["WEDEFI_DR_STACK_DIR"]))
    passfile = stack.approver_passfile(name)
    if not passfile.exists():
        stack.add_approver(name)
    try:
        record_approval(
            approver_dsn(stack.approver_dsn(name), passfile),
            run_id,
            approve=approve,
            emergency_declared=emergency,
            justification=f"test approval by {name}",
        )
    except ApprovalRefused as exc:
        return str(exc)
    return "ok"


def approve_when_paused(
    tag: str, run_input: dict, box: dict, authenticate: list[str] | None = None
) -> threading.Thread:
    """What approvers do: find the paused run tagged ``tag``; each name in ``authenticate``
    (default: ``run_input['approvers']``) that can be a role approves it with its own
    credentials (what the server refuses is kept in ``box['refused']``); then the run is
    resumed with ``run_input`` as its form. An error in the thread lands in ``box['error']``."""

    def worker() -> None:
        deadline = time.monotonic() + 180
        try:
            with get_client(sync_client=True) as client:
                while time.monotonic() < deadline:
                    runs = client.read_flow_runs(
                        flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[tag]))
                    )
                    state = runs[0].state if runs else None
                    if state and state.is_paused():
                        box["run_id"] = str(runs[0].id)
                        names = (
                            run_input.get("approvers", []) if authenticate is None else authenticate
                        )
                        for name in names:
                            role = name.strip().lower()
                            if not re.fullmatch(r"[a-z][a-z0-9_]{0,40}", role):
                                continue
                            said = approve_as(
                                role,
                                str(runs[0].id),
                                approve=run_input.get("approve", True),
                                emergency=run_input.get("emergency_declared", False),
                            )
                            if said != "ok":
                                box.setdefault("refused", []).append(said)
                        resume_with_answer(runs[0].id, run_input)
                        box["resumed"] = runs[0].id
                        return
                    if state and state.is_final():
                        return
                    time.sleep(0.5)
        except BaseException as exc:
            box["error"] = exc

    t = threading.Thread(target=worker, daemon=True)
    t.start()
    return t


def run_approved(flow: Callable[..., dict], run_input: dict, **params: object) -> dict:
    """Run ``flow`` in this thread while a helper thread answers its approval pause."""
    tag = f"approval-{uuid.uuid4().hex[:8]}"
    box: dict = {}
    helper = approve_when_paused(tag, run_input, box)
    try:
        with tags(tag):
            return flow(**params)
    finally:
        helper.join(timeout=10)
        assert "error" not in box, box.get("error")


BREAK_GLASS = {"approve": True, "emergency_declared": True, "approvers": ["alice", "bob"]}
