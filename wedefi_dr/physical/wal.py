"""The WAL archive: ``wal-push`` for ``archive_command``, ``wal-fetch`` for ``restore_command``.

Both run once per file, as the ``postgres`` OS user, started by the server itself, so they
import only the standard library, boto3 and the settings (no Prefect, no GX, no pandas):
``python -I -m wedefi_dr.physical.wal push|fetch`` is what the stack configures.

PostgreSQL's contract, which this module keeps exactly:

- ``push`` exits 0 only once the object is durably stored (S3 PUT returned; posix:
  fsynced and linked). A re-push of identical content exits 0 (the server re-sends after
  a crash); different content under a name that exists exits non-zero, stores nothing
  and says so loudly. The same rule protects ``.history`` files (never overwritten),
  ``.partial`` segments (their own names, never the complete segment's) and ``.backup``
  labels. The check-then-put race is closed by a conditional PUT (``If-None-Match: *``;
  posix: ``link()``).
- ``fetch`` of a file that is not in the archive exits 1 without noise: the server asks
  for files that may not exist (the next timeline's history, the segment after the end).
  Any other failure (access, checksum, decryption) exits 128, which the server treats as
  fatal, so recovery aborts instead of ending early at the wrong point. A missing segment
  while a later one of the same timeline is archived is such a failure: a gap, named.

Each object is ``zstd | gpg --symmetric`` under the archive's random WAL key
(``walkey.py``: one gpg S2K of the backup passphrase per process, not one per segment;
decryptable by hand with ``gpg -d wal-key/<id>`` then ``gpg -d | zstd -d``), encoding
``zstd+gpg-walkey``. Objects of the earlier encoding, ``gzip+gpg`` (gzip, then gpg under
the backup passphrase itself), still fetch: the ``encoding`` metadata tells them apart.
Either way the metadata holds the plaintext's and the object's sha256 and the plaintext
size, and an HMAC over (name, plaintext sha256, size, object sha256: ``object/v2``; objects
pushed before it carry ``object/v1``, without the object's) under the key derived from the
backup passphrase (``storage/authentication.py``), with its key id. Whoever can write to
the bucket can write metadata too, so ``fetch`` refuses (exit 128) any object whose MAC
does not verify: only this system's own segments are replayed. The MAC key id also picks
the passphrase that opens the object, so segments archived before a passphrase rotation
fetch with the old one listed in ``WEDEFI_DR_GPG_PREVIOUS_PASSPHRASES``. The MAC key is
derived once per process (PBKDF2, ~0.06 s), and no derived key is written anywhere.

Throughput: the server runs one ``archive_command`` at a time, and a process per 16 MB
segment (start, zstd, gpg, PUT) can fall behind a write burst. So ``push`` also archives
up to ``wal_push_parallel - 1`` other ``.ready`` segments in parallel and leaves a marker
(``pg_wal/.wedefi-pushed/<name>``, the plaintext sha256) for each one stored; when the
server later asks for that file, the marker answers if the file still hashes the same
(the object is already durable), else the normal path runs.

Replay speed: after handing a segment over, ``fetch`` starts a detached prefetcher (unless
one runs or enough is spooled) that keeps the next ``wal_prefetch`` segments, downloaded
in parallel, verified and decrypted, in ``pg_wal/.wedefi-prefetch`` for as long as replay
takes them (``restore_command`` is ``prefetch.py``, which hands them over). The following calls
hand them over by rename, checking the hash again, without importing pydantic or boto3:
replay overlaps the downloads instead of waiting for one at a time. The prefetcher also
answers ``prefetch.py``'s questions about files it has not spooled (:class:`_Answers`),
so the end of a recovery costs no full ``wal-fetch`` either.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from wedefi_dr.errors import DRError, NotAuthentic
from wedefi_dr.physical import prefetch as handover
from wedefi_dr.physical import walkey
from wedefi_dr.physical.walnames import next_segments
from wedefi_dr.storage import authentication, encryption, repository

if TYPE_CHECKING:  # pydantic costs ~0.3 s: a prefetched segment is handed over without it
    from wedefi_dr.config import Settings

EXIT_OK = 0
EXIT_MISSING = 1
EXIT_REFUSED = 3  # push: different content under an existing name
EXIT_FATAL = 128  # fetch: > 125 makes the server abort recovery

SEGMENT_RE = re.compile(r"^[0-9A-F]{24}$")
NAME_RE = re.compile(r"^(?:[0-9A-F]{24}(?:\.partial|\.[0-9A-F]{8}\.backup)?|[0-9A-F]{8}\.history)$")
PUSHED_DIR = ".wedefi-pushed"
PREFETCH_DIR = handover.PREFETCH_DIR
PREFETCHER_PID = handover.PREFETCHER_PID
PREFETCH_PLAN = handover.PREFETCH_PLAN
PREFETCH_WIDTH = 8
SEGMENT_BYTES_DEFAULT = 16 * 1024 * 1024
PREFETCH_IDLE_SECONDS = 60.0
PREFETCH_LINGER_SECONDS = 10.0
PREFETCH_POLL_SECONDS = 0.02
ASK_DIR = handover.ASK_DIR
ANSWER_SUFFIX = handover.ANSWER_SUFFIX
ANSWER_POLL_SECONDS = 0.01
ENCODING = "gzip+gpg"
ENCODING_WALKEY = "zstd+gpg-walkey"
ENCODINGS = (ENCODING_WALKEY, ENCODING)
# The plan's S2K count (M9). The WAL key is 256 random bits: no count makes guessing it
# harder, and gpg 2.2 took longer with the minimum, 1024 (0.34 s a call, measured), than
# with 65536 (0.02 s).
WALKEY_S2K_COUNT = 65536
MAC = "mac"
MAC_KEY_ID = "mac-key-id"
MAC_VERSION = "mac-version"
MAC_COVERS_OBJECT = "2"


class ArchiveConflict(DRError):
    """Different content is already archived under this name: nothing was stored."""


class ArchiveGap(DRError):
    """A segment is missing from the archive while later ones exist."""


class ArchiveCorrupt(DRError):
    """An archived object does not match its checksums, or does not decrypt."""


def _log(message: str) -> None:
    """One line on stderr: the server copies it into its log."""
    print(f"wedefi-dr wal: {message}", file=sys.stderr, flush=True)


def load_env_file(path: str | Path) -> None:
    """``KEY=VALUE`` lines into the environment (the file wins over inherited values).

    The server's configuration names this file (mode 600, owned by ``postgres``) instead
    of carrying the passphrase and keys in ``postgresql.conf``.
    """
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = line.split("=", 1)
        os.environ[key.strip()] = value


# ---- names -------------------------------------------------------------------------------
def validate_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise DRError(f"{name!r} is not a WAL file name (segment, .partial, .backup or .history)")
    return name


def archive_prefix(settings: Settings) -> str:
    return "/".join([settings.prefix.strip("/"), "wal"])


def archive_key(settings: Settings, name: str) -> str:
    return f"{archive_prefix(settings)}/{name}"


# ---- encoding ----------------------------------------------------------------------------
def _gpg_params(settings: Settings, wal_key: walkey.WalKey | None) -> encryption.GpgParams:
    params = encryption.GpgParams.from_settings(settings, compress_algo="none")  # packed
    return params if wal_key is None else replace(params, s2k_count=WALKEY_S2K_COUNT)


def encode(settings: Settings, plain: bytes) -> bytes:
    """gzip then gpg under the backup passphrase (``ENCODING``): what was archived before
    the WAL key, which :func:`decode` still reads; tests write it to show both read. Every
    object stored now is :func:`encode_stream`'s."""
    gpg = encryption.start_encrypt(
        settings.gpg_passphrase.get_secret_value(), _gpg_params(settings, None)
    )
    z = zlib.compressobj(settings.wal_compress_level, zlib.DEFLATED, 31)

    def feed() -> None:
        gpg.stdin.write(z.compress(plain) + z.flush())
        gpg.stdin.close()

    return _through_gpg(gpg, feed)


