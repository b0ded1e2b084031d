"""``restore_command`` of replay: hand prefetched segments over, fetch the rest.

Replay asks for one segment at a time and waits for each. The prefetcher (``python -m
wedefi_dr.physical.wal prefetch``, detached) fills ``pg_wal/.wedefi-prefetch`` with the next
``WEDEFI_DR_WAL_PREFETCH`` segments, downloaded, verified (the object's sha256 under its
MAC, gpg's integrity check, the size) and decrypted by parallel workers, as pgBackRest's
archive-get queue does. What is left per segment is this script: executed with ``python
-I -S`` (a few standard modules and its sibling ``walscript.py``: no site-packages, no
package import, nothing it does not need on this path), it checks the spooled file is
still the one the prefetcher recorded (:func:`record_spooled`), renames it to ``%p``, and
starts the next prefetcher when the spool runs low. So replay waits for an interpreter
start and a rename, close to what ``cp`` of the decrypted file costs. A segment the
running prefetcher is downloading now (its ``.prefetcher.plan``) is waited for, not
downloaded a second time by a full ``wal-fetch``: replay asks for the next segment within a
fraction of a second, sooner than a new prefetcher delivers the first one. Any other file,
while a prefetcher lives, is asked of it (``.ask/<name>``, answered in ``<name>.answer``):
it answers ``spooled`` or ``missing`` with its warm client, and ``defer`` for anything the
full ``wal-fetch`` must decide and log (an error, a gap, a streamed partial).

Before the recovering server starts, ``prefetch.py --prime --env-file FILE NAME DEST``
starts the prefetcher after ``NAME`` (the segment before the base backup's first): the
server's first questions (the next timeline's history, the first segment) then meet a
prefetcher that is already importing and downloading instead of a full ``wal-fetch`` each.

A segment that is not spooled goes to the full ``wal-fetch`` (``os.execv``: the same
process, the same exit status contract: 0 found, 1 not archived, 128 anything else, which
aborts recovery rather than ending it early).
"""

from __future__ import annotations

import os
import sys
import time

if __package__:  # imported: the prefetcher, the tests
    from wedefi_dr.physical import walscript
else:  # executed by the server (``python -I -S``): the sibling file, after the stdlib
    sys.path.append(os.path.dirname(os.path.abspath(__file__)))
    import walscript

ASK_DIR = ".ask"
ANSWER_SUFFIX = ".answer"
PREFETCH_DIR = ".wedefi-prefetch"
PREFETCHER_PID = ".prefetcher.pid"
PREFETCH_PLAN = ".prefetcher.plan"
SPOOLED_SUFFIX = ".spooled"
WAIT_SECONDS = 60.0
POLL_SECONDS = 0.01


