"""``restore_command`` of replay: hand prefetched segments over, fetch the rest.

Replay asks for one segment at a time and waits for each. The prefetcher (``python -m
wedefi_dr.physical.wal prefetch``, detached) fills ``pg_wal/.wedefi-prefetch`` with the next
``WEDEFI_DR_WAL_PREFETCH`` segments, downloaded, verified (object sha256, MAC, gpg's
integrity check, plaintext sha256) and decrypted by parallel workers, as pgBackRest's
archive-get queue does. What is left per segment is this script: executed with ``python
-I -S`` (standard library only, no site-packages, no package import), it checks the
spooled file still hashes as the prefetcher recorded, renames it to ``%p``, and starts the
next prefetcher when the spool runs low. So replay waits for an interpreter start and a
sha256, close to what ``cp`` of the decrypted file costs. A segment the running prefetcher
is downloading now (its ``.prefetcher.plan``) is waited for, not downloaded a second time
by a full ``wal-fetch``: replay asks for the next segment within a fraction of a second,
sooner than a new prefetcher delivers the first one. Any other file, while a prefetcher
lives, is asked of it (``.ask/<name>``, answered in ``<name>.answer``): it answers
``spooled`` or ``missing`` with its warm client, and ``defer`` for anything the full
``wal-fetch`` must decide and log (an error, a gap, a streamed partial).

Before the recovering server starts, ``prefetch.py --prime --env-file FILE NAME DEST``
starts the prefetcher after ``NAME`` (the segment before the base backup's first): the
server's first questions (the next timeline's history, the first segment) then meet a
prefetcher that is already importing and downloading instead of a full ``wal-fetch`` each.

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
import time

SEGMENT_RE = re.compile(r"^[0-9A-F]{24}$")
NAME_RE = re.compile(r"^(?:[0-9A-F]{24}(?:\.partial|\.[0-9A-F]{8}\.backup)?|[0-9A-F]{8}\.history)$")
ASK_DIR = ".ask"
ANSWER_SUFFIX = ".answer"
PREFETCH_DIR = ".wedefi-prefetch"
PREFETCHER_PID = ".prefetcher.pid"
PREFETCH_PLAN = ".prefetcher.plan"
WAIT_SECONDS = 60.0
POLL_SECONDS = 0.01
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


def _planned(spool: str, name: str) -> bool:
    try:
        with open(os.path.join(spool, PREFETCH_PLAN)) as f:
            return name in f.read().split()
    except FileNotFoundError:
        return False


def wait_for_prefetcher(spool: str, name: str, timeout: float = WAIT_SECONDS) -> bool:
    """True once ``name`` is spooled; False at once when the prefetcher is not fetching it,
    and as soon as it stops (it stops at a segment it could not spool: the full
    ``wal-fetch`` then reports why) or ``timeout`` passes."""
    done = os.path.join(spool, f"{name}.sha256")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(done):
            return True
        if not (_planned(spool, name) and _prefetcher_alive(spool)):
            return os.path.exists(done)
        time.sleep(POLL_SECONDS)
    return False


def ask_prefetcher(spool: str, name: str, timeout: float = WAIT_SECONDS) -> str | None:
    """The live prefetcher's answer about ``name``: ``spooled`` or ``missing``; None when
    no prefetcher lives, it defers to the full fetch, it stops, or ``timeout`` passes."""
    if not NAME_RE.match(name) or not _prefetcher_alive(spool):
        return None
    answer = os.path.join(spool, f"{name}{ANSWER_SUFFIX}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(answer)  # an earlier call's: only an answer to this question counts
    asks = os.path.join(spool, ASK_DIR)
    os.makedirs(asks, exist_ok=True)
    with open(os.path.join(asks, name), "w"):
        pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(answer) as f:
                what = f.read().strip()
        except FileNotFoundError:
            if not _prefetcher_alive(spool):
                return None
            time.sleep(POLL_SECONDS)
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(answer)
        return what if what in ("spooled", "missing") else None
    return None


def _spooled_ahead(spool: str, name: str) -> int:
    try:
        return sum(1 for n in os.listdir(spool) if SEGMENT_RE.match(n) and n > name)
    except OSError:
        return 0


def refill(env_file: str, spool: str, name: str, ahead: int) -> None:
    """Start the prefetcher after ``name`` unless one runs or enough is spooled. Its pid is
    recorded at once (it records it again when it starts), so the next call asks it
    instead of starting another or running the full fetch while it imports."""
    if ahead <= 0 or not SEGMENT_RE.match(name):
        return
    if _spooled_ahead(spool, name) > ahead // 2 or _prefetcher_alive(spool):
        return
    os.makedirs(spool, exist_ok=True)
    child = subprocess.Popen(
        [sys.executable, "-I", "-m", "wedefi_dr.physical.wal", "prefetch", name, spool]
        + ["--env-file", env_file],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
    )
    pid_file = os.path.join(spool, PREFETCHER_PID)
    with open(f"{pid_file}.tmp{os.getpid()}", "w") as f:
        f.write(str(child.pid))
    os.replace(f"{pid_file}.tmp{os.getpid()}", pid_file)


def main(argv: list[str]) -> int:
    """``prefetch.py [--prime] --env-file FILE NAME DEST`` (``%f %p``)."""
    prime = argv[:1] == ["--prime"]
    argv = argv[1:] if prime else argv
    if len(argv) != 4 or argv[0] != "--env-file":
        print("usage: prefetch.py [--prime] --env-file FILE NAME DEST", file=sys.stderr)
        return 128
    env_file, name, dest = argv[1], argv[2], argv[3]
    spool = os.path.join(os.path.dirname(os.path.abspath(dest)), PREFETCH_DIR)
    if prime:
        refill(env_file, spool, name, int(read_env(env_file).get("WEDEFI_DR_WAL_PREFETCH", "8")))
        return 0 if _prefetcher_alive(spool) else 1
    try:
        spooled = SEGMENT_RE.match(name) and (
            from_spool(spool, name, dest)
            or (wait_for_prefetcher(spool, name) and from_spool(spool, name, dest))
        )
        answer = None if spooled else ask_prefetcher(spool, name)
        if answer == "missing":
            return 1
        ahead = int(read_env(env_file).get("WEDEFI_DR_WAL_PREFETCH", "8"))
        if spooled or (answer == "spooled" and from_spool(spool, name, dest)):
            refill(env_file, spool, name, ahead)
            return 0
        refill(env_file, spool, name, ahead)  # the segments after this one, meanwhile
    except Exception as exc:  # fall through to the full fetch, which reports real errors
        print(f"wedefi-dr wal: spool of {name}: {type(exc).__name__}: {exc}", file=sys.stderr)
    cmd = [sys.executable, "-I", "-m", "wedefi_dr.physical.wal", "fetch", "--env-file"]
    os.execv(sys.executable, [*cmd, env_file, name, dest])
    return 128  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
