"""Client-side encryption with stock ``gpg``, as a streaming subprocess.

Why gpg and not a Python cipher: the break-glass path. Every object this project stores
decrypts by hand with ``gpg --decrypt`` and the passphrase, with no Python installed.

The passphrase reaches gpg through an inherited pipe (``--passphrase-fd``), never on the
command line or in the environment: gpg (and the gpg-agent it starts) gets a minimal
environment of its own, not ours, so no other secret of this process (cloud keys, database
passwords) reaches it either. ``--no-symkey-cache`` keeps gpg-agent from remembering the
passphrase, so a later decryption with a wrong passphrase really fails. gpg's home is a
folder this product owns (``~/.wedefi-dr/gnupg``, 0700, checked), never a predictable name
in a shared ``/tmp`` that another user could create first with a ``gpg.conf`` of theirs.

gpg's exit status alone proves nothing about where a message came from: ``gpg --decrypt``
exits 0 on an *unencrypted* OpenPGP message (``gpg --store``) whatever the passphrase. So a
decryption reads gpg's machine-readable status (``--status-fd``) and accepts a message only
when it was symmetric-encrypted (``NEED_PASSPHRASE_SYM`` then ``BEGIN_DECRYPTION``, with an
integrity-protection method in ``DECRYPTION_INFO``) and decrypted whole and unmodified
(``DECRYPTION_OKAY`` and ``GOODMDC``).
"""

from __future__ import annotations

import os
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

from wedefi_dr.errors import DecryptionFailed, InvalidInput, NotAuthentic, WrongPassphrase
from wedefi_dr.storage.secretfiles import owned_private_dir, product_home

if TYPE_CHECKING:  # no runtime import: wal-push keeps its import chain short
    from wedefi_dr.config import Settings


@dataclass(frozen=True)
class GpgParams:
    """AES256, S2K mode 3 (iterated+salted), SHA512 as the plan says; a count of 2**24 (the
    plan's 65536 is cheap to brute-force for a human passphrase: 256 times the work per guess,
    about 0.1 s per gpg run)."""

    cipher: str = "AES256"
    s2k_mode: int = 3
    s2k_digest: str = "SHA512"
    s2k_count: int = 16777216
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


def gnupg_home() -> str:
    """A private gpg home so runs never touch (or depend on) a user's keyring or agent:
    ``~/.wedefi-dr/gnupg``, created 0700 or refused when it is not this user's alone."""
    return str(owned_private_dir(product_home() / "gnupg"))


def gpg_env() -> dict[str, str]:
    """gpg's whole environment: where programs are and a fixed locale (its messages are
    parsed), nothing else of ours."""
    return {"PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"), "LC_ALL": "C"}


def _base_cmd(passphrase_fd: int) -> list[str]:
    return [
        "gpg",
        "--batch",
        "--no-tty",
        "--quiet",
        "--yes",
        "--homedir",
        gnupg_home(),
        "--pinentry-mode",
        "loopback",
        "--no-symkey-cache",
        "--passphrase-fd",
        str(passphrase_fd),
    ]


def check_passphrase(passphrase: str) -> str:
    """The passphrase, or InvalidInput when gpg could not receive it whole.

    gpg reads ``--passphrase-fd`` up to the first line break: a passphrase with a newline
    (say, a trailing one read from a file) would silently encrypt with its first line only,
    while the metadata key is derived from all of it. Refused instead, naming the fix.
    """
    if not passphrase:
        raise InvalidInput("the GPG passphrase is empty (WEDEFI_DR_GPG_PASSPHRASE)")
    if any(c in passphrase for c in "\r\n\0"):
        raise InvalidInput(
            "the GPG passphrase contains a line break or NUL (often a trailing newline read "
            "from a file): gpg would use only its first line; set WEDEFI_DR_GPG_PASSPHRASE "
            "without it"
        )
    return passphrase


def _passphrase_pipe(passphrase: str) -> int:
    check_passphrase(passphrase)
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
            env=gpg_env(),
        )
    finally:
        os.close(fd)