def encode_stream(
    settings: Settings, source: IO[bytes], size: int, *, wal_key: walkey.WalKey
) -> tuple[bytes, str]:
    """zstd then ``gpg --symmetric`` under ``wal_key`` of the ``size`` bytes ``source``
    holds, read a MiB at a time: returns the ciphertext and the plaintext's sha256.

    The server waits for this while it archives, so the steps overlap: gpg starts first
    (its start-up and key stretching run during the compression), zstd compresses with a
    thread per CPU, the hash of each MiB runs while zstd's threads compress the one before,
    and the output reaches gpg as it is made (one standard frame, its size in the header,
    as the one-shot decompression of :func:`decode` needs).

    Nothing holds the whole segment, and each thread keeps one zstd context for every
    segment it encodes: four uploads of whole segments, each through a new multi-threaded
    context, left the resident archiver at 280-290 MB after a burst, glibc keeping the
    freed buffers in the threads' heaps. By hand, 48 segments of this host's WAL on four
    threads: peak 307-314 MB whole and 148-165 MB this way, 1.81-1.98 s and 1.53-1.66 s;
    one at a time 40-43 ms and 37-38 ms per segment (p50)."""
    gpg = encryption.start_encrypt(wal_key.passphrase, _gpg_params(settings, wal_key))
    digest = hashlib.sha256()

    def feed() -> None:
        chunk = bytearray(ENCODE_CHUNK)
        view = memoryview(chunk)
        compressor = _zstd_compressor(max(1, settings.wal_compress_level))
        with compressor.stream_writer(gpg.stdin, size=size, closefd=True) as writer:
            while n := source.readinto(chunk):
                digest.update(view[:n])
                writer.write(view[:n])

    return _through_gpg(gpg, feed), digest.hexdigest()


