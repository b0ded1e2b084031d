"""The resident archiver and its hand-off keep PostgreSQL's archive_command contract.

Every call runs the real ``archive_command`` line (``archiving.archive_command``) against
the session's moto S3 server with real gpg, from a fake ``pg_wal`` of the test's own and
into a prefix of its own. The archiver is a real detached process; each test stops the
ones it caused, by pid.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.test_wal import FIRST, SEG, segment_bytes
from wedefi_dr.config import Settings
from wedefi_dr.physical import archiver, archiver_handoff, archiving, wal, walnames


def _archiver_pid(pg_wal: Path) -> int | None:
    try:
        return int((pg_wal / archiver.SPOOL / "archiver.pid").read_text())
    except (OSError, ValueError):
        return None


def _wait_for_pid(pg_wal: Path, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = _archiver_pid(pg_wal)
        if pid is not None:
            return pid
        time.sleep(0.05)
    raise AssertionError(f"no archiver started for {pg_wal}")


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    return False


def _stop(pid: int | None) -> None:
    if pid is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.fixture
def spool(settings: Settings, tmp_path: Path):
    """A fake pg_wal, an env file with a fresh prefix, and the archivers to stop after."""
    prefix = f"test-archiver-{uuid.uuid4().hex[:8]}"
    env_file = archiving.write_wal_env(settings, tmp_path / "wal.env", prefix=prefix)
    pg_wal = tmp_path / "pg_wal"
    (pg_wal / "archive_status").mkdir(parents=True)
    started: list[int] = []
    yield {
        "env": env_file,
        "pg_wal": pg_wal,
        "settings": settings.model_copy(update={"prefix": prefix}),
        "started": started,
    }
    for pid in {*started, _archiver_pid(pg_wal)}:
        _stop(pid)


def handoff(spool: dict, name: str, wait: float = 60) -> subprocess.CompletedProcess:
    """The server's call: ``archive_command`` with ``%p``, from the data directory."""
    command = archiving.archive_command(spool["env"]).replace("%p", f"pg_wal/{name}")
    return subprocess.run(
        shlex.split(command) + ["--wait", str(wait)],
        capture_output=True,
        text=True,
        cwd=spool["pg_wal"].parent,
        timeout=wait + 30,
    )


def ready(spool: dict, name: str, data: bytes) -> None:
    """What the server does before archive_command: the file, then its ``.ready``."""
    (spool["pg_wal"] / name).write_bytes(data)
    (spool["pg_wal"] / "archive_status" / f"{name}.ready").write_text("")


def test_handoff_exits_0_only_once_the_segment_is_stored_and_fetchable(spool, tmp_path):
    store = wal.Archive(spool["settings"])
    names = [FIRST, *walnames.next_segments(FIRST, 2, SEG)]
    contents = {n: segment_bytes(40 + i) for i, n in enumerate(names)}
    for n in names:
        ready(spool, n, contents[n])
    first = handoff(spool, names[0])
    assert first.returncode == 0, first.stderr
    spool["started"].append(_wait_for_pid(spool["pg_wal"]))
    assert store.head(names[0])["Metadata"]["plain-sha256"] == wal._sha256(contents[names[0]])
    for n in names[1:]:  # the archiver uploaded the other .ready files on its own
        assert handoff(spool, n).returncode == 0
    assert sorted(store.list_names()) == sorted(names)
    for n in names:  # the same objects as wal-push: wal-fetch reads them
        assert store.fetch_bytes(n, tmp_path / "w") == contents[n]
    assert _archiver_pid(spool["pg_wal"]) == spool["started"][0]  # one resident process