def record_spooled(spool: str, name: str, data: bytes) -> None:
    """Spool ``data``, already verified against the archive's authenticated checksums, as
    ``name``, and record which file that is: its inode, size, modification and change times
    and the boot it was written in (``<name>.spooled``, written after the data).

    Why a record and not a second sha256 at hand-over: the hand-over runs while replay
    waits, and hashing 16 MB there took 13–17 ms, as long as ``cp`` of the whole file. The
    spool is in ``pg_wal``, private to the server's OS user, so only that user (who can
    write ``pg_wal`` itself) could change the file, and any write or ``utime`` changes its
    change time. Neither write is fsynced: after a crash of the host the boot id differs
    and nothing spooled before it is handed over."""
    tmp = os.path.join(spool, f".{name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
    path = os.path.join(spool, name)
    os.replace(tmp, path)
    st = os.lstat(path)  # after the rename, which sets its change time
    record = os.path.join(spool, f".{name}{SPOOLED_SUFFIX}.tmp{os.getpid()}")
    with open(record, "w") as f:
        f.write(walscript.file_record(st))
    os.replace(record, path + SPOOLED_SUFFIX)


def is_spooled(spool: str, name: str) -> bool:
    """A record of ``name`` is there: the prefetcher has verified and spooled it."""
    return os.path.exists(os.path.join(spool, f"{name}{SPOOLED_SUFFIX}"))


def from_spool(spool: str, name: str, dest: str) -> bool:
    """Hand ``name`` over (a rename to ``dest``) when it is spooled and is still the file
    the prefetcher verified and recorded (see :func:`record_spooled`); a file that changed
    is removed, and the caller fetches it again."""
    data, record = os.path.join(spool, name), os.path.join(spool, f"{name}{SPOOLED_SUFFIX}")
    try:
        with open(record) as f:
            expected = f.read().strip()
    except FileNotFoundError:
        return False
    try:
        st = os.lstat(data)
        ok = (
            expected == walscript.file_record(st)
            and st.st_nlink == 1
            and st.st_uid == os.geteuid()
            and (st.st_mode & 0o170000) == 0o100000
        )
    except FileNotFoundError:
        ok = False
    if ok:
        os.replace(data, dest)
    else:
        walscript.unlink(data)
        print(f"wedefi-dr wal: prefetched {name} changed on disk; fetching it", file=sys.stderr)
    walscript.unlink(record)
    return ok


def prefetcher_alive(spool: str) -> bool:
    try:
        with open(os.path.join(spool, PREFETCHER_PID)) as f:
            os.kill(int(f.read()), 0)
    except (OSError, ValueError):
        return False
    return True


def write_plan(spool: str, names: list[str]) -> None:
    """The segments the prefetcher is fetching now (``.prefetcher.plan``): this script waits
    for one of them, while the prefetcher lives, instead of downloading it a second time.
    Replaced whole, not fsynced: it means nothing after the prefetcher is gone."""
    tmp = os.path.join(spool, f"{PREFETCH_PLAN}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write("\n".join(names))
    os.replace(tmp, os.path.join(spool, PREFETCH_PLAN))


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
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if is_spooled(spool, name):
            return True
        if not (_planned(spool, name) and prefetcher_alive(spool)):
            return is_spooled(spool, name)
        time.sleep(POLL_SECONDS)
    return False


def ask_prefetcher(spool: str, name: str, timeout: float = WAIT_SECONDS) -> str | None:
    """The live prefetcher's answer about ``name``: ``spooled`` or ``missing``; None when
    no prefetcher lives, it defers to the full fetch, it stops, or ``timeout`` passes."""
    if not walscript.is_wal_name(name) or not prefetcher_alive(spool):
        return None
    answer = os.path.join(spool, f"{name}{ANSWER_SUFFIX}")
    walscript.unlink(answer)  # an earlier call's: only an answer to this question counts
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
            if not prefetcher_alive(spool):
                return None
            time.sleep(POLL_SECONDS)
            continue
        walscript.unlink(answer)
        return what if what in ("spooled", "missing") else None
    return None


def spooled_ahead(spool: str, name: str) -> int:
    """How many segments after ``name`` are spooled (all of them for ``name=""``)."""
    try:
        return sum(1 for n in os.listdir(spool) if walscript.is_segment(n) and n > name)
    except OSError:
        return 0


def refill(env_file: str, spool: str, name: str, ahead: int) -> None:
    """Start the prefetcher after ``name`` unless one runs or enough is spooled. Its pid is
    recorded at once (it records it again when it starts), so the next call asks it
    instead of starting another or running the full fetch while it imports."""
    if ahead <= 0 or not walscript.is_segment(name):
        return
    if spooled_ahead(spool, name) > ahead // 2 or prefetcher_alive(spool):
        return
    os.makedirs(spool, exist_ok=True)
    import subprocess  # only here: its import is a third of this script's start-up

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


def _handed_over(name: str, t0: float) -> None:
    """The server log's record of each segment handed over from the spool and how long
    this script took (from its first line: the interpreter's start is not in it), as the
    archive hand-off logs its waits."""
    print(
        f"wedefi-dr wal: {name} handed over, waited {time.monotonic() - t0:.3f} s", file=sys.stderr
    )


def main(argv: list[str]) -> int:
    """``prefetch.py [--prime] --env-file FILE NAME DEST`` (``%f %p``)."""
    t0 = time.monotonic()
    prime = argv[:1] == ["--prime"]
    argv = argv[1:] if prime else argv
    if len(argv) != 4 or argv[0] != "--env-file":
        print("usage: prefetch.py [--prime] --env-file FILE NAME DEST", file=sys.stderr)
        return 128
    env_file, name, dest = argv[1], argv[2], argv[3]
    spool = os.path.join(os.path.dirname(os.path.abspath(dest)), PREFETCH_DIR)
    if prime:
        refill(
            env_file,
            spool,
            name,
            int(walscript.read_env(env_file).get("WEDEFI_DR_WAL_PREFETCH", "8")),
        )
        return 0 if prefetcher_alive(spool) else 1
    try:
        spooled = walscript.is_segment(name) and (
            from_spool(spool, name, dest)
            or (wait_for_prefetcher(spool, name) and from_spool(spool, name, dest))
        )
        answer = None if spooled else ask_prefetcher(spool, name)
        if answer == "missing":
            return 1
        ahead = int(walscript.read_env(env_file).get("WEDEFI_DR_WAL_PREFETCH", "8"))
        if spooled or (answer == "spooled" and from_spool(spool, name, dest)):
            refill(env_file, spool, name, ahead)
            _handed_over(name, t0)
            return 0
        refill(env_file, spool, name, ahead)  # the segments after this one, meanwhile
    except Exception as exc:  # fall through to the full fetch, which reports real errors
        print(f"wedefi-dr wal: spool of {name}: {type(exc).__name__}: {exc}", file=sys.stderr)
    cmd = [sys.executable, "-I", "-m", "wedefi_dr.physical.wal", "fetch", "--env-file"]
    os.execv(sys.executable, [*cmd, env_file, name, dest])
    return 128  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