def _through_gpg(gpg: subprocess.Popen[bytes], feed: Callable[[], None]) -> bytes:
    """Run ``feed`` (which writes gpg's plaintext and closes its stdin) while a thread
    reads the ciphertext; DRError naming gpg's error when gpg stops or fails."""
    out: list[bytes] = []
    reader = threading.Thread(target=lambda: out.append(gpg.stdout.read()))
    reader.start()
    try:
        feed()
    except BaseException as exc:
        gpg.kill()
        reader.join()
        gpg.wait()
        if isinstance(exc, BrokenPipeError):
            err = gpg.stderr.read().decode(errors="replace")[-300:]
            raise DRError(
                f"gpg --symmetric stopped reading (exit {gpg.returncode}): {err}"
            ) from exc
        raise
    reader.join()
    err = gpg.stderr.read()
    if gpg.wait() != 0:
        raise DRError(f"gpg --symmetric failed (exit {gpg.returncode}): {err.decode()[-300:]}")
    return out[0]


ENCODE_CHUNK = 1 << 20
_compressors = threading.local()


def _zstd_compressor(level: int) -> Any:
    """This thread's multi-threaded zstd context at ``level``, made once and reused."""
    import zstandard

    cache = _compressors.__dict__.setdefault("by_level", {})
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level, threads=-1)
    return cache[level]


def decode(
    settings: Settings,
    cipher: bytes,
    workdir: Path,
    *,
    encoding: str = ENCODING,
    passphrase: str | None = None,
) -> bytes:
    """``gpg --decrypt`` then gunzip or zstd (by ``encoding``); ArchiveCorrupt when either
    fails. ``passphrase`` defaults to the backup passphrase; it is the WAL key's for
    ``ENCODING_WALKEY``. The ciphertext reaches gpg on a pipe: nothing is written to disk,
    ``workdir`` included."""
    if passphrase is None:
        passphrase = settings.gpg_passphrase.get_secret_value()
    try:
        packed = encryption.decrypt_bytes(passphrase, cipher)
    except encryption.DecryptionFailed as exc:
        raise ArchiveCorrupt(str(exc)) from exc
    except NotAuthentic as exc:
        raise ArchiveCorrupt(f"WAL object refused: {exc}") from exc
    if encoding == ENCODING_WALKEY:
        import zstandard

        try:
            return zstandard.ZstdDecompressor().decompress(packed)
        except zstandard.ZstdError as exc:
            raise ArchiveCorrupt(f"zstd -d of the decrypted object failed: {exc}") from exc
    try:
        return zlib.decompress(packed, 31)
    except zlib.error as exc:
        raise ArchiveCorrupt(f"gunzip of the decrypted object failed: {exc}") from exc


