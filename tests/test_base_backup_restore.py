"""Restoring a base backup outside the PITR flow's swap: staging after a passphrase
rotation (the manifest's key id picks the passphrase, and a key id none derives is named),
and the delta restore into an existing data directory (only what differs is written, what
the backup lacks is removed, pg_verifybackup passes).

One base backup of the session's primary, under passphrase A in a prefix of its own.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from wedefi_dr.config import Settings
from wedefi_dr.errors import InvalidInput
from wedefi_dr.physical import basebackup
from wedefi_dr.physical.pitr import delta, recovery
from wedefi_dr.physical.pitr.verify import BaseBackupRefused
from wedefi_dr.postgres.cluster import ClusterHandle, free_port
from wedefi_dr.storage.authentication import derive_key
from wedefi_dr.storage.s3 import ObjectStore

OLD, NEW = "base backup passphrase A", "base backup passphrase B"


@pytest.fixture(scope="module")
def base(settings: Settings) -> Iterator[dict[str, Any]]:
    before = settings.model_copy(
        update={"gpg_passphrase": SecretStr(OLD), "prefix": f"{settings.prefix}-bb-restore"}
    )
    store = ObjectStore(before)
    root = Path(tempfile.mkdtemp(prefix="wedefi-dr-bb-restore-"))
    root.chmod(0o755)
    manifest = basebackup.take(before, "pytest")
    try:
        yield {"settings": before, "manifest": manifest, "root": root}
    finally:
        for key in (manifest.object.key, basebackup.manifest_key(store, manifest.backup_id)):
            store.delete(key)
        shutil.rmtree(root, ignore_errors=True)


def test_staging_opens_a_base_backup_from_before_the_rotation(base) -> None:
    root = base["root"]
    target = ClusterHandle(name="bb-rotation", data_dir=root / "rot" / "data", port=free_port())
    rotated = base["settings"].model_copy(
        update={"gpg_passphrase": SecretStr(NEW), "gpg_previous_passphrases": [SecretStr(OLD)]}
    )
    found = basebackup.resolve(ObjectStore(rotated), base["manifest"].backup_id)
    staged = recovery.stage_base_backup(rotated, found, target, root / "spool")
    assert (staged / "PG_VERSION").is_file() and (staged / "backup_manifest").is_file()
    shutil.rmtree(staged)

    forgotten = rotated.model_copy(update={"gpg_previous_passphrases": []})
    with pytest.raises(BaseBackupRefused, match=derive_key(OLD).key_id) as refused:
        recovery.stage_base_backup(forgotten, found, target, root / "spool")
    assert "WEDEFI_DR_GPG_PREVIOUS_PASSPHRASES" in str(refused.value)
    assert not recovery.staging_dir(target).exists()


def test_delta_restore_rewrites_only_what_differs_and_removes_what_the_backup_lacks(base):
    settings, manifest, root = base["settings"], base["manifest"], base["root"]
    target = ClusterHandle(name="bb-delta", data_dir=root / "delta" / "data", port=free_port())
    recovery.stage_base_backup(settings, manifest, target, root / "spool").rename(target.data_dir)
    data = target.data_dir
    files = sorted(p for p in (data / "base").rglob("*") if p.is_file() and p.stat().st_size)
    changed = files[len(files) // 2]
    body = bytearray(changed.read_bytes())
    body[len(body) // 2] ^= 0xFF  # same size, one byte in the middle
    changed.write_bytes(bytes(body))
    (data / "global" / "pg_filenode.map").unlink()
    (data / "base" / "not-in-the-backup").write_bytes(b"x" * 100)
    (data / "stray-folder").mkdir()
    (data / "stray-folder" / "file").write_text("stray")
    (data / "standby.signal").write_text("")

    done = delta.delta_restore(settings, manifest, target, root / "spool")
    assert done["written"] == 2
    assert done["kept"] > 100
    assert done["removed"] == [
        "base/not-in-the-backup",
        "standby.signal",
        "stray-folder",
        "stray-folder/file",
    ]
    assert changed.read_bytes() != bytes(body) and (data / "global" / "pg_filenode.map").exists()
    again = delta.delta_restore(settings, manifest, target, root / "spool")
    assert (again["written"], again["removed"]) == (0, [])

    production = target.model_copy(update={"production": True})
    with pytest.raises(InvalidInput, match="is production"):
        delta.delta_restore(settings, manifest, production, root / "spool")
