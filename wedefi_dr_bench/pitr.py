"""``wedefi-dr bench pitr``: what WAL archiving and point-in-time recovery cost.

Three figures on clusters of the bench's own (fsync on, archiving for real):

1. :func:`archive_backlog`: the archive backlog (``.ready`` files) at the end of a
   full-speed pgbench run, and how long it took to drain;
2. :func:`push_latency`: ``wal-push`` latency per 16 MB segment (process start to exit,
   one call per segment, no batching), against bare ``zstd -1 | gpg --symmetric`` with
   the same gpg parameters as a segment's (the WAL key's S2K count) to a local file;
3. :func:`replay_rate`: the replay rate of a recovery to 'latest' from a base backup
   taken before the load, in MB of WAL per second, with ``wal-fetch`` (prefetch on and
   off) and with bare ``cp`` of the same segments already decrypted (replay alone).

The bench's clusters, files and archive prefixes are removed at the end. Measured,
never asserted in tests.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from wedefi_dr.config import Settings
from wedefi_dr.observability.stats import percentile
from wedefi_dr.physical import archiving, basebackup, wal
from wedefi_dr.physical.basebackup import BaseBackupManifest
from wedefi_dr.physical.pitr import recovery
from wedefi_dr.physical.pitr.target import RecoveryTarget
from wedefi_dr.physical.walnames import lsn_to_int
from wedefi_dr.postgres.tools import connect, tool
from wedefi_dr.storage.encryption import GpgParams
from wedefi_dr.storage.repository import Repository, open_store
from wedefi_dr_bench import memory
from wedefi_dr_bench.logical import gpg_symmetric_cmd
from wedefi_dr_dev.stack import Cluster, Stack

SEGMENT_MB = 16.78
HANDED_OVER_RE = re.compile(r"wedefi-dr wal: ([0-9A-F]{24}) handed over, waited ([0-9.]+) s")
DRAIN_TIMEOUT_SECONDS = 600


@dataclass
class PitrBench:
    """The bench's own archive prefix, source and recovery clusters and work folder."""

    settings: Settings
    prefix: str
    src: Cluster
    dst: Cluster
    work: Path

    @property
    def store(self) -> Repository:
        return open_store(self.settings)


