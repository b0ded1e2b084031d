"""A DR environment restores as a login that is no superuser, so a hostile source database
cannot run programs on the DR host.

Our own backup (valid MAC, valid gpg MDC) of a source database holding an index whose
expression calls a function doing ``COPY ... TO PROGRAM``: pg_restore's CREATE INDEX runs
that function with the restoring login's rights. As the superuser the program runs; as the
copy's owner PostgreSQL refuses it, and the restore rolls back naming the refusal ("must be
superuser or have privileges of the pg_execute_server_program role to COPY to or from an
external program").
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from psycopg2 import sql
from pydantic import SecretStr

from tests.helpers import new_database
from wedefi_dr.catalog import listing
from wedefi_dr.catalog.manifest import new_backup_id
from wedefi_dr.config import Settings
from wedefi_dr.drtest.environments import RESTORER_ROLE, LocalClusterProvider
from wedefi_dr.drtest.restore import restore_into
from wedefi_dr.errors import RestoreFailed, TargetRefused
from wedefi_dr.logical import backup, restore
from wedefi_dr.postgres.conninfo import ConnTarget
from wedefi_dr.postgres.tools import connect
from wedefi_dr.storage.repository import open_store

HOSTILE_SOURCE = """
CREATE FUNCTION public.payload() RETURNS void LANGUAGE plpgsql VOLATILE AS $f$
BEGIN
    IF current_database() <> {source} THEN
        EXECUTE format('COPY (SELECT 1) TO PROGRAM %L', {command});
    END IF;
END $f$;
CREATE FUNCTION public.hostile(v int) RETURNS int LANGUAGE plpgsql IMMUTABLE AS $f$
BEGIN
    PERFORM public.payload();
    RETURN v;
END $f$;
CREATE TABLE victim (v int);
INSERT INTO victim SELECT generate_series(1, 3);
CREATE INDEX victim_hostile ON victim ((public.hostile(v)));
"""


@pytest.fixture(scope="module")
def scratch_root() -> Iterator[Path]:
    # Not pytest's tmp_path (mode 700): the postgres OS user must reach the DR cluster,
    # and may write the marker (the hostile program's proof that it ran).
    root = Path(tempfile.mkdtemp(prefix="wedefi-nonsuper-"))
    root.chmod(0o1777)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def hostile(settings: Settings, scratch_root: Path) -> Iterator[dict]:
    """The product's backup of a hostile source, under a prefix of its own (never a
    ``latest`` for other tests): its settings, backup id and marker path."""
    marker = scratch_root / "pwned"
    admin = settings.primary_dsn.get_secret_value()
    name = f"src_hostile_{uuid.uuid4().hex[:8]}"
    ours = settings.model_copy(update={"prefix": f"test-nonsuper-{uuid.uuid4().hex[:8]}"})
    with new_database(admin, name) as source:
        with connect(source) as conn, conn.cursor() as cur:
            cur.execute(
                sql.SQL(HOSTILE_SOURCE).format(
                    source=sql.Literal(name), command=sql.Literal(f"touch {marker}")
                )
            )
        taken = ours.model_copy(update={"primary_dsn": SecretStr(source)})
        manifest = backup.dump_encrypt_upload(taken, new_backup_id(), "pytest")
    store = open_store(ours)
    listing.write_manifest(store, manifest)
    try:
        yield {"settings": ours, "backup_id": manifest.backup_id, "marker": marker}
    finally:
        store.delete(manifest.object.key)
        store.delete(listing.manifest_key(store, manifest.backup_id))


def test_a_hostile_source_runs_no_program_on_the_dr_host(
    hostile: dict, settings: Settings, scratch_root: Path
) -> None:
    ours, backup_id, marker = hostile["settings"], hostile["backup_id"], hostile["marker"]
    provider = LocalClusterProvider(scratch_root / "envs", settings.dr_app_role, fast=True)
    env = provider.provision(f"dr-nonsuper-{uuid.uuid4().hex[:6]}")
    try:
        error = ""
        try:
            restore_into(ours, backup_id, env, "pytest", "hostile source drill")
        except RestoreFailed as exc:
            error = str(exc)
        assert not marker.exists(), "the source's function ran a program on the DR host"
        assert "pg_execute_server_program role to COPY to or from an external" in error, error
        assert "rolled back" in error
        assert restore.user_tables(env.owner) == 0
        assert restore.privileged_login(env.owner) == ""
        assert restore.privileged_login(env.admin) == "postgres is a superuser"

        # An owner that became privileged is refused before anything is downloaded.
        with connect(env.admin.conninfo, autocommit=True) as conn, conn.cursor() as cur:
            cur.execute(sql.SQL("ALTER ROLE {} SUPERUSER").format(sql.Identifier(RESTORER_ROLE)))
        with pytest.raises(TargetRefused, match=f"{RESTORER_ROLE} is a superuser; nothing was"):
            restore_into(ours, backup_id, env, "pytest", "hostile source drill")
        assert not marker.exists()
    finally:
        provider.teardown(env)


def test_an_operator_named_superuser_target_is_warned_about(
    hostile: dict, scratch_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The restore flow's target (named by the operator) is not refused for being a
    superuser: the target policy says why that is risky, in the log and in what it returns."""
    target = ConnTarget.parse(scratch_dsn, allow_password=False)
    request = restore.RestoreRequest(hostile["backup_id"], target, "pytest", "warning")
    with caplog.at_level("WARNING", logger=restore.__name__):
        _, check = restore.assess(hostile["settings"], request)
    assert check.privileged.startswith(f"restoring into {target.location} as a privileged")
    assert "is a superuser" in check.privileged
    assert check.privileged in caplog.text


