"""``restore_command`` of replay: hand prefetched segments over, fetch the rest.

Replay asks for one segment at a time and waits for each. The prefetcher (``python -m
wedefi_dr.physical.wal prefetch``, detached) fills ``pg_wal/.wedefi-prefetch`` with the next
``WEDEFI_DR_WAL_PREFETCH`` segments, downloaded, verified (object sha256, MAC, gpg's
integrity check, plaintext sha256) and decrypted by parallel workers, as pgBackRest's
archive-get queue does. What is left per segment is this script: executed with ``python
-I -S`` (standard library only, no site-packages, no package import), it checks the
spooled file still hashes as the prefetcher recorded, renames it to ``%p``, and starts the
next prefetcher when the spool runs low. So replay waits for an interpreter start and a
sha256, close to what ``cp`` of the decrypted file costs.

A segment that is not spooled goes to the full ``wal-fetch`` (``os.execv``: the same
process, the same exit status contract: 0 found, 1 not archived, 128 anything else, which
aborts recovery rather than ending it early).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import subprocess
import sys

SEGMENT_RE = re.compile(r"^[0-9A-F]{24}$")
PREFETCH_DIR = ".wedefi-prefetch"
PREFETCHER_PID = ".prefetcher.pid"
READ_CHUNK = 1 << 20


def read_env(path: str) -> dict[str, str]:
    values = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                key, value = line.split("=", 1)
                values[key.strip()] = value
    return values


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(READ_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def from_spool(spool: str, name: str, dest: str) -> bool:
    """Hand ``name`` over when it is spooled and still hashes as it did when verified."""
    data, sha = os.path.join(spool, name), os.path.join(spool, f"{name}.sha256")
    try:
        with open(sha) as f:
            expected = f.read().strip()
    except FileNotFoundError:
        return False
    ok = os.path.exists(data) and _sha256(data) == expected
    if ok:
        os.replace(data, dest)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(data)
        print(f"wedefi-dr wal: prefetched {name} changed on disk; fetching it", file=sys.stderr)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(sha)
    return ok


def _prefetcher_alive(spool: str) -> bool:
    try:
        with open(os.path.join(spool, PREFETCHER_PID)) as f:
            os.kill(int(f.read()), 0)
    except (OSError, ValueError):
        return False
    return True


def _spooled_ahead(spool: str, name: str) -> int:
    try:
        return sum(1 for n in os.listdir(spool) if SEGMENT_RE.match(n) and n > name)
    except OSError:
        return 0


def refill(env_file: str, spool: str, name: str, ahead: int) -> None:
    """Start the prefetcher after ``name`` unless one runs or enough is spooled."""
    if ahead <= 0 or not SEGMENT_RE.match(name):
        return
    if _spooled_ahead(spool, name) > ahead // 2 or _prefetcher_alive(spool):
        return
    subprocess.Popen(
        [sys.executable, "-I", "-m", "wedefi_dr.physical.wal", "prefetch", name, spool]
        + ["--env-file", env_file],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
    )


def main(argv: list[str]) -> int:
    """``prefetch.py --env-file FILE NAME DEST`` (``%f %p``)."""
    if len(argv) != 4 or argv[0] != "--env-file":
        print("usage: prefetch.py --env-file FILE NAME DEST", file=sys.stderr)
        return 128
    env_file, name, dest = argv[1], argv[2], argv[3]
    try:
        spool = os.path.join(os.path.dirname(os.path.abspath(dest)), PREFETCH_DIR)
        if SEGMENT_RE.match(name) and from_spool(spool, name, dest):
            ahead = int(read_env(env_file).get("WEDEFI_DR_WAL_PREFETCH", "8"))
            refill(env_file, spool, name, ahead)
            return 0
    except Exception as exc:  # fall through to the full fetch, which reports real errors
        print(f"wedefi-dr wal: spool of {name}: {type(exc).__name__}: {exc}", file=sys.stderr)
    cmd = [sys.executable, "-I", "-m", "wedefi_dr.physical.wal", "fetch", "--env-file"]
    os.execv(sys.executable, [*cmd, env_file, name, dest])
    return 128  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
