"""The embedded local stack: real PostgreSQL clusters and a real S3 endpoint on loopback.

``up`` is idempotent: it creates what is missing and starts what is stopped. Everything
lives in one folder (``.stack/`` in the project, or ``$WEDEFI_DR_STACK_DIR``), with a
``state.json`` that records ports and PIDs so ``down`` stops exactly what ``up`` started.

- ``primary``: the protected database ``wedefi`` (data checksums, ``wal_level=replica``,
  ``archive_mode=on``).
- ``ops``: its own cluster for the audit tables, so that restoring or recovering the
  protected database can never rewrite the record of doing so.
- ``s3``: a moto server process (real HTTP, SigV4, multipart, SSE, storage classes, SNS);
  three buckets stand for the primary region, the DR region and the Glacier tier.
- ``repo``: where backups go. ``s3`` (default): the moto buckets, held in moto's memory,
  so ``down`` loses them. ``posix``: a directory (``repo/`` here, or a given path) that
  ``down`` keeps; ``down --purge-repo`` removes the stack's own one.
- ``pushgateway``: Debian's Prometheus Pushgateway, where every run pushes its metrics.
- ``prefect``: the control plane, ``prefect server start`` on loopback (``PREFECT_HOME`` in
  the stack's folder, its database ``prefect`` on the ops cluster) and a ``process`` worker
  for the local work pool, so every run (CLI, schedule, UI) lands in one history the UI
  shows. PostgreSQL, not SQLite: on SQLite a slot of a global concurrency limit taken while
  the server records the run's task states fails with "database is locked" (a deferred
  transaction cannot upgrade to a write), the API answers 503 and the client backs off
  2 s, 4 s, ... before trying again.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import boto3
import yaml
from psycopg2 import sql
from pydantic import Field, SecretStr

from wedefi_dr.config import PROJECT_ROOT, Settings, host_concurrency_limit
from wedefi_dr.errors import InvalidInput, PreflightFailed
from wedefi_dr.lifecycle import buckets
from wedefi_dr.observability import audit
from wedefi_dr.physical import archiving
from wedefi_dr.postgres.cluster import (
    ClusterHandle,
    chown_to,
    free_port,
    os_user_kwargs,
    read_clusters,
    write_clusters,
)
from wedefi_dr.postgres.tools import child_env, connect, running_as_root
from wedefi_dr.storage import repository
from wedefi_dr.storage.secretfiles import replace_secret_file
from wedefi_dr_dev import approvers

PRIMARY_DB = "wedefi"
OPS_DB = "wedefi_ops"
# The Prefect server's database on the ops cluster and the role that owns it.
PREFECT_DB = "prefect"
PREFECT_DB_ROLE = "prefect_server"
SCRATCH_CLUSTER = "pitr-scratch"
STANDBY_CLUSTER = "standby"
# The settings' defaults: the stack creates exactly what an unconfigured run expects.
_DEFAULTS = Settings.model_fields
REGION = _DEFAULTS["aws_region"].default
BUCKETS = {
    f"WEDEFI_DR_{name.upper()}": _DEFAULTS[name].default
    for name in ("bucket", "dr_bucket", "glacier_bucket")
}
SNS_TOPIC = "wedefi-dr-notifications"
AUTOMATIONS_FILE = PROJECT_ROOT / "deployments" / "automations.yaml"
PUSHGATEWAY_BIN = "/usr/bin/prometheus-pushgateway"  # Debian's prometheus-pushgateway
# moto accepts any credentials; these only mark the local stack's requests.
LOCAL_AWS_KEY = "wedefi-local"
LOCAL_AWS_SECRET = "wedefi-local-secret"
# The WAL archiver's own key id (IAM role wal_archiver); its secret is generated per stack.
LOCAL_WAL_ARCHIVER_KEY = "wedefi-local-wal-archiver"
# The work pool every deployment of prefect.yaml targets.
WORK_POOL = "wedefi-dr-local"
# 15-20 s on an idle 2-core host; minutes when the host is busy (a fresh database migrates).
PREFECT_STARTUP_TIMEOUT = float(os.environ.get("WEDEFI_DR_PREFECT_STARTUP_TIMEOUT", "600"))


def default_stack_dir() -> Path:
    return Path(os.environ.get("WEDEFI_DR_STACK_DIR", PROJECT_ROOT / ".stack"))


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def pid_alive(pid: int | None) -> bool:
    """True while ``pid`` runs; a zombie (exited, not yet reaped) counts as gone."""
    if not pid:
        return False
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # reaps it when it is our own exited child
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@contextlib.contextmanager
def _environ(values: dict[str, str]):
    """``values`` in the environment for the block (libpq reads PGPASSFILE from it)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class Cluster(ClusterHandle):
    """One PostgreSQL cluster of the stack: a core handle plus the stack's own wiring (its
    superuser password, fsync-off, extra settings written at initdb)."""

    password: str = Field(default="", repr=False, exclude=True)
    fast: bool = Field(default=False, exclude=True)
    extra_conf: dict[str, str] = Field(default_factory=dict, exclude=True)

    def admin_dsn(self, dbname: str = "postgres") -> str:
        """With the password inline, for the stack's own set-up connections only."""
        return f"{self.dsn(dbname)} password={self.password}"

    def init(self) -> None:
        self.initdb(self.password, self.extra_conf, fast=self.fast)

    def create_database(self, name: str, owner: str | None = None) -> None:
        """``name`` when missing, owned by ``owner`` (the superuser when None)."""
        statement = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if owner is not None:
            statement += sql.SQL(" OWNER {}").format(sql.Identifier(owner))
        with connect(self.admin_dsn(), autocommit=True) as conn, conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if cur.fetchone() is None:
                cur.execute(statement)


