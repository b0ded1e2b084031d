"""``archive_command`` of the resident archiver: hand ``%p`` over, exit 0 once it is durable.

PostgreSQL runs ``archive_command`` once per segment and waits for it, one at a time, so
what it runs must be cheap: this file is executed as a script (``python -I -S
.../archiver_handoff.py``), imports a few standard modules and its sibling
``walscript.py``, never the package, and does no S3 or gpg work itself. The resident
archiver (``archiver.py``, one per cluster) uploads every ``.ready`` file it sees in
parallel and records each one stored in ``done/<name>``: the plaintext's sha256 and the
record of the file it read (:func:`walscript.file_record`). This command exits 0 when the
file at ``%p`` still has that record, and else asks the archiver for the file again (it
reads it anew, and stores it or finds it stored): so the server waits for no 16 MB hash
(15 ms here) and no ``hashlib`` or ``re`` import (11 ms).

The contract with the server is kept exactly:

- exit 0 only after the archiver wrote ``done/<name>`` with this very file's record, which
  it writes only once the S3 PUT of what it read returned (or the identical object was
  already there);
- exit 3 when the archiver refused the file (different content archived under its name);
- any other outcome (the archiver died before the segment was stored, it reported an
  error, or ``--wait`` seconds passed) exits 2, so the server retries the same file later.

No archiver running: this command starts one (detached, its log beside its records) and
waits for it. ``WEDEFI_DR_WAL_ARCHIVER=sync`` in the env file turns the hand-off off: the
synchronous one-process-per-segment ``wal-push`` runs instead.
"""

from __future__ import annotations

import errno
import fcntl
import os
import sys
import time

if __package__:  # imported: the archiver, the tests
    from wedefi_dr.physical import walscript
else:  # executed by the server (``python -I -S``): the sibling file, after the stdlib
    sys.path.append(os.path.dirname(os.path.abspath(__file__)))
    import walscript

SPOOL = ".wedefi-archiver"
LOCK = "lock"
LOG = "archiver.log"
EXIT_OK, EXIT_RETRY, EXIT_REFUSED = 0, 2, 3
POLL_SECONDS = 0.002  # two failed opens a poll; the server waits for this loop's last turn
LIVENESS_EVERY = 0.2
START_GRACE_SECONDS = 20.0


def _log(message: str) -> None:
    print(f"wedefi-dr archive: {message}", file=sys.stderr, flush=True)


def _durable(name: str, t0: float) -> None:
    """The server log's record of each hand-off and how long the server waited."""
    _log(f"{name} durable, waited {time.monotonic() - t0:.3f} s")


