"""A backup restores into a fresh database exactly, by the flow and by hand."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import boto3
import pytest
from pydantic import SecretStr

from flows.restore import restore_backup
from tests.helpers import BREAK_GLASS, fingerprint, new_database, run_approved, schema_of
from wedefi_dr.catalog import listing
from wedefi_dr.catalog.manifest import new_backup_id
from wedefi_dr.config import PROJECT_ROOT, Settings
from wedefi_dr.errors import RestoreFailed, VerificationFailed
from wedefi_dr.logical import backup, build, restore
from wedefi_dr.postgres.conninfo import ConnTarget, dbname_of
from wedefi_dr.postgres.fingerprint import (
    FINGERPRINT_METHOD,
    TEXT_METHOD,
    fingerprint_tables,
    is_table_entry,
)
from wedefi_dr.postgres.tools import connect, tool
from wedefi_dr.storage.s3 import ObjectStore
from wedefi_dr_dev.seed import SAMPLE_WALLET_ADDRESS


def test_backup_manifest_describes_the_source(good_backup, settings: Settings, store, seeded):
    manifest = listing.resolve(store, good_backup)
    assert manifest.backup_id == good_backup
    # Row counts in the manifest are the seeded counts, table by table.
    counts = {name.split(".", 1)[1]: t["rows"] for name, t in manifest.tables.items()}
    assert counts == seeded
    assert len(counts) == 33
    # And the hashes are the source's, taken now (the database has not changed since).
    assert manifest.tables == fingerprint(settings.primary_dsn.get_secret_value())
    head = store.head(manifest.object.key)
    assert head["ContentLength"] == manifest.object.size_bytes
    assert head["ServerSideEncryption"] == "AES256"
    assert head["StorageClass"] == "STANDARD_IA"
    assert manifest.encryption["cipher"] == "AES256"
    assert manifest.encryption["s2k_count"] == 16777216


def test_restore_into_fresh_database_reproduces_source_exactly(
    good_backup, settings: Settings, scratch_dsn: str
):
    result = restore_backup(
        backup_id=good_backup,
        target_dsn=scratch_dsn,
        operator="pytest",
        justification="exactness test",
    )
    source = settings.primary_dsn.get_secret_value()
    assert result["tables"] == 33
    assert fingerprint(scratch_dsn) == fingerprint(source)
    assert schema_of(scratch_dsn) == schema_of(source)
    with connect(settings.ops_dsn.get_secret_value()) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT status, operator_id, justification, target FROM recovery_audit_log "
            "WHERE backup_id = %s ORDER BY start_time DESC LIMIT 1",
            (good_backup,),
        )
        status, operator, justification, target = cur.fetchone()
    assert (status, operator, justification) == ("success", "pytest", "exactness test")
    assert target.endswith("/" + dbname_of(scratch_dsn))


def test_restore_latest_over_existing_database_replaces_it(
    good_backup, settings: Settings, scratch_dsn: str
):
    restore_backup(
        backup_id="latest", target_dsn=scratch_dsn, operator="pytest", justification="first"
    )
    # What the backup holds (other tests of the session may have changed the live source).
    restored = fingerprint(scratch_dsn)
    with connect(scratch_dsn) as conn, conn.cursor() as cur:
        cur.execute('DELETE FROM "AlertDelivery"')
    # The scratch database is on the primary's cluster: overwriting it is break-glass.
    run_approved(
        restore_backup,
        BREAK_GLASS,
        backup_id="latest",
        target_dsn=scratch_dsn,
        operator="pytest",
        justification="second, --clean over a changed copy",
        overwrite=True,
    )
    assert fingerprint(scratch_dsn) == restored

    # --clean drops only what the backup holds: a table it does not know stays behind, and
    # the verification says so instead of calling the target an exact copy.
    with connect(scratch_dsn) as conn, conn.cursor() as cur:
        cur.execute('CREATE TABLE "Leftover" (id int)')
    with pytest.raises(VerificationFailed, match=r"public\.Leftover: present in the restore"):
        run_approved(
            restore_backup,
            BREAK_GLASS,
            backup_id="latest",
            target_dsn=scratch_dsn,
            operator="pytest",
            justification="third",
            overwrite=True,
        )


def test_no_stored_object_contains_plaintext(
    good_backup, settings: Settings, store: ObjectStore, env_override, scratch_dsn, tmp_path
):
    from flows.backup import logical_backup

    # An uncompressed dump would show every wallet address in clear text if unencrypted.
    env_override(WEDEFI_DR_COMPRESS_LEVEL="0")
    uncompressed = logical_backup(operator="pytest")
    manifest = listing.resolve(store, uncompressed)
    needles = [b"PGDMP", SAMPLE_WALLET_ADDRESS.encode(), SAMPLE_WALLET_ADDRESS.lower().encode()]
    scanned = 0
    for obj in store.list_keys(""):
        body = store.client.get_object(Bucket=store.bucket, Key=obj["Key"])["Body"].read()
        scanned += len(body)
        for needle in needles:
            assert needle not in body, f"{needle!r} found in {obj['Key']}"
    assert scanned > manifest.object.size_bytes
    # The check can fail: the decrypted dump does hold the address.
    cipher = tmp_path / "c.gpg"
    cipher.write_bytes(
        store.client.get_object(Bucket=store.bucket, Key=manifest.object.key)["Body"].read()
    )
    plain = _gpg_decrypt(cipher, settings.gpg_passphrase.get_secret_value(), tmp_path)
    assert plain.startswith(b"PGDMP")
    assert SAMPLE_WALLET_ADDRESS.encode() in plain


def _gpg_decrypt(path, passphrase: str, home) -> bytes:
    home.joinpath("gnupg").mkdir(mode=0o700, exist_ok=True)
    return subprocess.run(
        [
            "gpg",
            "--batch",
            "--quiet",
            "--homedir",
            str(home / "gnupg"),
            "--pinentry-mode",
            "loopback",
            "--passphrase-fd",
            "0",
            "--decrypt",
            str(path),
        ],
        input=passphrase.encode() + b"\n",
        capture_output=True,
        check=True,
    ).stdout


def test_break_glass_restore_with_stock_tools_only(
    good_backup, settings: Settings, scratch_dsn: str, tmp_path
):
    """boto3 to fetch, stock gpg to decrypt, stock pg_restore to load: no project code."""
    s3 = boto3.client("s3", endpoint_url=settings.aws_endpoint_url, region_name=settings.aws_region)
    key = f"{settings.prefix}/logical/{good_backup}/dump.pgc.gpg"
    cipher = tmp_path / "backup.pgc.gpg"
    s3.download_file(settings.bucket, key, str(cipher))
    dump = tmp_path / "backup.pgc"
    dump.write_bytes(_gpg_decrypt(cipher, settings.gpg_passphrase.get_secret_value(), tmp_path))
    target = ConnTarget.parse(scratch_dsn, allow_password=True)
    env = target.tool_env()
    maintenance = f"--maintenance-db={target.with_dbname('postgres').conninfo}"
    subprocess.run(
        [tool("createdb"), "--no-password", maintenance, target.dbname], env=env, check=True
    )
    subprocess.run(
        [tool("pg_restore"), "--no-password", "--exit-on-error", *target.tool_args(), str(dump)],
        env=env,
        check=True,
    )
    assert fingerprint(scratch_dsn) == fingerprint(settings.primary_dsn.get_secret_value())


def test_a_restore_that_differs_from_its_manifest_is_rolled_back_naming_the_table(
    settings: Settings, store: ObjectStore, scratch_dsn: str, tmp_path
):
    """The tables are fingerprinted inside the restore transaction: names that need quoting
    come back under their manifest keys, a value whose text depends on the search_path
    (regclass) reads as the backup read it, and one table whose content is not what the
    manifest says fails the restore before COMMIT, naming it, with nothing left behind."""
    admin = settings.primary_dsn.get_secret_value()
    target = ConnTarget.parse(scratch_dsn, allow_password=True)
    with new_database(admin, f"src_{target.dbname}") as source:
        with connect(source) as conn, conn.cursor() as cur:
            cur.execute(
                'CREATE SCHEMA "odd ""schema"""; '
                'CREATE TABLE "odd ""schema"""."Dotted.Name" (id int, note text); '
                'INSERT INTO "odd ""schema"""."Dotted.Name" SELECT i, \'n\' || i '
                "FROM generate_series(1, 200) i; "
                "CREATE TABLE plain (v numeric, r regclass); "
                "INSERT INTO plain VALUES (1.50, 'plain'), (NULL, NULL); "
                "CREATE MATERIALIZED VIEW totals AS SELECT sum(v) AS s FROM plain"
            )
        ours = settings.model_copy(update={"primary_dsn": SecretStr(source)})
        manifest = backup.dump_encrypt_upload(ours, new_backup_id(), "pytest")
    try:
        odd = 'odd "schema".Dotted.Name'
        assert {odd, "public.plain", "public.totals"} <= set(manifest.tables)
        spool = restore.fetch_verified(settings, manifest, tmp_path / "a")
        proven = restore.decrypt_and_restore(settings, manifest, spool, target)
        tables = {k: v for k, v in manifest.tables.items() if is_table_entry(k)}
        assert proven.tables == tables
        assert restore.verify(manifest, target, proven)["tables"] == len(manifest.tables)

        tampered = dict(manifest.tables)
        tampered[odd] = {**tampered[odd], "content_hash": "0" * 64}
        lying = manifest.model_copy(update={"tables": tampered})
        spool = restore.fetch_verified(settings, manifest, tmp_path / "b")
        with new_database(admin, f"{target.dbname}_b") as second_dsn:
            second = ConnTarget.parse(second_dsn, allow_password=True)
            with pytest.raises(
                VerificationFailed,
                match=r'rolled back: odd "schema"\.Dotted\.Name: same row count, different',
            ):
                restore.decrypt_and_restore(settings, lying, spool, second)
            assert restore.user_tables(second) == 0
    finally:
        store.delete(manifest.object.key)