def mac_covered_object_sha(meta: dict[str, str]) -> str | None:
    """The object sha256 a WAL object's MAC covers (``object/v2``), None for ``object/v1``
    (its MAC covers the plaintext's only). Stripping the version does not downgrade an
    object: its tag then fails the v1 check."""
    if meta.get(MAC_VERSION) == MAC_COVERS_OBJECT:
        return meta.get("object-sha256", "")
    return None


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---- the archive -------------------------------------------------------------------------
@dataclass(frozen=True)
class Sealed:
    """A segment encoded for the archive (:meth:`Archive.seal`), not yet stored."""

    name: str
    plain_sha: str
    plain_size: int
    cipher: bytes = field(repr=False)


@dataclass
class Archive:
    """The WAL prefix of the repository, with the push and fetch rules."""

    settings: Settings

    def __post_init__(self) -> None:
        self.store = repository.open_store(
            self.settings, connections=max(16, self.settings.wal_prefetch + 2)
        )
        self.bucket = self.store.bucket
        self.keyring = authentication.keyring_of(self.settings)
        self.wal_keys = walkey.WalKeys(self.settings, self.store)

    @property
    def client(self) -> Any:
        """The boto3 client of an S3 repository, for S3-only operations (AttributeError on
        a posix one, which has none)."""
        return self.store.client  # type: ignore[attr-defined]

    def head(self, name: str) -> dict | None:
        return self.store.head(archive_key(self.settings, name))

    def _same_or_conflict(self, name: str, head: dict, sha: str) -> None:
        stored = head.get("Metadata", {}).get("plain-sha256")
        if stored != sha:
            raise ArchiveConflict(
                f"REFUSED: {name} is already archived at "
                f"{self.store.url(archive_key(self.settings, name))} with different content "
                f"(stored sha256 {stored}, this file {sha}); nothing was stored. Two clusters "
                "may be archiving into one prefix: stop and check before anything else."
            )

    def push_bytes(self, name: str, plain: bytes) -> str:
        """Store ``plain`` under ``name`` unless it is there; returns what happened."""
        return self.store_sealed(self.seal(name, io.BytesIO(plain), len(plain)))

    def seal(self, name: str, source: IO[bytes], size: int) -> Sealed:
        """The ``size`` bytes of ``source`` encoded for the archive under the current WAL
        key (:func:`encode_stream`), not yet stored: a caller reading a file checks it did
        not change before it stores it."""
        validate_name(name)
        try:
            wal_key = self.wal_keys.for_key(self.keyring.current, create=True)
        except walkey.WalKeyError as exc:
            raise ArchiveCorrupt(str(exc)) from exc
        cipher, sha = encode_stream(self.settings, source, size, wal_key=wal_key)
        return Sealed(name, sha, size, cipher)

    def store_sealed(self, sealed: Sealed) -> str:
        """Store a sealed segment unless it is there; returns what happened.

        No HEAD comes first: the conditional PUT (``If-None-Match: *``) is the existence
        check, and only a refused PUT reads what is there (a re-push is rare: after a
        crash, or a second archiver). Different content under the name is ArchiveConflict.
        """
        name, sha = sealed.name, sealed.plain_sha
        stored = self.store.put_new(
            archive_key(self.settings, name),
            sealed.cipher,
            storage_class=self.settings.storage_class,
            metadata=self.object_metadata(name, sha, sealed.plain_size, sealed.cipher),
        )
        if not stored:
            head = self.head(name)  # the conditional put found an object under the name
            if head is None:
                raise ArchiveConflict(f"{name}: the conditional put failed but nothing is stored")
            self._same_or_conflict(name, head, sha)
            return "already archived (identical)"
        return f"archived ({sealed.plain_size} -> {len(sealed.cipher)} bytes)"

    def object_metadata(
        self, mac_name: str, plain_sha: str, plain_size: int, cipher: bytes
    ) -> dict[str, str]:
        """A stored WAL object's metadata (a segment's or a streamed partial's): checksums,
        encoding, and the ``object/v2`` MAC over name, checksums and size under the current
        key, so a reader proves the plaintext by hashing the stored object alone."""
        key, object_sha = self.keyring.current, _sha256(cipher)
        return {
            "plain-sha256": plain_sha,
            "plain-size": str(plain_size),
            "object-sha256": object_sha,
            "encoding": ENCODING_WALKEY,
            MAC_KEY_ID: key.key_id,
            MAC_VERSION: MAC_COVERS_OBJECT,
            MAC: authentication.object_mac(key, mac_name, plain_sha, plain_size, object_sha),
        }

    def fetch_bytes(self, name: str, workdir: Path) -> bytes | None:
        """The verified plaintext, or None when the archive has no such object."""
        found = self.store.get(archive_key(self.settings, name))
        if found is None:
            return None
        cipher, meta = found
        return self.open_verified(name, cipher, meta, workdir)

    def open_verified(self, name: str, cipher: bytes, meta: dict[str, str], workdir: Path) -> bytes:
        """The plaintext of a stored WAL object whose MAC binds ``name`` (a segment's or a
        streamed partial's), after every check: checksums, MAC before gpg reads a byte, the
        passphrase its key id picks (the WAL key's for ``ENCODING_WALKEY``), the plaintext's
        size, and its sha256 unless the MAC covers the object's (``object/v2``: the object
        is then proven the one written, and gpg's integrity check proves its decryption).
        ArchiveCorrupt names what failed."""
        encoding = meta.get("encoding")
        if encoding not in ENCODINGS or "plain-sha256" not in meta:
            raise ArchiveCorrupt(
                f"{name}: object has no {' or '.join(ENCODINGS)} checksums in its metadata"
            )
        if _sha256(cipher) != meta.get("object-sha256"):
            raise ArchiveCorrupt(f"{name}: stored object fails its sha256: corrupt at rest")
        covered = mac_covered_object_sha(meta)
        try:  # before gpg reads a byte of it
            signer = authentication.verify_object_mac(
                self.keyring,
                name,
                meta["plain-sha256"],
                int(meta.get("plain-size", -1)),
                meta.get(MAC_KEY_ID),
                meta.get(MAC),
                covered,
            )
            passphrase = signer.passphrase
            if encoding == ENCODING_WALKEY:
                passphrase = self.wal_keys.for_key(signer).passphrase
        except NotAuthentic as exc:
            raise ArchiveCorrupt(f"WAL object refused: {exc}") from exc
        except walkey.WalKeyError as exc:
            raise ArchiveCorrupt(f"{name}: {exc}") from exc
        plain = decode(self.settings, cipher, workdir, encoding=encoding, passphrase=passphrase)
        if len(plain) != int(meta.get("plain-size", -1)):
            raise ArchiveCorrupt(f"{name}: decrypted content is not the size its MAC covers")
        if covered is None and _sha256(plain) != meta["plain-sha256"]:
            raise ArchiveCorrupt(f"{name}: decrypted content fails its sha256")
        return plain

    def later_segments(self, name: str, limit: int = 5) -> list[str]:
        """Archived segments (or .partial) of ``name``'s timeline that come after it."""
        prefix = archive_prefix(self.settings) + "/"
        found = []
        for obj in self.store.list_keys(
            prefix + name[:8],
            start_after=prefix + name + "~",  # '~' sorts after '.partial' and '.backup'
            max_keys=50,
        ):
            base = obj["Key"][len(prefix) :]
            if SEGMENT_RE.match(base[:24]) and (len(base) == 24 or base.endswith(".partial")):
                found.append(base)
        return found[:limit]

    def list_names(self) -> list[str]:
        prefix = archive_prefix(self.settings) + "/"
        return [o["Key"][len(prefix) :] for o in self.store.list_keys(prefix)]


