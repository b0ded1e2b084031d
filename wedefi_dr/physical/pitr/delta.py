"""Delta restore: a base backup into an existing data directory, rewriting only what differs.

pgBackRest's ``--delta`` and Barman's ``--delta-restore`` refresh a cluster from a backup
without rewriting the files that already hold the backup's bytes: a DR replica or a
scratch cluster refreshed from last night's base backup, a PITR retried after a failure.
Here the backup still streams whole through the same checks as a full staging (object
sha256, gpg's status, the decompressor's checksums; :func:`recovery.stream_plaintext`), but
each file of the tar is compared with the file already in place while it streams: equal
bytes are not written; at the first difference the file is rewritten beside the old one
(the equal prefix copied from it, the rest from the stream) and renamed over it. Files the
backup does not hold are removed, and ``pg_verifybackup`` (``verify_staged``) checks the
result against the backup's ``backup_manifest`` before any server may start on it.

The directory is changed in place, so there is no old copy to roll back to: a delta restore
is refused on a production cluster (PITR's swap keeps production's directory aside), on a
running one and on one that holds another database system (``check_target``; the PITR
flow's ``delta`` option asks it before the approval). An interrupted delta restore leaves
a directory that is neither: the error says so, and the next delta restore or a full one
repairs it.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import threading
from pathlib import Path, PurePosixPath
from typing import IO, Any

from wedefi_dr.config import Settings
from wedefi_dr.errors import InvalidInput
from wedefi_dr.physical.basebackup import BaseBackupManifest
from wedefi_dr.physical.pitr import recovery
from wedefi_dr.physical.pitr.verify import BaseBackupRefused, verify_staged
from wedefi_dr.physical.rejoin import controldata
from wedefi_dr.postgres.cluster import ClusterHandle, chown_to
from wedefi_dr.storage.repository import READ_CHUNK, open_store


def _member_path(root: Path, name: str) -> Path:
    """Where a tar member goes; a name that leaves the data directory is refused."""
    parts = PurePosixPath(name).parts
    if PurePosixPath(name).is_absolute() or ".." in parts:
        raise BaseBackupRefused(f"tar member {name!r} leaves the data directory: refused")
    return root.joinpath(*parts)


def _write_if_changed(dest: Path, stream: IO[bytes], size: int, mode: int, os_user: str) -> bool:
    """``dest`` holds the member's bytes afterwards; True when it had to be written."""
    equal = 0
    old = None
    if dest.is_file() and not dest.is_symlink() and dest.stat().st_size == size:
        old = dest.open("rb")
    try:
        if old is not None:
            while chunk := stream.read(READ_CHUNK):
                if old.read(len(chunk)) != chunk:
                    pending = chunk
                    break
                equal += len(chunk)
            else:
                return False
        else:
            pending = b""
        tmp = dest.with_name(f".{dest.name}.delta")
        with tmp.open("wb") as out:
            if old is not None:
                old.seek(0)
                shutil.copyfileobj(_Prefix(old, equal), out, READ_CHUNK)
            out.write(pending)
            shutil.copyfileobj(stream, out, READ_CHUNK)
        tmp.chmod(mode & 0o7777)
        chown_to(tmp, os_user)
        tmp.replace(dest)
        return True
    finally:
        if old is not None:
            old.close()


class _Prefix:
    """The first ``n`` bytes of a file object."""

    def __init__(self, f: IO[bytes], n: int) -> None:
        self.f, self.left = f, n

    def read(self, size: int = -1) -> bytes:
        if self.left <= 0:
            return b""
        data = self.f.read(self.left if size < 0 else min(size, self.left))
        self.left -= len(data)
        return data


