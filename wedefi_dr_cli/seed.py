"""``wedefi-dr seed``: the WeDefiDaily schema and deterministic sample data in the primary."""

from __future__ import annotations

from typing import Annotated

import typer

from wedefi_dr_cli.common import err, ready


def seed(
    scale: Annotated[float, typer.Option(help="1 loads in seconds; see wedefi_dr_dev.seed")] = 1.0,
    reset: Annotated[
        bool, typer.Option(help="drop the WeDefiDaily tables first (sample databases only)")
    ] = False,
) -> None:
    """Create the WeDefiDaily schema in the primary database and fill it deterministically."""
    from wedefi_dr.errors import InvalidInput
    from wedefi_dr_dev import seed as seeding

    if not scale > 0:  # before prepare: a reset must not drop tables it cannot refill
        raise InvalidInput(f"--scale must be positive, got {scale!r}")
    settings = ready(settings=("primary_dsn",), servers=("primary_dsn",))
    dsn = settings.primary_dsn.get_secret_value()
    seeding.prepare(dsn, reset=reset, scale=scale)
    counts = seeding.seed(dsn, scale)
    err.print(f"seeded {len(counts)} tables, {sum(counts.values()):,} rows (scale {scale})")
