"""The decrypted archive of a logical backup: opened, and judged before anything commits.

Both restore paths read the plaintext the same way: gpg with the current passphrase or
one rotated out, the stream refused unless it is a symmetric-encrypted message holding a
pg_dump custom archive, and at its end gpg's integrity check and the manifest's sha256 and
size, which decide whether a restore may commit (or a new database take the target's
name).
"""

from __future__ import annotations

from pathlib import Path

from wedefi_dr.catalog.manifest import BackupManifest
from wedefi_dr.config import Settings
from wedefi_dr.errors import DecryptionFailed, NotAuthentic, WrongPassphrase
from wedefi_dr.storage import authentication, encryption
from wedefi_dr.storage.pipeline import widen_pipe
from wedefi_dr.storage.repository import READ_CHUNK

PGDMP_MAGIC = b"PGDMP"


def _read_full(stream, n: int) -> bytes:
    parts, got = [], 0
    while got < n:
        chunk = stream.read(n - got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def _start(settings: Settings, ciphertext: Path) -> tuple[encryption.Decryption, bytes]:
    """gpg decrypting ``ciphertext`` and the first block of plaintext, with the current
    passphrase or, for a backup taken before a rotation, one rotated out
    (WEDEFI_DR_GPG_PREVIOUS_PASSPHRASES); WrongPassphrase when none opens it."""
    error: DecryptionFailed | None = None
    for passphrase in authentication.keyring_of(settings).passphrases:
        gpg = encryption.start_decrypt(passphrase, ciphertext)
        first = _read_full(gpg.stdout, READ_CHUNK)
        if first:
            return gpg, first
        gpg.wait()
        error = encryption.decrypt_error(gpg.returncode, gpg.stderr.read())
        if not isinstance(error, WrongPassphrase):
            break
    assert error is not None
    raise error


def open_archive(settings: Settings, ciphertext: Path) -> tuple[encryption.Decryption, bytes]:
    """gpg decrypting ``ciphertext``, and the first block of plaintext, refused (before any
    tool or server sees a byte) unless gpg reads a symmetric-encrypted message and the
    plaintext starts as a pg_dump custom archive does."""
    gpg, first = _start(settings, ciphertext)
    widen_pipe(gpg.stdout)
    gpg.require_encrypted()
    if not first.startswith(PGDMP_MAGIC):
        gpg.kill()
        raise DecryptionFailed("decrypted data is not a pg_dump custom archive (no PGDMP header)")
    return gpg, first


def problem(gpg: encryption.Decryption, manifest: BackupManifest, sha256: str, size: int) -> str:
    """Why the decrypted stream must not be committed ('' when it may be)."""
    if gpg.wait() != 0:
        return str(encryption.decrypt_error(gpg.returncode, gpg.stderr.read()))
    if not _authentic(gpg):
        return "gpg did not confirm an intact encrypted message (DECRYPTION_OKAY, GOODMDC)"
    if sha256 != manifest.plaintext.sha256 or size != manifest.plaintext.size_bytes:
        return (
            f"decrypted stream sha256 {sha256} ({size} bytes) does not match the "
            f"manifest's {manifest.plaintext.sha256} ({manifest.plaintext.size_bytes} bytes)"
        )
    return ""


def _authentic(gpg: encryption.Decryption) -> bool:
    try:
        gpg.require_authentic()
    except NotAuthentic:
        return False
    return True