def _one(dsn: str, query: str) -> Any:
    with connect(dsn, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(query)
        return cur.fetchone()[0]


def _pgbench(bench: PitrBench) -> list[str]:
    return [tool("pgbench"), "-h", "127.0.0.1", "-p", str(bench.src.port), "-U", "postgres"]


def prepare(settings: Settings) -> PitrBench:
    """The bench's names: an archive prefix and two clusters of its own (none created yet)."""
    hexid = uuid.uuid4().hex[:6]
    prefix = f"bench-pitr-{hexid}"
    stack = Stack()
    src = stack.cluster(f"benchsrc-{hexid}")
    src.fast = False
    src.extra_conf = stack.archiving_conf(src, prefix=prefix)
    bench = PitrBench(
        settings=settings.model_copy(update={"prefix": prefix}),
        prefix=prefix,
        src=src,
        dst=stack.cluster(f"benchrec-{hexid}"),
        work=Path(tempfile.mkdtemp(prefix="wedefi-bench-pitr-")),
    )
    return bench


def start_source(bench: PitrBench, scale: int = 10) -> None:
    """Create and start the source cluster, with pgbench's tables at ``scale``."""
    bench.src.init()
    bench.src.start()
    subprocess.run(
        [*_pgbench(bench), "-i", "-s", str(scale), "-q", "postgres"],
        env={**os.environ, "PGPASSWORD": bench.src.password},
        check=True,
        capture_output=True,
    )


def archive_backlog(bench: PitrBench, seconds: int, clients: int) -> dict[str, Any]:
    """Figure 1: pgbench at full speed for ``seconds``; the ``.ready`` backlog at its end
    and the time to drain it."""
    dsn = bench.src.dsn("postgres")
    start_lsn = _one(dsn, "SELECT pg_current_wal_lsn()::text")
    t0 = time.monotonic()
    run = subprocess.run(
        [*_pgbench(bench), "-c", str(clients), "-j", "2", "-T", str(seconds), "-n", "postgres"],
        env={**os.environ, "PGPASSWORD": bench.src.password},
        capture_output=True,
        text=True,
    )
    load_s = time.monotonic() - t0
    end_lsn = _one(dsn, "SELECT pg_current_wal_lsn()::text")
    status = bench.src.data_dir / "pg_wal" / "archive_status"
    backlog = len(list(status.glob("*.ready")))
    wal_mb = (lsn_to_int(end_lsn) - lsn_to_int(start_lsn)) / 1e6
    tps = next((ln for ln in run.stdout.splitlines() if ln.startswith("tps")), "")
    t_drain = time.monotonic()
    _one(dsn, "SELECT pg_switch_wal()")
    while list(status.glob("*.ready")) and time.monotonic() - t_drain < DRAIN_TIMEOUT_SECONDS:
        time.sleep(0.5)
    return {
        "wal_generated_mb": round(wal_mb, 1),
        "wal_rate_mb_s": round(wal_mb / load_s, 2),
        "pgbench": tps,
        "ready_backlog_at_end": backlog,
        "drain_seconds_after_end": round(time.monotonic() - t_drain, 1),
        "archived": _one(dsn, "SELECT archived_count FROM pg_stat_archiver"),
        "failed": _one(dsn, "SELECT failed_count FROM pg_stat_archiver"),
    }


def _bare_zstd_gpg(segment: Path, out: Path, gnupg_home: Path, settings: Settings) -> float:
    """``zstd -1 | gpg --symmetric > file`` with a segment's gpg parameters (cipher, S2K
    mode, digest, the WAL key's count), so the ratio compares the same encryption."""
    read_fd, write_fd = os.pipe()
    os.write(write_fd, settings.gpg_passphrase.get_secret_value().encode() + b"\n")
    os.close(write_fd)
    params = replace(GpgParams.from_settings(settings), s2k_count=wal.WALKEY_S2K_COUNT)
    try:
        t = time.monotonic()
        with out.open("wb") as sink:
            gz = subprocess.Popen(["zstd", "-q", "-1", "-c", str(segment)], stdout=subprocess.PIPE)
            gpg = subprocess.Popen(
                gpg_symmetric_cmd(gnupg_home, read_fd, params),
                stdin=gz.stdout,
                stdout=sink,
                stderr=subprocess.DEVNULL,
                pass_fds=(read_fd,),
            )
            assert gz.stdout is not None
            gz.stdout.close()
            gpg.wait()
            gz.wait()
        return time.monotonic() - t
    finally:
        os.close(read_fd)


def push_latency(bench: PitrBench, pushes: int) -> dict[str, Any]:
    """Figure 2: one ``wal-push`` process per segment, into a prefix of its own, against
    the bare pipeline on the same segment."""
    segs = sorted(
        p for p in (bench.src.data_dir / "pg_wal").iterdir() if wal.SEGMENT_RE.match(p.name)
    )
    pg_wal = bench.work / "pg_wal"
    (pg_wal / "archive_status").mkdir(parents=True)
    gnupg_home = bench.work / "gnupg"
    gnupg_home.mkdir(mode=0o700)
    env_file = archiving.write_wal_env(
        bench.settings, bench.work / "lat.env", prefix=f"{bench.prefix}-latency"
    )
    push_s, bare_s = [], []
    for seg in segs[-pushes:]:
        shutil.copy(seg, pg_wal / seg.name)
        t = time.monotonic()
        subprocess.run(
            [sys.executable, "-I", "-m", "wedefi_dr.physical.wal", "push"]
            + ["--env-file", str(env_file), f"pg_wal/{seg.name}"],
            cwd=bench.work,
            check=True,
            capture_output=True,
        )
        push_s.append(time.monotonic() - t)
        bare_s.append(
            _bare_zstd_gpg(pg_wal / seg.name, bench.work / "bare.gpg", gnupg_home, bench.settings)
        )
    subprocess.run(
        ["gpgconf", "--homedir", str(gnupg_home), "--kill", "gpg-agent"], capture_output=True
    )
    p50, bare_p50 = percentile(push_s, 50), percentile(bare_s, 50)
    return {
        "segments": len(push_s),
        "p50_s": round(p50, 3),
        "p95_s": round(percentile(push_s, 95), 3),
        "bare_zstd_gpg_p50_s": round(bare_p50, 3),
        "bare_zstd_gpg_p95_s": round(percentile(bare_s, 95), 3),
        "ratio_p50_vs_bare": round(p50 / max(bare_p50, 1e-6), 2),
        "one_process_per_segment_mb_s": round(SEGMENT_MB / p50, 1),
    }


def _replay(
    bench: PitrBench,
    base: BaseBackupManifest,
    restore_command: str,
    fetch_env: Path | None = None,
) -> dict[str, Any]:
    """One recovery of the destination cluster to 'latest' with ``restore_command``
    (wal-fetch's, with its prefetcher primed before the start, when ``fetch_env`` is set)."""
    cluster, settings = bench.dst, bench.settings
    fresh_memory_s = memory.back_free_memory(bench.work)
    t = time.monotonic()
    staged = recovery.stage_base_backup(settings, base, cluster, bench.work / "stage-spool")
    recovery.install_staged(cluster, staged)
    extract_s = time.monotonic() - t
    recovery.write_recovery_settings(
        cluster,
        RecoveryTarget.parse("latest"),
        restore_command=restore_command,
        archive_command=None,
        note="bench",
    )
    t = time.monotonic()
    if fetch_env is not None:
        recovery.prime_prefetch(cluster, fetch_env, settings.wal_segment_bytes)
    cluster.start(wait=False)
    reached = recovery.wait_for_target(cluster, 1800)
    seconds = time.monotonic() - t
    cluster.stop()
    waits = [float(m.group(2)) for m in HANDED_OVER_RE.finditer(cluster.log.read_text())]
    shutil.rmtree(cluster.home, ignore_errors=True)
    mb = (lsn_to_int(reached["replay_lsn"]) - lsn_to_int(base.stop_lsn)) / 1e6
    result: dict[str, Any] = {
        "fresh_memory_s": fresh_memory_s,
        "base_backup_stage_verified_s": round(extract_s, 2),
        "wal_replayed_mb": round(mb, 1),
        "replay_and_promote_s": round(seconds, 1),
        "replay_mb_s": round(mb / seconds, 1),
    }
    if waits:  # restore_command's own log: one line per segment handed over from the spool
        result["handed_over"] = wait_stats(waits)
    return result


def wait_stats(values: list[float]) -> dict[str, float]:
    """Count, p50, p95 and maximum of per-segment times, in seconds."""
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "p50_s": round(percentile(values, 50), 4),
        "p95_s": round(percentile(values, 95), 4),
        "max_s": round(max(values), 4),
    }


