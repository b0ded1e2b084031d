"""What is restored must be what this system wrote: manifests are authenticated.

Whoever can write to the bucket can write a manifest too, so its checksums prove nothing by
themselves. These tests plant and edit manifests the way an attacker with bucket access
would, and check that every reader refuses them by name before anything changes.
"""

from __future__ import annotations

import pytest

from tests.helpers import database_exists, planted_forged_backup, recovery_audit_rows
from wedefi_dr.catalog import listing
from wedefi_dr.catalog.manifest import new_backup_id
from wedefi_dr.config import Settings
from wedefi_dr.errors import NotAuthentic, UnknownBackup
from wedefi_dr.physical import basebackup
from wedefi_dr.postgres.conninfo import dbname_of
from wedefi_dr.storage import authentication
from wedefi_dr.storage.authentication import Keyring


# ---- the MAC itself (no servers) ---------------------------------------------------------
def test_signed_document_verifies_and_any_edit_is_refused() -> None:
    ring = Keyring("correct horse battery staple")
    signed = authentication.sign({"backup_id": "x", "rows": 10, "nested": {"a": [1, 2]}}, ring)
    assert authentication.verify(signed, ring, "doc").key_id == ring.current.key_id

    for edit in ({"rows": 11}, {"nested": {"a": [1, 3]}}, {"extra": True}):
        forged = {**signed, **edit}
        with pytest.raises(NotAuthentic, match="does not match its MAC"):
            authentication.verify(forged, ring, "doc")


def test_unsigned_and_foreign_documents_are_refused() -> None:
    ring = Keyring("ours")
    with pytest.raises(NotAuthentic, match="carries no authentication"):
        authentication.verify({"backup_id": "x"}, ring, "doc")
    theirs = authentication.sign({"backup_id": "x"}, Keyring("theirs"))
    with pytest.raises(NotAuthentic, match="wrong passphrase"):
        authentication.verify(theirs, ring, "doc")
    # A MAC copied from another key id under our key id is still refused.
    relabelled = {
        **theirs,
        "authentication": {**theirs["authentication"], "key_id": ring.current.key_id},
    }
    with pytest.raises(NotAuthentic, match="does not match its MAC"):
        authentication.verify(relabelled, ring, "doc")


def test_signature_never_shows_the_secret() -> None:
    ring = Keyring("s3cret-passphrase")
    assert "s3cret" not in repr(ring.current)
    signed = authentication.sign({"a": 1}, ring)
    assert "s3cret" not in str(signed) and ring.current.secret.hex() not in str(signed)


# ---- readers refuse planted and edited manifests ---------------------------------------
def _plant_unsigned(store, manifest) -> str:
    """A copy of a real manifest under a new id, written as an attacker would: no MAC."""
    planted = manifest.model_copy(update={"backup_id": new_backup_id()})
    store.put_json(listing.manifest_key(store, planted.backup_id), planted.model_dump(mode="json"))
    return planted.backup_id


def test_edited_manifest_is_refused_by_id(good_backup, store) -> None:
    key = listing.manifest_key(store, good_backup)
    original = store.get_json(key)
    edited = {**original, "total_rows": original.get("total_rows", 0) + 1}
    edited["tables"] = {**original["tables"]}
    first = next(iter(edited["tables"]))
    edited["tables"][first] = {**edited["tables"][first], "rows": 0}
    store.put_json(key, edited)
    try:
        with pytest.raises(NotAuthentic, match=f"{good_backup}.*does not match its MAC"):
            listing.resolve(store, good_backup)
        assert good_backup not in [m.backup_id for m in listing.list_backups(store)]
    finally:
        store.put_json(key, original)
    assert listing.resolve(store, good_backup).backup_id == good_backup


def test_planted_manifest_neither_becomes_latest_nor_hides_good_backups(good_backup, store) -> None:
    planted = _plant_unsigned(store, listing.resolve(store, good_backup))
    try:
        ids = [m.backup_id for m in listing.list_backups(store)]
        assert planted not in ids and good_backup in ids
        assert listing.resolve(store, "latest").backup_id != planted
        with pytest.raises(NotAuthentic, match="carries no authentication"):
            listing.resolve(store, planted)
    finally:
        store.delete(listing.manifest_key(store, planted))


def test_forged_backup_is_refused_before_the_target_is_touched(
    good_backup, settings: Settings, store, scratch_dsn: str, tmp_path
) -> None:
    """The attack of the security review: an unencrypted OpenPGP packet (``gpg --store``,
    which ``gpg --decrypt`` accepts with exit 0 under any passphrase) holding a dump of the
    attacker's choosing, with a manifest whose sizes and checksums match it exactly."""
    from flows.restore import restore_backup

    ops = settings.ops_dsn.get_secret_value()
    audits = recovery_audit_rows(ops)
    with (
        planted_forged_backup(store, good_backup, tmp_path, mac="none") as forged_id,
        pytest.raises(NotAuthentic, match=forged_id),
    ):
        restore_backup(
            backup_id=forged_id,
            target_dsn=scratch_dsn,
            operator="pytest",
            justification="forged backup must be refused",
        )
    assert not database_exists(scratch_dsn, dbname_of(scratch_dsn))
    assert recovery_audit_rows(ops) == audits + 1  # the refusal, on the record


def test_planted_base_backup_manifest_is_refused(store) -> None:
    backup_id = new_backup_id()
    key = basebackup.manifest_key(store, backup_id)
    store.put_json(key, {"backup_id": backup_id, "kind": "base"})
    try:
        assert backup_id not in [m.backup_id for m in basebackup.list_base_backups(store)]
        with pytest.raises(NotAuthentic, match=backup_id):
            basebackup.resolve(store, backup_id)
    finally:
        store.delete(key)
    with pytest.raises(UnknownBackup):
        basebackup.resolve(store, backup_id)
