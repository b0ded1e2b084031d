"""Compressed base backups: restorable by hand with stock tools, and checked as before.

A real base backup of the session primary (``pg_basebackup`` → zstd or lz4 → gpg → S3),
then the break-glass path the README gives: ``gpg -d | zstd -d | tar -x`` (or ``lz4 -d``)
with nothing of this project, and ``pg_verifybackup`` on the directory it yields.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import uuid
from pathlib import Path

import pytest

from wedefi_dr.catalog.manifest import new_backup_id
from wedefi_dr.config import Settings
from wedefi_dr.physical import basebackup
from wedefi_dr.postgres.tools import tool
from wedefi_dr.storage.s3 import ObjectStore

GPG_D = "gpg --batch --quiet --pinentry-mode loopback --passphrase-fd 3 -d {obj}"
UNPACK = {"zstd": "zstd -d", "lz4": "lz4 -d"}


def by_hand(pipeline: str, passphrase: str, gnupg: Path) -> subprocess.CompletedProcess:
    """One shell pipeline of stock tools, the passphrase on fd 3 (never in argv or env)."""
    read_fd, write_fd = os.pipe()
    os.write(write_fd, passphrase.encode() + b"\n")
    os.close(write_fd)
    try:
        return subprocess.run(
            ["bash", "-o", "pipefail", "-c", f"exec 3<&{read_fd}; {pipeline}"],
            capture_output=True,
            pass_fds=(read_fd,),
            env={**os.environ, "GNUPGHOME": str(gnupg)},
            timeout=300,
        )
    finally:
        os.close(read_fd)


@pytest.mark.parametrize("compression", ["zstd"])
def test_by_hand_restore_of_a_compressed_base_backup_passes_pg_verifybackup(
    settings: Settings, store: ObjectStore, tmp_path: Path, compression: str
):
    chosen = settings.model_copy(
        update={"base_backup_compression": compression, "prefix": f"test-bb-{uuid.uuid4().hex[:8]}"}
    )
    manifest = basebackup.stream(chosen, "test", new_backup_id())  # no manifest: not catalogued
    gnupg = tmp_path / "gnupg"
    gnupg.mkdir(mode=0o700)
    passphrase = settings.gpg_passphrase.get_secret_value()
    try:
        assert manifest.compression.startswith(compression)
        assert manifest.object.key.endswith(basebackup.DATA_NAMES[compression])
        obj = tmp_path / Path(manifest.object.key).name
        store.client.download_file(store.bucket, manifest.object.key, str(obj))
        assert hashlib.sha256(obj.read_bytes()).hexdigest() == manifest.object.sha256
        dest = tmp_path / "data"
        dest.mkdir(mode=0o700)
        head = GPG_D.format(obj=obj) + " | " + UNPACK[compression]
        extracted = by_hand(f"{head} | tar -x -C {dest}", passphrase, gnupg)
        assert extracted.returncode == 0, extracted.stderr.decode()
        summed = by_hand(f"{head} | sha256sum", passphrase, gnupg)
        assert summed.stdout.split()[0].decode() == manifest.plaintext_sha256
        assert (dest / "PG_VERSION").exists() and (dest / "backup_manifest").exists()
        verified = subprocess.run(
            [tool("pg_verifybackup"), str(dest)], capture_output=True, text=True, timeout=300
        )
        assert verified.returncode == 0, verified.stdout + verified.stderr
        (dest / "global" / "pg_control").write_bytes(b"damaged")  # the check can fail
        damaged = subprocess.run(
            [tool("pg_verifybackup"), str(dest)], capture_output=True, text=True, timeout=300
        )
        assert damaged.returncode != 0
    finally:
        subprocess.run(["gpgconf", "--homedir", str(gnupg), "--kill", "gpg-agent"], check=False)
        store.delete(manifest.object.key)


# Where each frame format says it carries a checksum of its content: zstd's frame header
# descriptor (the byte after the magic), bit 2; lz4's FLG byte, bit 2.
FRAME_MAGIC = {"zstd": bytes.fromhex("28b52ffd"), "lz4": bytes.fromhex("04224d18")}


@pytest.mark.parametrize("compression", ["zstd", "lz4"])
def test_staging_relies_on_frame_checksums_that_are_there_and_checked(
    settings: Settings, store: ObjectStore, tmp_path: Path, compression: str
):
    """The staging does not hash the tar again (the object's sha256 and gpg's MDC prove the
    compressed stream): what proves the decompression is the frame's content checksum, so
    the stream must carry it, and a stream whose content does not match it is refused."""
    from wedefi_dr.physical.pitr import recovery
    from wedefi_dr.physical.pitr.verify import BaseBackupRefused
    from wedefi_dr.storage import encryption

    chosen = settings.model_copy(
        update={"base_backup_compression": compression, "prefix": f"test-ck-{uuid.uuid4().hex[:8]}"}
    )
    manifest = basebackup.take(chosen, "test")
    chosen_store = ObjectStore(chosen)
    passphrase = settings.gpg_passphrase.get_secret_value()
    try:
        cipher = tmp_path / "object.gpg"
        recovery.download_cipher(chosen_store, manifest, tmp_path / "spool").rename(cipher)
        packed, _ = encryption.start_decrypt(passphrase, cipher).communicate()
        magic = FRAME_MAGIC[compression]
        assert packed.startswith(magic)
        assert packed[len(magic)] & 0b100, f"{compression} frame without a content checksum"
        if compression == "lz4":  # 64 KiB blocks, linked: what lets lz4 -d stream
            flags, block = packed[len(magic)], packed[len(magic) + 1]
            assert not flags & 0b100000 and (block >> 4) & 0b111 == 4, (flags, block)

        # The same stream with its content checksum wrong (the frame's last 4 bytes), then
        # encrypted again: gpg is satisfied, the decompressor is not.
        forged = packed[:-1] + bytes([packed[-1] ^ 0xFF])
        params = encryption.GpgParams.from_settings(settings, compress_algo="none")
        reencrypted, _ = encryption.start_encrypt(passphrase, params).communicate(forged)
        cipher.write_bytes(reencrypted)
        dest = tmp_path / "data"
        dest.mkdir()
        sink = recovery._TarSink(dest, "root")
        with pytest.raises(BaseBackupRefused, match=f"{compression} of the decrypted stream"):
            recovery.stream_plaintext(chosen, chosen_store, manifest, cipher, sink, "forged")

        cipher.write_bytes(encryption.start_encrypt(passphrase, params).communicate(packed)[0])
        clean = tmp_path / "clean"
        clean.mkdir()
        sink = recovery._TarSink(clean, "root")
        recovery.stream_plaintext(chosen, chosen_store, manifest, cipher, sink, "intact")
        assert (clean / "PG_VERSION").exists()
    finally:
        for obj in list(chosen_store.list_keys(chosen.prefix)):
            chosen_store.delete(obj["Key"])
