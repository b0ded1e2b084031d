"""gpg is trusted only for what its status says: a symmetric-encrypted, intact message.

Real ``gpg`` throughout. The forged inputs are what an attacker with write access to the
bucket can make without the passphrase: an unencrypted OpenPGP message (``gpg --store``,
which ``gpg --decrypt`` accepts with exit 0), and a real ciphertext with a flipped byte.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from wedefi_dr.errors import NotAuthentic
from wedefi_dr.storage import encryption
from wedefi_dr.storage.encryption import GpgParams

PASSPHRASE = "correct horse battery staple"
PLAINTEXT = b"PGDMP" + bytes(range(256)) * 512


def _encrypt(path: Path) -> Path:
    gpg = encryption.start_encrypt(PASSPHRASE, GpgParams())
    cipher, _ = gpg.communicate(PLAINTEXT)
    assert gpg.returncode == 0
    path.write_bytes(cipher)
    return path


def _decrypt(path: Path) -> tuple[encryption.Decryption, bytes]:
    gpg = encryption.start_decrypt(PASSPHRASE, path)
    out, _ = gpg.communicate()
    return gpg, out


def test_our_ciphertext_is_encrypted_and_authentic(tmp_path: Path) -> None:
    gpg, out = _decrypt(_encrypt(tmp_path / "good.gpg"))
    assert gpg.returncode == 0 and out == PLAINTEXT
    gpg.require_encrypted()
    gpg.require_authentic()


def test_unencrypted_openpgp_message_is_refused(tmp_path: Path) -> None:
    (tmp_path / "plain").write_bytes(PLAINTEXT)
    stored = tmp_path / "stored.gpg"
    subprocess.run(
        [
            "gpg",
            "--batch",
            "--homedir",
            str(tmp_path),
            "--store",
            "--output",
            str(stored),
            str(tmp_path / "plain"),
        ],
        check=True,
        capture_output=True,
    )
    gpg, out = _decrypt(stored)
    assert gpg.returncode == 0 and out == PLAINTEXT  # what exit status alone would accept
    with pytest.raises(NotAuthentic, match="not a symmetric-encrypted message"):
        gpg.require_encrypted()
    with pytest.raises(NotAuthentic, match="BEGIN_DECRYPTION"):
        gpg.require_authentic()


def test_modified_ciphertext_is_refused(tmp_path: Path) -> None:
    path = _encrypt(tmp_path / "good.gpg")
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01
    path.write_bytes(bytes(data))
    gpg, _ = _decrypt(path)
    assert gpg.returncode != 0
    with pytest.raises(NotAuthentic, match="modified"):
        gpg.require_authentic()


def test_stored_object_parameters_are_the_plans(tmp_path: Path) -> None:
    """The object's real OpenPGP packets, not the manifest's description of them."""
    path = _encrypt(tmp_path / "good.gpg")
    packets = subprocess.run(
        [
            "gpg",
            "--batch",
            "--homedir",
            str(tmp_path),
            "--list-packets",
            "--pinentry-mode",
            "loopback",
            "--passphrase",
            PASSPHRASE,
            str(path),
        ],
        capture_output=True,
        text=True,
    ).stdout
    # cipher 9 = AES256, s2k 3 = iterated and salted, hash 10 = SHA512 (RFC 4880 ids)
    assert re.search(r"symkey enc packet: version 4, cipher 9, aead 0,\s*s2k 3, hash 10", packets)
    assert re.search(r"count 16777216\b", packets)
    assert "encrypted data packet" in packets and "mdc_method: 2" in packets
    assert "compressed packet" not in packets
