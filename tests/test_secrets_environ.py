"""No secret in the environment of a running child: read it where an attacker would.

Another process of the same user (or root) reads ``/proc/PID/environ``; a command line is
read by every local user through ``ps``. So each child is started the way the product
starts it and held while it runs (pg_dump waiting on a table lock, pg_restore and gpg
waiting on their stdin), and its environment and argv are read with psutil.
"""

from __future__ import annotations

import os
import pwd
import secrets as tokens
import shutil
import stat
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from wedefi_dr.config import Settings
from wedefi_dr.errors import InvalidInput
from wedefi_dr.logical.build import load_command
from wedefi_dr.logical.restore import apply_command, restore_command
from wedefi_dr.physical import archiving
from wedefi_dr.postgres.cluster import ClusterHandle, conf_quote, free_port, os_user_kwargs
from wedefi_dr.postgres.conninfo import ConnTarget
from wedefi_dr.postgres.tools import child_env, connect, running_as_root, tool
from wedefi_dr.storage import encryption
from wedefi_dr.storage.encryption import GpgParams


def _superuser_password() -> str:
    lines = Path(os.environ["PGPASSFILE"]).read_text().splitlines()
    return next(ln.rsplit(":", 1)[1] for ln in lines if ":postgres:" in ln)


def _seen_by_others(proc: subprocess.Popen) -> str:
    """What another process of this user can read about ``proc`` while it runs."""
    p = psutil.Process(proc.pid)
    for _ in range(200):  # until the child has exec'd its program
        environ = p.environ()
        if environ and p.cmdline()[:1] == proc.args[:1]:
            break
        time.sleep(0.05)
    assert p.status() != psutil.STATUS_ZOMBIE
    assert "PATH" in environ, "the environment is readable, so the check below can fail"
    return "\n".join([*p.cmdline(), *(f"{k}={v}" for k, v in environ.items())])


def _assert_no_secret(seen: str, secrets: list[str]) -> None:
    for secret in secrets:
        assert secret not in seen


def test_running_tools_show_no_secret(seeded, settings: Settings, monkeypatch, tmp_path):
    password = _superuser_password()
    secrets = [
        password,
        settings.gpg_passphrase.get_secret_value(),
        os.environ["AWS_SECRET_ACCESS_KEY"],
    ]
    assert all(secrets)
    # The password only in the DSN and in the caller's PGPASSWORD: no ~/.pgpass to fall
    # back on, so the tool authenticates through the product's passfile or not at all.
    monkeypatch.delenv("PGPASSFILE")
    monkeypatch.setenv("PGPASSWORD", password)
    monkeypatch.setenv("WEDEFI_DR_GPG_PASSPHRASE", secrets[1])
    primary = ConnTarget.parse(settings.primary_dsn.get_secret_value(), allow_password=True)
    target = ConnTarget.parse(primary.conninfo + f" password={password}", allow_password=True)

    # pg_dump, held by an exclusive lock on a table it must read.
    with connect(primary.conninfo) as conn, conn.cursor() as cur:
        cur.execute('LOCK TABLE "Wallet" IN ACCESS EXCLUSIVE MODE')
        dump = subprocess.Popen(
            [tool("pg_dump"), "--format=custom", "--no-password", *target.tool_args()],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=target.tool_env(),
        )
        try:
            _wait_for_lock_waiter(primary.conninfo)
            _assert_no_secret(_seen_by_others(dump), secrets)
        except BaseException:
            dump.kill()
            raise
    out, err = dump.communicate(timeout=120)
    assert dump.returncode == 0, err  # it did authenticate: through the passfile
    assert out.startswith(b"PGDMP")

    (arg,) = target.tool_args()
    passfile = Path(arg.split("passfile=", 1)[1].split()[0].strip("'"))
    info, folder = passfile.stat(), passfile.parent.stat()
    assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == os.geteuid()
    assert stat.S_IMODE(folder.st_mode) == 0o700 and folder.st_uid == os.geteuid()
    assert not str(passfile).startswith("/tmp/")

    # pg_restore and psql (the streamed restore's two halves), waiting for their input on
    # stdin, and the parallel pg_restore of a new database, waiting for its archive.
    archive_read, archive_write = os.pipe()
    loading = load_command(target, archive_read, 2, no_owner=False)
    waiting = [
        subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
            pass_fds=fds,
        )
        for argv, env, fds in (
            (restore_command(), child_env(), ()),
            (apply_command(target), target.tool_env(), ()),
            (loading, target.tool_env(), (archive_read,)),
        )
    ]
    try:
        for proc in waiting:
            _assert_no_secret(_seen_by_others(proc), secrets)
    finally:
        for proc in waiting:
            proc.kill()
            proc.wait()
        os.close(archive_read)
        os.close(archive_write)

    # gpg, waiting for plaintext on stdin: its passphrase only on the pipe.
    gpg = encryption.start_encrypt(secrets[1], GpgParams())
    try:
        seen = _seen_by_others(gpg)
        _assert_no_secret(seen, secrets)
        assert "--passphrase-fd" in seen
        home = Path(encryption.gnupg_home())
        assert stat.S_IMODE(home.stat().st_mode) == 0o700 and home.stat().st_uid == os.geteuid()
        assert not str(home).startswith("/tmp/")
    finally:
        gpg.kill()
        gpg.wait()

    # tar, pg_ctl, initdb and the operator's start/stop commands get the minimal environment.
    env = "\n".join(f"{k}={v}" for k, v in child_env().items())
    assert "PATH=" in env
    _assert_no_secret(env, secrets)


