"""``wedefi-dr bench rpo``: the RPO drill, commits lost when the primary dies.

Twice, each time on a fresh cluster of its own (fsync on, ``synchronous_commit=on``, its
own archive prefix): a base backup, then pgbench load while one client commits numbered
rows (``rpo_acks``) and records each number the server acknowledged and when; then
``kill -9`` of the postmaster, and a recovery to ``latest`` from the archive alone (base
backup + WAL objects, nothing from the dead cluster's disk) into a scratch cluster. The
figure is what the client was told was committed and the recovered cluster does not have:
``lost_commits`` and ``lost_seconds`` (the ack time of the newest acknowledged row minus
that of the newest recovered one).

Run 1 archives with ``archive_command`` only (``archive_timeout`` 60 s, the plan's);
run 2 also streams with ``pg_receivewal`` into the archive (``--synchronous`` when the
setting says so), so the segment being written reaches the store as ``.partial``.
Measured, never asserted in tests.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from wedefi_dr.config import Settings
from wedefi_dr.physical import archiving, basebackup
from wedefi_dr.physical.pitr import recovery
from wedefi_dr.physical.pitr.target import RecoveryTarget
from wedefi_dr.physical.walreceiver import APP_NAME, WalStream
from wedefi_dr.postgres.tools import connect, tool
from wedefi_dr.storage.repository import open_store
from wedefi_dr_dev.stack import Cluster, Stack

SETTLE_SECONDS = 3.0  # after the kill: the stream's last upload of its partial


class Acker(threading.Thread):
    """One client committing ``INSERT INTO rpo_acks`` in a loop; ``acked`` holds
    (number, monotonic time) of every commit the server acknowledged."""

    def __init__(self, dsn: str) -> None:
        super().__init__(daemon=True)
        self.dsn = dsn
        self.acked: list[tuple[int, float]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        import psycopg2

        try:
            conn = psycopg2.connect(self.dsn)
            conn.autocommit = True
            cur = conn.cursor()
            n = 0
            while not self.stop.is_set():
                n += 1
                cur.execute("INSERT INTO rpo_acks (n) VALUES (%s)", (n,))
                self.acked.append((n, time.monotonic()))
        except psycopg2.Error:
            return  # the server died: what was acknowledged is recorded


def _one(dsn: str, query: str) -> Any:
    with connect(dsn, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(query)
        return cur.fetchone()[0] if cur.description else None


def drill(
    settings: Settings,
    *,
    streaming: bool,
    seconds: float,
    clients: int,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """One run of the drill (see the module docstring); its clusters and prefix removed."""
    hexid = uuid.uuid4().hex[:6]
    prefix = f"bench-rpo-{hexid}"
    stack = Stack()
    src: Cluster = stack.cluster(f"rposrc-{hexid}")
    dst: Cluster = stack.cluster(f"rporec-{hexid}")
    src.fast = False
    src.extra_conf = stack.archiving_conf(src, prefix=prefix)
    own = settings.model_copy(
        update={"prefix": prefix, "primary_dsn": SecretStr(src.dsn("postgres"))}
    )
    work = Path(tempfile.mkdtemp(prefix="wedefi-bench-rpo-"))
    work.chmod(0o755)
    stream: WalStream | None = None
    env = {**os.environ, "PGPASSWORD": src.password}
    try:
        src.init()
        src.start()
        pgbench = [tool("pgbench"), "-h", src.host, "-p", str(src.port), "-U", "postgres"]
        subprocess.run(
            [*pgbench, "-i", "-s", "5", "-q", "postgres"], env=env, check=True, capture_output=True
        )
        _one(
            src.admin_dsn(),
            "CREATE TABLE rpo_acks (n bigint PRIMARY KEY, at timestamptz"
            " DEFAULT clock_timestamp())",
        )
        say(f"{'streaming' if streaming else 'archive_command only'}: base backup")
        base = basebackup.take(own, "bench-rpo")
        if streaming:
            stream = WalStream(
                own,
                src.admin_dsn(),
                work / "stream",
                f"rpo_{hexid}",
                synchronous=settings.wal_stream_synchronous,
                interval=settings.wal_stream_interval_seconds,
                log_path=work / "pg_receivewal.log",
            )
            stream.start()
            if settings.wal_stream_synchronous:  # commits wait for the stream's flush
                _one(
                    src.admin_dsn(),
                    f"""ALTER SYSTEM SET synchronous_standby_names = '"{APP_NAME}"'""",
                )
                _one(src.admin_dsn(), "SELECT pg_reload_conf()")
        load = subprocess.Popen(
            [
                *pgbench,
                "-c",
                str(clients),
                "-j",
                "2",
                "-T",
                str(int(seconds) + 30),
                "-n",
                "postgres",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        acker = Acker(src.admin_dsn())
        acker.start()
        time.sleep(seconds)
        pid = src.pid()
        say(f"kill -9 of the postmaster (pid {pid}) after {seconds:.0f} s of load")
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        acker.stop.set()
        acker.join(30)
        load.kill()
        load.wait()
        for _ in range(50):  # the backends notice the postmaster's death and exit
            if not src.is_running():
                break
            time.sleep(0.2)
        if stream is not None:
            time.sleep(SETTLE_SECONDS)
            stream.stop()
        acked_n, acked_at = acker.acked[-1] if acker.acked else (0, killed_at)
        say("recovering 'latest' from the archive alone")
        t = time.monotonic()
        staged = recovery.stage_base_backup(own, base, dst, work / "spool")
        recovery.install_staged(dst, staged)
        fetch_env = archiving.write_wal_env(
            own, dst.home / archiving.RESTORE_ENV_NAME, os_user=dst.os_user
        )
        recovery.write_recovery_settings(
            dst,
            RecoveryTarget.parse("latest"),
            restore_command=archiving.restore_command(fetch_env),
            archive_command=None,
            note="rpo drill",
        )
        dst.start(wait=False)
        recovery.wait_for_target(dst, 1800)
        recover_s = time.monotonic() - t
        recovered = _one(dst.admin_dsn(), "SELECT coalesce(max(n), 0) FROM rpo_acks")
        used_partial = "streamed partial" in dst.log.read_text(errors="replace")
        when = dict(acker.acked)
        # Nothing recovered: at least the whole acknowledged window was lost. More than
        # acknowledged: the last commit was durable, its answer died with the server.
        first_at = acker.acked[0][1] if acker.acked else acked_at
        lost_seconds = 0.0 if recovered >= acked_n else acked_at - when.get(recovered, first_at)
        return {
            "mode": "pg_receivewal + archive_command" if streaming else "archive_command",
            "acked_commits": acked_n,
            "recovered_commits": recovered,
            "lost_commits": max(0, acked_n - recovered),
            "committed_not_acknowledged": max(0, recovered - acked_n),
            "lost_seconds": round(lost_seconds, 3),
            "recovery_used_streamed_partial": used_partial,
            "recovery_seconds": round(recover_s, 1),
            "stream_uploads": stream.uploader.uploads if stream else None,
            "settle_seconds_after_kill": SETTLE_SECONDS if stream else 0,
            "synchronous": bool(stream and settings.wal_stream_synchronous),
        }
    finally:
        if stream is not None and stream.alive():
            stream.stop()
        for c in (dst, src):
            if c.is_running():
                c.stop("immediate")
            shutil.rmtree(c.home, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
        store = open_store(own)
        for obj in list(store.list_keys(f"{prefix}/")):
            store.delete(obj["Key"])


def run_bench(
    settings: Settings, *, seconds: float, clients: int, say: Callable[[str], None]
) -> dict[str, Any]:
    """Both runs, archive_command alone first; the machine's load average beside them."""
    settings.require("gpg_passphrase")
    without = drill(settings, streaming=False, seconds=seconds, clients=clients, say=say)
    with_stream = drill(settings, streaming=True, seconds=seconds, clients=clients, say=say)
    return {
        "load_seconds": seconds,
        "pgbench_clients": clients,
        "archive_command_only": without,
        "with_wal_stream": with_stream,
        "load_average_1m": round(os.getloadavg()[0], 2),
    }