class Stack:
    """The local stack rooted at one folder; see the module docstring."""

    def __init__(
        self,
        root: Path | None = None,
        *,
        fast: bool = False,
        control_plane: bool = True,
        repo: str | None = None,
        repo_path: Path | None = None,
    ) -> None:
        self.root = Path(root) if root else default_stack_dir()
        self.fast = fast
        # False: no Prefect server or worker at ``up`` (a test session that brings its own).
        self.control_plane = control_plane
        self.state_path = self.root / "state.json"
        self.state: dict = (
            json.loads(self.state_path.read_text()) if self.state_path.exists() else {}
        )
        # None: what the stack was last brought up with (s3 for a new one).
        if repo is not None and repo not in repository.REPO_TYPES:
            raise InvalidInput(f"--repo must be s3 or posix, not {repo!r}")
        if repo_path is not None and not repo_path.is_absolute():
            raise InvalidInput(f"--repo-path must be an absolute path, not {str(repo_path)!r}")
        self.repo = repo
        self.repo_path_override = repo_path

    # ---- state -------------------------------------------------------------------------
    def _save(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        replace_secret_file(self.root, self.state_path.name, json.dumps(self.state, indent=2))

    def _secret(self, key: str) -> str:
        """A secret generated once per stack and kept in its state file (mode 600)."""
        if key not in self.state:
            self.state[key] = secrets.token_urlsafe(24)
            self._save()
        return self.state[key]

    def _port(self, key: str) -> int:
        port = self.state.get(key)
        if not port:
            taken = {v for k, v in self.state.items() if k.endswith("_port")}
            port = self.state[key] = free_port(taken)
            self._save()
        return port

    @property
    def clusters_file(self) -> Path:
        return self.root / "clusters.json"

    def cluster(self, name: str) -> Cluster:
        """The stack's cluster ``name`` (``primary`` is production), described in the
        clusters file so that recovery finds it the way it finds a real host's."""
        cluster = Cluster(
            name=name,
            data_dir=self.root / "pg" / name / "data",
            port=self._port(f"{name}_port"),
            production=name == "primary",
            password=self._secret("pg_password"),
            fast=self.state.get("fast", self.fast),
        )
        self._describe(cluster)
        return cluster

    def _describe(self, cluster: Cluster) -> None:
        known = read_clusters(self.clusters_file) if self.clusters_file.exists() else {}
        handle = ClusterHandle.model_validate(cluster.model_dump())
        if known.get(cluster.name) != handle:
            self.root.mkdir(parents=True, exist_ok=True)
            write_clusters(self.clusters_file, {**known, cluster.name: handle})
            if self.pgpass.exists():
                self._write_pgpass()

    @property
    def primary(self) -> Cluster:
        return self.cluster("primary")

    @property
    def ops(self) -> Cluster:
        return self.cluster("ops")

    @property
    def repo_type(self) -> str:
        return self.state.get("repo_type", "s3")

    @property
    def default_repo_path(self) -> Path:
        return self.root / "repo"

    @property
    def repo_path(self) -> Path | None:
        """The posix repository's directory (None for the S3 one)."""
        if self.repo_type != "posix":
            return None
        return Path(self.state.get("repo_path") or self.default_repo_path)

    def _configure_repo(self) -> None:
        """Record the repository choice and, for posix, create its directory owned by the
        server's OS user: ``archive_command`` writes WAL there as that user, and the posix
        driver gives every file and directory to the repository root's owner."""
        if self.repo is not None:
            self.state["repo_type"] = self.repo
            self.state.pop("repo_path", None)
            if self.repo_path_override is not None:
                self.state["repo_path"] = str(self.repo_path_override)
        self._save()
        path = self.repo_path
        if path is None:
            return
        fresh = not path.exists()
        path.mkdir(parents=True, exist_ok=True, mode=0o750)
        if fresh or path == self.default_repo_path:
            chown_to(path)

    def purge_repo(self) -> Path | None:
        """Remove the stack's own posix repository (``repo/`` in its folder) and every
        backup in it; a repository at a given path is never removed from here."""
        path = self.repo_path
        if path is None or not path.exists():
            return None
        if path.resolve() != self.default_repo_path.resolve():
            raise InvalidInput(
                f"the posix repository {path} is not the stack's own ({self.default_repo_path}): "
                "not removing it; delete it yourself if you mean to"
            )
        shutil.rmtree(path)
        return path

    @property
    def s3_port(self) -> int:
        return self._port("s3_port")

    @property
    def s3_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    # ---- lifecycle ---------------------------------------------------------------------
    def up(self) -> None:
        """Create and start whatever is missing; safe to run again."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)  # the postgres user must reach pg/ below it
        self._check_server_user_can_enter()
        self.state.setdefault("fast", self.fast)
        self.state["control_plane"] = self.control_plane
        self._configure_repo()
        (self.root / "pg").mkdir(exist_ok=True)
        _start(self.ops)  # first: the Prefect server keeps its database there
        if self.control_plane:  # takes longest to answer: started early, awaited last
            self._spawn_prefect_server()
        # S3 before the primary: its archive_command pushes to it from its first segment on.
        self._start_s3()
        self._create_buckets()
        self._start_pushgateway()
        primary = self.primary
        primary.extra_conf = self.archiving_conf(primary)
        _start(primary)
        self.cluster(SCRATCH_CLUSTER)  # the default target of `wedefi-dr pitr run`
        primary.create_database(PRIMARY_DB)
        self.ops.create_database(OPS_DB)
        audit.install(
            self.ops.admin_dsn(OPS_DB),
            app_password=self._secret("ops_app_password"),
            owner_password=self._audit_owner_password(),
        )
        self._install_approvals()
        self._ensure_archiving(primary)
        self._write_pgpass()
        if self.control_plane:
            self._wait_prefect_server()
            self.start_worker()

    # ---- Tier 1: the standby and the WAL stream ------------------------------------------
    @property
    def standby(self) -> Cluster:
        return self.cluster(STANDBY_CLUSTER)

    def up_standby(self) -> dict:
        """A streaming standby of the primary (``stack up --with-standby``): provisioned by
        the product's own code on its first start, started afterwards."""
        from wedefi_dr.physical import standby as tier1

        replica = self.standby
        if replica.initialized():
            if not replica.is_running():
                replica.start()
            return {"standby": "running", "port": replica.port}
        replica.home.mkdir(parents=True, exist_ok=True)
        # What it archives with once promoted: the stack's archive, the stack's keys.
        self.archiving_conf(replica)
        env_file = replica.home / archiving.ARCHIVE_ENV_NAME
        with _environ({"PGPASSFILE": str(self.pgpass)}):
            return tier1.provision(
                self.primary,
                replica,
                Settings().standby_slot,
                archive_command=archiving.archive_command(env_file),
            )

    def start_wal_stream(self) -> int:
        """``pg_receivewal`` into the archive as a resident process (``--with-wal-stream``),
        with the primary's archive env file (same bucket, prefix and keys)."""
        pid = self.state.get("wal_stream_pid")
        if pid_alive(pid):
            return pid
        directory = self.root / "wal-stream"
        directory.mkdir(exist_ok=True)
        log = (self.root / "wal-stream.log").open("ab")
        env = {**os.environ, "PGPASSFILE": str(self.pgpass)}
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "wedefi_dr.physical.walreceiver",
                "--env-file",
                str(self.primary.home / archiving.ARCHIVE_ENV_NAME),
                "--dir",
                str(directory),
                "--slot",
                Settings().wal_stream_slot,
                "--conninfo",
                self.primary.dsn(),
                "--log",
                str(self.root / "pg_receivewal.log"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
        )
        self.state["wal_stream_pid"] = proc.pid
        self._save()
        return proc.pid

    def stop_wal_stream(self) -> bool:
        pid = self.state.pop("wal_stream_pid", None)
        self._save()
        if not pid_alive(pid):
            return False
        os.killpg(pid, signal.SIGTERM)
        for _ in range(100):
            if not pid_alive(pid):
                return True
            time.sleep(0.1)
        os.killpg(pid, signal.SIGKILL)
        return True

    def _check_server_user_can_enter(self) -> None:
        """Fail with the fix, not with initdb's "Permission denied" three calls later."""
        if (
            running_as_root()
            and subprocess.run(
                ["test", "-x", str(self.root)], cwd="/", **os_user_kwargs()
            ).returncode
        ):
            raise PreflightFailed(
                f"the postgres OS user cannot enter {self.root}: a parent folder is private "
                "(mode 700, e.g. /root or a mktemp -d folder). Run `make setup`, which "
                "grants traverse (chmod o+x) on the project's parents, or set "
                "WEDEFI_DR_STACK_DIR to a folder it can reach."
            )

    # ---- WAL archive -----------------------------------------------------------------
    def archiving_conf(self, cluster: Cluster, prefix: str | None = None) -> dict[str, str]:
        """``archive_mode``/``archive_command``/``archive_timeout`` for ``cluster``, archiving
        into ``<prefix>/wal/`` (default: the settings' prefix, the production archive)."""
        env = self.env()
        settings = Settings(
            aws_endpoint_url=env["WEDEFI_DR_AWS_ENDPOINT_URL"],
            aws_region=env["WEDEFI_DR_AWS_REGION"],
            bucket=env["WEDEFI_DR_BUCKET"],
            gpg_passphrase=SecretStr(env["WEDEFI_DR_GPG_PASSPHRASE"]),
            wal_archiver_aws_access_key_id=SecretStr(
                env["WEDEFI_DR_WAL_ARCHIVER_AWS_ACCESS_KEY_ID"]
            ),
            wal_archiver_aws_secret_access_key=SecretStr(
                env["WEDEFI_DR_WAL_ARCHIVER_AWS_SECRET_ACCESS_KEY"]
            ),
            repo_type=self.repo_type,
            repo_path=self.repo_path,
        )
        env_file = archiving.write_wal_env(
            settings,
            cluster.home / archiving.ARCHIVE_ENV_NAME,
            prefix,
            os_user=cluster.os_user,
            aws_env=archiving.archiver_aws_env(settings),
        )
        return archiving.archiving_conf(env_file)

    def _ensure_archiving(self, cluster: Cluster) -> None:
        """A cluster initialised before archiving was wired in gets the command now (a
        reload; its ``.ready`` segments are then archived)."""
        command = archiving.archive_command(cluster.home / archiving.ARCHIVE_ENV_NAME)
        with connect(cluster.admin_dsn(), autocommit=True) as conn, conn.cursor() as cur:
            cur.execute("SHOW archive_command")
            if cur.fetchone()[0] != command:
                cur.execute("ALTER SYSTEM SET archive_command = %s", (command,))
                cur.execute("SELECT pg_reload_conf()")

    def _start_s3(self) -> None:
        pid = self.state.get("s3_pid")
        if pid_alive(pid) and port_open(self.s3_port):
            return
        log = (self.root / "s3.log").open("ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.s3_port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.state["s3_pid"] = proc.pid
        self._save()
        deadline = time.monotonic() + 30
        while not port_open(self.s3_port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"moto server did not start; see {self.root / 's3.log'}")
            time.sleep(0.1)

    def _client(self, service: str):
        return boto3.client(
            service,
            endpoint_url=self.s3_endpoint,
            region_name=REGION,
            aws_access_key_id=LOCAL_AWS_KEY,
            aws_secret_access_key=LOCAL_AWS_SECRET,
        )

    def _create_buckets(self) -> None:
        s3 = self._client("s3")
        for name, bucket in BUCKETS.items():
            if name == "WEDEFI_DR_DR_BUCKET":  # object lock exists only from creation on
                buckets.ensure_dr_bucket(
                    s3, bucket, REGION, _DEFAULTS["dr_object_lock_days"].default
                )
            else:
                buckets.ensure_plain_bucket(s3, bucket, REGION)
        self.state["sns_topic_arn"] = self._client("sns").create_topic(Name=SNS_TOPIC)["TopicArn"]
        self._save()

    def _all_clusters(self) -> dict[str, ClusterHandle]:
        """Primary, ops, and every other cluster under the stack's folder that the clusters
        file describes (the scratch clusters PITR recovered into)."""
        described = read_clusters(self.clusters_file) if self.clusters_file.exists() else {}
        found: dict[str, ClusterHandle] = {"primary": self.primary, "ops": self.ops}
        pg = (self.root / "pg").resolve()
        for name, handle in sorted(described.items()):
            if name not in found and handle.data_dir.resolve().is_relative_to(pg):
                found[name] = handle
        return found

    def down(self) -> list[str]:
        """Stop everything the stack started — its clusters, including those recovered into
        by PITR, and the S3 endpoint — each by its own PID; the data stays."""
        stopped = self.stop_prefect()  # first: the server's database is on the ops cluster
        if self.stop_wal_stream():
            stopped.append("wal-stream (pg_receivewal)")
        for name, cluster in self._all_clusters().items():
            if cluster.is_running():
                cluster.stop()
                stopped.append(f"postgres {name}")
        pid = self.state.get("s3_pid")
        if pid_alive(pid):
            os.killpg(pid, signal.SIGTERM)
            for _ in range(50):
                if not pid_alive(pid):
                    break
                time.sleep(0.1)
            else:
                os.killpg(pid, signal.SIGKILL)
            stopped.append("s3 (moto)")
        self.state.pop("s3_pid", None)
        if self._stop_pushgateway():
            stopped.append("pushgateway")
        self._save()
        return stopped

    def status(self) -> dict[str, str]:
        result = {}
        for name, cluster in self._all_clusters().items():
            if name in ("primary", "ops") or cluster.is_running():  # scratch: when running
                result[f"postgres {name}"] = (
                    f"running pid {cluster.pid()} port {cluster.port}"
                    if cluster.is_running()
                    else "stopped"
                )
        pid = self.state.get("s3_pid")
        result["s3 (moto)"] = (
            f"running pid {pid} {self.s3_endpoint}"
            if pid_alive(pid) and port_open(self.s3_port)
            else "stopped"
        )
        if Path(PUSHGATEWAY_BIN).exists():
            pid = self.state.get("pushgateway_pid")
            result["pushgateway"] = (
                f"running pid {pid} {self.pushgateway_url}"
                if pid_alive(pid) and port_open(self.pushgateway_port)
                else "stopped"
            )
        if self.state.get("wal_stream_pid"):
            pid = self.state["wal_stream_pid"]
            result["wal-stream"] = f"running pid {pid}" if pid_alive(pid) else "stopped"
        if self.state.get("control_plane", self.control_plane) or self._prefect_pids():
            result.update(self._prefect_status())
        return result

    @property
    def pgpass(self) -> Path:
        return self.root / "pgpass"

    def _write_pgpass(self) -> None:
        """The stack's passwords in libpq's own file, so no DSN needs to carry one.

        One line per cluster the stack describes (all share the superuser's password),
        rewritten when a cluster is added: a wildcard port would hand the password to
        whatever local server listens on any other port and asks for it.
        """
        password = self._secret("pg_password")
        lines = [
            f"{handle.host}:{handle.port}:*:postgres:{password}"
            for handle in read_clusters(self.clusters_file).values()
        ]
        lines.append(
            f"127.0.0.1:{self.ops.port}:{OPS_DB}:{audit.APP_ROLE}:"
            f"{self._secret('ops_app_password')}"
        )
        lines.append(
            f"127.0.0.1:{self.ops.port}:{PREFECT_DB}:{PREFECT_DB_ROLE}:"
            f"{self._secret('prefect_db_password')}"
        )
        replace_secret_file(self.root, self.pgpass.name, "\n".join(lines) + "\n")

    @property
    def audit_owner_password_file(self) -> Path:
        return self.root / "audit-owner.password"

    def _audit_owner_password(self) -> str:
        """The audit owner's password, in a file of its own (created mode 600) for set-up by
        hand: never in the state file, the pgpass or the environment the flows run with."""
        path = self.audit_owner_password_file
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(24) + "\n")
        return path.read_text().strip()

    # ---- approvals -----------------------------------------------------------------------
    def _install_approvals(self) -> None:
        """The approval tables in the ops database and the demo approvers (``alice``,
        ``bob``), each with a generated password in its own passfile (mode 600)."""
        approvers.install(self.ops.admin_dsn(OPS_DB))
        for name in approvers.DEMO_APPROVERS:
            self.add_approver(name)

    def approver_passfile(self, name: str) -> Path:
        return self.root / "approvers" / f"{name}.pgpass"

    def approver_dsn(self, name: str) -> str:
        """The ops database as approver ``name`` (the password is in their passfile)."""
        return self.ops.dsn(OPS_DB, user=name)

    def add_approver(self, name: str, *, approver: bool = True) -> Path:
        """A LOGIN role ``name`` on the ops cluster (in ``dr_approver`` when ``approver``);
        returns its passfile."""
        password = self._secret(f"approver_{name}_password")
        approvers.create_login(self.ops.admin_dsn(OPS_DB), name, password, approver=approver)
        return approvers.write_passfile(
            self.approver_passfile(name), "127.0.0.1", self.ops.port, OPS_DB, name, password
        )

    def ops_app_dsn(self) -> str:
        """The ops database as the application role (append-only on the audit tables)."""
        return self.ops.dsn(OPS_DB, user=audit.APP_ROLE)

    def env(self) -> dict[str, str]:
        """The environment that points every command at this stack (secrets included:
        it is meant for ``eval``, never for a log)."""
        env = {
            "WEDEFI_DR_PRIMARY_DSN": self.primary.dsn(PRIMARY_DB),
            # A database on the primary's server for restore checks (never the source).
            "WEDEFI_DR_SCRATCH_DSN": self.primary.dsn("wedefi_restore_check"),
            "WEDEFI_DR_OPS_DSN": self.ops_app_dsn(),
            "WEDEFI_DR_AWS_ENDPOINT_URL": self.s3_endpoint,
            "WEDEFI_DR_AWS_REGION": REGION,
            "WEDEFI_DR_GPG_PASSPHRASE": self._secret("gpg_passphrase"),
            "WEDEFI_DR_METRICS_DIR": str(self.root / "metrics"),
            "WEDEFI_DR_SPOOL_DIR": str(self.root / "spool"),
            "PGPASSFILE": str(self.pgpass),
            "PREFECT_HOME": str(self.root / "prefect"),
            "WEDEFI_DR_STACK_DIR": str(self.root),
            # The clusters recovery may act on (the primary is described as production).
            "WEDEFI_DR_CLUSTERS_FILE": str(self.clusters_file),
            "AWS_ACCESS_KEY_ID": LOCAL_AWS_KEY,
            "AWS_SECRET_ACCESS_KEY": LOCAL_AWS_SECRET,
            "AWS_DEFAULT_REGION": REGION,
            # What archive env files of new primaries carry (never the keys above).
            "WEDEFI_DR_WAL_ARCHIVER_AWS_ACCESS_KEY_ID": LOCAL_WAL_ARCHIVER_KEY,
            "WEDEFI_DR_WAL_ARCHIVER_AWS_SECRET_ACCESS_KEY": self._secret("wal_archiver_aws_secret"),
            **BUCKETS,
            "WEDEFI_DR_REPO_TYPE": self.repo_type,
        }
        if self.repo_path is not None:
            env["WEDEFI_DR_REPO_PATH"] = str(self.repo_path)
        if self.state.get("control_plane", self.control_plane):
            env.update(self._prefect_client_env())
        if self.state.get("sns_topic_arn"):
            env["WEDEFI_DR_SNS_TOPIC_ARN"] = self.state["sns_topic_arn"]
        if self.state.get("pushgateway_pid"):
            env["WEDEFI_DR_PUSHGATEWAY_URL"] = self.pushgateway_url
        return env

    def export_lines(self) -> str:
        return "\n".join(f"export {k}={shlex.quote(v)}" for k, v in self.env().items())

    # ---- metrics: the Pushgateway -----------------------------------------------------
    @property
    def pushgateway_port(self) -> int:
        return self._port("pushgateway_port")

    @property
    def pushgateway_url(self) -> str:
        return f"http://127.0.0.1:{self.pushgateway_port}"

    def _start_pushgateway(self) -> None:
        """Debian's Pushgateway on a free loopback port, its values kept in the stack's
        folder across restarts (the counters come from the audit log anyway). Skipped when
        the package is not installed: metrics then go to the textfiles alone."""
        pid = self.state.get("pushgateway_pid")
        if pid_alive(pid) and port_open(self.pushgateway_port):
            return
        self.state.pop("pushgateway_pid", None)
        if not Path(PUSHGATEWAY_BIN).exists():
            self._save()
            return
        log = (self.root / "pushgateway.log").open("ab")
        proc = subprocess.Popen(
            [
                PUSHGATEWAY_BIN,
                f"--web.listen-address=127.0.0.1:{self.pushgateway_port}",
                f"--persistence.file={self.root / 'pushgateway.db'}",
                "--persistence.interval=5s",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.state["pushgateway_pid"] = proc.pid
        self._save()
        deadline = time.monotonic() + 30
        while not port_open(self.pushgateway_port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"pushgateway did not start; see {self.root / 'pushgateway.log'}"
                )
            time.sleep(0.1)

    def _stop_pushgateway(self) -> bool:
        """Stop the Pushgateway ``up`` started (by its PID); True when it was running."""
        pid = self.state.pop("pushgateway_pid", None)
        if not pid_alive(pid):
            return False
        os.killpg(pid, signal.SIGTERM)
        for _ in range(50):
            if not pid_alive(pid):
                return True
            time.sleep(0.1)
        os.killpg(pid, signal.SIGKILL)
        return True

    # ---- Prefect control plane -------------------------------------------------------
    @property
    def prefect_home(self) -> Path:
        return self.root / "prefect"

    @property
    def prefect_port(self) -> int:
        return self._port("prefect_port")

    @property
    def prefect_ui_url(self) -> str:
        return f"http://127.0.0.1:{self.prefect_port}"

    @property
    def prefect_api_url(self) -> str:
        return f"{self.prefect_ui_url}/api"

    def _prefect_client_env(self) -> dict[str, str]:
        """What points a command, a worker or ``prefect deploy`` at the stack's server; the
        deployments' pull step changes into ``WEDEFI_DR_HOME`` to find the flows."""
        return {
            "PREFECT_HOME": str(self.prefect_home),
            "PREFECT_API_URL": self.prefect_api_url,
            "WEDEFI_DR_HOME": str(PROJECT_ROOT),
        }

    def _prefect_bin(self) -> str:
        return str(Path(sys.executable).with_name("prefect"))

    def _prefect_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The environment of the stack's Prefect processes: the caller's, the stack's, and
        the run defaults (persisted results, no analytics), which a caller's own wins over."""
        env = {
            "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
            "PREFECT_LOGGING_EXTRA_LOGGERS": "wedefi_dr",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
            # A run pressed in the UI starts within seconds, not the default 10 s poll.
            "PREFECT_WORKER_QUERY_SECONDS": "2",
            **os.environ,
            **self.env(),
            **self._prefect_client_env(),
        }
        env.update(extra or {})
        return env

    def prefect_ready(self) -> bool:
        """The API answers its health check and the UI its first page."""
        try:
            for url in (f"{self.prefect_api_url}/health", f"{self.prefect_ui_url}/"):
                with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - loopback
                    if response.status != 200:
                        return False
        except (urllib.error.URLError, OSError):
            return False
        return True

    def prefect_database_url(self) -> str:
        """The server's database on the ops cluster. No password in the URL: asyncpg reads
        it from the stack's pgpass (``PGPASSFILE``), as libpq does for every other role."""
        return f"postgresql+asyncpg://{PREFECT_DB_ROLE}@127.0.0.1:{self.ops.port}/{PREFECT_DB}"

    def _install_prefect_database(self) -> None:
        """The server's own role and database on the (running) ops cluster, and the role's
        line in the pgpass; the server creates its tables when it starts."""
        ops = self.ops
        _start(ops)
        approvers.create_login(
            ops.admin_dsn(), PREFECT_DB_ROLE, self._secret("prefect_db_password"), approver=False
        )
        ops.create_database(PREFECT_DB, owner=PREFECT_DB_ROLE)
        self._write_pgpass()

    def _server_env(self) -> dict[str, str]:
        """The Prefect server's environment: the Prefect settings, the locale and PATH, and
        a passfile holding its own database login only. None of the stack's secrets (the
        gpg passphrase, the AWS keys, the other roles' passwords): the server runs no flow,
        and a process's environment is readable by every process of its user."""
        passfile = replace_secret_file(
            self.root,
            "prefect-server.pgpass",
            f"127.0.0.1:{self.ops.port}:{PREFECT_DB}:{PREFECT_DB_ROLE}:"
            f"{self._secret('prefect_db_password')}\n",
        )
        env = {
            k: v
            for k, v in self._prefect_env().items()
            if k.startswith("PREFECT_") or k == "HOME" or k in child_env()
        }
        env.pop("PREFECT_API_URL", None)  # the server is the API; it needs no client URL
        env.update(
            PGPASSFILE=str(passfile),
            PREFECT_API_DATABASE_CONNECTION_URL=self.prefect_database_url(),
            PREFECT_SERVER_API_HOST="127.0.0.1",
            PREFECT_SERVER_API_PORT=str(self.prefect_port),
        )
        return env

    def _spawn_prefect_server(self) -> None:
        if pid_alive(self.state.get("prefect_server_pid")):
            return
        self._install_prefect_database()
        self.prefect_home.mkdir(parents=True, exist_ok=True)
        log = (self.root / "prefect-server.log").open("ab")
        env = self._server_env()
        proc = subprocess.Popen(
            [self._prefect_bin(), "server", "start", "--host", "127.0.0.1"]
            + ["--port", str(self.prefect_port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=self.root,
            start_new_session=True,
        )
        self.state["prefect_server_pid"] = proc.pid
        self._save()

    def _wait_prefect_server(self) -> None:
        pid = self.state.get("prefect_server_pid")
        deadline = time.monotonic() + PREFECT_STARTUP_TIMEOUT
        while not self.prefect_ready():
            if not pid_alive(pid) or time.monotonic() > deadline:
                _stop_group(pid)
                self.state.pop("prefect_server_pid", None)
                self._save()
                raise RuntimeError(
                    f"prefect server did not answer; see {self.root / 'prefect-server.log'}"
                )
            time.sleep(0.2)

    def start_prefect_server(self) -> None:
        """``prefect server start`` on the stack's port, waiting until API and UI answer."""
        self._spawn_prefect_server()
        self._wait_prefect_server()

    def start_worker(self, name: str = "local", env: dict[str, str] | None = None) -> int:
        """A ``process`` worker ``wedefi-dr-<name>`` polling the local work pool (created
        when missing); ``env`` adds to the environment its flow runs inherit (e.g. a
        shared result storage block). Its PID goes into the state file."""
        key = f"prefect_worker_{name}_pid"
        if pid_alive(self.state.get(key)):
            return self.state[key]
        log = (self.root / f"prefect-worker-{name}.log").open("ab")
        proc = subprocess.Popen(
            [self._prefect_bin(), "worker", "start", "--pool", WORK_POOL, "--type", "process"]
            + ["--name", f"wedefi-dr-{name}"],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self._prefect_env(env),
            cwd=PROJECT_ROOT,
            start_new_session=True,
        )
        self.state[key] = proc.pid
        self._save()
        return proc.pid

    def worker_log(self, name: str = "local") -> Path:
        return self.root / f"prefect-worker-{name}.log"

    def stop_worker(self, name: str = "local") -> bool:
        """Stop one worker (and the flow-run processes it started) by its PID."""
        pid = self.state.pop(f"prefect_worker_{name}_pid", None)
        self._save()
        return _stop_group(pid)

    def _prefect_pids(self) -> dict[str, int]:
        """``server`` and ``worker <name>``: the stack's Prefect processes by state key."""
        found = {}
        for key, pid in self.state.items():
            if key == "prefect_server_pid":
                found["prefect server"] = pid
            elif key.startswith("prefect_worker_") and key.endswith("_pid"):
                found[f"prefect worker {key[len('prefect_worker_') : -len('_pid')]}"] = pid
        return found

    def stop_prefect(self) -> list[str]:
        """Workers first (no run is handed to a server that is going away), then the server."""
        stopped = []
        for label, pid in sorted(self._prefect_pids().items(), key=lambda kv: "server" in kv[0]):
            if _stop_group(pid):
                stopped.append(label)
        for key in [k for k in self.state if k.startswith("prefect_") and k.endswith("_pid")]:
            self.state.pop(key)
        return stopped

    def _prefect_status(self) -> dict[str, str]:
        pids = self._prefect_pids()
        result = {}
        server = pids.pop("prefect server", None)
        result["prefect server"] = (
            f"running pid {server} {self.prefect_ui_url}"
            if pid_alive(server) and self.prefect_ready()
            else "stopped"
        )
        for label, pid in sorted(pids.items()) or [("prefect worker local", None)]:
            result[label] = f"running pid {pid} pool {WORK_POOL}" if pid_alive(pid) else "stopped"
        return result

    def prefect(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """One ``prefect`` CLI command against the stack's server (no prompts)."""
        return subprocess.run(
            [self._prefect_bin(), "--no-prompt", *args],
            env=self._prefect_env(),
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            check=check,
            timeout=PREFECT_STARTUP_TIMEOUT,
        )

    def host_limit_name(self) -> str:
        """The global concurrency limit of the primary's host (see prefect.yaml)."""
        return host_concurrency_limit(f"{self.primary.host}:{self.primary.port}")

    def deploy(self) -> list[str]:
        """The work pool, the per-host concurrency limit, the automations of
        deployments/automations.yaml and every deployment of prefect.yaml
        (``prefect --no-prompt deploy --all``) on the stack's server."""
        self.prefect("work-pool", "create", WORK_POOL, "--type", "process", "--overwrite")
        limit = self.host_limit_name()
        if self.prefect("gcl", "inspect", limit, check=False).returncode != 0:
            self.prefect("gcl", "create", limit, "--limit", "1")
        self.create_automations()
        try:
            out = self.prefect("deploy", "--all").stdout
        except subprocess.CalledProcessError as exc:
            raise RuntimeError(f"prefect deploy --all failed:\n{exc.stdout}\n{exc.stderr}") from exc
        return [line.split("'")[1] for line in out.splitlines() if "Deployment '" in line]

    def create_automations(self) -> None:
        """Each automation of deployments/automations.yaml the server does not have yet (by
        name; one already there is left as it is), created as an operator creates them on a
        real server, with ``prefect automation create``."""
        for name, spec in automation_specs().items():
            if self.prefect("automation", "inspect", name, check=False).returncode != 0:
                self.prefect("automation", "create", "--from-json", json.dumps(spec))


def automation_specs() -> dict[str, dict]:
    """deployments/automations.yaml by automation name, as ``prefect automation create``
    reads it."""
    return {a["name"]: a for a in yaml.safe_load(AUTOMATIONS_FILE.read_text())["automations"]}


def _start(cluster: Cluster) -> None:
    """``cluster`` initialised and running, whatever it was."""
    if not cluster.initialized():
        cluster.init()
    if not cluster.is_running():
        cluster.start()


def _stop_group(pid: int | None) -> bool:
    """SIGTERM the process group ``pid`` leads, SIGKILL after 10 s; True when it ran."""
    if not pid_alive(pid):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    for _ in range(100):
        if not pid_alive(pid):
            return True
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    return True
