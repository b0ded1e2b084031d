"""``wedefi-dr verify``: the whole repository checked in place, primary and DR, nothing restored.

Every backup whose manifest exists must be authentic (its MAC verifies), its object present
at its size and hashing to its recorded sha256; every WAL object must carry an authentic
MAC and hash to its ``object-sha256``; and the WAL from each base backup's start segment
must run without a gap to the newest segment present, following timelines whose
``.history`` is archived. The report says which backups are restorable to which points,
and names every problem by key. ``deep`` also decrypts every object end to end (gpg's
integrity check, the plaintext's sha256), as a restore would, without writing it anywhere.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import zlib
from pathlib import Path
from typing import Any

from wedefi_dr.catalog import listing
from wedefi_dr.catalog.manifest import BackupManifest
from wedefi_dr.config import Settings
from wedefi_dr.errors import DRError, IntegrityError, NotAuthentic
from wedefi_dr.physical import basebackup, wal
from wedefi_dr.physical.walnames import (
    int_to_lsn,
    lsn_to_int,
    segment_end_lsn,
    segment_file,
    segment_number,
)
from wedefi_dr.storage import authentication, encryption, repository
from wedefi_dr.storage.repository import READ_CHUNK, Repository, open_store

log = logging.getLogger(__name__)


def _hash(store: Repository, key: str, sink: Any = None) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    for chunk in store.get_body(key).iter_chunks(chunk_size=READ_CHUNK):
        digest.update(chunk)
        size += len(chunk)
        if sink is not None:
            sink.write(chunk)
    return digest.hexdigest(), size


def _decrypted_sha256(settings: Settings, cipher: Path, gunzip: bool) -> str:
    """gpg --decrypt (integrity checked), optionally gunzipped, hashed; nothing kept."""
    proc = encryption.start_decrypt(settings.gpg_passphrase.get_secret_value(), cipher)
    digest = hashlib.sha256()
    z = zlib.decompressobj(31) if gunzip else None
    assert proc.stdout is not None
    proc.require_encrypted()
    for chunk in iter(lambda: proc.stdout.read(READ_CHUNK), b""):
        digest.update(z.decompress(chunk) if z else chunk)
    if z:
        digest.update(z.flush())
    stderr = proc.stderr.read() if proc.stderr else b""
    if proc.wait() != 0:
        raise encryption.decrypt_error(proc.returncode, stderr)
    proc.require_authentic()
    return digest.hexdigest()


class Verifier:
    """One bucket's repository: findings by key, and what each backup can restore to."""

    def __init__(self, settings: Settings, region: str, bucket: str, deep: bool) -> None:
        self.settings = settings.model_copy(update={"bucket": bucket})
        self.region, self.deep = region, deep
        self.store = open_store(self.settings, bucket=bucket)
        self.keyring = authentication.keyring_of(settings)
        self.problems: list[str] = []
        self.objects = 0
        if deep:
            self.settings.spool_path.mkdir(parents=True, exist_ok=True)

    def problem(self, text: str) -> None:
        self.problems.append(text)

    def _manifests(self, kind: str, model: type) -> list[Any]:
        found = []
        for obj in self.store.list_keys(self.store.key(kind) + "/"):
            if not obj["Key"].endswith("/" + listing.MANIFEST_NAME):
                continue
            try:
                m = listing.get_manifest(self.store, obj["Key"], model)
            except (IntegrityError, ValueError) as exc:
                self.problem(f"{obj['Key']}: manifest not authentic ({exc})")
                continue
            if m is not None:
                found.append(m)
        return sorted(found, key=lambda m: m.finished_at)

    def check_object(self, key: str, size: int, sha256: str, plain: str, gunzip: bool) -> bool:
        self.objects += 1
        head = self.store.head(key)
        if head is None:
            self.problem(f"{key}: missing (its manifest exists)")
            return False
        if head["ContentLength"] != size:
            self.problem(f"{key}: {head['ContentLength']} bytes, the manifest says {size}")
            return False
        try:
            if self.deep:
                with tempfile.NamedTemporaryFile(dir=self.settings.spool_path) as spool:
                    got, _ = _hash(self.store, key, spool)
                    spool.flush()
                    if (
                        got == sha256
                        and _decrypted_sha256(self.settings, Path(spool.name), gunzip) != plain
                    ):
                        self.problem(f"{key}: decrypted content does not match its sha256")
                        return False
            else:
                got, _ = _hash(self.store, key)
        except DRError as exc:
            self.problem(f"{key}: {exc}")
            return False
        if got != sha256:
            self.problem(f"{key}: sha256 {got[:12]}… does not match the manifest's {sha256[:12]}…")
            return False
        return True

    def check_wal(self) -> dict[str, dict[int, Any]]:
        """Every WAL object checked; timeline -> segment number -> its LastModified."""
        prefix = wal.archive_prefix(self.settings) + "/"
        timelines: dict[str, dict[int, Any]] = {}
        self.histories: set[str] = set()
        archive = wal.Archive(self.settings) if self.deep else None
        for obj in self.store.list_keys(prefix):
            name = obj["Key"][len(prefix) :]
            self.objects += 1
            if not self._wal_object_ok(name, obj["Key"], archive):
                continue
            if name.endswith(".history"):
                self.histories.add(name[:8])
            elif wal.SEGMENT_RE.match(name):
                seg = segment_number(name, self.settings.wal_segment_bytes)
                timelines.setdefault(name[:8], {})[seg] = obj["LastModified"]
        return timelines

    def _wal_object_ok(self, name: str, key: str, archive: Any) -> bool:
        head = self.store.head(key) or {}
        meta = head.get("Metadata", {})
        try:
            authentication.verify_object_mac(
                self.keyring,
                name,
                meta.get("plain-sha256", ""),
                int(meta.get("plain-size", -1)),
                meta.get(wal.MAC_KEY_ID),
                meta.get(wal.MAC),
                wal.mac_covered_object_sha(meta),
            )
        except NotAuthentic as exc:
            self.problem(f"{key}: WAL object not authentic ({exc})")
            return False
        got, _ = _hash(self.store, key)
        if got != meta.get("object-sha256"):
            self.problem(f"{key}: sha256 does not match its object-sha256: damaged at rest")
            return False
        if archive is not None:
            with tempfile.TemporaryDirectory(dir=self.settings.spool_path) as work:
                try:
                    archive.fetch_bytes(name, Path(work))
                except DRError as exc:
                    self.problem(f"{key}: {exc}")
                    return False
        return True

    def reach(self, base: Any, timelines: dict[str, dict[int, Any]]) -> dict[str, Any]:
        """From the base backup's start segment, as far as the WAL runs without a gap."""
        segment_bytes = self.settings.wal_segment_bytes
        tli = f"{base.timeline:08X}"
        seg = segment_number(base.start_wal_file, segment_bytes)
        stop = lsn_to_int(base.stop_lsn) // segment_bytes

        def name(t: str, s: int) -> str:
            return segment_file(int(t, 16), s, segment_bytes)

        last = None
        while True:
            higher = sorted(t for t in timelines if t > tli and seg in timelines[t])
            if higher and higher[0] in self.histories:
                tli = higher[0]  # the branch: replay follows the newer timeline
            elif higher and seg not in timelines.get(tli, {}):
                self.problem(
                    f"timeline break after {last or base.start_wal_file}: segments of timeline "
                    f"{int(higher[0], 16)} without {higher[0]}.history in the archive"
                )
                break
            if seg not in timelines.get(tli, {}):
                break
            last = (tli, seg)
            seg += 1
        newest = max((max(s) for s in timelines.values() if s), default=None)
        result: dict[str, Any] = {"backup_id": base.backup_id, "kind": "base"}
        if last is None or last[1] < stop:
            result["restorable"] = False
            missing = name(tli, seg)
            self.problem(
                f"base backup {base.backup_id}: WAL {missing} is missing, needed to make the "
                "backup consistent"
            )
            return result
        end = segment_end_lsn(name(*last), segment_bytes)
        result.update(
            restorable=True,
            **{"from": base.finished_at.isoformat(), "to_wal": name(*last)},
            to_lsn=int_to_lsn(end),
            to_time=timelines[last[0]][last[1]].isoformat(),
        )
        if newest is not None and seg <= newest:
            self.problem(
                f"gap in the WAL archive: {name(tli, seg)} is missing, later "
                f"segments exist; base backup {base.backup_id} reaches only {name(*last)}"
            )
        return result

    def run(self) -> dict[str, Any]:
        restorable = []
        for m in self._manifests(listing.KIND, BackupManifest):
            ok = self.check_object(
                m.object.key, m.object.size_bytes, m.object.sha256, m.plaintext.sha256, False
            )
            restorable.append(
                {
                    "backup_id": m.backup_id,
                    "kind": "logical",
                    "restorable": ok,
                    "to_time": m.finished_at.isoformat(),
                }
            )
        bases = self._manifests(basebackup.KIND, basebackup.BaseBackupManifest)
        good_bases = [
            b
            for b in bases
            if self.check_object(
                b.object.key, b.object.size_bytes, b.object.sha256, b.plaintext_sha256, True
            )
        ]
        timelines = self.check_wal()
        restorable += [self.reach(b, timelines) for b in good_bases]
        return {
            "region": self.region,
            "bucket": self.store.bucket,
            "location": self.store.url(self.store.key("")),
            "objects": self.objects,
            "problems": self.problems,
            "restorable": restorable,
        }


def verify(
    settings: Settings, *, deep: bool = False, regions: tuple[str, ...] | None = None
) -> list[dict[str, Any]]:
    """Each region's report (by default every region the repository holds a copy in)."""
    regions = regions or repository.regions(settings)
    unsupported = [r for r in regions if r not in repository.regions(settings)]
    if unsupported:
        repository.require_s3(settings, f"verify --region {unsupported[0]}")
    buckets = {"primary": settings.bucket, "dr": settings.dr_bucket}
    return [Verifier(settings, r, buckets[r], deep).run() for r in regions]