def _wait_for_lock_waiter(dsn: str) -> None:
    """Until pg_dump is connected and waiting for the lock (it has authenticated)."""
    with connect(dsn, autocommit=True) as conn, conn.cursor() as cur:
        for _ in range(600):
            cur.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pg_dump' "
                "AND wait_event_type = 'Lock'"
            )
            if cur.fetchone()[0]:
                return
            time.sleep(0.05)
    raise AssertionError("pg_dump never waited for the table lock")


def test_a_gpg_home_someone_else_can_open_is_refused(tmp_path, monkeypatch):
    from wedefi_dr.storage import secretfiles

    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o777)
    with pytest.raises(InvalidInput, match="mode 777"):
        secretfiles.owned_private_dir(shared)
    link = tmp_path / "link"
    link.symlink_to(shared)
    with pytest.raises(InvalidInput, match="not a link"):
        secretfiles.owned_private_dir(link)
    made = secretfiles.owned_private_dir(tmp_path / "fresh")
    assert stat.S_IMODE(made.stat().st_mode) == 0o700
    with pytest.raises(FileExistsError):  # O_EXCL: never written through an existing name
        secretfiles.write_secret_file(made, "f", "x")
        secretfiles.write_secret_file(made, "f", "y")
    assert (made / "f").read_text() == "x"
    assert stat.S_IMODE((made / "f").stat().st_mode) == 0o600


def test_dr_reports_and_environments_default_to_product_folders(settings: Settings, tmp_path):
    """Unset, ``dr_report_dir`` is our ``.wedefi-dr/dr-reports`` and ``dr_env_dir`` the
    ``.wedefi-dr/dr-envs`` of the OS user the DR clusters run as (as root: ``postgres``,
    who could not pass root's 0700 home): 0700, that user's, enterable by the clusters'
    user; never a fixed name in the shared temporary folder."""
    from wedefi_dr.drtest import environments, report
    from wedefi_dr.storage import secretfiles

    unset = settings.model_copy(update={"dr_env_dir": None, "dr_report_dir": None})
    me = pwd.getpwuid(os.geteuid()).pw_name
    cluster_user = environments.LOCAL_CLUSTER_OS_USER if running_as_root() else me
    envs = environments.env_dir(unset)
    for folder, owner in ((report.report_dir(unset, "run").parent, me), (envs, cluster_user)):
        entry = pwd.getpwnam(owner)
        assert folder.parent == Path(entry.pw_dir) / secretfiles.PRODUCT_DIR
        info = os.lstat(folder)
        assert stat.S_ISDIR(info.st_mode) and info.st_uid == entry.pw_uid
        assert stat.S_IMODE(info.st_mode) == 0o700
    entered = subprocess.run(
        ["test", "-x", str(envs)], cwd="/", timeout=10, **os_user_kwargs(cluster_user)
    )
    assert entered.returncode == 0  # the clusters' user reaches its clusters below it
    if running_as_root():  # a folder of ours where postgres's is expected is refused
        mine = secretfiles.owned_private_dir(tmp_path / "mine")
        with pytest.raises(InvalidInput, match="not to postgres"):
            secretfiles.owned_private_dir(mine, os_user="postgres")


