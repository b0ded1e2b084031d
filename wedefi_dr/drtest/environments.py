"""DR environments: where the monthly DR test restores a backup, and how it goes away again.

Three providers, one small contract (``provision(name) -> DREnvironment``, ``teardown(env)``):

- ``local`` (default): a fresh PostgreSQL cluster made by
  :meth:`wedefi_dr.postgres.cluster.ClusterHandle.initdb` in a folder of its own. It is
  reached over its Unix socket with ``peer`` authentication mapped from the OS user running
  the test to the superuser and to the application role, so no password exists to leak:
  not in a DSN, a flow parameter, a persisted task result or a report.
- ``dsn``: an existing server named by a password-less DSN (PGPASSFILE holds the secret),
  e.g. the plan's ``wedefi-dr-test`` host. Its database is dropped at teardown only when
  the DR test created it.
- ``docker``: the docker SDK starts a ``postgres`` container for hosts that run an engine.
  It cannot be the only path (CI and this stack have no engine): asking for it without a
  reachable engine is refused before anything is created.

A :class:`DREnvironment` is plain data (it is a persisted Prefect task result): DSNs and
names, never a connection or a secret.

The restored copy belongs to :data:`RESTORER_ROLE`, a login that is no superuser and
reaches no server program or file, and the restore connects as that login (``owner_dsn``),
not as the superuser with ``SET ROLE`` (the archive's SQL could ``RESET ROLE``). A backup
proves we wrote it, not that its source database was benign: a function an index
expression calls runs during CREATE INDEX, with the restoring login's rights.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import re
import secrets
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psycopg2
from psycopg2 import sql
from psycopg2.extensions import encrypt_password, make_dsn

from wedefi_dr.config import Settings
from wedefi_dr.errors import DRError, InvalidInput, TargetRefused
from wedefi_dr.logical.restore import privileged_login, user_tables
from wedefi_dr.postgres.cluster import ClusterHandle, free_port
from wedefi_dr.postgres.conninfo import ConnTarget
from wedefi_dr.postgres.tools import connect, running_as_root
from wedefi_dr.storage.secretfiles import owned_private_dir, product_home, write_secret_file

log = logging.getLogger(__name__)
PROVIDERS = ("local", "dsn", "docker")
DR_DATABASE = "wedefi_dr_test"  # the plan's name for the restored copy
PEER_MAP = "wedefi_dr"
LOCAL_CLUSTER_OS_USER = "postgres"  # as root; otherwise the clusters run as we do
# Written into every environment folder at provisioning: ``dr-test teardown`` removes only
# folders that carry it, so no path handed to it can reach a cluster it did not make.
ENV_MARKER = ".wedefi-dr-environment"
# Put on every database the DR test creates: the damage drill runs only where it is.
DATABASE_MARKER = "wedefi-dr DR test environment"
ENV_NAME_RE = re.compile(r"^dr-[0-9A-Za-z][0-9A-Za-z-]{0,80}$")
# Owns the DR copy and runs its restore: LOGIN, and no other attribute.
RESTORER_ROLE = "dr_restorer"
RESTORER_ATTRIBUTES = "LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS"


class ProvisioningFailed(DRError):
    """The DR environment could not be created; nothing was restored."""


@dataclass
class DREnvironment:
    provider: str
    name: str
    admin_dsn: str  # superuser (or owner) on the DR server, the target database; no password
    app_role: str
    app_dsn: str | None = None  # the application role's own login; None: SET ROLE on admin
    home: str | None = None
    port: int | None = None
    container_id: str | None = None
    created_database: bool = False
    owner_dsn: str | None = None  # the copy's owner (RESTORER_ROLE), who restores; no password

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DREnvironment:
        return cls(**data)

    def describe(self) -> str:
        return f"{self.provider} DR environment {self.name} ({self.admin.redacted})"

    @property
    def admin(self) -> ConnTarget:
        """The admin DSN, parsed (it names no password: that is in PGPASSFILE)."""
        return ConnTarget.parse(self.admin_dsn, allow_password=False)

    @property
    def owner(self) -> ConnTarget:
        """Who restores into the copy: its owner's DSN, or the admin's for an environment
        provisioned without one (the restore then warns that it runs privileged)."""
        return ConnTarget.parse(self.owner_dsn or self.admin_dsn, allow_password=False)


def create_marked_database(cur: Any, dbname: str, env_name: str, owner: str | None) -> None:
    """``CREATE DATABASE`` owned by ``owner`` (None: the connected user), plus the comment
    that says the DR test made it (``cur``: autocommit, on the maintenance database)."""
    ident = sql.Identifier(dbname)
    owned = sql.SQL(" OWNER {}").format(sql.Identifier(owner)) if owner else sql.SQL("")
    cur.execute(sql.SQL("CREATE DATABASE {}{}").format(ident, owned))
    cur.execute(
        sql.SQL("COMMENT ON DATABASE {} IS {}").format(
            ident, sql.Literal(f"{DATABASE_MARKER} {env_name}")
        )
    )


def is_marked_database(cur: Any) -> bool:
    """Whether the connected database is one the DR test created (its comment says so)."""
    cur.execute(
        "SELECT shobj_description(oid, 'pg_database') FROM pg_database "
        "WHERE datname = current_database()"
    )
    comment = cur.fetchone()[0] or ""
    return comment.startswith(DATABASE_MARKER + " ")


def kept_environment(base_dir: Path, name: str) -> Path:
    """The folder of a kept local DR environment called ``name``, or InvalidInput.

    ``name`` must be a plain environment name (``dr-...``: no ``/``, no ``..``, not a
    path) of a folder directly under ``base_dir`` that carries :data:`ENV_MARKER`, so
    ``dr-test teardown`` can only ever stop and remove what a DR test provisioned.
    """
    if not ENV_NAME_RE.match(name or ""):
        raise InvalidInput(
            f"{name!r} is not a DR environment name (dr-<timestamp>-<id>, letters, digits "
            "and '-' only); nothing was stopped or removed"
        )
    base = Path(base_dir).resolve()
    home = base / name
    marker = home / ENV_MARKER
    if home.is_symlink() or home.resolve().parent != base or not marker.is_file():
        raise InvalidInput(
            f"no DR environment {name} under {base} (a folder the DR test made carries "
            f"{ENV_MARKER}); nothing was stopped or removed"
        )
    return home


def _os_user() -> str:
    return pwd.getpwuid(os.geteuid()).pw_name


def ensure_app_role(admin: ConnTarget, role: str, *, login: bool) -> None:
    """Create the application role before the restore (a dump's GRANTs may name it)."""
    maintenance = admin.with_dbname("postgres").conninfo
    with connect(maintenance, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,))
        if cur.fetchone() is None:
            cur.execute(
                sql.SQL("CREATE ROLE {} " + ("LOGIN" if login else "NOLOGIN")).format(
                    sql.Identifier(role)
                )
            )