def apply_tar(stream: IO[bytes], root: Path, os_user: str) -> dict[str, Any]:
    """The tar on ``stream`` made the content of ``root``: unchanged files kept, changed or
    missing ones written, and files and folders the tar does not hold removed."""
    seen: set[Path] = {root}
    written = kept = 0
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            dest = _member_path(root, member.name)
            seen.add(dest)
            if member.isdir():
                if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
                    dest.unlink()
                dest.mkdir(mode=member.mode & 0o7777 or 0o700, parents=True, exist_ok=True)
                chown_to(dest, os_user)
            elif member.issym():
                if dest.is_symlink() and os.readlink(dest) == member.linkname:
                    kept += 1
                    continue
                if dest.is_dir() and not dest.is_symlink():
                    shutil.rmtree(dest)
                else:
                    dest.unlink(missing_ok=True)
                os.symlink(member.linkname, dest)
                written += 1
            elif member.isfile():
                if dest.is_dir() and not dest.is_symlink():
                    shutil.rmtree(dest)
                source = tar.extractfile(member)
                assert source is not None
                if _write_if_changed(dest, source, member.size, member.mode, os_user):
                    written += 1
                else:
                    kept += 1
    removed = []
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames + dirnames:
            path = Path(dirpath) / name
            if path in seen:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(str(path.relative_to(root)))
    return {"written": written, "kept": kept, "removed": sorted(removed)}


class _ApplySink:
    """The plaintext tar through a pipe into :func:`apply_tar` on a thread of its own."""

    def __init__(self, root: Path, os_user: str) -> None:
        read_fd, write_fd = os.pipe()
        self._read = os.fdopen(read_fd, "rb")
        self.stdin = os.fdopen(write_fd, "wb")
        self.result: dict[str, Any] = {}
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(root, os_user), daemon=True)
        self._thread.start()

    def _run(self, root: Path, os_user: str) -> None:
        try:
            self.result = apply_tar(self._read, root, os_user)
            while self._read.read(READ_CHUNK):  # the tar's trailing padding
                pass
        except BaseException as exc:
            self._error = exc
        finally:
            self._read.close()

    def wait(self) -> str | None:
        self._thread.join()
        return f"delta apply failed: {self._error}" if self._error is not None else None

    def kill(self) -> None:
        self.stdin.close()


def check_target(cluster: ClusterHandle, system_identifier: str) -> None:
    """Refuse, naming why, a cluster a delta restore must not rewrite: production, running,
    without a data directory, or holding another system's (its files share nothing with
    the backup: a full restore is the honest way, and keeps the old directory aside)."""
    if cluster.production:
        raise InvalidInput(
            f"cluster {cluster.name} is production: a delta restore rewrites its directory in "
            "place with no copy to roll back to; recover it without --delta"
        )
    if not cluster.initialized():
        raise InvalidInput(
            f"{cluster.data_dir} holds no cluster to compare with: use a full restore"
        )
    if cluster.is_running():
        raise InvalidInput(f"cluster {cluster.name} is running: stop it before a delta restore")
    found = controldata(cluster).get("Database system identifier")
    if found != system_identifier:
        raise InvalidInput(
            f"{cluster.data_dir} holds database system {found}, the base backup is of system "
            f"{system_identifier}: a delta restore refreshes a copy of the same system only; "
            "use a full restore"
        )


def delta_restore(
    settings: Settings, manifest: BaseBackupManifest, cluster: ClusterHandle, spool: Path
) -> dict[str, Any]:
    """``manifest``'s base backup into ``cluster``'s existing, stopped, non-production data
    directory of the same system, rewriting only what differs; verified by
    ``pg_verifybackup`` at the end. Returns the counts of files written, kept and removed."""
    check_target(cluster, manifest.system_identifier)
    store = open_store(settings)
    what = f"base backup {manifest.backup_id} (delta into {cluster.data_dir})"
    cipher = recovery.download_cipher(store, manifest, spool)
    try:
        sink = _ApplySink(cluster.data_dir, cluster.os_user)
        try:
            recovery.stream_plaintext(settings, store, manifest, cipher, sink, what)
        except BaseException as exc:
            raise BaseBackupRefused(
                f"{exc}; {cluster.data_dir} is half-restored: run the delta restore again or a "
                "full restore before starting it"
            ) from exc
        verify_staged(cluster, cluster.data_dir, manifest.pg_backup_manifest, what)
    finally:
        cipher.unlink(missing_ok=True)
    return sink.result