def test_a_backup_fingerprinted_by_the_text_method_still_restores_verified(
    settings: Settings, store: ObjectStore, scratch_dsn: str, tmp_path
):
    """A manifest written before the typed row hash (TEXT_METHOD) is verified by the method
    it names: its restore commits when the rows match, and rolls back when they do not."""
    admin = settings.primary_dsn.get_secret_value()
    target = ConnTarget.parse(scratch_dsn, allow_password=True)
    with new_database(admin, f"src_{target.dbname}") as source:
        with connect(source) as conn, conn.cursor() as cur:
            cur.execute(
                "CREATE TABLE typed (id serial, v numeric(36, 18), at timestamp(3)); "
                "INSERT INTO typed (v, at) SELECT i / 7.0, now() FROM generate_series(1, 300) i"
            )
        ours = settings.model_copy(update={"primary_dsn": SecretStr(source)})
        manifest = backup.dump_encrypt_upload(ours, new_backup_id(), "pytest")
        with connect(source) as conn:
            text = fingerprint_tables(conn, method=TEXT_METHOD)
    try:
        assert manifest.fingerprint_method == FINGERPRINT_METHOD
        older = manifest.model_copy(update={"fingerprint_method": TEXT_METHOD, "tables": text})
        assert text["public.typed"] != manifest.tables["public.typed"]
        spool = restore.fetch_verified(settings, older, tmp_path / "a")
        proven = restore.decrypt_and_restore(settings, older, spool, target)
        assert proven.tables["public.typed"] == text["public.typed"]
        assert restore.verify(older, target, proven)["rows"] == 300

        wrong = {**text, "public.typed": manifest.tables["public.typed"]}  # the typed hash
        spool = restore.fetch_verified(settings, older, tmp_path / "b")
        with new_database(admin, f"{target.dbname}_b") as second_dsn:
            second = ConnTarget.parse(second_dsn, allow_password=True)
            with pytest.raises(VerificationFailed, match="public.typed: same row count"):
                restore.decrypt_and_restore(
                    settings, older.model_copy(update={"tables": wrong}), spool, second
                )
            assert restore.user_tables(second) == 0
    finally:
        store.delete(manifest.object.key)


