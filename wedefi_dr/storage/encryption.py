"""Client-side encryption with stock ``gpg``, as a streaming subprocess.

Why gpg and not a Python cipher: the break-glass path. Every object this project stores
decrypts by hand with ``gpg --decrypt`` and the passphrase, with no Python installed.

The passphrase reaches gpg through an inherited pipe (``--passphrase-fd``), never on the
command line or in the environment; ``--no-symkey-cache`` keeps gpg-agent from
remembering it, so a later decryption with a wrong passphrase really fails.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

from wedefi_dr.errors import DecryptionFailed, InvalidInput, WrongPassphrase

if TYPE_CHECKING:  # no runtime import: wal-push keeps its import chain short
    from wedefi_dr.config import Settings


@dataclass(frozen=True)
class GpgParams:
    """The plan's parameters: AES256, S2K mode 3 (iterated+salted), SHA512, count 65536."""

    cipher: str = "AES256"
    s2k_mode: int = 3
    s2k_digest: str = "SHA512"
    s2k_count: int = 65536
    compress_algo: str = "none"

    @classmethod
    def from_settings(cls, settings: Settings, compress_algo: str | None = None) -> GpgParams:
        """The configured parameters; ``compress_algo`` overrides for already-compressed input."""
        return cls(
            cipher=settings.gpg_cipher,
            s2k_digest=settings.gpg_s2k_digest,
            s2k_count=settings.gpg_s2k_count,
            compress_algo=compress_algo or settings.gpg_compress_algo,
        )

    def symmetric_args(self) -> list[str]:
        """``gpg`` arguments after the common ones: encrypt stdin to stdout with these."""
        return [
            "--symmetric",
            "--cipher-algo",
            self.cipher,
            "--s2k-mode",
            str(self.s2k_mode),
            "--s2k-digest-algo",
            self.s2k_digest,
            "--s2k-count",
            str(self.s2k_count),
            "--compress-algo",
            self.compress_algo,
            "--output",
            "-",
        ]

    def describe(self) -> dict[str, object]:
        return {
            "tool": "gpg",
            "cipher": self.cipher,
            "s2k_mode": self.s2k_mode,
            "s2k_digest": self.s2k_digest,
            "s2k_count": self.s2k_count,
            "compress_algo": self.compress_algo,
        }


def _gnupg_home() -> str:
    """A private GNUPGHOME so runs never touch (or depend on) a user's keyring or agent."""
    home = Path(tempfile.gettempdir()) / f"wedefi-dr-gnupg-{os.geteuid()}"
    home.mkdir(mode=0o700, exist_ok=True)
    home.chmod(0o700)
    return str(home)


def _base_cmd(passphrase_fd: int) -> list[str]:
    return [
        "gpg",
        "--batch",
        "--no-tty",
        "--quiet",
        "--yes",
        "--homedir",
        _gnupg_home(),
        "--pinentry-mode",
        "loopback",
        "--no-symkey-cache",
        "--passphrase-fd",
        str(passphrase_fd),
    ]


def _passphrase_pipe(passphrase: str) -> int:
    if not passphrase:
        raise InvalidInput("the GPG passphrase is empty (WEDEFI_DR_GPG_PASSPHRASE)")
    read_fd, write_fd = os.pipe()
    os.write(write_fd, passphrase.encode() + b"\n")
    os.close(write_fd)
    return read_fd


def start_encrypt(
    passphrase: str, params: GpgParams, stdout: int | IO[bytes] = subprocess.PIPE
) -> subprocess.Popen[bytes]:
    """``gpg --symmetric`` reading plaintext on stdin, writing ciphertext to ``stdout``."""
    fd = _passphrase_pipe(passphrase)
    try:
        return subprocess.Popen(
            _base_cmd(fd) + params.symmetric_args(),
            stdin=subprocess.PIPE,
            stdout=stdout,
            stderr=subprocess.PIPE,
            pass_fds=(fd,),
        )
    finally:
        os.close(fd)


def start_decrypt(
    passphrase: str, source: Path | str, stdout: int | IO[bytes] = subprocess.PIPE
) -> subprocess.Popen[bytes]:
    """``gpg --decrypt`` of a ciphertext file, plaintext on ``stdout``."""
    fd = _passphrase_pipe(passphrase)
    try:
        return subprocess.Popen(
            _base_cmd(fd) + ["--decrypt", "--output", "-", str(source)],
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.PIPE,
            pass_fds=(fd,),
        )
    finally:
        os.close(fd)


def decrypt_error(returncode: int, stderr: bytes) -> DecryptionFailed:
    """Turn gpg's exit into the specific error (wrong passphrase vs damaged data)."""
    text = stderr.decode(errors="replace").strip()
    if "bad session key" in text.lower() or "bad passphrase" in text.lower():
        return WrongPassphrase(
            "decryption failed: wrong passphrase (gpg: bad session key); "
            "check WEDEFI_DR_GPG_PASSPHRASE against the key used for this backup"
        )
    return DecryptionFailed(f"gpg --decrypt failed (exit {returncode}): {text[-500:]}")
