"""The WAL key: a random passphrase, stored once in the repository, that encrypts every segment.

Why: gpg stretches a passphrase (S2K, 2**24 SHA-512 rounds here, ~0.1 s on an idle host and
far more under load) on every encryption, and a segment is encrypted every time the server
finishes one. The stretching protects a human passphrase against guessing; a random 256-bit
secret cannot be guessed, so stretching it adds nothing. pgBackRest solves the same problem
with a random *cipher sub-passphrase* kept in ``archive.info``, encrypted by the repository
passphrase; this is that design within this project's trust model:

- the WAL key is 32 random bytes (64 hex characters), stored at ``<prefix>/wal-key/<key id>``
  as ``gpg --symmetric`` under the backup passphrase with the configured S2K (so it is as
  hard to open as any backup), with the same authenticated metadata as a segment: plaintext
  and object sha256, size, and the MAC under that passphrase's key, bound to the object's
  name (``storage/authentication.py``);
- one WAL key per backup passphrase: the object's name is that passphrase's public key id,
  so a rotated-out passphrase (``WEDEFI_DR_GPG_PREVIOUS_PASSPHRASES``) still opens the WAL
  key of the segments it archived, and a new passphrase gets a new WAL key on first push;
- segments name the backup key that MAC'd them, which is also the WAL key's id: a fetch
  needs no other metadata, and a planted WAL key is refused by name before any segment is
  decrypted with it;
- the key is opened once per process (the resident archiver, the prefetcher) and kept in
  memory only: never on disk in plaintext, never in argv or the environment (gpg reads it
  from a pipe, as it reads every passphrase here).

By hand, with stock tools: ``gpg -d wal-key/<id> > walkey`` (the backup passphrase), then
``gpg --passphrase-file walkey -d <segment> | zstd -d`` (README "Break-glass restore").

Standard library, gpg and the archive's repository only: the ``wal-push`` import chain uses it.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from wedefi_dr.errors import DRError, NotAuthentic
from wedefi_dr.storage import authentication, encryption

if TYPE_CHECKING:
    from wedefi_dr.config import Settings
    from wedefi_dr.storage.repository import Repository

KEY_DIR = "wal-key"
ENCODING = "gpg"
SECRET_BYTES = 32


class WalKeyError(DRError):
    """The WAL key of a passphrase is missing, damaged or not this system's."""


@dataclass(frozen=True)
class WalKey:
    """The random passphrase of the segments archived under one backup key."""

    key_id: str
    passphrase: str = field(repr=False)


def object_key(settings: Settings, key_id: str) -> str:
    """``<prefix>/wal-key/<key id>``: beside ``wal/``, so WAL expiry never lists it and the
    DR sync, which copies the whole prefix, carries it with the segments."""
    return "/".join([settings.prefix.strip("/"), KEY_DIR, key_id])


def mac_name(key_id: str) -> str:
    """The name the MAC binds: a segment's MAC never verifies as a WAL key's, and back."""
    return f"{KEY_DIR}/{key_id}"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class WalKeys:
    """The WAL keys of one archive, opened or created once and then kept in memory."""

    def __init__(self, settings: Settings, store: Repository) -> None:
        self.settings = settings
        self.store = store
        self._keys: dict[str, WalKey] = {}
        self._lock = threading.Lock()

    def for_key(self, signing: authentication.SigningKey, *, create: bool = False) -> WalKey:
        """The WAL key of ``signing``; created (once, by conditional PUT) when ``create``."""
        with self._lock:
            cached = self._keys.get(signing.key_id)
            if cached is None:
                cached = self._open(signing)
                if cached is None and create:
                    cached = self._create(signing)
                if cached is None:
                    where = self.store.url(object_key(self.settings, signing.key_id))
                    raise WalKeyError(
                        f"the WAL key {mac_name(signing.key_id)} of backup key id "
                        f"{signing.key_id} is missing from {where}: the segments archived "
                        "under it cannot be decrypted"
                    )
                self._keys[signing.key_id] = cached
            return cached

    def _open(self, signing: authentication.SigningKey) -> WalKey | None:
        key = object_key(self.settings, signing.key_id)
        found = self.store.get(key)
        if found is None:
            return None
        cipher, meta = found
        where = self.store.url(key)
        name = mac_name(signing.key_id)
        try:
            if meta.get("encoding") != ENCODING or _sha256(cipher) != meta.get("object-sha256"):
                raise NotAuthentic(f"{name} fails its sha256 or names no {ENCODING} encoding")
            authentication.verify_object_mac(
                authentication.Keyring(signing.passphrase),
                name,
                meta.get("plain-sha256", ""),
                int(meta.get("plain-size", -1)),
                meta.get("mac-key-id"),
                meta.get("mac"),
            )
            plain = encryption.decrypt_bytes(signing.passphrase, cipher)
            if _sha256(plain) != meta.get("plain-sha256"):
                raise NotAuthentic(f"{name} decrypts to other content than its MAC covers")
        except (NotAuthentic, encryption.DecryptionFailed) as exc:
            raise WalKeyError(f"WAL key {where} refused: {exc}") from exc
        return WalKey(key_id=signing.key_id, passphrase=plain.decode("ascii"))

    def _create(self, signing: authentication.SigningKey) -> WalKey | None:
        secret = secrets.token_hex(SECRET_BYTES).encode("ascii")
        params = encryption.GpgParams.from_settings(self.settings, compress_algo="none")
        gpg = encryption.start_encrypt(signing.passphrase, params)
        cipher, err = gpg.communicate(secret)
        if gpg.returncode != 0:
            raise WalKeyError(f"gpg --symmetric of the WAL key failed: {err.decode()[-300:]}")
        sha = _sha256(secret)
        stored = self.store.put_new(
            object_key(self.settings, signing.key_id),
            cipher,
            storage_class=None,
            metadata={
                "encoding": ENCODING,
                "plain-sha256": sha,
                "plain-size": str(len(secret)),
                "object-sha256": _sha256(cipher),
                "mac-key-id": signing.key_id,
                "mac": authentication.object_mac(
                    signing, mac_name(signing.key_id), sha, len(secret)
                ),
            },
        )
        if not stored:  # another archiver created it first: use theirs
            return self._open(signing)
        return WalKey(key_id=signing.key_id, passphrase=secret.decode("ascii"))
