"""Authenticated metadata: manifests (and anything else read back to decide what to trust)
carry an HMAC under a key only holders of the backup secret can derive.

Why: whoever can write to the bucket can also write a manifest, and every checksum in a
manifest is only as trustworthy as the manifest itself. A planted backup with a matching
manifest would otherwise be restored, and ``pg_restore`` runs SQL of the dump author's
choosing. So a manifest is accepted only when its MAC verifies under a key this system
holds; anything else is refused by name before a byte reaches ``pg_restore`` or ``tar``.

The key is derived from the backup passphrase with PBKDF2 (so guessing the passphrase from a
MAC costs as much as guessing it from the gpg message), and has a public *key id*: a manifest
names the key that signed it, so that a wrong passphrase is told apart from a forgery, and a
keyring of rotated passphrases can find the right key for an old backup.

Standard library only: the archive_command's import chain may use this module.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from wedefi_dr.errors import InvalidInput, NotAuthentic

if TYPE_CHECKING:
    from wedefi_dr.config import Settings

FIELD = "authentication"
ALGORITHM = "HMAC-SHA256"
_SALT = b"wedefi-dr/metadata-authentication/v1"
_ITERATIONS = 200_000


@dataclass(frozen=True)
class SigningKey:
    """A MAC key, its public id, and the passphrase it was derived from (which also
    decrypts the objects of the backups it signed)."""

    key_id: str
    secret: bytes
    passphrase: str = field(default="", repr=False, compare=False)

    def __repr__(self) -> str:  # never print the secret
        return f"SigningKey(key_id={self.key_id!r})"


@lru_cache(maxsize=8)
def derive_key(passphrase: str) -> SigningKey:
    """The MAC key of a backup passphrase (PBKDF2-HMAC-SHA256), cached per process."""
    if not passphrase:
        raise InvalidInput("the backup passphrase is empty (WEDEFI_DR_GPG_PASSPHRASE)")
    secret = hashlib.pbkdf2_hmac("sha256", passphrase.encode(), _SALT, _ITERATIONS)
    key_id = hashlib.sha256(b"key-id:" + secret).hexdigest()[:16]
    return SigningKey(key_id=key_id, secret=secret, passphrase=passphrase)


class Keyring:
    """The keys that verify, by key id; the current one also signs. Previous passphrases
    (rotated out) only verify, so the backups they made still restore."""

    def __init__(self, current: str, previous: tuple[str, ...] = ()) -> None:
        self.current = derive_key(current)
        self._keys = {self.current.key_id: self.current}
        for old in previous:
            key = derive_key(old)
            self._keys.setdefault(key.key_id, key)

    def key(self, key_id: str) -> SigningKey | None:
        return self._keys.get(key_id)

    @property
    def key_ids(self) -> list[str]:
        return list(self._keys)

    @property
    def passphrases(self) -> list[str]:
        """Every passphrase, the current one first: what a decryption may try."""
        return [k.passphrase for k in self._keys.values()]


def keyring_of(settings: Settings) -> Keyring:
    """The keyring of the settings' backup passphrase and the ones rotated out."""
    return Keyring(
        settings.gpg_passphrase.get_secret_value(),
        tuple(p.get_secret_value() for p in settings.gpg_previous_passphrases),
    )


def canonical(document: Mapping[str, Any]) -> bytes:
    """The bytes the MAC covers: the document without its MAC, keys sorted, no whitespace."""
    body = {k: v for k, v in document.items() if k != FIELD}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def mac(document: Mapping[str, Any], key: SigningKey) -> str:
    return hmac.new(key.secret, canonical(document), hashlib.sha256).hexdigest()


def sign(document: Mapping[str, Any], keyring: Keyring) -> dict[str, Any]:
    """A copy of ``document`` with its MAC under the current key."""
    signed = {k: v for k, v in document.items() if k != FIELD}
    signed[FIELD] = {
        "algorithm": ALGORITHM,
        "key_id": keyring.current.key_id,
        "mac": mac(signed, keyring.current),
    }
    return signed


def verify(document: Mapping[str, Any], keyring: Keyring, what: str) -> SigningKey:
    """The key that signed ``document``; NotAuthentic, naming ``what``, if none of ours did."""
    auth = document.get(FIELD)
    if not isinstance(auth, dict) or auth.get("algorithm") != ALGORITHM:
        raise NotAuthentic(
            f"{what} carries no authentication this system wrote: refusing to trust it "
            "(planted or written by another tool)"
        )
    key = keyring.key(str(auth.get("key_id", "")))
    if key is None:
        raise NotAuthentic(
            f"{what} is signed with key id {auth.get('key_id')!r}, but the configured passphrase "
            f"derives {', '.join(keyring.key_ids)}: wrong passphrase "
            "(WEDEFI_DR_GPG_PASSPHRASE), or the manifest was not written by this system"
        )
    if not hmac.compare_digest(str(auth.get("mac", "")), mac(document, key)):
        raise NotAuthentic(
            f"{what} does not match its MAC (key id {key.key_id}): it was changed after this "
            "system wrote it; refusing to trust it"
        )
    return key


def object_mac(
    key: SigningKey, name: str, sha256: str, size: int, object_sha256: str | None = None
) -> str:
    """The MAC of an archived object's identity: its name, plaintext sha256 and size, and
    (``object/v2``) the stored object's own sha256.

    Why the name is covered: a genuine segment copied under another name would otherwise
    verify, and replay would apply it at the wrong place in the WAL stream. Why the
    object's sha256: once it is covered, hashing the stored bytes proves they are the ones
    this system wrote, and with them the plaintext they decrypt to; a reader need not hash
    the plaintext again (for a 16 MB WAL segment, a fifth of what its fetch costs). Under
    ``object/v1`` only the plaintext's sha256 binds a ciphertext to its name.
    """
    if object_sha256 is None:
        message = f"wedefi-dr/object/v1\n{name}\n{sha256}\n{int(size)}"
    else:
        message = f"wedefi-dr/object/v2\n{name}\n{sha256}\n{int(size)}\n{object_sha256}"
    return hmac.new(key.secret, message.encode(), hashlib.sha256).hexdigest()


def verify_object_mac(
    keyring: Keyring,
    name: str,
    sha256: str,
    size: int,
    key_id: str | None,
    tag: str | None,
    object_sha256: str | None = None,
) -> SigningKey:
    """The key whose MAC ``tag`` covers (name, sha256, size), and ``object_sha256`` when
    given (``object/v2``); NotAuthentic naming ``name``."""
    if not key_id or not tag:
        raise NotAuthentic(
            f"{name} carries no MAC this system wrote: refusing it (planted or written by "
            "another tool)"
        )
    key = keyring.key(key_id)
    if key is None:
        raise NotAuthentic(
            f"{name} is signed with key id {key_id!r}, but the configured passphrase derives "
            f"{', '.join(keyring.key_ids)}: wrong passphrase, or not written by this system"
        )
    if not hmac.compare_digest(tag, object_mac(key, name, sha256, size, object_sha256)):
        raise NotAuthentic(f"{name} does not match its MAC: changed after this system wrote it")
    return key