def ensure_restorer(admin: ConnTarget, password: str | None = None) -> None:
    """Create :data:`RESTORER_ROLE` (or reset an existing one to its attributes), before
    the database it will own; ``password``: its new one, sent as a SCRAM verifier."""
    role = sql.Identifier(RESTORER_ROLE)
    maintenance = admin.with_dbname("postgres").conninfo
    with connect(maintenance, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (RESTORER_ROLE,))
        verb = "CREATE" if cur.fetchone() is None else "ALTER"
        cur.execute(sql.SQL(f"{verb} ROLE {{}} {RESTORER_ATTRIBUTES}").format(role))
        if password is not None:
            verifier = encrypt_password(password, RESTORER_ROLE, conn, "scram-sha-256")
            cur.execute(sql.SQL("ALTER ROLE {} PASSWORD %s").format(role), (verifier,))


def grant_read_only(owner: ConnTarget, role: str) -> None:
    """After the restore: the application role may connect and read, nothing more.

    The DR copy is evidence; smoke tests must not be able to change what was validated.
    Granted by the copy's owner, who owns every restored object.
    """
    with connect(owner.conninfo) as conn, conn.cursor() as cur:
        role_id = sql.Identifier(role)
        cur.execute(
            sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(
                sql.Identifier(owner.dbname), role_id
            )
        )
        cur.execute(sql.SQL("GRANT USAGE ON SCHEMA public TO {}").format(role_id))
        cur.execute(sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA public TO {}").format(role_id))


def ensure_base_dir(base_dir: Path) -> None:
    """The folder named by ``dr_env_dir``, made here when missing (0755: the postgres OS
    user must reach the cluster below it)."""
    if not base_dir.is_dir():
        base_dir.mkdir(parents=True)
        base_dir.chmod(0o755)


class LocalClusterProvider:
    """A throw-away cluster on this host, peer-authenticated over its Unix socket."""

    kind = "local"

    def __init__(self, base_dir: Path, app_role: str, fast: bool = False) -> None:
        self.base_dir = Path(base_dir)
        self.app_role = app_role
        self.fast = fast

    def _cluster(self, name: str, home: Path, port: int) -> ClusterHandle:
        return ClusterHandle(
            name=name, data_dir=home / "data", port=port, os_user=LOCAL_CLUSTER_OS_USER
        )

    def provision(self, name: str) -> DREnvironment:
        ensure_base_dir(self.base_dir)
        home = self.base_dir / name
        if home.exists():
            raise ProvisioningFailed(f"{home} already exists: a DR environment named {name}")
        port = free_port()
        cluster = self._cluster(name, home, port)
        t0 = time.monotonic()
        # The superuser password exists only for initdb; it is never stored or used.
        cluster.initdb(secrets.token_urlsafe(24), fast=self.fast)
        (home / ENV_MARKER).write_text(name + "\n")
        user = _os_user()
        # Peer authentication on the socket, first in pg_hba: the OS user running the DR
        # test may log in as the superuser, the copy's owner and the application role,
        # nobody else.
        hba = cluster.data_dir / "pg_hba.conf"
        hba.write_text(f"local all all peer map={PEER_MAP}\n" + hba.read_text())
        ident = cluster.data_dir / "pg_ident.conf"
        with ident.open("a") as f:
            for role in ("postgres", RESTORER_ROLE, self.app_role):
                f.write(f"{PEER_MAP} {user} {role}\n")
        cluster.start()
        socket = f"host={home} port={port}"
        env = DREnvironment(
            provider=self.kind,
            name=name,
            admin_dsn=f"{socket} user=postgres dbname={DR_DATABASE}",
            app_role=self.app_role,
            app_dsn=f"{socket} user={self.app_role} dbname={DR_DATABASE}",
            home=str(home),
            port=port,
            created_database=True,
            owner_dsn=f"{socket} user={RESTORER_ROLE} dbname={DR_DATABASE}",
        )
        ensure_app_role(env.admin, self.app_role, login=True)
        ensure_restorer(env.admin)
        with (
            connect(env.admin.with_dbname("postgres").conninfo, autocommit=True) as conn,
            conn.cursor() as cur,
        ):
            create_marked_database(cur, DR_DATABASE, name, RESTORER_ROLE)
        log.info("provisioned %s in %.1f s", env.describe(), time.monotonic() - t0)
        return env

    def teardown(self, env: DREnvironment) -> None:
        home = Path(env.home or "")
        if not env.home or not (home / "data").exists():
            return
        pid_file = home / "data" / "postmaster.pid"
        if pid_file.exists():  # running (or crashed): line 4 is the port it listens on
            port = env.port or int(pid_file.read_text().splitlines()[3])
            self._cluster(env.name, home, port).stop()
        shutil.rmtree(home)
        log.info("removed %s", env.describe())


def _require_empty(target: ConnTarget) -> None:
    """An existing database is a DR target only while it holds no tables: the DR test
    never restores over data it was not told to replace."""
    tables = user_tables(target)
    if tables:
        raise TargetRefused(
            f"refusing to use {target.location} as the DR copy: it exists and holds "
            f"{tables} table(s). Name a database the DR test may create (or an empty one)"
        )


class ExistingServerProvider:
    """A server someone else runs; the DR test owns only the database it creates there.

    When the DSN's login is privileged (a superuser: see
    :func:`~wedefi_dr.logical.restore.privileged_login`), the database it creates belongs
    to :data:`RESTORER_ROLE`, given a fresh password at each provisioning, kept in a 0600
    passfile in the environment's folder under ``base_dir`` (removed at teardown). An
    existing empty database keeps its owner and is restored as the DSN's login (with the
    restore's warning when that login is privileged).
    """

    kind = "dsn"

    def __init__(self, target_dsn: str, app_role: str, base_dir: Path | None = None) -> None:
        self.target = ConnTarget.parse(target_dsn, allow_password=False)
        self.app_role = app_role
        self.base_dir = Path(base_dir) if base_dir else None

    def _restorer(self, target: ConnTarget, name: str) -> tuple[str | None, str | None]:
        """(the owner's DSN, the environment's folder) for a database created here, or
        (None, None) when the DSN's own login may restore (or no folder is configured)."""
        if self.base_dir is None or not privileged_login(target):
            return None, None
        ensure_base_dir(self.base_dir)
        home = owned_private_dir(self.base_dir / name)
        password = secrets.token_urlsafe(24)
        passfile = write_secret_file(home, "pgpass", f"*:*:*:{RESTORER_ROLE}:{password}\n")
        try:
            ensure_restorer(target, password)
        except BaseException:
            shutil.rmtree(home, ignore_errors=True)
            raise
        params = {**dict(target.params), "user": RESTORER_ROLE, "passfile": str(passfile)}
        return make_dsn(**params), str(home)

    def provision(self, name: str) -> DREnvironment:
        target = self.target if self.target.dbname else self.target.with_dbname(DR_DATABASE)
        owner_dsn = home = None
        try:
            with (
                connect(target.with_dbname("postgres").conninfo, autocommit=True) as conn,
                conn.cursor() as cur,
            ):
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (target.dbname,))
                created = cur.fetchone() is None
            if created:
                owner_dsn, home = self._restorer(target, name)
                with (
                    connect(target.with_dbname("postgres").conninfo, autocommit=True) as conn,
                    conn.cursor() as cur,
                ):
                    owner = RESTORER_ROLE if owner_dsn else None
                    create_marked_database(cur, target.dbname, name, owner)
            else:
                _require_empty(target)
        except BaseException as exc:
            if home:  # no environment: its passfile goes too
                shutil.rmtree(home, ignore_errors=True)
            if isinstance(exc, psycopg2.OperationalError):
                raise ProvisioningFailed(
                    f"cannot reach the DR server {target.redacted}: {str(exc).strip()}"
                ) from exc
            raise
        ensure_app_role(target, self.app_role, login=False)
        return DREnvironment(
            provider=self.kind,
            name=name,
            admin_dsn=target.conninfo,
            app_role=self.app_role,
            home=home,
            created_database=created,
            owner_dsn=owner_dsn,
        )

    def teardown(self, env: DREnvironment) -> None:
        if env.home:
            shutil.rmtree(env.home, ignore_errors=True)
        if not env.created_database:
            log.info("leaving %s: the DR test did not create it", env.describe())
            return
        with (
            connect(env.admin.with_dbname("postgres").conninfo, autocommit=True) as conn,
            conn.cursor() as cur,
        ):
            cur.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(env.admin.dbname)
                )
            )