# ---- push --------------------------------------------------------------------------------
def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def _other_ready(wal_dir: Path, current: str, limit: int) -> list[str]:
    """Other files the server has marked ``.ready``, oldest first."""
    status = wal_dir / "archive_status"
    try:
        names = sorted(p.name[: -len(".ready")] for p in status.glob("*.ready"))
    except OSError:
        return []
    return [n for n in names if n != current and NAME_RE.match(n)][:limit]


def push(settings: Settings, path: str | Path) -> str:
    """Archive one file (the server's ``%p``), plus other ready ones in parallel."""
    path = Path(path)
    name = validate_name(path.name)
    wal_dir = path.parent
    marker = wal_dir / PUSHED_DIR / name
    plain = path.read_bytes()
    if marker.exists():
        if marker.read_text().strip() == _sha256(plain):
            marker.unlink()
            return "archived earlier in a batch (identical)"
        marker.unlink()  # stale: fall through to the normal, checked path
    archive = Archive(settings)
    others = _other_ready(wal_dir, name, settings.wal_push_parallel - 1)
    if not others:
        return archive.push_bytes(name, plain)

    def push_other(other: str) -> None:
        try:
            data = (wal_dir / other).read_bytes()
            archive.push_bytes(other, data)
            (wal_dir / PUSHED_DIR).mkdir(exist_ok=True)
            _atomic_write(wal_dir / PUSHED_DIR / other, _sha256(data).encode())
        except Exception as exc:  # the server will ask for it itself, and hear the error
            _log(f"batch push of {other} deferred: {type(exc).__name__}: {exc}")

    with ThreadPoolExecutor(max_workers=len(others) + 1) as pool:
        futures = [pool.submit(push_other, o) for o in others]
        result = archive.push_bytes(name, plain)
        for f in futures:
            f.result()
    return f"{result}; {len(others)} more in parallel"