def archiver_alive(spool: str) -> bool:
    """The archiver holds an exclusive lock on ``lock`` while it runs (a dead one drops it)."""
    try:
        fd = os.open(os.path.join(spool, LOCK), os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        return exc.errno in (errno.EAGAIN, errno.EACCES)
    finally:
        os.close(fd)  # also releases a shared lock we got
    return False


def start_archiver(env_file: str, pg_wal: str, spool: str) -> None:
    """The archiver, detached from the server's process group; output into its log."""
    import subprocess  # only here: the usual hand-off starts nothing, and this import is slow

    log = os.open(os.path.join(spool, LOG), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        subprocess.Popen(
            [sys.executable, "-I", "-m", "wedefi_dr.physical.archiver"]
            + ["--env-file", env_file, pg_wal],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            close_fds=True,
        )
    finally:
        os.close(log)


def _write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return None


def done_record(sha256: str, record: str) -> str:
    """What the archiver writes in ``done/<name>`` once it stored a file."""
    return f"{sha256} {record}"


def stored_this_file(done: str, record: str) -> bool:
    """The archiver's ``done`` record is of the file whose record is ``record``: it read
    and stored this very file. Another file under the name (copied, rewritten, touched) is
    asked for again, and the archiver reads it anew."""
    return done.partition(" ")[2] == record


def handoff(env_file: str, path: str, wait: float) -> int:
    """The exit status the server expects (see the module docstring)."""
    name = os.path.basename(path)
    if not walscript.is_wal_name(name):
        _log(f"{name!r} is not a WAL file name")
        return EXIT_RETRY
    pg_wal = os.path.dirname(os.path.abspath(path))
    spool = os.path.join(pg_wal, SPOOL)
    for sub in ("", "done", "failed", "want"):
        os.makedirs(os.path.join(spool, sub), mode=0o700, exist_ok=True)
    done_path = os.path.join(spool, "done", name)
    failed_path = os.path.join(spool, "failed", name)
    want_path = os.path.join(spool, "want", name)
    t0 = time.monotonic()
    record = walscript.file_record(os.stat(path))
    done = _read(done_path)
    if done is not None and stored_this_file(done, record):  # stored before we asked
        os.unlink(done_path)
        _durable(name, t0)
        return EXIT_OK
    for stale in (done_path, failed_path):
        walscript.unlink(stale)
    _write(want_path, record)
    deadline = time.monotonic() + wait
    started = None
    if not archiver_alive(spool):
        start_archiver(env_file, pg_wal, spool)
        started = time.monotonic()
    next_liveness = time.monotonic() + LIVENESS_EVERY
    while time.monotonic() < deadline:
        done = _read(done_path)
        if done is not None:
            os.unlink(done_path)
            record = walscript.file_record(os.stat(path))  # it may have changed since we asked
            if stored_this_file(done, record):
                _durable(name, t0)
                return EXIT_OK
            _log(f"{name}: the archiver's record is of another file by this name; asking again")
            _write(want_path, record)
        failed = _read(failed_path)
        if failed is not None:
            code, _, message = failed.partition(" ")
            _log(f"{name}: {message.strip()}")
            return EXIT_REFUSED if code == str(EXIT_REFUSED) else EXIT_RETRY
        now = time.monotonic()
        if now >= next_liveness:
            next_liveness = now + LIVENESS_EVERY
            starting = started is not None and now - started < START_GRACE_SECONDS
            if not starting and not archiver_alive(spool):
                if _read(done_path) is not None:
                    continue  # it finished just before it exited
                _log(
                    f"{name}: the archiver is gone before the segment was stored "
                    f"(see {os.path.join(spool, LOG)}); the server will retry"
                )
                return EXIT_RETRY
        time.sleep(POLL_SECONDS)
    _log(f"{name}: not durable after {wait:.0f} s; the server will retry")
    return EXIT_RETRY


def main(argv: list[str]) -> int:
    """``archiver_handoff.py --env-file FILE [--wait SECONDS] PATH`` (``%p``)."""
    args = list(argv)
    env_file, wait, path = None, None, None
    while args:
        arg = args.pop(0)
        if arg == "--env-file" and args:
            env_file = args.pop(0)
        elif arg == "--wait" and args:
            wait = float(args.pop(0))
        elif path is None:
            path = arg
        else:
            _log(f"unexpected argument {arg!r}")
            return EXIT_RETRY
    if env_file is None or path is None:
        _log("usage: archiver_handoff.py --env-file FILE [--wait SECONDS] PATH")
        return EXIT_RETRY
    try:
        env = walscript.read_env(env_file)
        if env.get("WEDEFI_DR_WAL_ARCHIVER", "resident") == "sync":
            cmd = [sys.executable, "-I", "-m", "wedefi_dr.physical.wal", "push"]
            os.execv(sys.executable, cmd + ["--env-file", env_file, path])
        if wait is None:
            wait = float(env.get("WEDEFI_DR_WAL_ARCHIVER_WAIT_SECONDS", "60"))
        return handoff(env_file, path, wait)
    except Exception as exc:  # the server retries; it logs this line
        _log(f"{path}: {type(exc).__name__}: {exc}")
        return EXIT_RETRY


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
