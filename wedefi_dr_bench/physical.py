"""``wedefi-dr bench physical``: the physical path against pgBackRest and the bare tools.

One source cluster of the bench's own (fsync on, pgbench tables at ``scale``), measured in
one run, side by side:

1. base backup: ``wedefi-dr base-backup``'s stream (zstd and lz4), into the S3 endpoint
   and into a posix repository in a temp folder (like for like), against pgBackRest 2.x
   ``backup --type=full`` (posix repo in a temp folder, lz4, process-max 2, aes-256-cbc);
2. physical restore: staging each of our base backups (download, decrypt, decompress,
   extract, ``pg_verifybackup``) against ``pgbackrest restore`` into an empty folder, in
   rounds, the best of each;
3. pgbench TPS with ``archive_command=/bin/true`` and with the resident archiver, the
   ``.ready`` backlog sampled every second during the archived run, and the server's wait
   per segment as the hand-off logged it;
4. one segment's ``archive_command`` alone (a fresh segment handed over, nothing ahead):
   the hand-off (into S3, and into a posix repository as pgBackRest's is), the synchronous
   ``wal-push``, ``pgbackrest archive-push`` (lz4) and ``cp``;
5. replay: recovery to 'latest' from the base backup taken before the load, with our
   ``restore_command`` (prefetch) and with ``cp`` of the same segments, decrypted;
6. the pgbench run of 3 again, archiving into a posix repository (last: the replay reads
   the S3 archive).

Ratios in one run on one host; the load average says what else ran. Measured, never
asserted in tests. The bench's clusters, repo, files and prefixes are removed at the end.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import secrets
import shlex
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
from pydantic import SecretStr

from wedefi_dr.catalog.manifest import new_backup_id
from wedefi_dr.config import Settings
from wedefi_dr.observability.stats import percentile
from wedefi_dr.physical import archiver, archiving, basebackup, wal
from wedefi_dr.physical.pitr import recovery
from wedefi_dr.physical.walnames import lsn_to_int
from wedefi_dr.postgres.cluster import chown_to, os_user_kwargs
from wedefi_dr.postgres.tools import connect
from wedefi_dr_bench import memory
from wedefi_dr_bench import pitr as pitr_bench
from wedefi_dr_bench.memory import RssSampler

DURABLE_RE = re.compile(r"wedefi-dr archive: ([0-9A-F]{24}) durable, waited ([0-9.]+) s")
STANZA = "bench"


def _run_as(user: str, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, **os_user_kwargs(user), **kwargs)


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a is not None and b else None


class PgBackRest:
    """pgBackRest on the bench's source cluster: a posix repo in the bench's work folder."""

    def __init__(self, bench: pitr_bench.PitrBench) -> None:
        self.bench = bench
        self.root = bench.work / "pgbackrest"
        self.root.mkdir()
        bench.work.chmod(0o755)  # the server's OS user runs pgbackrest
        self.user = bench.src.os_user
        self.conf = self.root / "pgbackrest.conf"
        cipher = secrets.token_urlsafe(24)
        self.conf.write_text(
            "\n".join(
                [
                    "[global]",
                    f"repo1-path={self.root / 'repo'}",
                    "repo1-cipher-type=aes-256-cbc",
                    f"repo1-cipher-pass={cipher}",
                    "compress-type=lz4",
                    "process-max=2",
                    f"log-path={self.root / 'log'}",
                    f"lock-path={self.root / 'lock'}",
                    f"spool-path={self.root / 'spool'}",
                    "log-level-console=warn",
                    "start-fast=y",
                    "archive-check=n",
                    f"[{STANZA}]",
                    f"pg1-path={bench.src.data_dir}",
                    f"pg1-port={bench.src.port}",
                    f"pg1-socket-path={bench.src.sockets}",
                    "",
                ]
            )
        )
        self.conf.chmod(0o600)
        for sub in ("repo", "log", "lock", "spool"):
            (self.root / sub).mkdir()
        subprocess.run(["chown", "-R", self.user, str(self.root)], check=True)
        self.cmd("stanza-create")

    def cmd(self, *args: str) -> float:
        t = time.monotonic()
        done = _run_as(
            self.user,
            ["pgbackrest", f"--config={self.conf}", f"--stanza={STANZA}", *args],
            timeout=3600,
            env={**os.environ, "PGPASSWORD": self.bench.src.password},  # the bench's own
        )
        if done.returncode != 0:
            raise RuntimeError(f"pgbackrest {args[0]} failed: {done.stdout}{done.stderr}")
        return time.monotonic() - t

    def repo_bytes(self) -> int:
        files = (self.root / "repo" / "backup").rglob("*")
        return sum(p.stat().st_size for p in files if p.is_file())


def set_archive_command(bench: pitr_bench.PitrBench, command: str) -> None:
    """Switch the source's archive_command (a reload, as an operator would)."""
    dsn = bench.src.dsn("postgres")
    with connect(dsn, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("ALTER SYSTEM SET archive_command = %s", (command,))
        cur.execute("SELECT pg_reload_conf()")


def wait_drained(bench: pitr_bench.PitrBench, timeout: float = 600) -> float:
    status = bench.src.data_dir / "pg_wal" / "archive_status"
    t = time.monotonic()
    pitr_bench._one(bench.src.dsn("postgres"), "SELECT pg_switch_wal()")
    while list(status.glob("*.ready")) and time.monotonic() - t < timeout:
        time.sleep(0.2)
    return time.monotonic() - t


def stop_resident_archiver(bench: pitr_bench.PitrBench, timeout: float = 30) -> None:
    """Stop the source's resident archiver (SIGTERM) and wait until it is gone: it keeps the
    env file it started with, and the next hand-off starts one with the current one."""
    pid_file = bench.src.data_dir / "pg_wal" / archiver.SPOOL / "archiver.pid"
    try:
        proc = psutil.Process(int(pid_file.read_text()))
        proc.terminate()
        proc.wait(timeout)
    except psutil.TimeoutExpired:
        proc.kill()
    except (OSError, ValueError, psutil.NoSuchProcess):
        return


def archived_pgbench_run(
    bench: pitr_bench.PitrBench, seconds: int, clients: int, sampler: RssSampler, phase: str
) -> dict[str, Any]:
    """pgbench with the source archiving (``.ready`` sampled), the drain after it, and the
    server's wait per segment as the hand-off logged it during the run."""
    log_at = bench.src.log.stat().st_size
    with sampler.measuring(phase):
        loaded = pgbench_run(bench, seconds, clients, sample=True)
    loaded["drain_after_s"] = round(wait_drained(bench), 1)
    loaded["server_wait_per_segment"] = pitr_bench.wait_stats(handoff_waits(bench.src.log, log_at))
    return loaded


def loaded_into_posix(
    bench: pitr_bench.PitrBench, seconds: int, clients: int, sampler: RssSampler
) -> dict[str, Any]:
    """The pgbench run again, archiving into a posix repository (pgBackRest's kind here):
    the server's wait without the local S3 server's CPU on the same cores. It runs last:
    the replay reads the S3 archive, which these segments are not in (and stopped the
    source, which starts again here)."""
    if not bench.src.is_running():
        bench.src.start()
    env = archiving.write_wal_env(
        repo_settings(bench.settings, bench, "posix"),
        bench.src.home / "wal-archive-posix.env",
        prefix=bench.prefix,
    )
    wait_drained(bench)
    set_archive_command(bench, archiving.archive_command(env))
    stop_resident_archiver(bench)
    return archived_pgbench_run(bench, seconds, clients, sampler, "pgbench_archiver_posix")


def pgbench_run(
    bench: pitr_bench.PitrBench, seconds: int, clients: int, sample: bool
) -> dict[str, Any]:
    """pgbench -T ``seconds``; with ``sample``, the ``.ready`` count every second."""
    status = bench.src.data_dir / "pg_wal" / "archive_status"
    samples: list[int] = []
    halt = threading.Event()

    def sampler() -> None:
        while not halt.wait(1.0):
            samples.append(len(list(status.glob("*.ready"))))

    thread = threading.Thread(target=sampler, daemon=True)
    dsn = bench.src.dsn("postgres")
    start_lsn = pitr_bench._one(dsn, "SELECT pg_current_wal_lsn()::text")
    if sample:
        thread.start()
    t = time.monotonic()
    run = subprocess.run(
        [*pitr_bench._pgbench(bench), "-c", str(clients), "-j", "2", "-T", str(seconds)]
        + ["-n", "postgres"],
        env={**os.environ, "PGPASSWORD": bench.src.password},
        capture_output=True,
        text=True,
    )
    elapsed = time.monotonic() - t
    halt.set()
    if sample:
        thread.join()
    end_lsn = pitr_bench._one(dsn, "SELECT pg_current_wal_lsn()::text")
    match = re.search(r"tps = ([0-9.]+)", run.stdout)
    wal_mb = (lsn_to_int(end_lsn) - lsn_to_int(start_lsn)) / 1e6
    out: dict[str, Any] = {
        "tps": float(match.group(1)) if match else None,
        "wal_mb": round(wal_mb, 1),
        "wal_mb_s": round(wal_mb / elapsed, 2),
    }
    if sample:
        out["ready_backlog_samples"] = samples
        out["ready_backlog_max"] = max(samples, default=0)
        out["ready_backlog_p95"] = percentile([float(s) for s in samples], 95) if samples else 0
    return out


def handoff_waits(log: Path, since: int) -> list[float]:
    """The server's waits per segment, as the hand-off logged them after offset ``since``."""
    with log.open("rb") as f:
        f.seek(since)
        text = f.read().decode(errors="replace")
    return [float(m.group(2)) for m in DURABLE_RE.finditer(text)]


def single_segment_latency(
    bench: pitr_bench.PitrBench, pgbr: PgBackRest, pushes: int
) -> dict[str, Any]:
    """One fresh segment at a time, as the server hands it over with nothing ahead."""
    segs = sorted(
        p for p in (bench.src.data_dir / "pg_wal").iterdir() if wal.SEGMENT_RE.match(p.name)
    )[-pushes:]
    fake = bench.work / "lat" / "pg_wal"
    (fake / "archive_status").mkdir(parents=True)
    env = archiving.write_wal_env(
        bench.settings, bench.work / "lat.env", prefix=f"{bench.prefix}-latency"
    )
    sync_env = archiving.write_wal_env(
        bench.settings, bench.work / "lat-sync.env", prefix=f"{bench.prefix}-latency-sync"
    )
    posix_env = archiving.write_wal_env(  # like for like: pgBackRest's repo is posix too
        repo_settings(bench.settings, bench, "posix"),
        bench.work / "lat-posix.env",
        prefix=f"{bench.prefix}-latency",
    )
    posix_fake = bench.work / "lat-posix" / "pg_wal"
    (posix_fake / "archive_status").mkdir(parents=True)
    copies = bench.work / "lat" / "cp"
    copies.mkdir()
    times: dict[str, list[float]] = {
        "handoff": [],
        "handoff_posix": [],
        "wal_push_sync": [],
        "pgbackrest": [],
        "cp": [],
    }
    handoff = shlex.split(archiving.archive_command(env))[:-1]
    handoff_posix = shlex.split(archiving.archive_command(posix_env))[:-1]
    sync = shlex.split(archiving.archive_command(sync_env, resident=False))[:-1]
    for folder in ("lat", "lat-posix"):
        subprocess.run(["chown", "-R", pgbr.user, str(bench.work / folder)], check=True)
    try:
        warm = segs.pop(0)  # starts the archivers (imports, S3 client): not timed
        for where, argv in ((fake, handoff), (posix_fake, handoff_posix)):
            shutil.copy(warm, where / warm.name)
            subprocess.run([*argv, f"pg_wal/{warm.name}"], cwd=where.parent, check=True)
        for seg in segs:
            for kind, argv, where in (
                ("handoff", [*handoff, f"pg_wal/{seg.name}"], fake),
                ("handoff_posix", [*handoff_posix, f"pg_wal/{seg.name}"], posix_fake),
                ("wal_push_sync", [*sync, f"pg_wal/{seg.name}"], fake),
                ("cp", ["cp", str(fake / seg.name), str(copies / seg.name)], fake),
            ):
                if kind.startswith("handoff"):  # ready just now: its archiver has no head start
                    shutil.copy(seg, where / seg.name)
                    (where / "archive_status" / f"{seg.name}.ready").write_text("")
                t = time.monotonic()
                subprocess.run(argv, cwd=where.parent, check=True, capture_output=True)
                times[kind].append(time.monotonic() - t)
            t = time.monotonic()
            pgbr.cmd("archive-push", str(seg))
            times["pgbackrest"].append(time.monotonic() - t)
            for where in (fake, posix_fake):
                ready = where / "archive_status" / f"{seg.name}.ready"
                ready.rename(ready.with_suffix(".done"))  # as the server does after exit 0
    finally:
        for where in (fake, posix_fake):
            with_pid = where / archiver.SPOOL / "archiver.pid"
            if with_pid.exists():
                os.kill(int(with_pid.read_text()), 15)
    result: dict[str, Any] = {k: pitr_bench.wait_stats(v) for k, v in times.items()}
    result["ratio_p50_handoff_vs_pgbackrest"] = _ratio(
        result["handoff"].get("p50_s"), result["pgbackrest"].get("p50_s")
    )
    result["ratio_p50_handoff_posix_vs_pgbackrest"] = _ratio(
        result["handoff_posix"].get("p50_s"), result["pgbackrest"].get("p50_s")
    )
    result["ratio_p50_handoff_vs_cp"] = _ratio(
        result["handoff"].get("p50_s"), result["cp"].get("p50_s")
    )
    return result


POSIX_REPO = "posix-repo"
REPOS = ("s3", "posix")


def repo_settings(settings: Settings, bench: pitr_bench.PitrBench, repo: str) -> Settings:
    """``settings`` writing to the bench's S3 prefix, or to a posix repository in its work
    folder (owned by the server's OS user, as a posix repository beside pgBackRest's)."""
    if repo == "s3":
        return settings
    return settings.model_copy(update={"repo_type": "posix", "repo_path": bench.work / POSIX_REPO})


def _label(repo: str, compression: str) -> str:
    """``zstd``/``lz4`` into S3 (the keys of earlier reports), ``posix_zstd``/``posix_lz4``."""
    return compression if repo == "s3" else f"{repo}_{compression}"


def base_backups(
    bench: pitr_bench.PitrBench, pgbr: PgBackRest, source: Settings
) -> tuple[dict[str, Any], dict[str, basebackup.BaseBackupManifest]]:
    """Ours (zstd, lz4; into S3 and into a posix repository) and pgBackRest's full backup
    of the same cluster, back to back."""
    out: dict[str, Any] = {}
    manifests = {}
    posix_root = bench.work / POSIX_REPO
    posix_root.mkdir(mode=0o750)
    chown_to(posix_root, pgbr.user)
    for repo in REPOS:
        for compression in ("zstd", "lz4"):
            label = _label(repo, compression)
            chosen = repo_settings(source, bench, repo).model_copy(
                update={"base_backup_compression": compression}
            )
            t = time.monotonic()
            manifest = basebackup.take(chosen, "bench", new_backup_id())
            out[f"ours_{label}_s"] = round(time.monotonic() - t, 2)
            out[f"ours_{label}_stored_mb"] = round(manifest.object.size_bytes / 1e6, 1)
            manifests[label] = manifest
            time.sleep(1.1)  # backup ids are per second
    out["tar_mb"] = round(manifests["zstd"].plaintext_size_bytes / 1e6, 1)
    out["pgbackrest_s"] = round(pgbr.cmd("backup", "--type=full"), 2)
    out["pgbackrest_stored_mb"] = round(pgbr.repo_bytes() / 1e6, 1)
    for label in manifests:
        out[f"ratio_ours_{label}_vs_pgbackrest"] = _ratio(
            out[f"ours_{label}_s"], out["pgbackrest_s"]
        )
    return out, manifests


RESTORE_ROUNDS = 5


def restores(
    bench: pitr_bench.PitrBench,
    pgbr: PgBackRest,
    manifests: dict[str, Any],
    rounds: int = RESTORE_ROUNDS,
) -> dict[str, Any]:
    """Stage (verified) our base backups, from S3 and from the posix repository, and
    ``pgbackrest restore`` into an empty folder: ``rounds`` times each, back to back, the
    order reversed every other round; the best attempt of each is its figure, every
    attempt is in ``attempts_s``.

    On this VM one restore's time says more about the host than about the restore: a file
    written or read pays for memory the host took back while nobody touched it (see
    ``memory.back_free_memory``), 0.2-12 s per GB over one day. One afternoon's five
    pgBackRest attempts took 1.7-10 s (fast when it ran right after itself, its repository
    still in memory) and ours 1.8-14 s, the first of a run the slowest. What the host adds
    only ever makes an attempt slower, so the best of several is each restore's own speed
    (as ``timeit`` takes the minimum), and reversing the order gives each a turn right
    after every neighbour.
    """
    cluster = bench.dst
    target = bench.work / "pgbr-restore"

    def ours(repo: str, label: str) -> tuple[float, dict[str, float]]:
        t, steps = time.monotonic(), {}
        staged = recovery.stage_base_backup(
            repo_settings(bench.settings, bench, repo),
            manifests[label],
            cluster,
            bench.work / "sp",
            steps,
        )
        seconds = time.monotonic() - t
        shutil.rmtree(staged, ignore_errors=True)
        return seconds, steps

    def pgbackrest() -> tuple[float, dict[str, float]]:
        target.mkdir(mode=0o700)
        chown_to(target, pgbr.user)
        seconds = pgbr.cmd("restore", f"--pg1-path={target}")
        shutil.rmtree(target, ignore_errors=True)
        return seconds, {}

    runs: list[tuple[str, Callable[[], tuple[float, dict[str, float]]]]] = [
        (label, functools.partial(ours, repo, label))
        for repo in REPOS
        for label in (_label(repo, c) for c in ("zstd", "lz4"))
    ]
    runs.append(("pgbackrest", pgbackrest))
    tries: dict[str, list[tuple[float, dict[str, float]]]] = {label: [] for label, _ in runs}
    for n in range(rounds):
        for label, run in runs if n % 2 == 0 else runs[::-1]:
            seconds, steps = run()
            tries[label].append((round(seconds, 2), steps))
    best = {label: min(t, key=lambda attempt: attempt[0]) for label, t in tries.items()}
    out: dict[str, Any] = {
        "rounds": rounds,
        "attempts_s": {label: [seconds for seconds, _ in t] for label, t in tries.items()},
        "pgbackrest_restore_s": best["pgbackrest"][0],
    }
    for label in manifests:
        out[f"ours_{label}_stage_verified_s"], out[f"ours_{label}_stage_steps_s"] = best[label]
        out[f"ratio_ours_{label}_vs_pgbackrest"] = _ratio(
            out[f"ours_{label}_stage_verified_s"], out["pgbackrest_restore_s"]
        )
    return out


def run_bench(
    settings: Settings,
    *,
    scale: int,
    seconds: int,
    clients: int,
    pushes: int,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Every figure of the module docstring, as a JSON-able dict."""
    settings.require("gpg_passphrase")
    load_before = os.getloadavg()
    sampler = RssSampler()
    sampler.start()
    bench = pitr_bench.prepare(settings)
    result: dict[str, Any] = {"scale": scale, "pgbench_seconds": seconds, "clients": clients}
    loads: list[float] = []
    halt = threading.Event()

    archiver_rss: list[int] = []

    def watch_load() -> None:
        pid_file = bench.src.data_dir / "pg_wal" / archiver.SPOOL / "archiver.pid"
        while not halt.wait(1.0):
            loads.append(os.getloadavg()[0])
            with contextlib.suppress(OSError, ValueError):
                archiver_rss.append(memory._vm_rss(int(pid_file.read_text())))

    threading.Thread(target=watch_load, daemon=True).start()
    try:
        say(f"source cluster, pgbench -i -s {scale}")
        pitr_bench.start_source(bench, scale=scale)
        source = bench.settings.model_copy(
            update={"primary_dsn": SecretStr(bench.src.dsn("postgres"))}
        )
        pgbr = PgBackRest(bench)
        result["database_mb"] = round(
            pitr_bench._one(bench.src.dsn("postgres"), "SELECT pg_database_size('postgres')") / 1e6,
            1,
        )
        say("pgbench with archive_command=/bin/true")
        wait_drained(bench)
        set_archive_command(bench, "/bin/true")
        with sampler.measuring("pgbench_true"):
            result["pgbench_bin_true"] = pgbench_run(bench, seconds, clients, sample=False)
        set_archive_command(
            bench, archiving.archive_command(bench.src.home / archiving.ARCHIVE_ENV_NAME)
        )
        with connect(bench.src.dsn("postgres"), autocommit=True) as conn, conn.cursor() as cur:
            cur.execute("VACUUM")  # the next runs start from the same state of the tables
            cur.execute("CHECKPOINT")
        say("base backups: ours (zstd, lz4) and pgBackRest")
        with sampler.measuring("base_backup"):
            result["base_backup"], manifests = base_backups(bench, pgbr, source)
        say("restores: ours (staged, verified) and pgBackRest")
        with sampler.measuring("restore"):
            result["restore"] = restores(bench, pgbr, manifests)
        say(f"pgbench {seconds} s with the resident archiver")
        loaded = archived_pgbench_run(bench, seconds, clients, sampler, "pgbench_archiver")
        result["pgbench_archiver"] = loaded
        result["tps_ratio_archiver_vs_bin_true"] = _ratio(
            loaded["tps"], result["pgbench_bin_true"]["tps"]
        )
        say(f"one segment at a time, {pushes} segments")
        result["single_segment"] = single_segment_latency(bench, pgbr, pushes)
        say("replay from the base backup: restore_command vs cp")
        result["replay"] = pitr_bench.replay_rate(bench, manifests["zstd"], with_no_prefetch=False)
        say(f"pgbench {seconds} s with the resident archiver into a posix repository")
        result["pgbench_archiver_posix"] = loaded_into_posix(bench, seconds, clients, sampler)
        result["tps_ratio_archiver_posix_vs_bin_true"] = _ratio(
            result["pgbench_archiver_posix"]["tps"], result["pgbench_bin_true"]["tps"]
        )
    finally:
        halt.set()
        pitr_bench.cleanup(bench)
        sampler.stop()
    result["peak_rss_mb"] = {
        phase: {k: round(v / 1e6, 1) for k, v in peaks.items()}
        for phase, peaks in sampler.peaks.items()
    }
    result["peak_rss_mb"]["resident archiver (source cluster)"] = round(
        max(archiver_rss, default=0) / 1e6, 1
    )
    result["host"] = {
        "cpus": os.cpu_count(),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "loadavg_1min_max_during": round(max(loads, default=0.0), 2),
    }
    return result
