"""Passphrase rotation for base backups: PITR's staging opens a base backup taken under a
passphrase rotated out (the manifest's key id picks it from the keyring), and names that
key id when no configured passphrase derives it."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from pydantic import SecretStr

from wedefi_dr.config import Settings
from wedefi_dr.physical import basebackup
from wedefi_dr.physical.pitr import recovery
from wedefi_dr.physical.pitr.verify import BaseBackupRefused
from wedefi_dr.postgres.cluster import ClusterHandle, free_port
from wedefi_dr.storage.authentication import derive_key
from wedefi_dr.storage.s3 import ObjectStore

OLD, NEW = "base backup passphrase A", "base backup passphrase B"


def test_staging_opens_a_base_backup_from_before_the_rotation(settings: Settings) -> None:
    before = settings.model_copy(
        update={"gpg_passphrase": SecretStr(OLD), "prefix": f"{settings.prefix}-bb-rotation"}
    )
    store = ObjectStore(before)
    root = Path(tempfile.mkdtemp(prefix="wedefi-dr-bb-rotation-"))
    root.chmod(0o755)
    target = ClusterHandle(name="bb-rotation", data_dir=root / "c" / "data", port=free_port())
    manifest = basebackup.take(before, "pytest")
    try:
        rotated = before.model_copy(
            update={
                "gpg_passphrase": SecretStr(NEW),
                "gpg_previous_passphrases": [SecretStr(OLD)],
            }
        )
        found = basebackup.resolve(ObjectStore(rotated), manifest.backup_id)
        staged = recovery.stage_base_backup(rotated, found, target, root / "spool")
        assert (staged / "PG_VERSION").is_file() and (staged / "backup_manifest").is_file()
        shutil.rmtree(staged)

        forgotten = rotated.model_copy(update={"gpg_previous_passphrases": []})
        with pytest.raises(BaseBackupRefused, match=derive_key(OLD).key_id) as refused:
            recovery.stage_base_backup(forgotten, found, target, root / "spool")
        assert "WEDEFI_DR_GPG_PREVIOUS_PASSPHRASES" in str(refused.value)
        assert not recovery.staging_dir(target).exists()
    finally:
        for key in (manifest.object.key, basebackup.manifest_key(store, manifest.backup_id)):
            store.delete(key)
        shutil.rmtree(root, ignore_errors=True)
