"""The one place AWS clients are built: endpoint, region, retries and pool size from the settings.

boto3 is imported inside the function, so that modules on the archive_command's import chain
pay for it only when they talk to the object store (``--help`` and name checks stay instant).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from wedefi_dr.config import Settings


def aws_client(settings: Settings, service: str, *, max_pool_connections: int = 10) -> Any:
    """A boto3 client for ``service`` ("s3", "sns", ...) with standard-mode retries.

    ``max_pool_connections`` matters for parallel transfers: each concurrent GET or part
    upload holds one connection, and boto3's default of 10 would serialise the rest.
    """
    import boto3
    from botocore.config import Config

    return boto3.client(
        service,
        endpoint_url=settings.aws_endpoint_url,
        region_name=settings.aws_region,
        config=Config(
            retries={"max_attempts": 5, "mode": "standard"},
            max_pool_connections=max_pool_connections,
        ),
    )