def _databases_like(target: ConnTarget, pattern: str) -> list[str]:
    with connect(target.with_dbname("postgres").conninfo) as conn, conn.cursor() as cur:
        cur.execute("SELECT datname FROM pg_database WHERE datname LIKE %s", (pattern,))
        return [name for (name,) in cur.fetchall()]


def _comment_on(target: ConnTarget) -> str | None:
    with connect(target.with_dbname("postgres").conninfo) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s",
            (target.dbname,),
        )
        return cur.fetchone()[0]


def _sessions_on(target: ConnTarget, name: str) -> int:
    with connect(target.with_dbname("postgres").conninfo) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (name,))
        return cur.fetchone()[0]


def _copy_being_loaded(target: ConnTarget, child: subprocess.Popen) -> str:
    """The name of the copy the child is building, once pg_restore is connected to it."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and child.poll() is None:
        for name in _databases_like(target, target.dbname + "\\_restoring\\_%"):
            if _sessions_on(target, name):
                return name
        time.sleep(0.01)
    raise AssertionError(f"no copy of {target.dbname} seen loading (child exit {child.poll()})")


def test_a_rename_refused_because_the_target_appeared_keeps_the_copys_mark(
    settings: Settings, scratch_dsn: str
):
    """Clearing the mark and taking the name are one transaction: when someone created the
    target meanwhile, the rename is refused, the other database is left as it is, and the
    copy is still marked (so a process killed before it drops the copy leaves one that the
    next restore drops)."""
    admin = settings.primary_dsn.get_secret_value()
    target = ConnTarget.parse(scratch_dsn, allow_password=True)
    with new_database(admin, build.hidden_name(target.dbname)) as copy_dsn:
        copy = ConnTarget.parse(copy_dsn, allow_password=True)
        build.mark_unproven(copy, target)
        build.create_database(target)
        with connect(target.conninfo) as conn, conn.cursor() as cur:
            cur.execute("CREATE TABLE theirs (id int)")
        with pytest.raises(RestoreFailed, match="was created by someone else during the restore"):
            build._unmark_and_rename(copy, target)
        assert '"wedefi_dr_unproven_copy"' in (_comment_on(copy) or "")
        assert _comment_on(target) is None
        with connect(target.conninfo) as conn, conn.cursor() as cur:
            cur.execute("SELECT to_regclass('public.theirs') IS NOT NULL")
            assert cur.fetchone()[0], "the other database was changed"


def test_a_restore_killed_mid_build_leaves_a_copy_the_next_restore_drops(
    settings: Settings, good_backup: str, scratch_dsn: str, caplog
):
    """SIGKILL of a restore (the CLI and its pg_restore) while it builds a new database
    leaves the copy behind; the next restore of that target drops it before it starts,
    and leaves a database of the same shape of name that is not marked as such a copy, and
    a marked copy that someone is connected to."""
    from prefect.settings import PREFECT_API_URL

    target = ConnTarget.parse(scratch_dsn, allow_password=True)
    building = target.dbname + "\\_restoring\\_%"
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "WEDEFI_DR_RESTORE_JOBS": "2"}
    argv = ["restore", good_backup, "--target-dsn", scratch_dsn, "--operator", "pytest"]
    child = subprocess.Popen(
        [sys.executable, "-m", "wedefi_dr_cli.app", *argv, "--justification", "killed on purpose"],
        env=env,
        cwd=PROJECT_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its pg_restore dies with it
    )
    try:
        killed = _copy_being_loaded(target, child)
        os.killpg(child.pid, signal.SIGKILL)
        child.wait(30)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait(30)
    deadline = time.monotonic() + 30
    while _sessions_on(target, killed) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _databases_like(target, building) == [killed]
    assert not restore.database_exists(target)

    stranger = target.with_dbname(build.hidden_name(target.dbname))
    busy = target.with_dbname(build.hidden_name(target.dbname))
    build.create_database(stranger)
    build.create_database(busy)
    build.mark_unproven(busy, target)
    try:
        caplog.set_level("WARNING", logger="wedefi_dr.logical.build")
        with connect(busy.conninfo):
            result = restore_backup(
                backup_id=good_backup,
                target_dsn=scratch_dsn,
                operator="pytest",
                justification="the restore after the killed one",
            )
        assert result["tables"] == 33
        assert sorted(_databases_like(target, building)) == sorted([stranger.dbname, busy.dbname])
        assert f"dropped {killed}, the unproven copy of {target.dbname}" in caplog.text
        assert f"left {busy.dbname}" in caplog.text and "someone is connected" in caplog.text
    finally:
        with connect(target.with_dbname("postgres").conninfo, autocommit=True) as conn:
            for name in (stranger.dbname, busy.dbname, killed):
                conn.cursor().execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_a_new_database_takes_the_targets_name_only_once_proven(
    settings: Settings, store: ObjectStore, scratch_dsn: str, tmp_path, caplog
):
    """A target that does not exist is built in parallel under a name of its own: a copy
    that differs from the manifest is dropped and the target never appears; an equal one
    is renamed to the target, and nothing is left under the building name. With one job the
    same restore streams into the new database in one transaction instead."""
    admin = settings.primary_dsn.get_secret_value()
    target = ConnTarget.parse(scratch_dsn, allow_password=True)
    building = target.dbname + "\\_restoring\\_%"
    with new_database(admin, f"src_{target.dbname}") as source:
        with connect(source) as conn, conn.cursor() as cur:
            cur.execute(
                "CREATE TABLE big (id int PRIMARY KEY, note text); "
                "INSERT INTO big SELECT i, md5(i::text) FROM generate_series(1, 5000) i; "
                "CREATE TABLE small (id serial, at timestamptz DEFAULT now()); "
                "INSERT INTO small DEFAULT VALUES"
            )
        ours = settings.model_copy(update={"primary_dsn": SecretStr(source)})
        manifest = backup.dump_encrypt_upload(ours, new_backup_id(), "pytest")
    try:
        tampered = {**manifest.tables, "public.big": {**manifest.tables["public.big"], "rows": 1}}
        lying = manifest.model_copy(update={"tables": tampered})
        spool = restore.fetch_verified(settings, manifest, tmp_path / "a")
        parallel = settings.model_copy(update={"restore_jobs": 2})
        with pytest.raises(
            VerificationFailed,
            match=r"dropped before it took the target's name: public\.big: 5000 rows, the "
            r"backup holds 1",
        ):
            restore.decrypt_and_restore(parallel, lying, spool, target)
        assert not restore.database_exists(target)
        assert _databases_like(target, building) == []

        caplog.set_level("INFO", logger="wedefi_dr.logical.build")
        proven = restore.decrypt_and_restore(parallel, manifest, spool, target)
        assert f"restoring into {target.dbname}_restoring_" in caplog.text
        assert proven.tables == {k: v for k, v in manifest.tables.items() if is_table_entry(k)}
        assert restore.verify(manifest, target, proven)["rows"] == 5001
        assert _databases_like(target, building) == []
        assert _comment_on(target) is None  # the copy's mark went with its name

        streamed = target.with_dbname(target.dbname + "_one")
        single = settings.model_copy(update={"restore_jobs": 1})
        try:
            with pytest.raises(VerificationFailed, match="so it was rolled back: public.big"):
                restore.decrypt_and_restore(single, lying, spool, streamed)
            assert restore.database_exists(streamed)
            assert restore.user_tables(streamed) == 0
        finally:
            with connect(target.with_dbname("postgres").conninfo, autocommit=True) as conn:
                conn.cursor().execute(f'DROP DATABASE IF EXISTS "{streamed.dbname}"')
    finally:
        store.delete(manifest.object.key)
