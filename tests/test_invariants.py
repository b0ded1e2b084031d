"""Attacks on what DESIGN.md promises: each test is built so that breaking the promise
in the code makes it fail.

* nothing lost, under a writer: a backup taken while rows keep arriving restores to exactly
  its manifest (which then differs from the live source). Dropping ``--snapshot`` from the
  pg_dump command line makes the dump read later than the fingerprints and fails this test;
* the content proof sees sequences, large objects and materialized views;
* secrets never leak: persisted Prefect results, the server log and S3 object metadata
  are scanned after a backup and a restore;
* the exact gpg command lines, with the passphrase nowhere on them;
* a forged backup that passes the manifest check still is not restored: an unencrypted
  ``gpg --store`` packet under a manifest carrying a valid MAC is refused by gpg's status.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import threading
import uuid
from pathlib import Path

import pytest
from psycopg2 import sql
from pydantic import SecretStr

from wedefi_dr.catalog import listing
from wedefi_dr.catalog.manifest import new_backup_id
from wedefi_dr.config import Settings
from wedefi_dr.errors import DecryptionFailed, NotAuthentic
from wedefi_dr.logical import backup, restore
from wedefi_dr.postgres.conninfo import ConnTarget, dbname_of, with_dbname
from wedefi_dr.postgres.fingerprint import LARGE_OBJECTS, compare, fingerprint_tables
from wedefi_dr.postgres.tools import connect
from wedefi_dr.storage import authentication, encryption
from wedefi_dr.storage.encryption import GpgParams

from .helpers import database_exists, fingerprint, planted_forged_backup


def _create(admin: str, name: str) -> str:
    with connect(with_dbname(admin, "postgres"), autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return with_dbname(admin, name)


def _drop(admin: str, name: str) -> None:
    with connect(with_dbname(admin, "postgres"), autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


class Writer(threading.Thread):
    """Commits one row after another into ``ticks`` until stopped.

    Each commit also draws a burst of ids: sequences ignore snapshots, so a backup that
    read a position after pg_dump did would record one the restore stands before.
    """

    def __init__(self, dsn: str) -> None:
        super().__init__(daemon=True)
        self.dsn, self.stop, self.commits, self.error = dsn, threading.Event(), 0, None

    def run(self) -> None:
        try:
            with connect(self.dsn, autocommit=True) as conn, conn.cursor() as cur:
                while not self.stop.is_set():
                    cur.execute(
                        "INSERT INTO ticks (note) VALUES ('written during the backup');"
                        "SELECT nextval('ticks_id_seq') FROM generate_series(1, 500)"
                    )
                    self.commits += 1
        except Exception as exc:  # reported by the test, not lost in the thread
            self.error = exc


def test_backup_under_a_writer_restores_to_its_manifest_not_to_the_live_source(
    settings: Settings, store, scratch_dsn: str, tmp_path: Path
) -> None:
    admin = settings.primary_dsn.get_secret_value()
    name = f"writer_src_{uuid.uuid4().hex[:8]}"
    source = _create(admin, name)
    key = None
    try:
        with connect(source) as conn, conn.cursor() as cur:
            cur.execute(
                "CREATE TABLE ticks (id bigserial PRIMARY KEY, note text, "
                "at timestamptz DEFAULT clock_timestamp());"
                # pg_dump reads sequences before any data; hashing this view (nothing to
                # dump) keeps the content proof busy well past that moment.
                "CREATE MATERIALIZED VIEW ballast AS "
                "SELECT g AS id FROM generate_series(1, 1000000) g;"
                "CREATE TABLE pad AS SELECT g AS id, md5(g::text) AS pad "
                "FROM generate_series(1, 60000) g;"
                "INSERT INTO ticks (note) SELECT 'before' FROM generate_series(1, 100)"
            )
        writer = Writer(source)
        writer.start()
        try:
            while writer.commits < 20 and writer.error is None:  # it is really writing
                threading.Event().wait(0.01)
            before = writer.commits
            ours = settings.model_copy(update={"primary_dsn": SecretStr(source)})
            manifest = backup.dump_encrypt_upload(ours, new_backup_id(), "pytest")
            key = manifest.object.key
            during = writer.commits - before
        finally:
            writer.stop.set()
            writer.join(30)
        assert writer.error is None, writer.error
        assert during > 0  # rows were committed while the backup ran
        spool = restore.fetch_verified(settings, manifest, tmp_path)
        target = ConnTarget.parse(scratch_dsn, allow_password=True)
        restore.decrypt_and_restore(settings, manifest, spool, target)
        restored = fingerprint(scratch_dsn)
        assert compare(manifest.tables, restored) == []
        restore.verify(manifest, target)  # the product's own check agrees
        live = fingerprint(source)
        assert live["public.ticks"] != manifest.tables["public.ticks"]
        assert live["public.ticks"]["rows"] > restored["public.ticks"]["rows"]
    finally:
        if key:
            store.delete(key)
        _drop(admin, name)


def test_the_content_proof_sees_sequences_large_objects_and_matviews(
    settings: Settings, scratch_dsn: str
) -> None:
    admin = settings.primary_dsn.get_secret_value()
    _create(admin, dbname_of(scratch_dsn))
    with connect(scratch_dsn) as conn, conn.cursor() as cur:
        cur.execute(
            "CREATE TABLE t (id int); INSERT INTO t SELECT generate_series(1, 10);"
            "CREATE SEQUENCE s; SELECT setval('s', 500);"
            "CREATE MATERIALIZED VIEW mv AS SELECT sum(id) AS total FROM t;"
            "SELECT lo_from_bytea(0, 'large object payload')"
        )
        (oid,) = cur.fetchone()

    def proof() -> dict:
        with connect(scratch_dsn) as conn:
            return fingerprint_tables(conn)

    base = proof()
    assert {"public.t", "public.mv", "sequence public.s", LARGE_OBJECTS} <= set(base)
    changes = {
        "sequence set back": ("SELECT setval('s', 42)", "sequence public.s"),
        "large object edited": (f"SELECT lo_put({oid}, 0, 'LARGE')", LARGE_OBJECTS),
        "matview refreshed on new rows": (
            "INSERT INTO t VALUES (11); REFRESH MATERIALIZED VIEW mv; DELETE FROM t WHERE id = 11",
            "public.mv",
        ),
    }
    for what, (statement, entry) in changes.items():
        with connect(scratch_dsn) as conn, conn.cursor() as cur:
            cur.execute(statement)
        problems = compare(base, proof())
        assert len(problems) == 1 and problems[0].startswith(entry), what
        base = proof()
    # A sequence ahead of where the backup saw it is fine (pg_dump reads it later).
    with connect(scratch_dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT nextval('s')")
    assert compare(base, proof()) == []


def _stack_secrets(settings: Settings) -> list[str]:
    found = [settings.gpg_passphrase.get_secret_value(), os.environ["AWS_SECRET_ACCESS_KEY"]]
    for line in Path(os.environ["PGPASSFILE"]).read_text().splitlines():
        found.append(line.rsplit(":", 1)[1])
    found.append(authentication.keyring_of(settings).current.secret.hex())
    return [s for s in found if s]


def test_results_server_log_and_object_metadata_hold_no_secret(
    good_backup, settings: Settings, store, stack, scratch_dsn: str
) -> None:
    from flows.restore import restore_backup

    restore_backup(
        backup_id=good_backup,
        target_dsn=scratch_dsn,
        operator="pytest",
        justification="scan for secrets after a restore",
    )
    results = Path(os.environ["PREFECT_HOME"]) / "storage"
    persisted = [p for p in results.rglob("*") if p.is_file()]
    assert persisted, "the flows persisted their results, so the scan reads something"
    scanned = "".join(_persisted_text(p) for p in persisted)
    assert good_backup in scanned
    for cluster in (stack.primary, stack.ops):
        scanned += cluster.log.read_text(errors="replace")
    metadata = []
    for page in store.client.get_paginator("list_objects_v2").paginate(Bucket=store.bucket):
        for item in page.get("Contents", []):
            head = store.client.head_object(Bucket=store.bucket, Key=item["Key"])
            metadata.append({"key": item["Key"], "meta": head.get("Metadata", {})})
    assert any(m["meta"] for m in metadata), "objects carry metadata, so the scan can fail"
    scanned += json.dumps(metadata)
    for secret in _stack_secrets(settings):
        assert secret not in scanned


def _persisted_text(path: Path) -> str:
    """A persisted result as text: the JSON record and its base64-encoded payload."""
    raw = path.read_bytes()
    try:
        record = json.loads(raw)
        payload = base64.b64decode(record.get("result") or "")
    except (ValueError, AttributeError):
        return raw.decode(errors="replace")
    return raw.decode(errors="replace") + payload.decode(errors="replace")


HOSTILE_PASSPHRASE = "-x'\n--passphrase evil"


def test_gpg_command_lines_are_exact_and_carry_no_passphrase() -> None:
    params = GpgParams(s2k_count=65011712)
    home = encryption.gnupg_home()
    common = [
        "gpg",
        "--batch",
        "--no-tty",
        "--quiet",
        "--yes",
        "--homedir",
        home,
        "--pinentry-mode",
        "loopback",
        "--no-symkey-cache",
        "--passphrase-fd",
    ]
    gpg = encryption.start_encrypt("s3cret-passphrase", params)
    try:
        argv = list(gpg.args)
    finally:
        gpg.kill()
        gpg.wait()
    fd = argv[len(common)]
    assert argv == [
        *common,
        fd,
        "--symmetric",
        "--cipher-algo",
        "AES256",
        "--s2k-mode",
        "3",
        "--s2k-digest-algo",
        "SHA512",
        "--s2k-count",
        "65011712",
        "--compress-algo",
        "none",
        "--output",
        "-",
    ]
    assert fd.isdigit()
    source = "-x'; rm -rf \n--decrypt"
    dec = encryption.start_decrypt("s3cret-passphrase", source)
    try:
        argv = list(dec.args)
    finally:
        dec.kill()
        dec.wait()
    assert argv[: len(common)] == common
    assert argv[len(common) + 1 :] == [
        "--status-fd",
        argv[len(common) + 2],
        "--decrypt",
        "--output",
        "-",
        "--",
        source,  # one argument, after the options end: never read as one
    ]
    assert not any("s3cret" in a for a in argv)
    with pytest.raises(Exception, match="line break"):
        encryption.start_encrypt(HOSTILE_PASSPHRASE, params)


def test_an_unencrypted_packet_under_a_valid_manifest_is_refused(
    good_backup, settings: Settings, store, scratch_dsn: str, tmp_path: Path
) -> None:
    """Defence in depth: the manifest check passes (its MAC is ours), and gpg's status
    still refuses the object before pg_restore or the target sees a byte."""
    with planted_forged_backup(store, good_backup, tmp_path, mac="ours") as forged_id:
        manifest = listing.resolve(store, forged_id)  # the manifest check passes
        spool = restore.fetch_verified(settings, manifest, tmp_path / "spool")
        target = ConnTarget.parse(scratch_dsn, allow_password=True)
        with pytest.raises(NotAuthentic, match="not a symmetric-encrypted message"):
            restore.decrypt_and_restore(settings, manifest, spool, target)
    assert not database_exists(scratch_dsn, dbname_of(scratch_dsn))


def test_the_dr_test_refuses_a_forged_backup_before_provisioning(
    good_backup, settings: Settings, store, tmp_path: Path
) -> None:
    from flows.dr_test import dr_test

    with (
        planted_forged_backup(store, good_backup, tmp_path, mac="zeros") as forged_id,
        pytest.raises(NotAuthentic, match=forged_id),
    ):
        dr_test(
            backup_id=forged_id,
            provider="local",
            operator="pytest",
            justification="a forged backup must be refused",
        )


def test_the_stored_object_has_the_configured_gpg_parameters(
    good_backup, settings: Settings, store, tmp_path: Path
) -> None:
    """Read from the object in the bucket with ``gpg --list-packets``, not from the
    manifest's description of the parameters (which is built from the same settings)."""
    manifest = listing.resolve(store, good_backup)
    stored = tmp_path / "stored.gpg"
    stored.write_bytes(
        store.client.get_object(Bucket=manifest.object.bucket, Key=manifest.object.key)[
            "Body"
        ].read()
    )
    packets = subprocess.run(
        ["gpg", "--batch", "--homedir", str(tmp_path), "--pinentry-mode", "loopback"]
        + ["--passphrase-fd", "0", "--list-packets", str(stored)],
        input=settings.gpg_passphrase.get_secret_value().encode(),
        capture_output=True,
    ).stdout.decode()
    # cipher 9 = AES256, s2k 3 = iterated and salted, hash 10 = SHA512 (RFC 4880 ids)
    assert re.search(r"symkey enc packet: version 4, cipher 9, aead 0,\s*s2k 3, hash 10", packets)
    (count,) = re.findall(r"\bcount (\d+)\b", packets)
    assert int(count) == settings.gpg_s2k_count >= 16777216
    assert "encrypted data packet" in packets and "mdc_method: 2" in packets
    assert "compressed packet" not in packets  # -Z9 dumps are not compressed twice


def test_a_plaintext_that_differs_from_the_manifest_commits_nothing(
    good_backup, settings: Settings, store, scratch_dsn: str, tmp_path: Path
) -> None:
    """The whole archive reaches pg_restore before the plaintext hash can be compared: the
    restore must still not have committed when the comparison fails."""
    real = listing.resolve(store, good_backup)
    spool = restore.fetch_verified(settings, real, tmp_path)
    lying = real.model_copy(
        update={"plaintext": real.plaintext.model_copy(update={"sha256": "0" * 64})}
    )
    target = ConnTarget.parse(scratch_dsn, allow_password=True)
    with pytest.raises(DecryptionFailed, match="does not match the manifest"):
        restore.decrypt_and_restore(settings, lying, spool, target)
    assert restore.user_tables(target) == 0
