"""The fleet file: every database the backup flow protects, one entry per host and database.

Data, parsed into pydantic models and checked before anything runs: unique names, a
catalog prefix per database (two databases never share a catalog), connection strings
without passwords (they are flow inputs, visible in the UI; libpq reads the password from
PGPASSFILE), and a concurrency limit per host, so that a fleet never runs more dumps on
one database server than that server was sized for.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from wedefi_dr.errors import InvalidInput
from wedefi_dr.postgres.conninfo import ConnTarget

NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
PREFIX_RE = re.compile(r"^[a-z0-9][a-z0-9/_-]{0,120}$")


class FleetDatabase(BaseModel):
    """One database to back up: ``host`` names its entry in ``hosts`` (its limit)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    host: str
    # The connection string, or the name of the environment variable that holds it on the
    # worker (``dsn_env``: the same fleet file then serves every environment).
    dsn: str = ""
    dsn_env: str = ""
    prefix: str

    @field_validator("name", "host")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME_RE.match(value):
            raise ValueError(f"{value!r}: lower-case letters, digits and '-' only")
        return value

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not PREFIX_RE.match(value) or ".." in value:
            raise ValueError(f"prefix {value!r}: lower-case letters, digits, '/', '_', '-'")
        return value.strip("/")

    @model_validator(mode="after")
    def _one_dsn(self) -> FleetDatabase:
        if bool(self.dsn) == bool(self.dsn_env):
            raise ValueError(f"database {self.name}: give exactly one of dsn and dsn_env")
        if self.dsn:
            ConnTarget.parse(self.dsn, allow_password=False)
        return self

    def resolved_dsn(self) -> str:
        """The DSN, read from the worker's environment for ``dsn_env`` (no password)."""
        if not self.dsn_env:
            return self.dsn
        value = os.environ.get(self.dsn_env, "")
        if not value:
            raise InvalidInput(f"fleet database {self.name}: {self.dsn_env} is not set")
        ConnTarget.parse(value, allow_password=False)
        return value


class FleetHost(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Backups of this host's databases that may run at once (a dump is one backend and
    # one core on the server, plus the network to the object store).
    max_concurrent_backups: int = Field(default=1, ge=1, le=16)


class Fleet(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hosts: dict[str, FleetHost] = Field(default_factory=dict)
    databases: list[FleetDatabase] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> Fleet:
        names = [d.name for d in self.databases]
        if len(set(names)) != len(names):
            raise ValueError(f"database names must be unique: {names}")
        prefixes = [d.prefix for d in self.databases]
        if len(set(prefixes)) != len(prefixes):
            raise ValueError(f"each database needs its own catalog prefix: {prefixes}")
        for d in self.databases:
            self.hosts.setdefault(d.host, FleetHost())
        return self

    def limit_of(self, host: str) -> int:
        return self.hosts[host].max_concurrent_backups


def concurrency_limit_name(host: str) -> str:
    """The Prefect global concurrency limit that bounds backups on ``host``."""
    return f"wedefi-dr-backup-host:{host}"


def load_fleet(path: Path | str) -> Fleet:
    """The fleet file, validated; InvalidInput (one line) for any mistake in it."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InvalidInput(f"fleet file {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise InvalidInput(f"fleet file {path} is not valid YAML: {exc}") from exc
    try:
        return Fleet.model_validate(raw or {})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise InvalidInput(f"fleet file {path}: {where}: {first['msg']}") from exc
