"""``wedefi-dr`` commands of the pitr area (registered by cli.py).

Imports of Prefect, Great Expectations and the flows stay inside the command functions,
so that ``wedefi-dr --help`` and the fast commands start in a fraction of a second.

``wal-push``/``wal-fetch`` are here for operators; the server's ``archive_command`` and
``restore_command`` call ``python -I -m wedefi_dr.physical.wal`` directly (same code, no typer or
rich import: see ``wedefi_dr.physical.wal``).
"""

from __future__ import annotations

import json
from typing import Annotated

import typer


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    """Add this area's commands to ``app`` and its benchmark to ``bench_app``."""
    pitr_app = typer.Typer(no_args_is_help=True, help="Point-in-time recovery.")
    app.add_typer(pitr_app, name="pitr")

    @app.command("wal-push")
    def wal_push(
        path: Annotated[str, typer.Argument(help="%p: the WAL file to archive")],
        env_file: Annotated[str | None, typer.Option(help="KEY=VALUE settings file")] = None,
    ) -> None:
        """archive_command: archive one WAL file (exit 0 only once durably stored)."""
        from wedefi_dr.physical import wal

        raise typer.Exit(wal.run("push", env_file, path=path))

    @app.command("wal-fetch")
    def wal_fetch(
        name: Annotated[str, typer.Argument(help="%f: the file the server asks for")],
        dest: Annotated[str, typer.Argument(help="%p: where to write it")],
        env_file: Annotated[str | None, typer.Option(help="KEY=VALUE settings file")] = None,
    ) -> None:
        """restore_command: fetch one WAL file (1 = not archived; 128 = abort recovery)."""
        from wedefi_dr.physical import wal

        raise typer.Exit(wal.run("fetch", env_file, name=name, dest=dest))

    @app.command("base-backup")
    def base_backup(
        operator: Annotated[str, typer.Option(help="who asked for it (audit log)")] = "",
    ) -> None:
        """Run the base-backup flow (pg_basebackup streamed, encrypted); prints its manifest."""
        from wedefi_dr.config import apply_prefect_run_defaults
        from wedefi_dr.errors import DRError
        from wedefi_dr_cli.app import _fail, _settings

        apply_prefect_run_defaults()
        from flows.base_backup import base_backup as flow

        try:
            manifest = flow(operator=operator or _settings().operator)
        except DRError as exc:
            _fail(exc)
        print(json.dumps(manifest, indent=2))

    @pitr_app.command("window")
    def window(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
        """The recoverable window: earliest base-backup end → newest archived WAL."""
        from wedefi_dr.physical.pitr.window import recoverable_window
        from wedefi_dr_cli.app import _settings

        w = recoverable_window(_settings())
        d = w.describe()
        if as_json:
            print(json.dumps(d, indent=2))
            return
        if not w.base_backups:
            typer.echo("no base backups: nothing is recoverable yet (wedefi-dr base-backup)")
            raise typer.Exit(1)
        typer.echo(f"recoverable from {d['from']}  (end of base backup {d['from_base_backup']})")
        typer.echo(f"             to {d['to']}  (newest archived WAL {d['to_wal']})")
        typer.echo(f"{d['base_backups']} base backup(s), {d['wal_objects']} archived WAL file(s)")

    @pitr_app.command("run")
    def run(
        target: Annotated[str, typer.Option(help="time | lsn | name | latest")] = "latest",
        value: Annotated[str, typer.Option(help="ISO time with zone, LSN, or name")] = "",
        operator: Annotated[str, typer.Option(help="who is recovering")] = "",
        justification: Annotated[str, typer.Option(help="why (audit log)")] = "",
        cluster: Annotated[str, typer.Option(help="'primary' = production")] = "pitr-scratch",
        inclusive: Annotated[bool, typer.Option(help="stop just after the target")] = False,
        timeline: Annotated[str, typer.Option(help="latest | current | N")] = "latest",
    ) -> None:
        """Run the point-in-time-recovery flow; it pauses for approval (Prefect UI)."""
        from wedefi_dr.config import apply_prefect_run_defaults
        from wedefi_dr.errors import DRError, InvalidInput
        from wedefi_dr.physical.pitr.approval import validate_cluster_name
        from wedefi_dr.physical.pitr.target import RecoveryTarget
        from wedefi_dr_cli.app import _fail

        try:
            if not operator.strip():
                raise InvalidInput("--operator is required: who is recovering (audit log)")
            if not justification.strip():
                raise InvalidInput("--justification is required: why (audit log)")
            RecoveryTarget.parse(target, value, inclusive, timeline)
            validate_cluster_name(cluster)
        except DRError as exc:
            _fail(exc)
        apply_prefect_run_defaults()
        from flows.pitr import point_in_time_recovery

        try:
            result = point_in_time_recovery(
                target_kind=target,
                target_value=value,
                operator=operator,
                justification=justification,
                cluster=cluster,
                inclusive=inclusive,
                timeline=timeline,
            )
        except DRError as exc:
            _fail(exc)
        print(json.dumps(result, indent=2, default=str))

    @bench_app.command("pitr")
    def bench_pitr(
        seconds: Annotated[int, typer.Option(help="length of the pgbench run")] = 60,
        clients: Annotated[int, typer.Option(help="pgbench clients")] = 4,
        pushes: Annotated[int, typer.Option(help="segments for the push latency")] = 20,
    ) -> None:
        """wal-push latency per segment, archive backlog under pgbench, replay MB/s."""
        print(json.dumps(run_bench(seconds, clients, pushes), indent=2))


# ---- the benchmark -----------------------------------------------------------------------
def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_bench(seconds: int, clients: int, pushes: int) -> dict:
    """Three figures on a cluster of its own (fsync on, archiving for real):

    1. ``wal-push`` latency per 16 MB segment (process start to exit, one call per
       segment, no batching), against bare ``gzip -1 | gpg --symmetric`` to a local file;
    2. the archive backlog (``.ready`` files) at the end of a full-speed pgbench run of
       ``seconds``, and how long it took to drain;
    3. the replay rate of a recovery to 'latest' from a base backup taken before the run,
       in MB of WAL per second (restore_command = wal-fetch with prefetch).

    The bench's clusters, files and archive prefix are removed at the end.
    """
    import os
    import shutil
    import subprocess
    import sys
    import tempfile
    import time
    import uuid
    from pathlib import Path

    from pydantic import SecretStr

    from wedefi_dr.config import get_settings
    from wedefi_dr.physical import archiving, basebackup, wal
    from wedefi_dr.physical.pitr import recovery
    from wedefi_dr.physical.pitr.target import RecoveryTarget
    from wedefi_dr.postgres.tools import connect, tool
    from wedefi_dr.storage.s3 import ObjectStore
    from wedefi_dr_dev.stack import Stack

    hexid = uuid.uuid4().hex[:6]
    prefix = f"bench-pitr-{hexid}"
    stack = Stack()
    settings = get_settings().model_copy(update={"prefix": prefix})
    store = ObjectStore(settings)
    src = stack.cluster(f"benchsrc-{hexid}")
    src.fast = False
    src.extra_conf = stack.archiving_conf(src, prefix=prefix)
    dst = stack.cluster(f"benchrec-{hexid}")
    work = Path(tempfile.mkdtemp(prefix="wedefi-bench-pitr-"))
    result: dict = {"prefix": prefix, "pgbench_seconds": seconds, "clients": clients}

    def one(dsn: str, query: str):
        with connect(dsn, autocommit=True) as conn, conn.cursor() as cur:
            cur.execute(query)
            return cur.fetchone()

    try:
        src.init()
        src.start()
        dsn = src.dsn("postgres")
        env = {**os.environ, "PGPASSWORD": src.password}
        bench = [tool("pgbench"), "-h", "127.0.0.1", "-p", str(src.port), "-U", "postgres"]
        subprocess.run(
            [*bench, "-i", "-s", "10", "-q", "postgres"], env=env, check=True, capture_output=True
        )
        base = basebackup.take(settings.model_copy(update={"primary_dsn": SecretStr(dsn)}), "bench")
        start_lsn = one(dsn, "SELECT pg_current_wal_lsn()::text")[0]
        t0 = time.monotonic()
        run = subprocess.run(
            [*bench, "-c", str(clients), "-j", "2", "-T", str(seconds), "-n", "postgres"],
            env=env,
            capture_output=True,
            text=True,
        )
        load_s = time.monotonic() - t0
        end_lsn = one(dsn, "SELECT pg_current_wal_lsn()::text")[0]
        status = src.data_dir / "pg_wal" / "archive_status"
        backlog = len(list(status.glob("*.ready")))
        wal_mb = (basebackup.lsn_to_int(end_lsn) - basebackup.lsn_to_int(start_lsn)) / 1e6
        tps = next((ln for ln in run.stdout.splitlines() if ln.startswith("tps")), "")
        t_drain = time.monotonic()
        one(dsn, "SELECT pg_switch_wal()")
        while list(status.glob("*.ready")) and time.monotonic() - t_drain < 600:
            time.sleep(0.5)
        result["archive"] = {
            "wal_generated_mb": round(wal_mb, 1),
            "wal_rate_mb_s": round(wal_mb / load_s, 2),
            "pgbench": tps,
            "ready_backlog_at_end": backlog,
            "drain_seconds_after_end": round(time.monotonic() - t_drain, 1),
            "archived": one(dsn, "SELECT archived_count FROM pg_stat_archiver")[0],
            "failed": one(dsn, "SELECT failed_count FROM pg_stat_archiver")[0],
        }

        # 1. push latency, one process per segment, into a prefix of its own.
        segs = sorted(
            p for p in (src.data_dir / "pg_wal").iterdir() if wal.SEGMENT_RE.match(p.name)
        )
        segs = segs[-pushes:]
        pg_wal = work / "pg_wal"
        (pg_wal / "archive_status").mkdir(parents=True)
        lat_env = archiving.write_wal_env(settings, work / "lat.env", prefix=f"{prefix}-latency")
        push_s, bare_s = [], []
        for seg in segs:
            shutil.copy(seg, pg_wal / seg.name)
            t = time.monotonic()
            subprocess.run(
                [
                    sys.executable,
                    "-I",
                    "-m",
                    "wedefi_dr.physical.wal",
                    "push",
                    "--env-file",
                    str(lat_env),
                    f"pg_wal/{seg.name}",
                ],
                cwd=work,
                check=True,
                capture_output=True,
            )
            push_s.append(time.monotonic() - t)
            t = time.monotonic()
            with (work / "bare.gpg").open("wb") as out:
                gz = subprocess.Popen(
                    ["gzip", "-1", "-c", str(pg_wal / seg.name)], stdout=subprocess.PIPE
                )
                gpg = subprocess.Popen(
                    [
                        "gpg",
                        "--batch",
                        "--yes",
                        "--pinentry-mode",
                        "loopback",
                        "--passphrase",
                        "bench-only",
                        "--symmetric",
                        "--cipher-algo",
                        "AES256",
                        "--compress-algo",
                        "none",
                        "-o",
                        "-",
                    ],
                    stdin=gz.stdout,
                    stdout=out,
                    stderr=subprocess.DEVNULL,
                )
                gz.stdout.close()
                gpg.wait()
                gz.wait()
            bare_s.append(time.monotonic() - t)
        p50, p95 = _percentile(push_s, 0.5), _percentile(push_s, 0.95)
        result["wal_push_latency"] = {
            "segments": len(push_s),
            "p50_s": round(p50, 3),
            "p95_s": round(p95, 3),
            "bare_gzip_gpg_p50_s": round(_percentile(bare_s, 0.5), 3),
            "ratio_p50_vs_bare": round(p50 / max(_percentile(bare_s, 0.5), 1e-6), 2),
            "one_process_per_segment_mb_s": round(16.78 / p50, 1),
        }

        # 3. replay rate: recover 'latest' from the base backup taken before the load,
        #    with wal-fetch (prefetch on, then off) and with bare 'cp' from a local folder
        #    of the same segments already decrypted (the floor: replay alone).
        src.stop()

        def replay(cluster, restore_command: str) -> dict:
            t = time.monotonic()
            recovery.extract_base_backup(settings, base, cluster, work)
            extract_s = time.monotonic() - t
            recovery.write_recovery_settings(
                cluster,
                RecoveryTarget.parse("latest"),
                restore_command=restore_command,
                archive_command=None,
                note="bench",
            )
            t = time.monotonic()
            cluster.start(wait=False)
            reached = recovery.wait_for_target(cluster, 1800)
            seconds = time.monotonic() - t
            cluster.stop()
            shutil.rmtree(cluster.home, ignore_errors=True)
            mb = (
                basebackup.lsn_to_int(reached["replay_lsn"]) - basebackup.lsn_to_int(base.stop_lsn)
            ) / 1e6
            return {
                "base_backup_extract_s": round(extract_s, 2),
                "wal_replayed_mb": round(mb, 1),
                "replay_and_promote_s": round(seconds, 1),
                "replay_mb_s": round(mb / seconds, 1),
            }

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
        result["replay"] = {
            f"wal_fetch_prefetch_{settings.wal_prefetch}": replay(
                dst, archiving.restore_command(fetch_env)
            ),
            "wal_fetch_no_prefetch": replay(dst, archiving.restore_command(no_prefetch_env)),
            "bare_cp_local_plaintext": replay(dst, f"cp {plain_dir}/%f %p"),
        }
        fetched = result["replay"][f"wal_fetch_prefetch_{settings.wal_prefetch}"]
        bare = result["replay"]["bare_cp_local_plaintext"]
        result["replay"]["ratio_vs_bare_cp"] = round(
            fetched["replay_and_promote_s"] / max(bare["replay_and_promote_s"], 1e-6), 2
        )
    finally:
        for c in (src, dst):
            c.stop()
            shutil.rmtree(c.home, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
        for key_prefix in (f"{prefix}/", f"{prefix}-latency/"):
            for obj in list(store.list_keys(key_prefix)):
                store.delete(obj["Key"])
    return result