def test_segments_the_server_marked_done_are_not_archived_again(spool):
    """A starting archiver finds the segments the server archived earlier (their status
    ``.done``, the files kept until recycled): they are not its work. Pushing them again
    would spend a zstd, a gpg and a refused PUT on each, up to ``max_wal_size`` worth, while
    the server's next segment waits behind them."""
    store = wal.Archive(spool["settings"])
    archived, pending = FIRST, walnames.next_segments(FIRST, 1, SEG)[0]
    (spool["pg_wal"] / archived).write_bytes(segment_bytes(65))
    (spool["pg_wal"] / "archive_status" / f"{archived}.done").write_text("")
    ready(spool, pending, segment_bytes(66))
    assert handoff(spool, pending).returncode == 0  # starts the resident archiver
    spool["started"].append(_wait_for_pid(spool["pg_wal"]))
    time.sleep(1.0)  # many scans: time to start, and finish, any push it would make
    assert store.list_names() == [pending]
    assert archived not in (spool["pg_wal"] / archiver.SPOOL / archiver_handoff.LOG).read_text()


def _frozen_archiver(spool: dict) -> subprocess.Popen:
    """A resident archiver, stopped (SIGSTOP): it holds its lock but stores nothing."""
    proc = subprocess.Popen(
        [sys.executable, "-I", "-m", "wedefi_dr.physical.archiver"]
        + ["--env-file", str(spool["env"])]
        + [str(spool["pg_wal"])],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    spool["started"].append(proc.pid)
    assert _wait_for_pid(spool["pg_wal"]) == proc.pid
    proc.send_signal(signal.SIGSTOP)
    return proc


def _waiting_handoff(spool: dict, name: str, wait: float = 60) -> subprocess.Popen:
    """The server's call, started: it returns once the hand-off asked for ``name``."""
    command = archiving.archive_command(spool["env"]).replace("%p", f"pg_wal/{name}")
    waiting = subprocess.Popen(
        shlex.split(command) + ["--wait", str(wait)],
        cwd=spool["pg_wal"].parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    want = spool["pg_wal"] / archiver.SPOOL / "want" / name
    while not want.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert want.exists() and waiting.poll() is None  # handed over, waiting for "durable"
    return waiting


def test_archiver_killed_before_durable_exits_nonzero_then_retry_stores_once(spool):
    store = wal.Archive(spool["settings"])
    data = segment_bytes(50)
    proc = _frozen_archiver(spool)
    ready(spool, FIRST, data)
    waiting = _waiting_handoff(spool, FIRST)
    assert store.head(FIRST) is None
    proc.kill()
    proc.wait()
    _, err = waiting.communicate(timeout=30)
    assert waiting.returncode == 2, err  # non-zero: the server keeps the .ready and retries
    assert "gone before the segment was stored" in err
    assert store.head(FIRST) is None

    retry = handoff(spool, FIRST)  # starts a new archiver, which stores it
    assert retry.returncode == 0, retry.stderr
    spool["started"].append(_wait_for_pid(spool["pg_wal"]))
    stored = store.head(FIRST)
    assert stored["Metadata"]["plain-sha256"] == wal._sha256(data)
    again = handoff(spool, FIRST)  # the server re-sends after a crash: identical, accepted
    assert again.returncode == 0, again.stderr
    assert store.head(FIRST)["ETag"] == stored["ETag"]

    ready(spool, FIRST, segment_bytes(51))  # other content under the stored name
    refused = handoff(spool, FIRST)
    assert refused.returncode == wal.EXIT_REFUSED
    assert "REFUSED" in refused.stderr
    after = store.head(FIRST)
    assert after["ETag"] == stored["ETag"]  # nothing overwritten
    assert store.list_names() == [FIRST]  # no duplicate


def _stored_on_its_own(spool: dict, name: str, data: bytes) -> None:
    """The server marks ``name`` ready and the running archiver stores it before any
    hand-off asks (its ``done`` record appears)."""
    ready(spool, name, data)
    done = spool["pg_wal"] / archiver.SPOOL / "done" / name
    deadline = time.monotonic() + 30
    while not done.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert done.exists(), f"the archiver did not store {name} on its own"
    time.sleep(0.05)  # past the kernel's coarse timestamp clock: a change shows in ctime


def test_handoff_trusts_the_archivers_record_only_for_the_file_it_read(spool):
    """The hand-off does not hash the segment when the file still has the record the
    archiver took of what it stored; a file changed since (same size, other bytes) must
    not exit 0 on that record, and one merely touched is accepted once the archiver has
    read it again."""
    store = wal.Archive(spool["settings"])
    names = [FIRST, *walnames.next_segments(FIRST, 3, SEG)]
    ready(spool, names[0], segment_bytes(59))
    assert handoff(spool, names[0]).returncode == 0  # starts the resident archiver
    spool["started"].append(_wait_for_pid(spool["pg_wal"]))

    _stored_on_its_own(spool, names[1], segment_bytes(60))
    assert handoff(spool, names[1]).returncode == 0  # the record matches: no hash needed

    first = segment_bytes(61)
    _stored_on_its_own(spool, names[2], first)
    other = segment_bytes(62)
    with open(spool["pg_wal"] / names[2], "r+b") as f:  # rewritten in place, same size
        f.write(other)
    changed = handoff(spool, names[2], wait=20)
    assert changed.returncode == wal.EXIT_REFUSED, changed.stderr
    assert store.fetch_bytes(names[2], spool["pg_wal"].parent / "w") == first  # kept

    _stored_on_its_own(spool, names[3], segment_bytes(63))
    os.utime(spool["pg_wal"] / names[3])  # a new record, the same bytes
    touched = handoff(spool, names[3], wait=20)
    assert touched.returncode == 0, touched.stderr
    assert sorted(store.list_names()) == sorted(names)


def test_a_file_touched_while_the_handoff_waits_is_accepted_once_stored(spool):
    """The archiver reads the file after the hand-off took its record; touched in between
    (the same bytes, a new record), it is durable as soon as the archiver stored it, and the
    hand-off must not wait out its ``--wait`` on the record it took first."""
    proc = _frozen_archiver(spool)
    ready(spool, FIRST, segment_bytes(64))
    waiting = _waiting_handoff(spool, FIRST, wait=20)
    time.sleep(0.05)  # past the kernel's coarse timestamp clock
    os.utime(spool["pg_wal"] / FIRST)
    proc.send_signal(signal.SIGCONT)
    _, err = waiting.communicate(timeout=60)
    assert waiting.returncode == 0, err
    assert f"{FIRST} durable" in err


def test_sync_setting_falls_back_to_wal_push(spool, settings, tmp_path):
    sync_env = archiving.write_wal_env(
        settings.model_copy(update={"wal_archiver": "sync"}),
        tmp_path / "sync.env",
        prefix=spool["settings"].prefix,
    )
    data = segment_bytes(52)
    ready(spool, FIRST, data)
    result = handoff({**spool, "env": sync_env}, FIRST)
    assert result.returncode == 0, result.stderr
    assert "wedefi-dr wal: push" in result.stderr  # wal-push ran, in this process
    assert _archiver_pid(spool["pg_wal"]) is None
    assert wal.Archive(spool["settings"]).head(FIRST) is not None


def test_a_file_that_changes_while_it_is_read_is_not_stored(spool):
    """The archiver reads a segment a MiB at a time, so another writer can change it
    mid-read: then nothing of it may be stored (a torn segment under the name would be
    refused as a conflict for ever after), the failure is recorded, and once the file
    holds still it is stored whole."""
    import threading

    name = FIRST
    path = spool["pg_wal"] / name
    ready(spool, name, segment_bytes(70))
    resident = archiver.Archiver(spool["settings"], spool["pg_wal"])
    stop = threading.Event()

    def touch() -> None:
        while not stop.is_set():
            os.utime(path)
            time.sleep(0.0005)

    writer = threading.Thread(target=touch, daemon=True)
    writer.start()
    try:
        resident._push(name)
    finally:
        stop.set()
        writer.join()
    failed = (spool["pg_wal"] / archiver.SPOOL / "failed" / name).read_text()
    assert failed.startswith("2 ") and "changed while it was read" in failed
    assert resident.archive.list_names() == []
    assert not (spool["pg_wal"] / archiver.SPOOL / "done" / name).exists()

    resident._push(name)
    assert resident.archive.list_names() == [name]
    assert (spool["pg_wal"] / archiver.SPOOL / "done" / name).exists()
    resident.pool.shutdown()
