"""The one place AWS clients are built: endpoint, region, retries and pool size from the settings.

boto3 is imported inside the function, so that modules on the archive_command's import chain
pay for it only when they talk to the object store (``--help`` and name checks stay instant).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from wedefi_dr.config import Settings


def aws_client(
    settings: Settings,
    service: str,
    *,
    max_pool_connections: int = 10,
    credentials: tuple[str, str] | None = None,
) -> Any:
    """A boto3 client for ``service`` ("s3", "sns", ...) with standard-mode retries.

    ``max_pool_connections`` matters for parallel transfers: each concurrent GET or part
    upload holds one connection, and boto3's default of 10 would serialise the rest.
    ``credentials`` (access key id, secret) replace the default chain for a client of one
    role, e.g. the lifecycle's deleting credential; otherwise boto3 finds them as usual.
    """
    import boto3
    from botocore.config import Config

    return boto3.client(
        service,
        endpoint_url=settings.aws_endpoint_url,
        region_name=settings.aws_region,
        **(
            {"aws_access_key_id": credentials[0], "aws_secret_access_key": credentials[1]}
            if credentials
            else {}
        ),
        config=Config(
            retries={"max_attempts": 5, "mode": "standard"},
            max_pool_connections=max_pool_connections,
        ),
    )