# ---- fetch -------------------------------------------------------------------------------
def _spool(dest: Path) -> Path:
    return dest.parent / PREFETCH_DIR


def _prefetch_one(archive: Archive, spool: Path, name: str) -> bool:
    """Spool ``name`` verified and decrypted; False when the archive does not have it."""
    if (spool / name).exists():
        return True
    try:
        plain = archive.fetch_bytes(name, spool)
    except Exception:
        return False  # the server's own request for it reports the real error
    if plain is None:
        return False
    handover.record_spooled(str(spool), name, plain)
    return True


def _answer(archive: Archive, spool: Path, name: str) -> str:
    """``prefetch.py``'s question about ``name``: ``spooled`` (verified, in the spool),
    ``missing`` (not archived, and nothing that would make :func:`fetch` say otherwise), or
    ``defer``: the full ``wal-fetch`` decides, and logs, whatever else it is (an error, a
    gap, a segment arriving, a streamed partial)."""
    try:
        validate_name(name)
        plain = archive.fetch_bytes(name, spool)
        if plain is not None:
            handover.record_spooled(str(spool), name, plain)
            return "spooled"
        if not SEGMENT_RE.match(name):
            return "missing"
        from wedefi_dr.physical import walstream

        if (
            archive.later_segments(name, limit=1)
            or walstream.later_timeline_exists(archive, name)
            or walstream.fetch_partial(archive, name, spool) is not None
        ):
            return "defer"
        return "missing"
    except Exception:
        return "defer"


class _Answers(threading.Thread):
    """Answers ``prefetch.py``'s questions (``<spool>/.ask/<name>``) with the prefetcher's
    warm client and WAL key, so the files replay asks for that are not spooled (the next
    timeline's history, the segment after the end, one asked for again) cost the server an
    interpreter start and a request instead of a full ``wal-fetch``."""

    def __init__(self, archive: Archive, spool: Path) -> None:
        super().__init__(daemon=True, name="answers")
        self.archive, self.spool = archive, spool
        self.last_at = time.monotonic()
        self.halt = threading.Event()

    def run(self) -> None:
        asks = self.spool / ASK_DIR
        while not self.halt.wait(ANSWER_POLL_SECONDS):
            try:
                names = sorted(p.name for p in asks.iterdir())
            except OSError:
                continue
            for name in names:
                self.last_at = time.monotonic()
                what = _answer(self.archive, self.spool, name)
                _atomic_write(self.spool / f"{name}{ANSWER_SUFFIX}", what.encode())
                (asks / name).unlink(missing_ok=True)
                self.last_at = time.monotonic()


def start_prefetcher(
    env_file: str | None,
    name: str,
    dest: Path,
    ahead: int,
    segment_bytes: int = SEGMENT_BYTES_DEFAULT,
) -> bool:
    """Fill the spool with the ``ahead`` segments after ``name`` in a detached process.

    The server is not kept waiting: this call returns at once and replay overlaps the
    downloads (pgBackRest's asynchronous archive-get does the same). Nothing starts when
    enough is spooled already or a prefetcher is still running.
    """
    spool = _spool(dest)
    if not SEGMENT_RE.match(name) or ahead <= 0:
        return False
    if handover.spooled_ahead(str(spool), name) > ahead // 2 or handover.prefetcher_alive(
        str(spool)
    ):
        return False
    spool.mkdir(exist_ok=True)
    cmd = [sys.executable, "-I", "-m", "wedefi_dr.physical.wal", "prefetch", name, str(spool)]
    if env_file:
        cmd += ["--env-file", env_file]
    child = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
    )
    _atomic_write(spool / PREFETCHER_PID, str(child.pid).encode())
    handover.write_plan(str(spool), next_segments(name, min(PREFETCH_WIDTH, ahead), segment_bytes))
    return True


