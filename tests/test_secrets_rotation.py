"""Passphrase rotation: new backups use the new passphrase; a backup taken before the
rotation still verifies and restores with the old passphrase kept in the keyring, and is
refused, naming its key id, when the old passphrase is gone."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from psycopg2 import sql
from pydantic import SecretStr

from wedefi_dr.catalog import listing
from wedefi_dr.catalog.manifest import new_backup_id
from wedefi_dr.config import Settings
from wedefi_dr.errors import NotAuthentic
from wedefi_dr.logical import backup, restore
from wedefi_dr.postgres.conninfo import ConnTarget, with_dbname
from wedefi_dr.postgres.tools import connect
from wedefi_dr.storage.authentication import derive_key
from wedefi_dr.storage.s3 import ObjectStore

OLD, NEW = "passphrase before the rotation", "passphrase after the rotation"


def test_a_backup_from_before_a_rotation_restores_with_the_old_key(
    settings: Settings, scratch_dsn: str, tmp_path: Path
) -> None:
    admin = settings.primary_dsn.get_secret_value()
    name = f"rotation_src_{uuid.uuid4().hex[:8]}"
    with connect(with_dbname(admin, "postgres"), autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    source = with_dbname(admin, name)
    keys: list[str] = []
    before = settings.model_copy(
        update={"gpg_passphrase": SecretStr(OLD), "primary_dsn": SecretStr(source)}
    )
    old_store = ObjectStore(before)
    try:
        with connect(source) as conn, conn.cursor() as cur:
            cur.execute("CREATE TABLE t AS SELECT generate_series(1, 500) AS id")
        manifest = backup.dump_encrypt_upload(before, new_backup_id(), "pytest")
        keys.append(manifest.object.key)
        keys.append(listing.manifest_key(old_store, manifest.backup_id))
        listing.put_manifest(old_store, keys[-1], manifest)

        after = settings.model_copy(update={"gpg_passphrase": SecretStr(NEW)})
        with pytest.raises(NotAuthentic, match=derive_key(OLD).key_id):
            listing.resolve(ObjectStore(after), manifest.backup_id)

        rotated = after.model_copy(update={"gpg_previous_passphrases": [SecretStr(OLD)]})
        found = listing.resolve(ObjectStore(rotated), manifest.backup_id)
        spool = restore.fetch_verified(rotated, found, tmp_path)
        target = ConnTarget.parse(scratch_dsn, allow_password=True)
        restore.decrypt_and_restore(rotated, found, spool, target)
        assert restore.verify(found, target)["rows"] == 500
        # New manifests are signed with the new key only.
        signed = listing.put_manifest  # the one signing path
        probe = listing.manifest_key(old_store, new_backup_id())
        keys.append(probe)
        signed(ObjectStore(rotated), probe, found)
        document = old_store.get_json(probe)
        assert document["authentication"]["key_id"] == derive_key(NEW).key_id
    finally:
        for key in keys:
            old_store.delete(key)
        with connect(with_dbname(admin, "postgres"), autocommit=True) as conn, conn.cursor() as cur:
            cur.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