class DockerProvider:
    """A ``postgres`` container via the docker SDK, published on loopback only."""

    kind = "docker"

    def __init__(self, base_dir: Path, app_role: str, image: str) -> None:
        self.base_dir = Path(base_dir)
        self.app_role = app_role
        self.image = image
        try:
            import docker

            self.client = docker.from_env()
            self.client.ping()
        except Exception as exc:  # DockerException, or no SDK: refused before any change
            raise InvalidInput(
                f"the docker provider needs a reachable Docker engine ({exc}); on this host "
                "use --provider local (a fresh cluster) or --provider dsn --target-dsn ..."
            ) from exc

    def provision(self, name: str) -> DREnvironment:
        home = self.base_dir / name
        home.mkdir(parents=True, exist_ok=False)
        (home / ENV_MARKER).write_text(name + "\n")
        password = secrets.token_urlsafe(24)
        port = free_port()
        container = self.client.containers.run(
            self.image,
            detach=True,
            name=f"wedefi-dr-{name}",
            environment={"POSTGRES_PASSWORD": password},
            ports={"5432/tcp": ("127.0.0.1", port)},
            labels={"wedefi-dr.environment": name},
        )
        restorer_password = secrets.token_urlsafe(24)
        # The passwords live in a 0600 passfile next to the environment, named by the DSNs.
        passfile = write_secret_file(
            home,
            "pgpass",
            f"127.0.0.1:{port}:*:postgres:{password}\n"
            f"127.0.0.1:{port}:*:{RESTORER_ROLE}:{restorer_password}\n",
        )
        server = f"host=127.0.0.1 port={port} dbname={DR_DATABASE} passfile={passfile}"
        target = ConnTarget.parse(f"{server} user=postgres", allow_password=False)
        deadline = time.monotonic() + 120
        while True:
            try:
                ensure_restorer(target, restorer_password)
                with (
                    connect(target.with_dbname("postgres").conninfo, autocommit=True) as conn,
                    conn.cursor() as cur,
                ):
                    create_marked_database(cur, DR_DATABASE, name, RESTORER_ROLE)
                break
            except psycopg2.OperationalError:
                if time.monotonic() > deadline:
                    container.remove(force=True)
                    raise ProvisioningFailed(
                        f"container {container.short_id} accepted no connection in 120 s"
                    ) from None
                time.sleep(1)
        ensure_app_role(target, self.app_role, login=False)
        return DREnvironment(
            provider=self.kind,
            name=name,
            admin_dsn=target.conninfo,
            app_role=self.app_role,
            home=str(home),
            port=port,
            container_id=container.id,
            created_database=True,
            owner_dsn=f"{server} user={RESTORER_ROLE}",
        )

    def teardown(self, env: DREnvironment) -> None:
        import docker.errors

        if env.container_id:
            with contextlib.suppress(docker.errors.NotFound):
                self.client.containers.get(env.container_id).remove(force=True)
        if env.home:
            shutil.rmtree(env.home, ignore_errors=True)


