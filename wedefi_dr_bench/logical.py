"""``wedefi-dr bench``: the flows measured against the bare tools, in one process tree.

Why this exists: the flows add safety (snapshot fingerprints, two checksums, S3 multipart,
audit rows, a verified download, a full verification of the restore) and the on-call
engineer needs to know what that safety costs against the plan's one-liners. So one run,
on one database, times

- bare ``pg_dump -Fc -Z<level> | gpg --symmetric`` (the flow's compression level and gpg
  parameters) to a local file (two processes, one pipe) against the ``logical-backup``
  flow, and
- bare ``pg_restore --clean --if-exists --single-transaction`` of a plain dump file, and
  bare ``gpg --decrypt | pg_restore`` of the encrypted one (what the stored object needs
  by hand), against the ``restore-backup`` flow,

and prints the ratios (DESIGN.md: "ratios against the bare tools run in the same process
tree", never timed assertions in tests). Each restore, bare or flow, is the best of
``--restore-attempts`` (3) attempts, every attempt kept in the JSON (:func:`best_of`).
A background thread samples the RSS of this process and of every descendant process
(``wedefi_dr_bench.memory``), so memory is compared too.

The database is the WeDefiDaily seed (UUIDs, hashes, numerics), not pgbench, whose filler
columns compress about 40:1 and flatter every tool. It lives in ``wedefi_bench`` on the
primary's server and is reused across runs (its scale is recorded in ``COMMENT ON
DATABASE``), because seeding about 1 GB takes longer than the benchmark itself.

Plain Python: Prefect and the flows are imported inside the functions that run them.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg2
from psycopg2 import sql
from psycopg2.extensions import ISOLATION_LEVEL_REPEATABLE_READ
from rich.console import Console
from rich.table import Table

from wedefi_dr.config import (
    Settings,
    apply_prefect_run_defaults,
    get_settings,
    host_concurrency_limit,
)
from wedefi_dr.errors import DRError
from wedefi_dr.postgres.conninfo import ConnTarget, with_dbname
from wedefi_dr.postgres.primary import primary_dsn
from wedefi_dr.postgres.tools import connect, tool
from wedefi_dr.storage.encryption import GpgParams
from wedefi_dr_bench.memory import SAMPLE_SECONDS, SELF_KIND, RssSampler, rss_by_kind

# The seed scale that makes about 1 GB (wedefi_dr_dev/seed.py measures scale 40 at 1029 MB).
DEFAULT_SCALE = 40.0
BENCH_DB = "wedefi_bench"
BARE_DB = "wedefi_bench_bare"
FLOW_DB = "wedefi_bench_flow"
COMMENT_KEY = "wedefi_dr_bench"
PHASES = (
    "bare_dump",
    "bare_backup",
    "bare_decrypt_restore",
    "bare_restore",
    "bare_restore_jobs",
    "flow_backup",
    "flow_restore",
)
BARE_PHASES = (
    "bare_dump",
    "bare_backup",
    "bare_decrypt_restore",
    "bare_restore",
    "bare_restore_jobs",
)
FLOW_PHASES = ("flow_backup", "flow_restore")


class BenchFailed(DRError):
    """A bare tool failed or the bench database is unusable: the figures would be wrong."""


# ---- the bench database ----------------------------------------------------------------
def _maintenance(dsn: str) -> str:
    return with_dbname(dsn, "postgres")


def bench_record(server_dsn: str, name: str = BENCH_DB) -> dict[str, Any] | None:
    """What ``COMMENT ON DATABASE`` says the bench database holds; None when not seeded."""
    with connect(_maintenance(server_dsn), autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s",
            (name,),
        )
        row = cur.fetchone()
    if row is None or not row[0]:
        return None
    try:
        return json.loads(row[0])[COMMENT_KEY]
    except (ValueError, KeyError, TypeError):
        return None


def recreate_database(server_dsn: str, name: str) -> None:
    """An empty database, whatever was there (only ever called on the bench's own names)."""
    drop_database(server_dsn, name)
    with connect(_maintenance(server_dsn), autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def drop_database(server_dsn: str, name: str) -> None:
    with connect(_maintenance(server_dsn), autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def database_size(server_dsn: str, name: str) -> int:
    with connect(_maintenance(server_dsn), autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("SELECT pg_database_size(%s)", (name,))
        return int(cur.fetchone()[0])


# How long a timed step waits for the WAL archiver to catch up with the previous one.
ARCHIVE_DRAIN_SECONDS = 300.0


def checkpoint(server_dsn: str) -> None:
    """Before a timed step: dirty buffers flushed, then the WAL the previous step wrote
    archived (no ``.ready`` file left), so no step pays for the previous one's writes. The
    server archives every segment (compressed, encrypted, uploaded): a 1 GB restore leaves
    about a hundred, and a step started behind them shared the CPU with their archiving."""
    with connect(_maintenance(server_dsn), autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("CHECKPOINT")
        deadline = time.monotonic() + ARCHIVE_DRAIN_SECONDS
        while True:
            cur.execute("SELECT count(*) FROM pg_ls_archive_statusdir() WHERE name LIKE '%.ready'")
            (ready,) = cur.fetchone()
            if not ready:
                return
            if time.monotonic() > deadline:
                raise BenchFailed(
                    f"the WAL archiver still has {ready} segment(s) to archive after "
                    f"{ARCHIVE_DRAIN_SECONDS:.0f} s: is archive_command failing? (server log)"
                )
            time.sleep(0.2)


def ensure_seeded(
    server_dsn: str, scale: float, reuse: bool, say: Callable[[str], None]
) -> dict[str, Any]:
    """The bench database at ``scale``: reused when its comment says so, else seeded anew.

    After seeding, ``VACUUM (FREEZE, ANALYZE)`` sets every hint bit: otherwise the first
    reader (the bare pg_dump) would pay for writing them and flatter the flow that runs
    after it.
    """
    record = bench_record(server_dsn)
    if reuse and record is not None and float(record.get("scale", -1)) == float(scale):
        say(f"reusing {BENCH_DB} (scale {scale}, seeded {record.get('seeded_at')})")
        return {"seeded": False, "rows": record.get("rows"), "seeded_at": record.get("seeded_at")}

    from wedefi_dr_dev import seed as seeding

    dsn = with_dbname(server_dsn, BENCH_DB)
    say(f"seeding {BENCH_DB} at scale {scale} (takes minutes at about 1 GB)")
    recreate_database(server_dsn, BENCH_DB)
    t0 = time.perf_counter()
    seeding.prepare(dsn, reset=True)
    counts = seeding.seed(dsn, scale)
    seed_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    with connect(dsn, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("VACUUM (FREEZE, ANALYZE)")
    vacuum_seconds = time.perf_counter() - t0
    rows = sum(counts.values())
    seeded_at = datetime.now(UTC).isoformat(timespec="seconds")
    comment = json.dumps({COMMENT_KEY: {"scale": scale, "rows": rows, "seeded_at": seeded_at}})
    with connect(_maintenance(server_dsn), autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(
            sql.SQL("COMMENT ON DATABASE {} IS {}").format(
                sql.Identifier(BENCH_DB), sql.Literal(comment)
            )
        )
    say(f"seeded {rows:,} rows in {seed_seconds:.1f} s, vacuum {vacuum_seconds:.1f} s")
    return {
        "seeded": True,
        "rows": rows,
        "seeded_at": seeded_at,
        "seed_seconds": round(seed_seconds, 3),
        "vacuum_freeze_analyze_seconds": round(vacuum_seconds, 3),
    }


# ---- the bare tools --------------------------------------------------------------------
def _check(proc: subprocess.Popen[bytes], name: str, errfile: Path) -> None:
    if proc.returncode != 0:
        text = errfile.read_text(errors="replace").strip()
        raise BenchFailed(f"bare {name} failed (exit {proc.returncode}): {text[-800:]}")


def _pg_dump_cmd(target: ConnTarget, compress_level: int) -> list[str]:
    """The flow's dump (same format and compression level), without the snapshot."""
    return [
        tool("pg_dump"),
        "--format=custom",
        f"--compress={compress_level}",
        "--no-password",
        *target.tool_args(),
    ]


def _pg_restore_cmd(target: ConnTarget, archive: Path | None = None, jobs: int = 1) -> list[str]:
    """pg_restore into ``target`` in one transaction, from ``archive`` or stdin; with
    ``jobs`` > 1 over that many sessions instead (from a file: it must seek)."""
    how = [f"--jobs={jobs}"] if jobs > 1 else ["--single-transaction"]
    return [
        tool("pg_restore"),
        "--clean",
        "--if-exists",
        *how,
        "--no-password",
        *target.tool_args(),
        *([str(archive)] if archive is not None else []),
    ]


def bare_dump(dsn: str, out: Path, work: Path, compress_level: int = 9) -> float:
    """``pg_dump -Fc -Z<level> > file``: the plaintext archive the bare restore reads."""
    err = work / "pg_dump.err"
    target = ConnTarget.parse(dsn, allow_password=True)
    with out.open("wb") as sink, err.open("wb") as errf:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            _pg_dump_cmd(target, compress_level), stdout=sink, stderr=errf, env=target.tool_env()
        )
        proc.wait()
        elapsed = time.perf_counter() - t0
    _check(proc, "pg_dump", err)
    return elapsed


def _gpg_cmd(homedir: Path, passphrase_fd: int) -> list[str]:
    return [
        "gpg",
        "--batch",
        "--no-tty",
        "--quiet",
        "--homedir",
        str(homedir),
        "--pinentry-mode",
        "loopback",
        "--no-symkey-cache",
        "--passphrase-fd",
        str(passphrase_fd),
    ]


def gpg_symmetric_cmd(homedir: Path, passphrase_fd: int, params: GpgParams) -> list[str]:
    """Stock gpg with the plan's parameters (what the flow's encryption module runs)."""
    return _gpg_cmd(homedir, passphrase_fd) + params.symmetric_args()


@dataclass(frozen=True)
class _Stage:
    """One process of a bare pipeline: its command line, environment and extra fds."""

    name: str
    argv: list[str]
    env: dict[str, str] | None = None
    pass_fds: tuple[int, ...] = ()


def _piped(first: _Stage, second: _Stage, sink: int | Any, work: Path) -> float:
    """``first | second > sink``: two processes and a kernel pipe, timed; BenchFailed
    naming the stage that failed."""
    first_err, second_err = work / f"pipe-{first.name}.err", work / f"pipe-{second.name}.err"
    with first_err.open("wb") as ferr, second_err.open("wb") as serr:
        t0 = time.perf_counter()
        head = subprocess.Popen(
            first.argv, stdout=subprocess.PIPE, stderr=ferr, env=first.env, pass_fds=first.pass_fds
        )
        tail = subprocess.Popen(
            second.argv,
            stdin=head.stdout,
            stdout=sink,
            stderr=serr,
            env=second.env,
            pass_fds=second.pass_fds,
        )
        assert head.stdout is not None
        head.stdout.close()  # the second holds the only read end: the first sees EPIPE
        tail.wait()
        head.wait()
        elapsed = time.perf_counter() - t0
    _check(head, first.name, first_err)
    _check(tail, second.name, second_err)
    return elapsed


def _passphrase_fd(passphrase: str) -> int:
    read_fd, write_fd = os.pipe()
    os.write(write_fd, passphrase.encode() + b"\n")
    os.close(write_fd)
    return read_fd


def bare_dump_encrypt(
    dsn: str,
    out: Path,
    work: Path,
    passphrase: str,
    params: GpgParams,
    gnupg_home: Path,
    compress_level: int = 9,
) -> float:
    """``pg_dump -Fc -Z<level> | gpg --symmetric > file``: two processes and a kernel pipe."""
    fd = _passphrase_fd(passphrase)
    target = ConnTarget.parse(dsn, allow_password=True)
    try:
        with out.open("wb") as sink:
            return _piped(
                _Stage("pg_dump", _pg_dump_cmd(target, compress_level), target.tool_env()),
                _Stage("gpg --symmetric", gpg_symmetric_cmd(gnupg_home, fd, params), None, (fd,)),
                sink,
                work,
            )
    finally:
        os.close(fd)


def bare_decrypt_restore(
    dsn: str, encrypted: Path, work: Path, passphrase: str, gnupg_home: Path
) -> float:
    """``gpg --decrypt file | pg_restore --clean --if-exists --single-transaction``: what
    restoring the stored (encrypted) object takes by hand, checking nothing else."""
    fd = _passphrase_fd(passphrase)
    target = ConnTarget.parse(dsn, allow_password=True)
    try:
        return _piped(
            _Stage(
                "gpg --decrypt",
                [*_gpg_cmd(gnupg_home, fd), "--decrypt", str(encrypted)],
                None,
                (fd,),
            ),
            _Stage("pg_restore", _pg_restore_cmd(target), target.tool_env()),
            subprocess.DEVNULL,
            work,
        )
    finally:
        os.close(fd)


def bare_restore(dsn: str, archive: Path, work: Path, jobs: int = 1) -> float:
    """``pg_restore --clean --if-exists --single-transaction`` of the plain dump file, or
    with ``jobs`` > 1 ``--jobs`` sessions (no single transaction then)."""
    err = work / "pg_restore.err"
    target = ConnTarget.parse(dsn, allow_password=True)
    with err.open("wb") as errf:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            _pg_restore_cmd(target, archive, jobs),
            stdout=subprocess.DEVNULL,
            stderr=errf,
            env=target.tool_env(),
        )
        proc.wait()
        elapsed = time.perf_counter() - t0
    _check(proc, "pg_restore", err)
    return elapsed


# ---- the flows ---------------------------------------------------------------------------
def warm_up_prefect() -> float:
    """Run a throwaway flow so the ephemeral API server's start-up is not billed to a flow."""
    from prefect import flow

    @flow(name="bench-warm-up")
    def bench_warm_up() -> int:
        return 1

    t0 = time.perf_counter()
    bench_warm_up()
    return time.perf_counter() - t0


@contextmanager
def host_limit_in_place(server_dsn: str) -> Iterator[dict[str, Any]]:
    """The primary host's global concurrency limit for the flow phases, as ``stack deploy``
    creates it (one slot) when the server has none, so the flows take, renew and give back
    a slot as every deployed run does rather than run the cheaper no-limit path. A limit
    the bench created is deleted afterwards; an existing one is left as it was."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectNotFound

    name = host_concurrency_limit(ConnTarget.parse(server_dsn, allow_password=True).location)
    with get_client(sync_client=True) as client:
        try:
            existing = client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            existing = None
        if existing is None:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
    record = {
        "name": name,
        "limit": existing.limit if existing else 1,
        "active": existing.active if existing else True,
        "created_by_bench": existing is None,
    }
    try:
        yield record
    finally:
        if existing is None:
            with get_client(sync_client=True) as client:
                client.delete_global_concurrency_limit_by_name(name)


def fingerprint_seconds(dsn: str) -> float:
    """Time the per-table row counts and content hashes alone (the flow runs them
    concurrently with pg_dump, in pg_dump's snapshot), to show what they cost."""
    from wedefi_dr.postgres.fingerprint import fingerprint_tables

    conn = psycopg2.connect(dsn, application_name="wedefi-dr bench fingerprints")
    try:
        conn.set_isolation_level(ISOLATION_LEVEL_REPEATABLE_READ)
        t0 = time.perf_counter()
        fingerprint_tables(conn)
        elapsed = time.perf_counter() - t0
        conn.rollback()
    finally:
        conn.close()
    return elapsed


@contextmanager
def _settings_with(**values: str) -> Iterator[None]:
    """Point the settings (and so the flows) at the bench database or another repository,
    then back: ``_settings_with(WEDEFI_DR_PRIMARY_DSN=...)``."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    get_settings.cache_clear()
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        get_settings.cache_clear()


def _delete_backup(settings: Settings, backup_id: str) -> None:
    """The bench's backup is of the bench database: remove it so moto does not keep
    (in memory) a gigabyte per run and the catalog does not list bench runs."""
    from wedefi_dr.catalog import listing
    from wedefi_dr.storage.repository import open_store

    store = open_store(settings)
    store.delete(listing.manifest_key(store, backup_id))
    store.delete(listing.data_key(store, backup_id))


# ---- the run -----------------------------------------------------------------------------
def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a is not None and b else None


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:,.1f} MB"


@dataclass
class BenchRun:
    """The state one benchmark run carries from phase to phase (and the finally clause)."""

    settings: Settings
    say: Callable[[str], None]
    server_dsn: str
    work: Path
    database: dict[str, Any]
    sampler: RssSampler = field(default_factory=RssSampler)
    load_before: tuple[float, float, float] = field(default_factory=os.getloadavg)
    times: dict[str, float] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    python_rss: dict[str, int] = field(default_factory=dict)
    backup_id: str | None = None
    restore_result: dict[str, Any] = field(default_factory=dict)
    host_limit: dict[str, Any] = field(default_factory=dict)
    flow_first: bool = False
    restore_attempts: int = 1
    attempts: dict[str, list[float]] = field(default_factory=dict)

    def dsn(self, name: str) -> str:
        return with_dbname(self.server_dsn, name)

    @property
    def gnupg_home(self) -> Path:
        return self.work / "gnupg"


RESTORE_ATTEMPTS = 3


def best_of(run: BenchRun, key: str, attempt: Callable[[], float]) -> int:
    """Run ``attempt`` (its own set-up untimed, the seconds of its timed part returned)
    ``run.restore_attempts`` times: the fastest is ``times[key]``, every one is in
    ``attempts[key]``; returns the fastest attempt's index.

    Why: the same restore of the same archive took 12.9 to 15.7 s within half an hour here
    (the WAL archiver, autovacuum and the page cache share two CPUs with it), and other work
    only ever makes an attempt slower, so the best of several is each restore's own speed
    and a ratio of two bests compares the tools rather than the minutes they ran in."""
    seconds = [attempt() for _ in range(max(run.restore_attempts, 1))]
    run.attempts[key] = [round(t, 3) for t in seconds]
    best = min(range(len(seconds)), key=seconds.__getitem__)
    run.times[key] = seconds[best]
    return best


def prepare(settings: Settings, scale: float, reuse: bool, say: Callable[[str], None]) -> BenchRun:
    """The seeded bench database, a work folder on the spool disk, the memory sampler."""
    settings.require("primary_dsn", "ops_dsn", "gpg_passphrase")
    server_dsn = primary_dsn(settings)
    apply_prefect_run_defaults()
    say(f"server {ConnTarget.parse(_maintenance(server_dsn), allow_password=True).redacted}")
    database = ensure_seeded(server_dsn, scale, reuse, say)
    database.update(name=BENCH_DB, scale=scale, size_bytes=database_size(server_dsn, BENCH_DB))
    say(f"{BENCH_DB}: {_mb(database['size_bytes'])}")
    # Bare files go where the flow restore spools its download: the same disk for both.
    if settings.spool_dir:
        settings.spool_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="wedefi-bench-", dir=settings.spool_dir or None))
    run = BenchRun(settings=settings, say=say, server_dsn=server_dsn, work=work, database=database)
    run.gnupg_home.mkdir(mode=0o700)
    run.sizes["database_bytes"] = database["size_bytes"]
    run.python_rss["start"] = rss_by_kind()[SELF_KIND]
    run.sampler.start()
    return run


def run_bare_phases(run: BenchRun) -> None:
    """Bare ``pg_dump``, ``pg_dump | gpg`` and ``pg_restore``; in the first run before Prefect
    is imported, so the bare figures show this process as the plain tools would see it.
    ``pg_dump`` alone runs first: it also warms the page cache, so the denominator
    (``pg_dump | gpg``) and the flow both read from a warm cache."""
    say, times, sizes = run.say, run.times, run.sizes
    plain, encrypted = run.work / "bare.pgc", run.work / "bare.pgc.gpg"
    checkpoint(run.server_dsn)
    level = run.settings.compress_level
    say(f"bare pg_dump -Fc -Z{level} > file")
    with run.sampler.measuring("bare_dump"):
        times["bare_pg_dump"] = bare_dump(run.dsn(BENCH_DB), plain, run.work, level)
    checkpoint(run.server_dsn)
    say(f"bare pg_dump -Fc -Z{level} | gpg --symmetric > file")
    passphrase = run.settings.gpg_passphrase.get_secret_value()
    with run.sampler.measuring("bare_backup"):
        times["bare_pg_dump_gpg"] = bare_dump_encrypt(
            run.dsn(BENCH_DB),
            encrypted,
            run.work,
            passphrase,
            GpgParams.from_settings(run.settings),
            run.gnupg_home,
            level,
        )
    sizes["bare_dump_bytes"] = plain.stat().st_size
    sizes["bare_encrypted_bytes"] = encrypted.stat().st_size

    def restored(phase: str, restore: Callable[[], float]) -> Callable[[], float]:
        """One attempt: a fresh empty database and a drained archiver (untimed), the
        restore (timed), the database's size, then the drop (so its autovacuum cannot
        steal CPU from the next step)."""

        def attempt() -> float:
            recreate_database(run.server_dsn, BARE_DB)
            checkpoint(run.server_dsn)
            with run.sampler.measuring(phase):
                seconds = restore()
            sizes["restored_bytes"] = database_size(run.server_dsn, BARE_DB)
            drop_database(run.server_dsn, BARE_DB)
            return seconds

        return attempt

    tries = f"best of {run.restore_attempts}"
    say(f"bare gpg --decrypt | pg_restore --single-transaction -> {BARE_DB} ({tries})")
    best_of(
        run,
        "bare_gpg_pg_restore",
        restored(
            "bare_decrypt_restore",
            lambda: bare_decrypt_restore(
                run.dsn(BARE_DB), encrypted, run.work, passphrase, run.gnupg_home
            ),
        ),
    )
    encrypted.unlink()

    say(f"bare pg_restore --clean --if-exists --single-transaction -> {BARE_DB} ({tries})")
    best_of(
        run,
        "bare_pg_restore",
        restored("bare_restore", lambda: bare_restore(run.dsn(BARE_DB), plain, run.work)),
    )

    # The parallel load a new database gets from the flow (WEDEFI_DR_RESTORE_JOBS).
    jobs = run.settings.restore_jobs
    say(f"bare pg_restore --clean --if-exists --jobs={jobs} -> {BARE_DB} ({tries})")
    best_of(
        run,
        "bare_pg_restore_jobs",
        restored(
            "bare_restore_jobs", lambda: bare_restore(run.dsn(BARE_DB), plain, run.work, jobs)
        ),
    )
    plain.unlink()


def run_flow_phases(run: BenchRun, keep_backup: bool) -> None:
    """The backup and restore flows on the same database, after a throwaway flow has started
    Prefect's ephemeral API (its start-up is not billed to either flow)."""
    run.python_rss["before_prefect_warm_up"] = rss_by_kind()[SELF_KIND]
    run.say("Prefect warm-up flow (ephemeral API start-up, not counted)")
    run.times["prefect_warm_up"] = warm_up_prefect()
    with host_limit_in_place(run.server_dsn) as limit:
        run.host_limit = limit
        run.say(
            f"host concurrency limit {limit['name']} (created by the bench: "
            f"{limit['created_by_bench']})"
        )
        _flow_round_trips(run, keep_backup)


def _flow_round_trips(run: BenchRun, keep_backup: bool) -> None:
    """The backup and restore flows, to S3 and then to a posix repository."""
    from flows.backup import logical_backup
    from wedefi_dr.catalog import listing
    from wedefi_dr.storage.repository import open_store

    say, times, sizes = run.say, run.times, run.sizes

    with _settings_with(WEDEFI_DR_PRIMARY_DSN=run.dsn(BENCH_DB)):
        flow_settings = get_settings()
        checkpoint(run.server_dsn)
        run.python_rss["before_flow_backup"] = rss_by_kind()[SELF_KIND]
        say("flow logical-backup")
        with run.sampler.measuring("flow_backup"):
            run.backup_id, times["flow_backup"], times["flow_backup_to_completed"] = timed_flow(
                logical_backup, operator="bench"
            )
        run.python_rss["after_flow_backup"] = rss_by_kind()[SELF_KIND]
        manifest = listing.resolve(open_store(flow_settings), run.backup_id)
        times["flow_backup_stream"] = manifest.duration_seconds
        sizes["flow_dump_bytes"] = manifest.plaintext.size_bytes
        sizes["stored_bytes"] = manifest.object.size_bytes

        say("fingerprints alone (the flow takes them during the dump)")
        checkpoint(run.server_dsn)
        times["fingerprints_alone"] = fingerprint_seconds(run.dsn(BENCH_DB))

        say(f"flow restore-backup -> {FLOW_DB} (a new database; best of {run.restore_attempts})")
        run.python_rss["before_flow_restore"] = rss_by_kind()[SELF_KIND]
        results: list[dict[str, Any]] = []
        attempt = flow_restore_attempt(
            run, run.backup_id, "restore timing against bare pg_restore", results, "flow_restore"
        )
        run.restore_result = results[best_of(run, "flow_restore", attempt)]
        times["flow_restore_to_completed"] = min(r["seconds_to_completed"] for r in results)
        for step, seconds in run.restore_result["timings"].items():
            times[f"flow_restore_{step}"] = seconds
        times["flow_restore_tables_fingerprints"] = run.restore_result.get(
            "tables_fingerprinted_seconds", 0.0
        )
        if not keep_backup:
            _delete_backup(flow_settings, run.backup_id)
    posix_round_trip(run)


def timed_flow(flow: Callable[..., Any], **params: Any) -> tuple[Any, float, float]:
    """``flow(**params)``: its result, the seconds until the call returned and the seconds
    until the run's Completed state.

    The two differ by 0-1 s: a sync flow returns only after Prefect has joined its heartbeat
    thread, which sleeps in one-second steps, so the call ends on that thread's next tick.
    The run is Completed (the backup stored and recorded, the database renamed and proven,
    the UI saying so) before that."""
    started, t0 = time.time(), time.perf_counter()
    state = flow(**params, return_state=True)
    seconds = time.perf_counter() - t0
    return state.result(), seconds, state.timestamp.timestamp() - started


def flow_restore_attempt(
    run: BenchRun,
    backup_id: str,
    why: str,
    results: list[dict[str, Any]],
    phase: str | None = None,
) -> Callable[[], float]:
    """One attempt of the restore flow into a new ``FLOW_DB`` for :func:`best_of`: the drop
    and a drained archiver untimed, the flow timed (its memory under ``phase`` when given),
    its result appended to ``results`` with its ``seconds_to_completed``."""
    from flows.restore import restore_backup

    def attempt() -> float:
        drop_database(run.server_dsn, FLOW_DB)
        checkpoint(run.server_dsn)
        with run.sampler.measuring(phase) if phase else nullcontext():
            result, seconds, to_completed = timed_flow(
                restore_backup,
                backup_id=backup_id,
                target_dsn=run.dsn(FLOW_DB),
                operator="bench",
                justification=f"wedefi-dr bench: {why}",
            )
        results.append({**result, "seconds_to_completed": to_completed})
        return seconds

    return attempt


def posix_round_trip(run: BenchRun) -> None:
    """The same backup and restore flows through a posix repository on the local disk:
    the bare pipeline writes a local file, so this is the like-for-like backup figure (no
    HTTP, no moto server sharing the CPUs)."""
    from flows.backup import logical_backup

    times = run.times
    repo = run.work / "posix-repo"
    with _settings_with(
        WEDEFI_DR_PRIMARY_DSN=run.dsn(BENCH_DB),
        WEDEFI_DR_REPO_TYPE="posix",
        WEDEFI_DR_REPO_PATH=str(repo),
    ):
        checkpoint(run.server_dsn)
        run.say("flow logical-backup into a posix repository")
        backup_id, times["flow_backup_posix"], times["flow_backup_posix_to_completed"] = timed_flow(
            logical_backup, operator="bench"
        )
        run.say(
            f"flow restore-backup from the posix repository -> {FLOW_DB} (new; best of "
            f"{run.restore_attempts})"
        )
        attempt = flow_restore_attempt(run, backup_id, "restore timing from a posix repository", [])
        best_of(run, "flow_restore_posix", attempt)
    shutil.rmtree(repo, ignore_errors=True)


def cleanup(run: BenchRun) -> None:
    """Stop sampling; drop the bench's scratch databases, its gpg agent and its files."""
    run.sampler.stop()
    for name in (BARE_DB, FLOW_DB):
        with suppress(psycopg2.Error):
            drop_database(run.server_dsn, name)
    with suppress(OSError, subprocess.SubprocessError):
        subprocess.run(
            ["gpgconf", "--homedir", str(run.gnupg_home), "--kill", "gpg-agent"],
            capture_output=True,
            timeout=10,
        )
    shutil.rmtree(run.work, ignore_errors=True)


NOTES = [
    "The flow backup uploads to S3 (the local moto server, over HTTP on 127.0.0.1: "
    "multipart, SSE, STANDARD_IA); the bare pipeline writes to a local file, as the "
    "posix-repository round trip does.",
    "The flow backup also hashes plaintext and ciphertext and takes per-table row "
    "counts and content hashes in pg_dump's snapshot, concurrently with the dump "
    "(timed alone as fingerprints_alone).",
    "The flow restore downloads with one streaming GET to a spool file (ciphertext), "
    "checks its sha256, decrypts into memory and checks the plaintext's sha256, runs "
    "pg_restore --jobs into a new database under a name of its own, fingerprints every "
    "table (each as soon as pg_restore reports it loaded, the rest after the load: that "
    "part timed apart) and renames it to the target; the bare "
    "restores read a plaintext dump from a local file and verify nothing.",
    "Each restore figure, bare or flow, is the best of its attempts "
    "(restore_attempts_seconds has every one); the backups are one attempt each.",
    "Prefect's ephemeral API start-up is excluded (a throwaway flow ran first).",
    "The flows take a slot of the primary host's global concurrency limit, as deployed "
    "runs do (host_limit: created for the run and deleted after when the server had none).",
    "The moto and PostgreSQL server processes are excluded from the memory figures.",
]


def summarize(run: BenchRun, keep_backup: bool) -> dict[str, Any]:
    """Every figure of the run, with the flow ÷ bare ratios, as a JSON-able dict."""
    times = run.times
    restore_without_verify = (
        times["flow_restore"]
        - times.get("flow_restore_verify", 0.0)
        - times.get("flow_restore_tables_fingerprints", 0.0)
    )
    times["flow_restore_without_verify"] = restore_without_verify
    ratios = {
        "backup_flow_vs_bare_pg_dump_gpg": _ratio(times["flow_backup"], times["bare_pg_dump_gpg"]),
        "restore_flow_vs_bare_pg_restore": _ratio(times["flow_restore"], times["bare_pg_restore"]),
        "restore_flow_without_verify_vs_bare_pg_restore": _ratio(
            restore_without_verify, times["bare_pg_restore"]
        ),
        "restore_flow_vs_bare_pg_restore_jobs": _ratio(
            times["flow_restore"], times.get("bare_pg_restore_jobs")
        ),
        "backup_flow_to_completed_vs_bare_pg_dump_gpg": _ratio(
            times.get("flow_backup_to_completed"), times["bare_pg_dump_gpg"]
        ),
        "backup_flow_posix_to_completed_vs_bare_pg_dump_gpg": _ratio(
            times.get("flow_backup_posix_to_completed"), times["bare_pg_dump_gpg"]
        ),
        "restore_flow_to_completed_vs_bare_pg_restore_jobs": _ratio(
            times.get("flow_restore_to_completed"), times.get("bare_pg_restore_jobs")
        ),
        "restore_flow_vs_bare_gpg_pg_restore": _ratio(
            times["flow_restore"], times.get("bare_gpg_pg_restore")
        ),
        "backup_flow_posix_vs_bare_pg_dump_gpg": _ratio(
            times.get("flow_backup_posix"), times["bare_pg_dump_gpg"]
        ),
        "restore_flow_posix_vs_bare_pg_restore": _ratio(
            times.get("flow_restore_posix"), times["bare_pg_restore"]
        ),
    }
    sampler = run.sampler
    return {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": {
            "cpus": os.cpu_count(),
            "loadavg_before": [round(x, 2) for x in run.load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        },
        "database": run.database,
        "order": "flows, then bare tools" if run.flow_first else "bare tools, then flows",
        "backup_id": run.backup_id,
        "backup_kept": keep_backup,
        "sizes": run.sizes,
        "times_seconds": {k: round(v, 3) for k, v in times.items()},
        "restore_attempts_seconds": run.attempts,
        "ratios": ratios,
        "memory_bytes": {
            "python_rss": run.python_rss,
            "bare_peak": sampler.peak_over(BARE_PHASES),
            "flow_peak": sampler.peak_over(FLOW_PHASES),
            "per_phase_peak": {p: sampler.peaks.get(p, {}) for p in PHASES},
            "samples": sampler.samples,
            "sample_seconds": SAMPLE_SECONDS,
        },
        "host_limit": run.host_limit,
        "rows_verified": run.restore_result.get("rows"),
        "tables_verified": run.restore_result.get("tables"),
        "notes": NOTES,
    }


def run_bench(
    settings: Settings,
    scale: float = DEFAULT_SCALE,
    reuse: bool = True,
    keep_backup: bool = False,
    say: Callable[[str], None] = print,
    *,
    flow_first: bool = False,
    restore_attempts: int = RESTORE_ATTEMPTS,
) -> dict[str, Any]:
    """Every figure of one benchmark run, as a JSON-able dict (see the module docstring).

    Other work on the host skews every figure: the load average before and after says how
    much there was. ``flow_first``: the flows before the bare tools (only for a run after
    the first, whose bare ``pg_dump`` warmed the page cache and which imported Prefect).
    """
    run = prepare(settings, scale, reuse, say)
    run.flow_first = flow_first
    run.restore_attempts = restore_attempts
    try:
        if flow_first:
            run_flow_phases(run, keep_backup)
            run_bare_phases(run)
        else:
            run_bare_phases(run)
            run_flow_phases(run, keep_backup)
    finally:
        cleanup(run)
    return summarize(run, keep_backup)


def run_rounds(settings: Settings, rounds: int = 1, **options: Any) -> dict[str, Any]:
    """``rounds`` runs of :func:`run_bench`, one after the other: the last run's figures,
    with every run's ratios under ``rounds``, their medians under ``ratios_median`` and
    every run's times under ``rounds_times_seconds`` (which side of a ratio moved).

    Why: on this 2-core host the same step differs between runs by up to a third (bare
    ``pg_restore`` of the same dump took 17.5 s and 29.2 s an hour apart), more than the
    overhead being measured, so one run's ratio says little on its own. Every second run
    times the flows before the bare tools: a host that slows down or speeds up during a
    run then tilts two runs' ratios in opposite directions, and the median of an even
    number of rounds carries no order bias."""
    reports = [run_bench(settings, flow_first=i % 2 == 1, **options) for i in range(max(rounds, 1))]
    last = reports[-1]
    if len(reports) > 1:
        last["rounds"] = [r["ratios"] for r in reports]
        last["rounds_times_seconds"] = [r["times_seconds"] for r in reports]
        last["rounds_order"] = [r["order"] for r in reports]
        last["ratios_median"] = {
            key: statistics.median(values)
            for key in last["ratios"]
            if (values := [r["ratios"][key] for r in reports if r["ratios"].get(key) is not None])
        }
    return last


def render(report: dict[str, Any], console: Console) -> None:
    """The figures as rich tables (the JSON file has the same figures, unrounded)."""
    t = report["times_seconds"]
    s = report["sizes"]
    r = report["ratios"]
    db = report["database"]

    head = Table(title=f"wedefi-dr bench — {db['name']} at scale {db['scale']}", show_header=False)
    head.add_column("what")
    head.add_column("value", justify="right")
    head.add_row("database size (pg_database_size)", _mb(db["size_bytes"]))
    head.add_row("rows", f"{db['rows']:,}" if db.get("rows") is not None else "-")
    if db.get("seeded"):
        head.add_row("seed time", f"{db['seed_seconds']:.1f} s")
        head.add_row("VACUUM (FREEZE, ANALYZE)", f"{db['vacuum_freeze_analyze_seconds']:.1f} s")
    else:
        head.add_row("seed", f"reused (seeded {db.get('seeded_at')})")
    head.add_row("dump size (bare pg_dump -Fc)", _mb(s.get("bare_dump_bytes")))
    head.add_row("stored size (flow, encrypted)", _mb(s.get("stored_bytes")))
    head.add_row("bare encrypted file", _mb(s.get("bare_encrypted_bytes")))
    head.add_row("restored database size", _mb(s.get("restored_bytes")))
    host = report["host"]
    head.add_row("CPUs", str(host["cpus"]))
    head.add_row(
        "load average 1/5/15 min, before → after",
        f"{'/'.join(map(str, host['loadavg_before']))} → "
        f"{'/'.join(map(str, host['loadavg_after']))}",
    )
    console.print(head)

    times = Table(title="times (wall clock)")
    times.add_column("step")
    times.add_column("seconds", justify="right")
    rows = [
        ("bare pg_dump -Fc > file", "bare_pg_dump"),
        ("bare pg_dump | gpg > file", "bare_pg_dump_gpg"),
        ("Prefect warm-up flow (not counted)", "prefect_warm_up"),
        ("flow logical-backup", "flow_backup"),
        (
            "  until the run is Completed (before Prefect's heartbeat join)",
            "flow_backup_to_completed",
        ),
        ("  of which dump→gpg→S3 stream (manifest)", "flow_backup_stream"),
        ("fingerprints alone (inside the flow, concurrent)", "fingerprints_alone"),
        ("bare pg_restore (file)", "bare_pg_restore"),
        ("bare pg_restore --jobs (file)", "bare_pg_restore_jobs"),
        ("bare gpg --decrypt | pg_restore (file)", "bare_gpg_pg_restore"),
        ("flow restore-backup", "flow_restore"),
        (
            "  until the run is Completed (before Prefect's heartbeat join)",
            "flow_restore_to_completed",
        ),
        ("  download + verify checksum", "flow_restore_download_verify"),
        ("  decrypt + pg_restore (+ tables' fingerprints)", "flow_restore_decrypt_restore"),
        ("    of which tables' fingerprints after the load", "flow_restore_tables_fingerprints"),
        ("  verify the rest (large objects, sequences)", "flow_restore_verify"),
        ("  flow restore without verify", "flow_restore_without_verify"),
        ("flow logical-backup, posix repository", "flow_backup_posix"),
        ("  until the run is Completed", "flow_backup_posix_to_completed"),
        ("flow restore-backup, posix repository", "flow_restore_posix"),
    ]
    for label, key in rows:
        if key in t:
            times.add_row(label, f"{t[key]:.2f}")
    console.print(times)

    ratios = Table(title="ratios (flow ÷ bare, same process tree)")
    ratios.add_column("ratio")
    ratios.add_column("×", justify="right")
    labels = {
        "backup_flow_vs_bare_pg_dump_gpg": "backup flow ÷ bare pg_dump | gpg",
        "backup_flow_to_completed_vs_bare_pg_dump_gpg": (
            "backup flow until Completed ÷ bare pg_dump | gpg"
        ),
        "backup_flow_posix_to_completed_vs_bare_pg_dump_gpg": (
            "backup flow, posix repo, until Completed ÷ bare pg_dump | gpg"
        ),
        "restore_flow_vs_bare_pg_restore": "restore flow ÷ bare pg_restore",
        "restore_flow_without_verify_vs_bare_pg_restore": "restore flow without verify ÷ bare",
        "restore_flow_vs_bare_pg_restore_jobs": "restore flow ÷ bare pg_restore --jobs",
        "restore_flow_to_completed_vs_bare_pg_restore_jobs": (
            "restore flow until Completed ÷ bare pg_restore --jobs"
        ),
        "restore_flow_vs_bare_gpg_pg_restore": "restore flow ÷ bare gpg -d | pg_restore",
        "backup_flow_posix_vs_bare_pg_dump_gpg": "backup flow, posix repo ÷ bare pg_dump | gpg",
        "restore_flow_posix_vs_bare_pg_restore": "restore flow, posix repo ÷ bare pg_restore",
    }
    for key, label in labels.items():
        value = r.get(key)
        ratios.add_row(label, "-" if value is None else f"{value:.2f}")
    console.print(ratios)

    mem = report["memory_bytes"]
    per_phase = mem["per_phase_peak"]
    kinds = sorted({k for p in per_phase.values() for k in p}, key=lambda k: (k != SELF_KIND, k))
    shown = ("bare_backup", "bare_restore", "flow_backup", "flow_restore")
    memory = Table(title=f"peak RSS (sampled every {mem['sample_seconds']} s; servers excluded)")
    memory.add_column("process")
    for phase in shown:
        memory.add_column(phase.replace("_", " "), justify="right")
    for kind in kinds:
        memory.add_row(kind, *(_mb(per_phase.get(p, {}).get(kind)) for p in shown))
    console.print(memory)
    py = mem["python_rss"]
    flow_peak = per_phase.get("flow_backup", {}).get(SELF_KIND)
    before = py.get("before_flow_backup")
    console.print(
        f"python RSS: at start {_mb(py.get('start'))}, after the Prefect warm-up (before the "
        f"flow backup) {_mb(before)}, peak during the flow backup {_mb(flow_peak)}"
        + (f" (+{_mb(flow_peak - before)})" if flow_peak and before else "")
    )
    for note in report["notes"]:
        console.print(f"[dim]note: {note}[/]")