class Decryption(subprocess.Popen):
    """A running ``gpg --decrypt`` whose status lines are collected as they come.

    Callers check twice: :meth:`require_encrypted` as soon as plaintext starts flowing
    (before any of it reaches a database or a data directory), and :meth:`require_authentic`
    once gpg has exited (before the consumer is allowed to finish: the integrity check of an
    OpenPGP message comes at its very end).
    """

    def __init__(self, cmd: list[str], status_fd: int, **kwargs: object) -> None:
        super().__init__(cmd, **kwargs)
        self.status: list[str] = []
        self._plaintext_started = threading.Event()
        self._reader = threading.Thread(
            target=self._read_status, args=(os.fdopen(status_fd, "rb"),), daemon=True
        )
        self._reader.start()

    def _read_status(self, stream: IO[bytes]) -> None:
        with stream:
            for raw in stream:
                line = raw.decode(errors="replace").strip()
                if line.startswith("[GNUPG:] "):
                    self.status.append(line[len("[GNUPG:] ") :])
                    if line.startswith("[GNUPG:] PLAINTEXT "):
                        self._plaintext_started.set()
        self._plaintext_started.set()

    def _keywords(self) -> list[str]:
        return [line.split(" ", 1)[0] for line in self.status]

    def require_encrypted(self, timeout: float = 30.0) -> None:
        """NotAuthentic unless the message is symmetric-encrypted with integrity protection."""
        self._plaintext_started.wait(timeout)
        words = self._keywords()
        if "PLAINTEXT" in words:
            before = words[: words.index("PLAINTEXT")]
            info = next((s for s in self.status if s.startswith("DECRYPTION_INFO ")), "")
            mdc_method = info.split()[1] if len(info.split()) > 1 else "0"
            if "NEED_PASSPHRASE_SYM" in before and "BEGIN_DECRYPTION" in before:
                if mdc_method == "0":
                    self.kill()
                    raise NotAuthentic(
                        "the message is encrypted without integrity protection (no MDC): "
                        "this system never writes such objects; refusing it"
                    )
                if "ENC_TO" not in before:
                    return
            self.kill()
            raise NotAuthentic(
                "the object is not a symmetric-encrypted message this system wrote (gpg status: "
                + ", ".join(before + ["PLAINTEXT"])
                + "): refusing it before any byte is used"
            )

    def require_authentic(self, timeout: float = 30.0) -> None:
        """After gpg exited: NotAuthentic unless it reported DECRYPTION_OKAY and GOODMDC."""
        self._reader.join(timeout)
        words = self._keywords()
        if "BADMDC" in words:
            raise NotAuthentic("the encrypted message has been modified (gpg: BADMDC)")
        missing = [w for w in ("BEGIN_DECRYPTION", "DECRYPTION_OKAY", "GOODMDC") if w not in words]
        if missing or "DECRYPTION_FAILED" in words:
            raise NotAuthentic(
                "gpg did not confirm an intact symmetric-encrypted message (missing "
                + ", ".join(missing or ["DECRYPTION_FAILED seen"])
                + ")"
            )


def start_decrypt(
    passphrase: str,
    source: Path | str,
    stdout: int | IO[bytes] = subprocess.PIPE,
    *,
    stdin: int | IO[bytes] = subprocess.DEVNULL,
) -> Decryption:
    """``gpg --decrypt`` of a ciphertext file (``"-"`` with ``stdin``: a pipe), plaintext on
    ``stdout``, status collected."""
    fd = _passphrase_pipe(passphrase)
    status_read, status_write = os.pipe()
    try:
        return Decryption(
            _base_cmd(fd)
            + ["--status-fd", str(status_write), "--decrypt", "--output", "-"]
            + ["--", str(source)],  # a path is never read as an option
            status_read,
            stdin=stdin,
            stdout=stdout,
            stderr=subprocess.PIPE,
            pass_fds=(fd, status_write),
            env=gpg_env(),
        )
    except BaseException:
        os.close(status_read)
        raise
    finally:
        os.close(fd)
        os.close(status_write)


def decrypt_bytes(passphrase: str, cipher: bytes) -> bytes:
    """The plaintext of a small in-memory message, through pipes (nothing written to disk),
    accepted only as an intact symmetric-encrypted message; DecryptionFailed (or
    WrongPassphrase) and NotAuthentic otherwise."""
    gpg = start_decrypt(passphrase, "-", stdin=subprocess.PIPE)
    plain, err = gpg.communicate(cipher)
    if gpg.returncode != 0:
        raise decrypt_error(gpg.returncode, err)
    gpg.require_encrypted()
    gpg.require_authentic()
    return plain


def decrypt_error(returncode: int, stderr: bytes) -> DecryptionFailed:
    """Turn gpg's exit into the specific error (wrong passphrase vs damaged data)."""
    text = stderr.decode(errors="replace").strip()
    if "bad session key" in text.lower() or "bad passphrase" in text.lower():
        return WrongPassphrase(
            "decryption failed: wrong passphrase (gpg: bad session key); "
            "check WEDEFI_DR_GPG_PASSPHRASE against the key used for this backup"
        )
    return DecryptionFailed(f"gpg --decrypt failed (exit {returncode}): {text[-500:]}")