def replay_rate(
    bench: PitrBench, base: BaseBackupManifest, *, with_no_prefetch: bool = True
) -> dict[str, Any]:
    """Figure 3: recover 'latest' from ``base`` with wal-fetch (prefetch on, then off) and
    with bare ``cp`` from a local folder of the same segments, decrypted (the floor)."""
    settings, work = bench.settings, bench.work
    bench.src.stop()
    fetch_env = archiving.write_wal_env(settings, work / "fetch.env")
    no_prefetch_env = archiving.write_wal_env(
        settings.model_copy(update={"wal_prefetch": 0}), work / "fetch0.env"
    )
    plain_dir = work / "plain-wal"
    plain_dir.mkdir()
    archive = wal.Archive(settings)
    for name in archive.list_names():
        data = archive.fetch_bytes(name, work)
        if data is not None:
            (plain_dir / name).write_bytes(data)
    work.chmod(0o755)
    subprocess.run(["chmod", "-R", "a+rX", str(plain_dir)], check=True)
    prefetched = f"wal_fetch_prefetch_{settings.wal_prefetch}"
    result: dict[str, Any] = {
        prefetched: _replay(bench, base, archiving.restore_command(fetch_env), fetch_env),
        "bare_cp_local_plaintext": _replay(bench, base, f"cp {plain_dir}/%f %p"),
    }
    if with_no_prefetch:
        result["wal_fetch_no_prefetch"] = _replay(
            bench, base, archiving.restore_command(no_prefetch_env)
        )
    result["replay_mb_s_vs_cp"] = round(
        result[prefetched]["replay_mb_s"]
        / max(result["bare_cp_local_plaintext"]["replay_mb_s"], 1e-6),
        2,
    )
    result["ratio_vs_bare_cp"] = round(
        result[prefetched]["replay_and_promote_s"]
        / max(result["bare_cp_local_plaintext"]["replay_and_promote_s"], 1e-6),
        2,
    )
    return result


def cleanup(bench: PitrBench) -> None:
    """Stop and remove the bench's clusters, its files and both of its archive prefixes."""
    for c in (bench.src, bench.dst):
        c.stop()
        shutil.rmtree(c.home, ignore_errors=True)
    shutil.rmtree(bench.work, ignore_errors=True)
    store = bench.store
    for key_prefix in (f"{bench.prefix}/", f"{bench.prefix}-latency/"):
        for obj in list(store.list_keys(key_prefix)):
            store.delete(obj["Key"])


def run_bench(settings: Settings, *, seconds: int, clients: int, pushes: int) -> dict[str, Any]:
    """The three figures (see the module docstring), in the order the cluster allows: the
    base backup before the load, the pushes of its segments, then the recoveries."""
    settings.require("gpg_passphrase")
    bench = prepare(settings)
    try:
        start_source(bench)
        source = bench.settings.model_copy(
            update={"primary_dsn": SecretStr(bench.src.dsn("postgres"))}
        )
        base = basebackup.take(source, "bench")
        result: dict[str, Any] = {
            "prefix": bench.prefix,
            "pgbench_seconds": seconds,
            "clients": clients,
            "archive": archive_backlog(bench, seconds, clients),
            "wal_push_latency": push_latency(bench, pushes),
            "replay": replay_rate(bench, base),
        }
    finally:
        cleanup(bench)
    return result
