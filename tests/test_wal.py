"""WAL archive: wal-push / wal-fetch keep PostgreSQL's archive contract, end to end.

Every call runs the real command line (``python -I -m wedefi_dr.physical.wal``, as the server
runs it) against the session's moto S3 server with real gpg. Each test archives into its
own prefix, so the production archive of the session primary is never touched.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from pydantic import SecretStr

from tests.test_basebackup import GPG_D, by_hand
from wedefi_dr.config import Settings
from wedefi_dr.physical import archiver, archiving, prefetch, wal, walkey, walnames
from wedefi_dr.postgres.tools import connect
from wedefi_dr.storage import authentication, encryption
from wedefi_dr_dev.stack import Stack

SEG = 16 * 1024 * 1024
FIRST = "000000010000000000000010"


def segment_bytes(seed: int) -> bytes:
    """A segment-sized file: some distinctive content, the rest zeros (like a switched one)."""
    head = (f"wal segment {seed} " * 4096).encode()[: 256 * 1024] + os.urandom(64 * 1024)
    return head + bytes(SEG - len(head))


@pytest.fixture
def archive(settings: Settings, tmp_path: Path):
    """An env file pointing at a fresh prefix, and a fake pg_wal to push from."""
    prefix = f"test-wal-{uuid.uuid4().hex[:8]}"
    env_file = archiving.write_wal_env(settings, tmp_path / "wal.env", prefix=prefix)
    pg_wal = tmp_path / "pg_wal"
    (pg_wal / "archive_status").mkdir(parents=True)
    s = settings.model_copy(update={"prefix": prefix})
    return {"env": env_file, "pg_wal": pg_wal, "prefix": prefix, "settings": s}


def wal_cmd(archive: dict, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-I",
            "-m",
            "wedefi_dr.physical.wal",
            args[0],
            "--env-file",
            str(archive["env"]),
        ]
        + list(args[1:]),
        capture_output=True,
        text=True,
        cwd=cwd or archive["pg_wal"].parent,
    )


def put_file(archive: dict, name: str, data: bytes) -> Path:
    path = archive["pg_wal"] / name
    path.write_bytes(data)
    return path


def head(store, archive: dict, name: str) -> dict | None:
    return wal.Archive(archive["settings"]).head(name)


def test_push_fetch_round_trip_is_encrypted_and_checksummed(archive, store):
    data = segment_bytes(1)
    put_file(archive, FIRST, data)
    pushed = wal_cmd(archive, "push", f"pg_wal/{FIRST}")
    assert pushed.returncode == 0, pushed.stderr
    key = wal.archive_key(archive["settings"], FIRST)
    obj = store.client.get_object(Bucket=store.bucket, Key=key)
    body = obj["Body"].read()
    assert b"wal segment 1" not in body  # zstd + gpg: no plaintext at rest
    assert len(body) < SEG // 10  # the zero tail compressed away
    assert obj["Metadata"]["plain-sha256"] == wal._sha256(data)
    assert obj["Metadata"]["encoding"] == "zstd+gpg-walkey"
    assert obj["ServerSideEncryption"] == "AES256"

    fetched = wal_cmd(archive, "fetch", FIRST, "pg_wal/RECOVERYXLOG")
    assert fetched.returncode == 0, fetched.stderr
    assert (archive["pg_wal"] / "RECOVERYXLOG").read_bytes() == data


def test_identical_repush_succeeds_and_different_content_is_refused(archive, store):
    data = segment_bytes(2)
    put_file(archive, FIRST, data)
    assert wal_cmd(archive, "push", f"pg_wal/{FIRST}").returncode == 0
    before = head(store, archive, FIRST)

    again = wal_cmd(archive, "push", f"pg_wal/{FIRST}")
    assert again.returncode == 0, again.stderr
    assert "already archived (identical)" in again.stderr

    put_file(archive, FIRST, segment_bytes(3))
    refused = wal_cmd(archive, "push", f"pg_wal/{FIRST}")
    assert refused.returncode == wal.EXIT_REFUSED
    assert "REFUSED" in refused.stderr and FIRST in refused.stderr
    after = head(store, archive, FIRST)
    assert after["ETag"] == before["ETag"]  # nothing was stored
    assert after["Metadata"]["plain-sha256"] == wal._sha256(data)


def test_history_never_overwritten_and_partial_kept_apart(archive, store):
    put_file(archive, "00000002.history", b"1\t0/5000000\tno recovery target specified\n")
    assert wal_cmd(archive, "push", "pg_wal/00000002.history").returncode == 0
    put_file(archive, "00000002.history", b"1\t0/6000000\tanother history\n")
    refused = wal_cmd(archive, "push", "pg_wal/00000002.history")
    assert refused.returncode == wal.EXIT_REFUSED

    partial = segment_bytes(4)
    put_file(archive, f"{FIRST}.partial", partial)
    assert wal_cmd(archive, "push", f"pg_wal/{FIRST}.partial").returncode == 0
    label = f"{FIRST}.00000028.backup"
    put_file(archive, label, b"START WAL LOCATION: 0/10000028\n")
    assert wal_cmd(archive, "push", f"pg_wal/{label}").returncode == 0
    # The .partial is not the complete segment: asking for the segment finds nothing.
    missing = wal_cmd(archive, "fetch", FIRST, "pg_wal/RECOVERYXLOG")
    assert missing.returncode == wal.EXIT_MISSING
    assert not (archive["pg_wal"] / "RECOVERYXLOG").exists()
    got = wal_cmd(archive, "fetch", f"{FIRST}.partial", "pg_wal/RECOVERYXLOG")
    assert got.returncode == 0
    assert (archive["pg_wal"] / "RECOVERYXLOG").read_bytes() == partial
    names = wal.Archive(archive["settings"]).list_names()
    assert set(names) == {"00000002.history", f"{FIRST}.partial", label}


def test_fetch_missing_is_quiet_and_a_gap_is_fatal_and_named(archive):
    missing = wal_cmd(archive, "fetch", FIRST, "pg_wal/RECOVERYXLOG")
    assert missing.returncode == wal.EXIT_MISSING
    assert missing.stderr == ""  # the server asks for files that may not exist
    assert wal_cmd(archive, "fetch", "00000005.history", "pg_wal/RECOVERYHISTORY").returncode == 1

    first, second, third = [FIRST, *walnames.next_segments(FIRST, 2, SEG)]
    for name in (first, third):
        put_file(archive, name, segment_bytes(5))
        assert wal_cmd(archive, "push", f"pg_wal/{name}").returncode == 0
    gap = wal_cmd(archive, "fetch", second, "pg_wal/RECOVERYXLOG")
    assert gap.returncode == wal.EXIT_FATAL  # > 125: the server aborts recovery
    assert "GAP" in gap.stderr and second in gap.stderr and third in gap.stderr


def test_corrupt_object_or_wrong_passphrase_aborts_recovery(archive, store, settings, tmp_path):
    data = segment_bytes(6)
    put_file(archive, FIRST, data)
    assert wal_cmd(archive, "push", f"pg_wal/{FIRST}").returncode == 0

    wrong = dict(archive)
    wrong["env"] = archiving.write_wal_env(
        settings.model_copy(update={"gpg_passphrase": SecretStr("not-the-passphrase")}),
        tmp_path / "wrong.env",
        prefix=archive["prefix"],
    )
    bad_key = wal_cmd(wrong, "fetch", FIRST, "pg_wal/RECOVERYXLOG")
    assert bad_key.returncode == wal.EXIT_FATAL
    assert "passphrase" in bad_key.stderr
    assert "not-the-passphrase" not in bad_key.stderr

    key = wal.archive_key(archive["settings"], FIRST)
    obj = store.client.get_object(Bucket=store.bucket, Key=key)
    body = bytearray(obj["Body"].read())
    body[len(body) // 2] ^= 0xFF
    store.client.put_object(
        Bucket=store.bucket, Key=key, Body=bytes(body), Metadata=obj["Metadata"]
    )
    corrupt = wal_cmd(archive, "fetch", FIRST, "pg_wal/RECOVERYXLOG")
    assert corrupt.returncode == wal.EXIT_FATAL
    assert "corrupt" in corrupt.stderr
    assert not (archive["pg_wal"] / "RECOVERYXLOG").exists()


def test_fetch_prefetches_ahead_and_verifies_before_handing_over(archive):
    names = [FIRST, *walnames.next_segments(FIRST, 3, SEG)]
    contents = {n: segment_bytes(10 + i) for i, n in enumerate(names)}
    for n, data in contents.items():
        put_file(archive, n, data)
        assert wal_cmd(archive, "push", f"pg_wal/{n}").returncode == 0
        (archive["pg_wal"] / n).unlink()
    assert wal_cmd(archive, "fetch", names[0], "pg_wal/RECOVERYXLOG").returncode == 0
    spool = archive["pg_wal"] / wal.PREFETCH_DIR
    deadline = time.monotonic() + 60  # the prefetcher runs detached, replay goes on
    spooled = set(names[1:]) | {f"{n}{prefetch.SPOOLED_SUFFIX}" for n in names[1:]}
    while time.monotonic() < deadline:
        if spool.exists() and {p.name for p in spool.iterdir()} >= spooled:
            break
        time.sleep(0.2)
    assert {p.name for p in spool.iterdir()} >= set(names[1:])
    # A prefetched file that changed on disk is not handed over: it is fetched again.
    (spool / names[2]).write_bytes(b"damaged")
    # The server's restore_command (prefetch.py: stdlib only) hands them over.
    command = archiving.restore_command(archive["env"])
    for n in names[1:]:
        dest = archive["pg_wal"] / "RECOVERYXLOG"
        argv = shlex.split(command.replace("%f", n).replace("%p", "pg_wal/RECOVERYXLOG"))
        done = subprocess.run(argv, cwd=archive["pg_wal"].parent, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert dest.read_bytes() == contents[n]
        # The server log records each hand-over from the spool (the bench reads it); the
        # damaged one was fetched again into the spool by the live prefetcher first.
        assert f"{n} handed over, waited" in done.stderr, done.stderr
        assert ("changed on disk" in done.stderr) == (n == names[2]), done.stderr
    assert not (spool / names[1]).exists()  # handed over by rename, not copied
    missing = shlex.split(command.replace("%f", FIRST[:-1] + "F").replace("%p", "pg_wal/X"))
    gone = subprocess.run(missing, cwd=archive["pg_wal"].parent, capture_output=True)
    assert gone.returncode == wal.EXIT_MISSING  # not spooled, not archived

    # What replay asks for at the end (a segment again, a history file, the next segment)
    # the lingering prefetcher answers; a gap still goes to the full fetch and is fatal.
    def restore(name: str) -> subprocess.CompletedProcess:
        argv = shlex.split(command.replace("%f", name).replace("%p", "pg_wal/RECOVERYXLOG"))
        return subprocess.run(argv, cwd=archive["pg_wal"].parent, capture_output=True, text=True)

    again = restore(names[1])
    assert again.returncode == 0, again.stderr
    assert (archive["pg_wal"] / "RECOVERYXLOG").read_bytes() == contents[names[1]]
    assert restore("00000002.history").returncode == wal.EXIT_MISSING
    hole, after = walnames.next_segments(names[-1], 2, SEG)
    put_file(archive, after, segment_bytes(19))
    assert wal_cmd(archive, "push", f"pg_wal/{after}").returncode == 0
    gap = restore(hole)
    assert gap.returncode == wal.EXIT_FATAL and "GAP" in gap.stderr, gap.stderr


def test_push_archives_other_ready_files_in_parallel(archive, store):
    names = [FIRST, *walnames.next_segments(FIRST, 3, SEG)]
    for i, n in enumerate(names):
        put_file(archive, n, segment_bytes(20 + i))
        (archive["pg_wal"] / "archive_status" / f"{n}.ready").touch()
    first = wal_cmd(archive, "push", f"pg_wal/{names[0]}")
    assert first.returncode == 0, first.stderr
    assert "3 more in parallel" in first.stderr
    for n in names[1:]:
        assert head(store, archive, n) is not None  # already durable
        assert (archive["pg_wal"] / wal.PUSHED_DIR / n).exists()
    second = wal_cmd(archive, "push", f"pg_wal/{names[1]}")
    assert second.returncode == 0 and "archived earlier in a batch" in second.stderr
    # A marker never hides a changed file: the normal path runs, and refuses.
    put_file(archive, names[2], segment_bytes(99))
    third = wal_cmd(archive, "push", f"pg_wal/{names[2]}")
    assert third.returncode == wal.EXIT_REFUSED


def test_session_primary_archives_through_the_stack_configuration(stack: Stack, settings, store):
    """The stack's archive_command works as the postgres user, with no secret in the conf."""
    primary = stack.primary
    env_file = primary.home / "wal-archive.env"
    st = env_file.stat()
    assert oct(st.st_mode & 0o777) == "0o600"
    # The same keys as a recovered cluster's env file (one write_wal_env for both).
    keys = {line.split("=", 1)[0] for line in env_file.read_text().splitlines()}
    assert {
        "WEDEFI_DR_SSE",
        "WEDEFI_DR_STORAGE_CLASS",
        "WEDEFI_DR_GPG_CIPHER",
        "WEDEFI_DR_WAL_PREFETCH",
        "WEDEFI_DR_WAL_ARCHIVER",
        "AWS_ACCESS_KEY_ID",
    } <= keys
    with connect(primary.admin_dsn(), autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("SHOW archive_command")
        command = cur.fetchone()[0]
        cur.execute("SHOW archive_timeout")
        assert cur.fetchone()[0] == "1min"
        cur.execute("CREATE TEMP TABLE t AS SELECT 1")  # some WAL, so the switch is real
        cur.execute("SELECT pg_walfile_name(pg_current_wal_insert_lsn())")
        segment = cur.fetchone()[0]
        cur.execute("SELECT pg_switch_wal()")
        assert "archiver_handoff.py" in command  # the hand-off to the resident archiver
        assert settings.gpg_passphrase.get_secret_value() not in command
        deadline = time.monotonic() + 60
        archived = None
        while time.monotonic() < deadline:
            cur.execute("SELECT last_archived_wal, failed_count FROM pg_stat_archiver")
            archived, failed = cur.fetchone()
            if archived and archived >= segment:
                break
            time.sleep(0.3)
    assert archived and archived >= segment, f"archiver did not reach {segment} ({failed} failed)"
    assert store.head(wal.archive_key(settings, segment)) is not None
    pg_wal = primary.data_dir / "pg_wal"
    assert (pg_wal / archiver.SPOOL / "archiver.pid").exists()  # one resident archiver


@pytest.mark.parametrize("forgery", ["no-mac", "mac-of-another-segment"])
def test_planted_segment_without_our_mac_is_refused_by_fetch(archive, store, forgery):
    """An object written by anyone but wal-push is refused (exit 128: abort, not end early),
    even when it is real gpg under the right passphrase with consistent checksums: the MAC
    over (name, sha256, size) is what only this system's key produces."""
    genuine = FIRST[:-1] + "1"
    put_file(archive, genuine, segment_bytes(20))
    assert wal_cmd(archive, "push", f"pg_wal/{genuine}").returncode == 0
    genuine_meta = head(store, archive, genuine)["Metadata"]

    forged = segment_bytes(21)
    cipher = wal.encode(archive["settings"], forged)
    metadata = {
        "plain-sha256": wal._sha256(forged),
        "plain-size": str(len(forged)),
        "object-sha256": wal._sha256(cipher),
        "encoding": wal.ENCODING,
    }
    if forgery == "mac-of-another-segment":
        metadata["mac"] = genuine_meta.get("mac", "")
        metadata["mac-key-id"] = genuine_meta.get("mac-key-id", "")
    store.client.put_object(
        Bucket=store.bucket,
        Key=wal.archive_key(archive["settings"], FIRST),
        Body=cipher,
        Metadata=metadata,
    )
    planted = wal_cmd(archive, "fetch", FIRST, "pg_wal/RECOVERYXLOG")
    assert planted.returncode == wal.EXIT_FATAL, planted.stderr
    assert FIRST in planted.stderr and "MAC" in planted.stderr
    assert not (archive["pg_wal"] / "RECOVERYXLOG").exists()
    ok = wal_cmd(archive, "fetch", genuine, "pg_wal/RECOVERYXLOG")
    assert ok.returncode == 0, ok.stderr
    assert genuine_meta["mac"] and genuine_meta["mac-key-id"]  # what wal-push stores


def test_unarchived_wal_of_a_set_aside_directory_is_pushed_or_kept_and_named(archive, store):
    """``.ready`` files of the old pg_wal reach the archive; one that cannot be archived
    (different content under its name) is kept in place and named, never dropped."""
    from wedefi_dr.physical.pitr.recovery import push_unarchived

    aside = archive["pg_wal"].parent
    fresh, clash = FIRST, FIRST[:-1] + "1"
    put_file(archive, clash, segment_bytes(30))
    assert wal_cmd(archive, "push", f"pg_wal/{clash}").returncode == 0
    for name, seed in ((fresh, 31), (clash, 32)):
        put_file(archive, name, segment_bytes(seed))
        (archive["pg_wal"] / "archive_status" / f"{name}.ready").write_text("")

    result = push_unarchived(archive["settings"], aside)
    assert result["pushed"] == [fresh]
    assert len(result["kept"]) == 1 and clash in result["kept"][0]
    assert "different content" in result["kept"][0]
    assert (archive["pg_wal"] / clash).exists()
    assert head(store, archive, fresh) is not None


def _fetch_env(archive: dict, settings: Settings, path: Path, **update) -> dict:
    """``archive`` with an env file of other settings (no prefetcher: one fetch each)."""
    chosen = settings.model_copy(update={"wal_prefetch": 0, **update})
    env = archiving.write_wal_env(chosen, path, prefix=archive["prefix"])
    return {**archive, "env": env}


def _put_legacy(archive: dict, name: str, plain: bytes) -> None:
    """A segment as the earlier ``wal-push`` stored it: gzip + gpg under the backup
    passphrase itself, encoding ``gzip+gpg``, MAC under that passphrase's key."""
    s = archive["settings"]
    store = wal.Archive(s)
    sha = wal._sha256(plain)
    cipher = wal.encode(s, plain)
    store.client.put_object(
        Bucket=store.bucket,
        Key=wal.archive_key(s, name),
        Body=cipher,
        Metadata={
            "plain-sha256": sha,
            "plain-size": str(len(plain)),
            "object-sha256": wal._sha256(cipher),
            "encoding": wal.ENCODING,
            wal.MAC_KEY_ID: store.keyring.current.key_id,
            wal.MAC: authentication.object_mac(store.keyring.current, name, sha, len(plain)),
        },
    )


def test_wal_key_encoding_round_trip_and_by_hand_with_stock_tools(archive, store, tmp_path):
    """A segment is zstd + gpg under the random WAL key; the WAL key object is gpg under the
    backup passphrase; both open by hand with gpg and zstd (README "Break-glass restore"),
    and the WAL key's plaintext is written nowhere by push or fetch."""
    data = segment_bytes(50)
    put_file(archive, FIRST, data)
    pushed = wal_cmd(archive, "push", f"pg_wal/{FIRST}")
    assert pushed.returncode == 0, pushed.stderr
    s = archive["settings"]
    meta = head(store, archive, FIRST)["Metadata"]
    assert meta["encoding"] == wal.ENCODING_WALKEY
    key_object = walkey.object_key(s, meta[wal.MAC_KEY_ID])
    assert store.head(key_object) is not None
    fetched = wal_cmd(archive, "fetch", FIRST, "pg_wal/RECOVERYXLOG")
    assert fetched.returncode == 0, fetched.stderr
    assert (archive["pg_wal"] / "RECOVERYXLOG").read_bytes() == data

    hand = tmp_path / "by-hand"
    (hand / "gnupg").mkdir(parents=True, mode=0o700)
    store.client.download_file(store.bucket, key_object, str(hand / "walkey.gpg"))
    store.client.download_file(store.bucket, wal.archive_key(s, FIRST), str(hand / "seg.gpg"))
    body = (hand / "seg.gpg").read_bytes()
    assert b"wal segment 50" not in body and len(body) < SEG // 10
    passphrase = s.gpg_passphrase.get_secret_value()
    opened = by_hand(GPG_D.format(obj=hand / "walkey.gpg"), passphrase, hand / "gnupg")
    assert opened.returncode == 0, opened.stderr.decode()
    wal_key = opened.stdout.decode()
    assert len(wal_key) == 64 and wal_key != passphrase
    segment = by_hand(f"{GPG_D.format(obj=hand / 'seg.gpg')} | zstd -d", wal_key, hand / "gnupg")
    assert segment.returncode == 0, segment.stderr.decode()
    assert segment.stdout == data

    secret = wal_key.encode()
    written = [tmp_path, encryption.gnupg_home()]
    for root in written:
        for path in Path(root).rglob("*"):
            if path.is_file():
                assert secret not in path.read_bytes(), path


def test_rotated_passphrase_still_fetches_old_and_new_encodings_and_names_a_missing_key(
    archive, settings, tmp_path
):
    """Segments archived under passphrase A (both encodings) fetch once B is current and A
    is listed as previous; with A gone, the error names A's key id (exit 128)."""
    legacy, current = FIRST, walnames.next_segments(FIRST, 1, SEG)[0]
    old, new = segment_bytes(60), segment_bytes(61)
    _put_legacy(archive, legacy, old)
    put_file(archive, current, new)
    assert wal_cmd(archive, "push", f"pg_wal/{current}").returncode == 0
    a = settings.gpg_passphrase
    a_id = authentication.derive_key(a.get_secret_value()).key_id
    b = SecretStr(f"rotated-{uuid.uuid4().hex}")
    rotated = _fetch_env(
        archive, settings, tmp_path / "b.env", gpg_passphrase=b, gpg_previous_passphrases=[a]
    )
    for name, plain in ((legacy, old), (current, new)):
        got = wal_cmd(rotated, "fetch", name, "pg_wal/RECOVERYXLOG")
        assert got.returncode == 0, got.stderr
        assert (archive["pg_wal"] / "RECOVERYXLOG").read_bytes() == plain

    only_b = _fetch_env(archive, settings, tmp_path / "b-only.env", gpg_passphrase=b)
    refused = wal_cmd(only_b, "fetch", current, "pg_wal/RECOVERYXLOG2")
    assert refused.returncode == wal.EXIT_FATAL
    assert a_id in refused.stderr and current in refused.stderr
    assert b.get_secret_value() not in refused.stderr
    assert not (archive["pg_wal"] / "RECOVERYXLOG2").exists()


def test_tampered_or_planted_wal_key_is_refused_by_name(archive, store, settings, tmp_path):
    """The WAL key object is trusted only under its MAC: a damaged body, or a key planted
    with consistent checksums but no MAC of ours, stops the fetch (exit 128) naming it."""
    put_file(archive, FIRST, segment_bytes(70))
    assert wal_cmd(archive, "push", f"pg_wal/{FIRST}").returncode == 0
    s = archive["settings"]
    key_id = head(store, archive, FIRST)["Metadata"][wal.MAC_KEY_ID]
    key = walkey.object_key(s, key_id)
    obj = store.client.get_object(Bucket=store.bucket, Key=key)
    genuine, meta = obj["Body"].read(), obj["Metadata"]
    damaged = bytearray(genuine)
    damaged[len(damaged) // 2] ^= 0xFF
    planted_secret = b"0" * 64
    gpg = encryption.start_encrypt(
        s.gpg_passphrase.get_secret_value(), encryption.GpgParams.from_settings(s)
    )
    planted = gpg.communicate(planted_secret)[0]
    planted_meta = {
        **meta,
        "plain-sha256": wal._sha256(planted_secret),
        "object-sha256": wal._sha256(planted),
    }
    reader = _fetch_env(archive, settings, tmp_path / "r.env")
    for body, metadata in ((bytes(damaged), meta), (planted, planted_meta)):
        store.client.put_object(Bucket=store.bucket, Key=key, Body=body, Metadata=metadata)
        refused = wal_cmd(reader, "fetch", FIRST, "pg_wal/RECOVERYXLOG")
        assert refused.returncode == wal.EXIT_FATAL, refused.stderr
        assert walkey.mac_name(key_id) in refused.stderr and "refused" in refused.stderr
        assert not (archive["pg_wal"] / "RECOVERYXLOG").exists()


def test_restore_command_waits_for_a_segment_the_prefetcher_is_fetching(tmp_path):
    """``prefetch.py`` hands over a segment the live prefetcher lists in its plan once it is
    spooled, and goes to the full fetch at once when the segment is not planned or the
    prefetcher is gone (never waiting on a process that will not deliver)."""
    import threading

    spool = tmp_path / wal.PREFETCH_DIR
    spool.mkdir()
    planned, other = FIRST, walnames.next_segments(FIRST, 1, SEG)[0]
    worker = subprocess.Popen(["sleep", "30"])
    try:
        (spool / wal.PREFETCHER_PID).write_text(str(worker.pid))
        (spool / wal.PREFETCH_PLAN).write_text(planned)
        data = b"spooled segment"

        def deliver() -> None:
            time.sleep(0.3)
            prefetch.record_spooled(str(spool), planned, data)

        threading.Thread(target=deliver).start()
        assert not prefetch.wait_for_prefetcher(str(spool), other, timeout=5)
        assert prefetch.wait_for_prefetcher(str(spool), planned, timeout=5)
        assert prefetch.from_spool(str(spool), planned, str(tmp_path / "RECOVERYXLOG"))
        assert (tmp_path / "RECOVERYXLOG").read_bytes() == data
        (spool / wal.PREFETCH_PLAN).write_text(other)
        worker.kill()
        worker.wait()
        assert not prefetch.wait_for_prefetcher(str(spool), other, timeout=5)
    finally:
        worker.kill()
        worker.wait()


def test_a_spooled_segment_is_handed_over_only_while_it_is_the_file_that_was_verified(
    tmp_path, capfd
):
    """The hand-over trusts the prefetcher's record (inode, size, times, boot) instead of
    hashing 16 MB while replay waits: a file rewritten in place, replaced, hard-linked, or
    recorded in another boot is removed, not handed over, and fetched again."""
    spool, dest = tmp_path / wal.PREFETCH_DIR, tmp_path / "RECOVERYXLOG"
    spool.mkdir()
    data = segment_bytes(40)[:65536]

    def spooled_then(change) -> bool:
        prefetch.record_spooled(str(spool), FIRST, data)
        time.sleep(0.05)  # past the kernel's coarse timestamp clock
        change(spool / FIRST, spool / f"{FIRST}{prefetch.SPOOLED_SUFFIX}")
        handed = prefetch.from_spool(str(spool), FIRST, str(dest))
        assert not (spool / f"{FIRST}{prefetch.SPOOLED_SUFFIX}").exists()
        return handed

    def rewrite_same_size(path, record):
        with open(path, "r+b") as f:
            f.write(b"\xff" * 16)

    def replace_same_content(path, record):
        other = path.with_name("other")
        other.write_bytes(data)
        other.replace(path)

    def hard_link(path, record):
        os.link(path, tmp_path / "linked")

    def another_boot(path, record):
        boot, identity = record.read_text().split(" ", 1)
        record.write_text(f"{'0' * len(boot)} {identity}")

    assert spooled_then(lambda path, record: None) is True
    assert dest.read_bytes() == data
    dest.unlink()
    for change in (rewrite_same_size, replace_same_content, hard_link, another_boot):
        assert spooled_then(change) is False, change.__name__
        assert not dest.exists(), change.__name__
        assert not (spool / FIRST).exists(), change.__name__
    assert capfd.readouterr().err.count(f"prefetched {FIRST} changed on disk") == 4


@pytest.mark.parametrize(
    "swap", ["object-only", "object-and-its-sha", "and-the-version-stripped", "legacy-v1"]
)
def test_another_segments_genuine_ciphertext_under_a_name_is_refused(archive, store, swap):
    """The plaintext is not hashed again at fetch when the MAC covers the stored object's
    sha256 (``object/v2``), so the object's hash must bind it: another segment's genuine
    ciphertext (same WAL key, valid gpg) under this name is refused however the metadata
    is bent. A ``v1`` object still has its plaintext hashed, which catches the same swap."""
    victim, donor = FIRST, walnames.next_segments(FIRST, 1, SEG)[0]
    if swap == "legacy-v1":
        _put_legacy(archive, victim, segment_bytes(30))
        _put_legacy(archive, donor, segment_bytes(31))
    else:
        for i, n in enumerate((victim, donor)):
            put_file(archive, n, segment_bytes(30 + i))
            assert wal_cmd(archive, "push", f"pg_wal/{n}").returncode == 0
            (archive["pg_wal"] / n).unlink()
    key = wal.archive_key(archive["settings"], victim)
    meta = store.client.head_object(Bucket=store.bucket, Key=key)["Metadata"]
    assert (wal.mac_covered_object_sha(meta) is None) == (swap == "legacy-v1")
    donor_key = wal.archive_key(archive["settings"], donor)
    cipher = store.client.get_object(Bucket=store.bucket, Key=donor_key)["Body"].read()
    if swap != "object-only":
        meta["object-sha256"] = wal._sha256(cipher)
    if swap == "and-the-version-stripped":
        meta.pop(wal.MAC_VERSION)
    store.client.put_object(Bucket=store.bucket, Key=key, Body=cipher, Metadata=meta)
    swapped = wal_cmd(archive, "fetch", victim, "pg_wal/RECOVERYXLOG")
    assert swapped.returncode == wal.EXIT_FATAL, swapped.stderr
    expected = {
        "object-only": "corrupt at rest",
        "object-and-its-sha": "does not match its MAC",
        "and-the-version-stripped": "does not match its MAC",
        "legacy-v1": "decrypted content fails its sha256",
    }[swap]
    assert victim in swapped.stderr and expected in swapped.stderr, swapped.stderr
    assert not (archive["pg_wal"] / "RECOVERYXLOG").exists()
    intact = wal_cmd(archive, "fetch", donor, "pg_wal/RECOVERYXLOG")
    assert intact.returncode == 0, intact.stderr
