"""The shared streaming pipeline, on its own: real producers, real gpg, moto over HTTP.

A producer that dies mid-stream must fail the backup by name, with its stderr, and leave
nothing behind: no object at the key, no multipart upload open (invariant 2).
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import os
import subprocess
import uuid
from pathlib import Path

import pytest

from wedefi_dr.config import Settings
from wedefi_dr.errors import BackupFailed
from wedefi_dr.physical.basebackup import (
    TAR_READ_BYTES,
    TarGzip,
    compressor_argv,
    decompressor_argv,
)
from wedefi_dr.storage import encryption
from wedefi_dr.storage.pipeline import PIPE_BYTES, EncryptedUpload, Producer, widen_pipe
from wedefi_dr.storage.s3 import ObjectStore

# Over one 5 MiB part (the session's chunk size), so a multipart upload is under way
# when the producer dies.
MID_STREAM = 7 * 1024 * 1024


def _pipeline(settings: Settings, argv: list[str], **kwargs) -> EncryptedUpload:
    return EncryptedUpload(
        producer=Producer("producer", argv),
        passphrase=settings.gpg_passphrase.get_secret_value(),
        gpg=encryption.GpgParams.from_settings(settings),
        **kwargs,
    )


def _open_uploads(store: ObjectStore, key: str) -> list[dict]:
    return store.client.list_multipart_uploads(Bucket=store.bucket, Prefix=key).get("Uploads", [])


def test_a_producer_dying_mid_stream_fails_by_name_and_leaves_nothing(
    settings: Settings, store: ObjectStore
):
    key = store.key("pipeline-test", uuid.uuid4().hex, "data.gpg")
    dying = f"head -c {MID_STREAM} /dev/urandom; echo 'disk on fire' >&2; exit 3"
    with pytest.raises(BackupFailed, match=r"producer failed \(exit 3\): disk on fire"):
        _pipeline(settings, ["sh", "-c", dying]).run(store, key)
    assert store.head(key) is None
    assert _open_uploads(store, key) == []


def test_a_job_alongside_that_fails_fails_the_backup(settings: Settings, store: ObjectStore):
    key = store.key("pipeline-test", uuid.uuid4().hex, "data.gpg")

    def fingerprints() -> None:
        raise RuntimeError("snapshot connection lost")

    with pytest.raises(BackupFailed, match="fingerprints failed: snapshot connection lost"):
        _pipeline(
            settings,
            ["head", "-c", str(MID_STREAM), "/dev/urandom"],
            alongside={"fingerprints": fingerprints},
        ).run(store, key)
    assert store.head(key) is None
    assert _open_uploads(store, key) == []


def _decrypt(settings: Settings, body: bytes, home: Path) -> bytes:
    """Stock gpg, as the break-glass path uses it (no Python)."""
    passphrase = home / "passphrase"
    passphrase.write_text(settings.gpg_passphrase.get_secret_value())
    return subprocess.run(
        ["gpg", "--batch", "--quiet", "--pinentry-mode", "loopback", "--homedir", str(home)]
        + ["--passphrase-file", str(passphrase), "--decrypt"],
        input=body,
        capture_output=True,
        check=True,
    ).stdout


def test_a_good_stream_is_stored_encrypted_with_both_checksums(
    settings: Settings, store: ObjectStore, tmp_path
):
    key = store.key("pipeline-test", uuid.uuid4().hex, "data.gpg")
    plaintext = tmp_path / "plain"
    plaintext.write_bytes(b"wedefi " * 1_000_000)
    streamed = _pipeline(settings, ["cat", str(plaintext)]).run(store, key)

    body = store.client.get_object(Bucket=store.bucket, Key=key)["Body"].read()
    assert streamed.stored_size == len(body)
    assert streamed.stored_sha256 == hashlib.sha256(body).hexdigest()
    assert streamed.plaintext_size == plaintext.stat().st_size
    assert streamed.plaintext_sha256 == hashlib.sha256(plaintext.read_bytes()).hexdigest()
    assert _decrypt(settings, body, tmp_path) == plaintext.read_bytes()
    store.delete(key)


def _tar_of(folder: Path) -> list[str]:
    return ["tar", "-cf", "-", "-C", str(folder), "."]


def test_the_base_backup_transform_gzips_the_tar_and_keeps_its_label(
    settings: Settings, store: ObjectStore, tmp_path
):
    data = tmp_path / "data"
    data.mkdir()
    (data / "backup_label").write_text("START WAL LOCATION: 0/2000028\n")
    (data / "backup_manifest").write_text('{"WAL-Ranges": []}')
    (data / "base").write_bytes(b"page" * 100_000)
    key = store.key("pipeline-test", uuid.uuid4().hex, "base.tar.gz.gpg")
    tar = TarGzip(level=1)
    streamed = _pipeline(settings, _tar_of(data), transform=tar).run(store, key)

    assert tar.found["backup_label"] == b"START WAL LOCATION: 0/2000028\n"
    tar_bytes = subprocess.run(_tar_of(data), capture_output=True, check=True).stdout
    assert streamed.plaintext_sha256 == hashlib.sha256(tar_bytes).hexdigest()
    body = store.client.get_object(Bucket=store.bucket, Key=key)["Body"].read()
    assert gzip.decompress(_decrypt(settings, body, tmp_path)) == tar_bytes
    store.delete(key)


def test_a_tar_without_backup_label_is_not_stored(settings: Settings, store: ObjectStore, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "base").write_bytes(b"page" * 100_000)
    key = store.key("pipeline-test", uuid.uuid4().hex, "base.tar.gz.gpg")
    with pytest.raises(BackupFailed, match=r"lacks \['backup_label', 'backup_manifest'\]"):
        _pipeline(settings, _tar_of(data), transform=TarGzip(level=1)).run(store, key)
    assert store.head(key) is None
    assert _open_uploads(store, key) == []


def test_the_zstd_transform_keeps_a_manifest_larger_than_its_tar_reads(
    settings: Settings, store: ObjectStore, tmp_path
):
    """A big cluster's backup_manifest spans many of tarfile's reads, among small members."""
    data = tmp_path / "data"
    (data / "global").mkdir(parents=True)
    for i in range(300):
        (data / "global" / f"{i}").write_bytes(bytes([i % 251]) * (i * 37 % 9000))
    manifest = b'{"Files": [' + b",".join(b'{"Path": "f%d"}' % i for i in range(20_000)) + b"]}"
    assert len(manifest) > 4 * TAR_READ_BYTES
    (data / "backup_manifest").write_bytes(manifest)
    (data / "backup_label").write_text("START WAL LOCATION: 0/2000028\n")
    key = store.key("pipeline-test", uuid.uuid4().hex, "base.tar.zst.gpg")
    tar = TarGzip(level=1, compressor=compressor_argv("zstd", 1))
    streamed = _pipeline(settings, _tar_of(data), transform=tar).run(store, key)

    assert tar.found["backup_manifest"] == manifest
    tar_bytes = subprocess.run(_tar_of(data), capture_output=True, check=True).stdout
    assert streamed.plaintext_sha256 == hashlib.sha256(tar_bytes).hexdigest()
    body = store.client.get_object(Bucket=store.bucket, Key=key)["Body"].read()
    unpacked = subprocess.run(
        decompressor_argv("zstd"),
        input=_decrypt(settings, body, tmp_path),
        capture_output=True,
        check=True,
    ).stdout
    assert unpacked == tar_bytes
    store.delete(key)


def test_widen_pipe_gives_the_pipe_a_megabyte_and_ignores_what_is_no_pipe(tmp_path):
    read_end, write_end = os.pipe()
    with os.fdopen(read_end, "rb") as r, os.fdopen(write_end, "wb") as w:
        widen_pipe(w)
        assert fcntl.fcntl(r.fileno(), fcntl.F_GETPIPE_SZ) == PIPE_BYTES
    with (tmp_path / "file").open("wb") as f:
        widen_pipe(f)  # not a pipe: left as it is, no error
    widen_pipe(None)
