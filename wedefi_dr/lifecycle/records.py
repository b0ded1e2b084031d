"""Deletion records: the backup lifecycle's signed list of what it removed on purpose.

The sync propagates a deletion to the DR copy only for a key named in one of these
records, never because a key is missing from the primary. A record is authenticated like a
manifest (:mod:`wedefi_dr.storage.authentication`), so whoever can write the primary
bucket cannot plant one to make the sync delete the DR copy.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from wedefi_dr.errors import NotAuthentic
from wedefi_dr.storage import authentication
from wedefi_dr.storage.repository import Repository

log = logging.getLogger(__name__)
FOLDER = "lifecycle/deletions"


def records_prefix(store: Repository) -> str:
    return store.key(FOLDER) + "/"


def write_record(store: Repository, run_id: str, deleted: dict[str, str], operator: str) -> str:
    """Store the record of one lifecycle run: key -> why it went. Returns its key."""
    now = datetime.now(UTC)
    key = f"{records_prefix(store)}{now:%Y%m%dT%H%M%SZ}-{run_id}.json"
    document: dict[str, Any] = {
        "run_id": run_id,
        "written_at": now.isoformat(),
        "operator": operator,
        "deleted": dict(sorted(deleted.items())),
    }
    store.put_json(key, authentication.sign(document, authentication.keyring_of(store.settings)))
    return key


def deleted_on_purpose(store: Repository) -> dict[str, str]:
    """Every key an authentic record names (key -> reason); a record that does not verify
    is ignored with a warning naming it."""
    keyring = authentication.keyring_of(store.settings)
    keys: dict[str, str] = {}
    for obj in store.list_keys(records_prefix(store)):
        document = store.get_json(obj["Key"])
        if document is None:
            continue
        try:
            authentication.verify(document, keyring, f"deletion record {store.url(obj['Key'])}")
        except NotAuthentic as exc:
            log.warning("deletion record ignored: %s", exc)
            continue
        keys.update(document.get("deleted", {}))
    return keys