def prefetch(settings: Settings, name: str, spool: Path) -> int:
    """Download, verify and decrypt the segments after ``name`` into ``spool``, in parallel.

    It keeps ``wal_prefetch`` segments spooled or in flight for as long as replay takes
    them: each one handed over makes room and the next download starts at once (a pipeline,
    not batches that wait for their slowest), so one process with one S3 client serves the
    whole replay. At the first segment the archive does not have (the end, or an error the
    server's own request will report) it stops reading ahead and stays
    PREFETCH_LINGER_SECONDS after the last question to answer ``prefetch.py`` (see
    :class:`_Answers`); it exits after PREFETCH_IDLE_SECONDS without room (replay paused
    or over).
    """
    spool.mkdir(exist_ok=True)
    (spool / PREFETCHER_PID).write_text(str(os.getpid()))
    (spool / ASK_DIR).mkdir(exist_ok=True)
    archive = Archive(settings)
    answers = _Answers(archive, spool)
    answers.start()
    try:
        width = max(1, min(PREFETCH_WIDTH, settings.wal_prefetch))
        cursor, fetched, busy_at, ahead = name, 0, time.monotonic(), True
        in_flight: dict[Future, str] = {}
        with ThreadPoolExecutor(max_workers=width) as pool:
            while True:
                for future in [f for f in in_flight if f.done()]:
                    in_flight.pop(future)
                    found = future.result()
                    fetched += found
                    ahead = ahead and found
                    busy_at = time.monotonic()
                room = 0
                if ahead:
                    spooled = handover.spooled_ahead(str(spool), "")
                    room = min(settings.wal_prefetch - spooled, width) - len(in_flight)
                if room > 0:
                    names = next_segments(cursor, room, settings.wal_segment_bytes)
                    handover.write_plan(str(spool), [*in_flight.values(), *names])
                    for n in names:
                        in_flight[pool.submit(_prefetch_one, archive, spool, n)] = n
                    busy_at, cursor = time.monotonic(), names[-1]
                elif not in_flight:
                    handover.write_plan(str(spool), [])
                    limit = PREFETCH_IDLE_SECONDS if ahead else PREFETCH_LINGER_SECONDS
                    if time.monotonic() - max(busy_at, answers.last_at) > limit:
                        break
                if in_flight:
                    wait(in_flight, timeout=PREFETCH_POLL_SECONDS, return_when=FIRST_COMPLETED)
                else:
                    time.sleep(PREFETCH_POLL_SECONDS)
        return fetched
    finally:
        answers.halt.set()
        (spool / PREFETCH_PLAN).unlink(missing_ok=True)
        (spool / PREFETCHER_PID).unlink(missing_ok=True)
        answers.join(timeout=30)


def fetch(settings: Settings, name: str, dest: str | Path) -> bool:
    """Write ``name`` to ``dest`` (the server's ``%f`` and ``%p``); False when not archived.

    Raises ArchiveGap when the segment is missing but later ones exist, ArchiveCorrupt on
    checksum or decryption failures (the caller exits 128 on both). A prefetched copy in
    the spool is handed over first (see :func:`run`, which does that without settings).
    """
    validate_name(name)
    dest = Path(dest)
    spool = _spool(dest)
    if handover.from_spool(str(spool), name, str(dest)):
        return True
    archive = Archive(settings)
    spool.mkdir(exist_ok=True)
    plain = archive.fetch_bytes(name, spool)
    if plain is None:
        if SEGMENT_RE.match(name):
            later = archive.later_segments(name)
            if later and archive.head(name) is None:
                raise ArchiveGap(
                    f"GAP IN THE WAL ARCHIVE: segment {name} is missing from "
                    f"{archive.store.url(archive_prefix(settings))}/ but later segments exist "
                    f"({', '.join(later)}): recovery stops here rather than end early"
                )
            if later:  # it arrived meanwhile (a live primary archiving)
                plain = archive.fetch_bytes(name, spool)
        if plain is None:
            plain = streamed_partial(archive, name, spool)
        if plain is None:
            return False
    _atomic_write(dest, plain)
    return True