@pytest.mark.parametrize("bad", ["line\n", "two\nlines", "nul\0"])
def test_a_passphrase_gpg_cannot_receive_whole_is_refused(bad: str) -> None:
    with pytest.raises(InvalidInput, match="line break or NUL"):
        encryption.start_encrypt(bad, GpgParams())


def test_a_passphrase_starting_with_a_dash_works(tmp_path) -> None:
    passphrase = "--symmetric -x 'q\" ; rm -rf /"
    gpg = encryption.start_encrypt(passphrase, GpgParams())
    cipher, _ = gpg.communicate(b"PGDMP hello")
    assert gpg.returncode == 0
    (tmp_path / "c.gpg").write_bytes(cipher)
    dec = encryption.start_decrypt(passphrase, tmp_path / "c.gpg")
    out, _ = dec.communicate()
    assert dec.returncode == 0 and out == b"PGDMP hello"
    dec.require_authentic()
    wrong = encryption.start_decrypt("--symmetric", tmp_path / "c.gpg")
    _, err = wrong.communicate()
    assert wrong.returncode != 0


def test_password_with_a_line_break_is_refused_for_tools() -> None:
    target = ConnTarget.parse("host=h dbname=d password='a\nb'", allow_password=True)
    with pytest.raises(InvalidInput, match="line break"):
        target.tool_args()


def _planted_secrets(monkeypatch) -> list[str]:
    """Secrets of every kind in our environment, each a value found nowhere else."""
    token = tokens.token_hex(8)
    planted = {
        "WEDEFI_DR_GPG_PASSPHRASE": f"planted-passphrase-{token}",
        "AWS_ACCESS_KEY_ID": f"planted-aws-key-{token}",
        "AWS_SECRET_ACCESS_KEY": f"planted-aws-secret-{token}",
        "AWS_SESSION_TOKEN": f"planted-session-{token}",
        "PGPASSWORD": f"planted-pgpassword-{token}",
    }
    for key, value in planted.items():
        monkeypatch.setenv(key, value)
    return list(planted.values())


def _wait_for_file(path: Path, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.2)
    return path.read_text()


def test_a_server_started_by_its_handle_holds_no_secret(stack, monkeypatch):
    """The postmaster (so every backend) and an ``archive_command`` child it runs: their
    environment holds none of ours, read where another process of that user would."""
    planted = _planted_secrets(monkeypatch)
    home = stack.root / f"environ-{tokens.token_hex(4)}"
    witness = home / "archive-child.env"
    password = tokens.token_urlsafe(16)
    handle = ClusterHandle(name="environ-check", data_dir=home / "data", port=free_port())
    child = f"env > {witness}.tmp && mv {witness}.tmp {witness}"
    handle.initdb(password, {"archive_mode": "on", "archive_command": conf_quote(child)}, fast=True)
    try:
        handle.start()
        environ = psutil.Process(handle.pid()).environ()
        assert "PATH" in environ, "the environment is readable, so the check below can fail"
        _assert_no_secret("\n".join(f"{k}={v}" for k, v in environ.items()), planted)
        dsn = f"{handle.dsn()} password={password}"
        with connect(dsn, autocommit=True) as conn, conn.cursor() as cur:
            cur.execute("CREATE TABLE switch_me AS SELECT 1 AS x; SELECT pg_switch_wal()")
        seen = _wait_for_file(witness)
        assert "PATH=" in seen
        _assert_no_secret(seen, planted)
    finally:
        handle.stop("immediate")
        shutil.rmtree(home, ignore_errors=True)


def test_a_new_primary_archives_with_the_archivers_own_credential(
    settings: Settings, monkeypatch, tmp_path
):
    """A recovered or promoted cluster without an archive env file gets one holding the
    archiver's credential: the worker's own keys (personal, short-lived) never."""
    worker = _planted_secrets(monkeypatch)
    path = archiving.production_archive_env(settings, tmp_path, os_user="postgres")
    written = dict(line.split("=", 1) for line in path.read_text().splitlines())
    assert (
        written["AWS_ACCESS_KEY_ID"] == settings.wal_archiver_aws_access_key_id.get_secret_value()
    )
    assert (
        written["AWS_SECRET_ACCESS_KEY"]
        == settings.wal_archiver_aws_secret_access_key.get_secret_value()
    )
    _assert_no_secret(path.read_text(), worker)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