def test_the_restore_flow_reports_a_superuser_target(good_backup: str, scratch_dsn: str) -> None:
    """The warning reaches the restore-backup flow's result, and the restore still runs."""
    from flows.restore import restore_backup

    result = restore_backup(
        backup_id=good_backup, target_dsn=scratch_dsn, operator="pytest", justification="warn"
    )
    assert result["rows"] > 0
    assert "is a superuser" in result["privilege_warning"]


PLANTED_VIEW = """
ALTER TABLE "Alert" RENAME TO "Alert_real";
CREATE FUNCTION public.refuse_superuser() RETURNS boolean LANGUAGE plpgsql STABLE AS $f$
BEGIN
    IF (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
        RAISE EXCEPTION 'planted view read by the superuser %', current_user;
    END IF;
    RETURN true;
END $f$;
CREATE VIEW "Alert" AS SELECT * FROM "Alert_real" WHERE public.refuse_superuser();
"""


def test_the_validation_reads_the_copy_as_its_owner(
    good_backup: str, settings: Settings, scratch_root: Path
) -> None:
    """What the copy holds came from the source: a view planted there runs its functions
    with the rights of whoever reads it. The suites read the copy as its unprivileged owner
    (amcheck alone, which reads index pages, as the superuser)."""
    from tasks.dr_test import validate_copy

    provider = LocalClusterProvider(scratch_root / "envs", settings.dr_app_role, fast=True)
    env = provider.provision(f"dr-owner-{uuid.uuid4().hex[:6]}")
    try:
        restore_into(settings, good_backup, env, "pytest", "validation as the owner")
        with connect(env.owner.conninfo, autocommit=True) as conn, conn.cursor() as cur:
            cur.execute(PLANTED_VIEW)
        manifest = listing.resolve(open_store(settings), good_backup).model_dump(mode="json")
        result = validate_copy.fn(env.to_dict(), manifest, str(scratch_root / "docs"))
        assert "planted view read by the superuser" not in repr(result)
        assert result["success"], result
    finally:
        provider.teardown(env)