def make_provider(
    kind: str,
    *,
    base_dir: Path,
    app_role: str,
    target_dsn: str | None = None,
    docker_image: str = "postgres:15",
    fast: bool = False,
):
    """The provider for ``kind``; bad choices are refused here, before any side effect."""
    if kind not in PROVIDERS:
        raise InvalidInput(f"unknown DR environment provider {kind!r}: one of {PROVIDERS}")
    if kind == "dsn":
        if not target_dsn:
            raise InvalidInput("--provider dsn needs --target-dsn (the DR server, no password)")
        return ExistingServerProvider(target_dsn, app_role, base_dir)
    if target_dsn:
        raise InvalidInput(f"--target-dsn is only for --provider dsn, not {kind!r}")
    if kind == "docker":
        return DockerProvider(base_dir, app_role, docker_image)
    return LocalClusterProvider(base_dir, app_role, fast=fast)


def env_dir(settings: Settings) -> Path:
    """Where local DR clusters live: ``dr_env_dir``, else ``.wedefi-dr/dr-envs`` of the OS
    user the clusters run as (0700, that user's, refused if a link or someone else's).

    Not a fixed name in the shared temporary folder: another local user could create it
    first and then swap or read what we put there. As root the clusters run as
    ``postgres``, which must enter the folder to reach its cluster, and cannot pass
    through root's own 0700 home: so the folder is in ``postgres``'s product home, its
    own; root enters any folder.
    """
    if settings.dr_env_dir:
        return Path(settings.dr_env_dir)
    os_user = LOCAL_CLUSTER_OS_USER if running_as_root() else None
    return owned_private_dir(product_home(os_user) / "dr-envs", os_user=os_user)


def provider_from_settings(settings: Settings, kind: str, target_dsn: str | None):
    """:func:`make_provider` configured from the settings: the one way the flow and its
    steps get a provider, so a step rebuilds the same one from plain inputs."""
    return make_provider(
        kind,
        base_dir=env_dir(settings),
        app_role=settings.dr_app_role,
        target_dsn=target_dsn,
        docker_image=settings.dr_docker_image,
        fast=settings.dr_env_fast,
    )