def streamed_partial(archive: Archive, name: str, spool: Path) -> bytes | None:
    """The last resort for a segment not archived: its streamed partial, when it is the
    best data there is (``wedefi_dr.physical.walstream.best_partial``, which logs it)."""
    from wedefi_dr.physical import walstream

    return walstream.best_partial(archive, name, spool)


def clear_spool(pg_wal: Path) -> None:
    """Remove prefetched and marker files (after a promotion they are of no use)."""
    for sub in (PREFETCH_DIR, PUSHED_DIR):
        shutil.rmtree(pg_wal / sub, ignore_errors=True)


# ---- entry point -------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """``python -m wedefi_dr.physical.wal push PATH | fetch NAME DEST | prefetch NAME SPOOL``."""
    parser = argparse.ArgumentParser(prog="wedefi-dr-wal", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_push = sub.add_parser("push", help="archive_command: wal-push %%p")
    p_push.add_argument("path")
    p_fetch = sub.add_parser("fetch", help="restore_command: wal-fetch %%f %%p")
    p_fetch.add_argument("name")
    p_fetch.add_argument("dest")
    p_pre = sub.add_parser("prefetch", help="(internal) fill the spool after NAME")
    p_pre.add_argument("name")
    p_pre.add_argument("spool")
    for p in (p_push, p_fetch, p_pre):
        p.add_argument("--env-file", help="KEY=VALUE settings file (mode 600)")
    args = parser.parse_args(argv)
    if args.command == "prefetch":
        try:
            if args.env_file:
                load_env_file(args.env_file)
            prefetch(_settings(), validate_name(args.name), Path(args.spool))
        except Exception:
            return 1  # best effort: the server's own request reports real errors
        return 0
    return run(
        args.command,
        args.env_file,
        path=getattr(args, "path", None),
        name=getattr(args, "name", None),
        dest=getattr(args, "dest", None),
    )


def _settings() -> Settings:
    from wedefi_dr.config import Settings

    settings = Settings()
    settings.require("gpg_passphrase", "bucket")
    return settings


def run(
    command: str,
    env_file: str | None,
    path: str | None = None,
    name: str | None = None,
    dest: str | None = None,
) -> int:
    """The exit status the server expects (see the module docstring)."""
    t0 = time.monotonic()
    try:
        if env_file:
            load_env_file(env_file)
        if command == "fetch":
            validate_name(name)
            ahead = int(os.environ.get("WEDEFI_DR_WAL_PREFETCH", "8"))
            if handover.from_spool(str(_spool(Path(dest))), name, dest):  # no pydantic, no boto3
                start_prefetcher(env_file, name, Path(dest), ahead)
                return EXIT_OK
        settings = _settings()
    except Exception as exc:
        _log(f"{command}: configuration error: {exc}")
        return EXIT_FATAL if command == "fetch" else 2
    if command == "push":
        try:
            what = push(settings, path)
        except ArchiveConflict as exc:
            _log(f"push {path}: {exc}")
            return EXIT_REFUSED
        except Exception as exc:
            _log(f"push {path} FAILED (the server will retry): {type(exc).__name__}: {exc}")
            return 2
        _log(f"push {Path(path).name}: {what} in {time.monotonic() - t0:.2f} s")
        return EXIT_OK
    try:
        found = fetch(settings, name, dest)
    except (ArchiveGap, ArchiveCorrupt) as exc:
        _log(f"fetch {name} FATAL: {exc}")
        return EXIT_FATAL
    except Exception as exc:
        _log(f"fetch {name} FATAL (archive unreachable?): {type(exc).__name__}: {exc}")
        return EXIT_FATAL
    if found:
        start_prefetcher(
            env_file, name, Path(dest), settings.wal_prefetch, settings.wal_segment_bytes
        )
    return EXIT_OK if found else EXIT_MISSING


if __name__ == "__main__":
    sys.exit(main())
