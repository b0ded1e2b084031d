"""The IAM policies in deployments/iam/, enforced by moto's IAM engine over HTTP.

A second moto server, started here with ``INITIAL_NO_AUTH_ACTION_COUNT`` so that only the
set-up runs unauthenticated: then every request is signed by one role's user and checked
against that role's policy. One case per allowed and per denied action."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from botocore.exceptions import ClientError

from wedefi_dr.config import PROJECT_ROOT, Settings
from wedefi_dr.lifecycle import buckets
from wedefi_dr.postgres.cluster import free_port
from wedefi_dr.storage.s3 import ObjectStore

POLICIES = PROJECT_ROOT / "deployments" / "iam"
REGION = "us-west-2"
PRIMARY, DR = "wedefi-backup-primary", "wedefi-backup-dr-east"
SEEDED = [
    "wedefi/logical/old/dump.pgc.gpg",
    "wedefi/wal/000000010000000000000001",
]


def _client(endpoint: str, key: str = "setup", secret: str = "setup", service: str = "s3"):
    return boto3.client(
        service,
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=key,
        aws_secret_access_key=secret,
    )


@pytest.fixture(scope="module")
def iam_server(tmp_path_factory) -> Iterator[dict]:
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = (tmp_path_factory.mktemp("iam") / "moto.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "1000"},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(endpoint + "/moto-api/", timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the IAM-enforcing moto server did not start") from None
                time.sleep(0.2)
        s3, iam = _client(endpoint), _client(endpoint, service="iam")
        buckets.ensure_plain_bucket(s3, PRIMARY, REGION)
        buckets.ensure_dr_bucket(s3, DR, REGION, 1)
        for key in SEEDED:
            s3.put_object(Bucket=PRIMARY, Key=key, Body=b"seed")
        keys = {}
        for policy in sorted(POLICIES.glob("*.json")):
            role = policy.stem
            iam.create_user(UserName=role)
            iam.put_user_policy(UserName=role, PolicyName=role, PolicyDocument=policy.read_text())
            k = iam.create_access_key(UserName=role)["AccessKey"]
            keys[role] = (k["AccessKeyId"], k["SecretAccessKey"])
        # From here on every request is authenticated and authorised.
        urllib.request.urlopen(
            urllib.request.Request(
                endpoint + "/moto-api/reset-auth",
                data=b"0",
                method="POST",
                headers={"Content-Type": "text/plain"},  # a form body would hide the count
            )
        )
        yield {"endpoint": endpoint, "keys": keys}
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


def act(server: dict, role: str, action: str, key: str) -> None:
    c = _client(server["endpoint"], *server["keys"][role])
    if action == "put":
        c.put_object(Bucket=PRIMARY, Key=key, Body=b"x")
    elif action == "get":
        c.get_object(Bucket=PRIMARY, Key=key)["Body"].read()
    elif action == "list":
        c.list_objects_v2(Bucket=PRIMARY, Prefix=key)
    elif action == "delete":
        c.delete_object(Bucket=PRIMARY, Key=key)
    elif action == "put-dr":
        c.put_object(Bucket=DR, Key=key, Body=b"x", ChecksumAlgorithm="SHA256")
    elif action == "delete-dr":
        c.delete_object(Bucket=DR, Key=key)
    elif action == "preflight":  # the backup's own bucket check, as this role
        store = ObjectStore(Settings(aws_endpoint_url=server["endpoint"], bucket=PRIMARY))
        store.client = c
        store.check_writable()
    else:
        raise AssertionError(action)


CASES = [
    ("backup_operator", "put", "wedefi/logical/new/dump.pgc.gpg", True),
    ("backup_operator", "put", "wedefi/base/new/base.tar.gz.gpg", True),
    ("backup_operator", "get", "wedefi/logical/old/dump.pgc.gpg", True),
    ("backup_operator", "list", "wedefi/logical/", True),
    ("backup_operator", "preflight", "", True),
    ("backup_operator", "delete", "wedefi/logical/old/dump.pgc.gpg", False),
    ("backup_operator", "put", "wedefi/wal/000000010000000000000099", False),
    ("backup_operator", "put-dr", "wedefi/logical/new/dump.pgc.gpg", False),
    ("wal_archiver", "put", "wedefi/wal/0000000100000000000000AA", True),
    ("wal_archiver", "get", "wedefi/wal/000000010000000000000001", True),
    ("wal_archiver", "put", "wedefi/wal-key/0123456789abcdef", True),
    ("wal_archiver", "put", "wedefi/logical/x/dump.pgc.gpg", False),
    ("wal_archiver", "delete", "wedefi/wal/000000010000000000000001", False),
    ("wal_archiver", "get", "wedefi/logical/old/dump.pgc.gpg", False),
    ("recovery_operator", "get", "wedefi/logical/old/dump.pgc.gpg", True),
    ("recovery_operator", "list", "wedefi/", True),
    ("recovery_operator", "put", "wedefi/logical/y/dump.pgc.gpg", False),
    ("recovery_operator", "delete", "wedefi/logical/old/dump.pgc.gpg", False),
    ("lifecycle", "delete", "wedefi/logical/expired/dump.pgc.gpg", True),
    ("lifecycle", "delete", "wedefi/wal/000000010000000000000000", True),
    ("lifecycle", "put", "wedefi/lifecycle/deletions/run.json", True),
    ("lifecycle", "delete", "wedefi/wal-key/0123456789abcdef", False),
    ("lifecycle", "put", "wedefi/logical/z/dump.pgc.gpg", False),
    ("lifecycle", "delete-dr", "wedefi/logical/old/dump.pgc.gpg", False),
    ("dr_sync", "put-dr", "wedefi/logical/old/dump.pgc.gpg", True),
    ("dr_sync", "delete-dr", "wedefi/logical/gone/dump.pgc.gpg", True),
    ("dr_sync", "get", "wedefi/logical/old/dump.pgc.gpg", True),
    ("dr_sync", "delete", "wedefi/logical/old/dump.pgc.gpg", False),
    ("dr_sync", "put", "wedefi/logical/w/dump.pgc.gpg", False),
    ("dr_admin", "delete", "wedefi/logical/any/dump.pgc.gpg", True),
    ("dr_admin", "put-dr", "wedefi/logical/any/dump.pgc.gpg", True),
]


@pytest.mark.parametrize(
    ("role", "action", "key", "allowed"),
    CASES,
    ids=[
        f"{r}-{a}-{'allowed' if ok else 'denied'}-{k.rsplit('/', 2)[-2] if k else ''}"
        for r, a, k, ok in CASES
    ],
)
def test_role_policy(iam_server, role, action, key, allowed):
    if allowed:
        act(iam_server, role, action, key)
        return
    with pytest.raises(ClientError) as denied:
        act(iam_server, role, action, key)
    assert denied.value.response["Error"]["Code"] == "AccessDenied"


def test_unknown_credentials_are_refused(iam_server):
    with pytest.raises(ClientError) as refused:
        _client(iam_server["endpoint"], "nobody", "nothing").list_objects_v2(Bucket=PRIMARY)
    assert refused.value.response["Error"]["Code"] in {"InvalidAccessKeyId", "AccessDenied"}


def test_every_policy_file_is_valid_json_with_statements():
    for policy in POLICIES.glob("*.json"):
        document = json.loads(Path(policy).read_text())
        assert document["Version"] == "2012-10-17" and document["Statement"], policy.name
