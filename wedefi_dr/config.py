"""One typed settings object for every command, task and flow.

Values come from the environment (``WEDEFI_DR_*``, what ``eval "$(wedefi-dr stack env)"``
exports), optionally layered over a profile file in ``deployments/`` named by
``WEDEFI_DR_PROFILE``. Secrets are ``SecretStr`` so that printing or logging the settings
object never shows them.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PROFILES_DIR = PROJECT_ROOT / "deployments" / "profiles"


class _ProfileSource(PydanticBaseSettingsSource):
    """Reads ``deployments/profiles/<WEDEFI_DR_PROFILE>.yaml``; the environment wins over it."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        name = os.environ.get("WEDEFI_DR_PROFILE")
        if not name:
            return {}
        path = PROFILES_DIR / f"{name}.yaml"
        if not path.is_file():
            raise ValueError(f"profile {name!r} not found: expected {path}")
        return yaml.safe_load(path.read_text()) or {}


class Settings(BaseSettings):
    """Where the protected database, the ops database, the object store and the keys are."""

    model_config = SettingsConfigDict(env_prefix="WEDEFI_DR_", extra="ignore")

    # The protected database (libpq DSN; the password, if any, is a secret inside it).
    primary_dsn: SecretStr = Field(default=SecretStr(""))
    # The ops database: audit tables live here, never in the protected database.
    ops_dsn: SecretStr = Field(default=SecretStr(""))

    # Object storage (S3 through boto3; an endpoint URL points at the local moto server).
    aws_endpoint_url: str | None = None
    aws_region: str = "us-west-2"
    bucket: str = "wedefi-backup-primary"
    dr_bucket: str = "wedefi-backup-dr-east"
    glacier_bucket: str = "wedefi-backup-glacier"
    prefix: str = "wedefi"
    storage_class: str = "STANDARD_IA"
    sse: str = "AES256"
    sns_topic_arn: str | None = None

    # Logical backup parameters (the plan: --format=custom --compress=9).
    compress_level: int = Field(default=9, ge=0, le=9)
    # Client-side encryption (the plan: AES256, S2K mode 3, SHA512, count 65536).
    gpg_passphrase: SecretStr = Field(default=SecretStr(""))
    gpg_cipher: str = "AES256"
    gpg_s2k_digest: str = "SHA512"
    gpg_s2k_count: int = 65536
    # gpg's own compression is off by default: a -Z9 dump is already compressed and
    # gpg's zlib runs at a fraction of the cipher's speed (DESIGN.md pitfalls).
    gpg_compress_algo: str = "none"

    # Multipart upload tuning (bytes) and local scratch space for verified downloads.
    multipart_chunk_bytes: int = 16 * 1024 * 1024
    upload_concurrency: int = 4
    spool_dir: Path | None = None

    # Observability.
    metrics_dir: Path | None = None  # node_exporter textfile collector directory
    pushgateway_url: str | None = None
    operator: str = Field(default_factory=lambda: os.environ.get("USER", "unknown"))

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _ProfileSource(settings_cls), file_secret_settings)

    def require(self, *names: str) -> None:
        """Fail with one clear message naming every missing setting, before any side effect."""
        missing = []
        for name in names:
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            if not value:
                missing.append(f"WEDEFI_DR_{name.upper()}")
        if missing:
            raise ValueError(
                "missing settings: "
                + ", ".join(missing)
                + ' (for the local stack: eval "$(wedefi-dr stack env)")'
            )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings; tests build their own ``Settings(...)`` instead."""
    return Settings()
