"""How a server is wired to the WAL archive: the env file and the command lines.

The server runs ``archive_command`` and ``restore_command`` as its OS user, isolated from
our environment (``python -I``). What they need (bucket, prefix, keys, the passphrase)
reaches them through one env file per purpose, mode 600 and owned by that user, so no
secret is written into ``postgresql.conf`` or shown by ``SHOW archive_command``. The
local stack's primary, a recovered cluster and a real host are all wired by these same
functions, so they archive with the same settings.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path

from wedefi_dr.config import Settings
from wedefi_dr.postgres.cluster import chown_to, conf_quote

ARCHIVE_ENV_NAME = "wal-archive.env"
RESTORE_ENV_NAME = "wal-restore.env"
HANDOFF_SCRIPT = Path(__file__).resolve().with_name("archiver_handoff.py")
PREFETCH_SCRIPT = Path(__file__).resolve().with_name("prefetch.py")
AWS_ENV_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")


def wal_command(action: str, env_file: Path) -> str:
    """The server-side command line of ``wal-push``/``wal-fetch`` (without ``%p``/``%f``).

    ``python -I -m wedefi_dr.physical.wal``: the venv's interpreter (built on the system
    Python, so the server's OS user may execute it), isolated from the server's environment
    and working directory, importing neither Prefect nor GX.
    """
    parts = (
        sys.executable,
        "-I",
        "-m",
        "wedefi_dr.physical.wal",
        action,
        "--env-file",
        str(env_file),
    )
    return " ".join(shlex.quote(part) for part in parts)


def write_wal_env(
    settings: Settings,
    path: Path,
    prefix: str | None = None,
    *,
    os_user: str = "postgres",
    aws_env: Mapping[str, str] | None = None,
) -> Path:
    """The settings ``wal-push``/``wal-fetch`` need, in a file only ``os_user`` reads.

    AWS credentials come from ``aws_env`` (default: our environment), the way boto3 would
    find them: the server runs with a minimal environment holding no secret, so its
    children find keys only here. A file a server keeps using after we are gone (a new
    primary's archive env) gets :func:`archiver_aws_env` instead: a worker's keys, session
    token or profile are short-lived or personal, and archiving with them stops, silently,
    when they expire.
    """
    values = {
        "WEDEFI_DR_AWS_REGION": settings.aws_region,
        "WEDEFI_DR_BUCKET": settings.bucket,
        "WEDEFI_DR_PREFIX": prefix or settings.prefix,
        "WEDEFI_DR_GPG_PASSPHRASE": settings.gpg_passphrase.get_secret_value(),
        "WEDEFI_DR_GPG_CIPHER": settings.gpg_cipher,
        "WEDEFI_DR_STORAGE_CLASS": settings.storage_class,
        "WEDEFI_DR_SSE": settings.sse,
        "WEDEFI_DR_WAL_PREFETCH": str(settings.wal_prefetch),
        "WEDEFI_DR_WAL_ARCHIVER": settings.wal_archiver,
        "WEDEFI_DR_WAL_ARCHIVER_WAIT_SECONDS": str(settings.wal_archiver_wait_seconds),
        "WEDEFI_DR_WAL_ARCHIVER_PARALLEL": str(settings.wal_archiver_parallel),
        "WEDEFI_DR_WAL_ARCHIVER_IDLE_SECONDS": str(settings.wal_archiver_idle_seconds),
    }
    values["WEDEFI_DR_REPO_TYPE"] = settings.repo_type
    if settings.repo_path is not None:
        values["WEDEFI_DR_REPO_PATH"] = str(settings.repo_path)
    if settings.gpg_previous_passphrases:  # segments archived before a rotation still fetch
        values["WEDEFI_DR_GPG_PREVIOUS_PASSPHRASES"] = json.dumps(
            [p.get_secret_value() for p in settings.gpg_previous_passphrases]
        )
    if settings.aws_endpoint_url:
        values["WEDEFI_DR_AWS_ENDPOINT_URL"] = settings.aws_endpoint_url
    source = os.environ if aws_env is None else aws_env
    values.update({key: source[key] for key in AWS_ENV_KEYS if source.get(key)})
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("".join(f"{k}={v}\n" for k, v in values.items()))
    path.chmod(0o600)
    chown_to(path, os_user)
    return path


def archiver_aws_env(settings: Settings) -> dict[str, str]:
    """The WAL archiver's own credential (settings ``WEDEFI_DR_WAL_ARCHIVER_AWS_*``) as the
    env file's AWS keys; empty when unset, and the server's children then find credentials
    the way boto3 does on the host (instance profile, the OS user's ``~/.aws``)."""
    key_id = settings.wal_archiver_aws_access_key_id.get_secret_value()
    secret = settings.wal_archiver_aws_secret_access_key.get_secret_value()
    if not (key_id and secret):
        return {}
    return {"AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret}


def production_archive_env(settings: Settings, home: Path, *, os_user: str) -> Path:
    """The archive env file a new primary archives with: the one the cluster already had
    (its own home, kept as it was: production's settings and credentials), else one
    written with the archiver's own credential, never the worker's."""
    path = home / ARCHIVE_ENV_NAME
    if path.is_file():
        return path
    return write_wal_env(settings, path, os_user=os_user, aws_env=archiver_aws_env(settings))


def handoff_command(env_file: Path) -> str:
    """The resident archiver's hand-off (``archiver_handoff.py``), without ``%p``.

    Run as a script with ``-I -S``: no site-packages, no package import, a few standard
    modules and its sibling ``walscript.py``, so the server's wait per segment is an
    interpreter start, a ``stat`` and the archiver's upload.
    """
    parts = (sys.executable, "-I", "-S", str(HANDOFF_SCRIPT), "--env-file", str(env_file))
    return " ".join(shlex.quote(part) for part in parts)


def archive_command(env_file: Path, *, resident: bool = True) -> str:
    """``archive_command`` as the server runs it (unquoted): the hand-off to the resident
    archiver, which the env file's ``WEDEFI_DR_WAL_ARCHIVER=sync`` turns back into
    ``wal-push``; ``resident=False`` writes ``wal-push`` itself."""
    if not resident:
        return wal_command("push", env_file) + " %p"
    return handoff_command(env_file) + " %p"


def restore_command(env_file: Path) -> str:
    """``restore_command`` as the server runs it (unquoted): ``prefetch.py`` (standard
    library only, ``-I -S``) hands prefetched segments over and runs ``wal-fetch`` for the
    rest."""
    parts = (sys.executable, "-I", "-S", str(PREFETCH_SCRIPT), "--env-file", str(env_file))
    return " ".join(shlex.quote(part) for part in parts) + " %f %p"


def archiving_conf(env_file: Path) -> dict[str, str]:
    """``archive_mode``/``archive_command``/``archive_timeout`` (the plan's 60 s) as
    ``postgresql.conf`` lines, for a cluster whose env file is ``env_file``."""
    return {
        "archive_mode": "on",
        "archive_command": conf_quote(archive_command(env_file)),
        "archive_timeout": "60",
    }
