"""``wedefi-dr seed``: the WeDefiDaily schema and deterministic sample data in the primary."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated

import typer

from wedefi_dr_cli.common import err, ready, require_text

if TYPE_CHECKING:
    from wedefi_dr.config import Settings


def seed(
    scale: Annotated[float, typer.Option(help="1 loads in seconds; see wedefi_dr_dev.seed")] = 1.0,
    reset: Annotated[
        bool, typer.Option(help="drop the WeDefiDaily tables first (sample databases only)")
    ] = False,
    operator: Annotated[str, typer.Option(help="who resets it (audit log)")] = "",
    justification: Annotated[
        str, typer.Option(help="why (audit log, with --reset)")
    ] = "reset the sample data",
) -> None:
    """Create the WeDefiDaily schema in the primary database and fill it deterministically.

    A ``--reset`` drops data: when the ops database is configured, the reset (or its
    refusal) is on the audit record like any other overwrite."""
    from wedefi_dr.errors import InvalidInput
    from wedefi_dr.postgres.primary import primary_dsn
    from wedefi_dr_dev import seed as seeding

    if not scale > 0:  # before prepare: a reset must not drop tables it cannot refill
        raise InvalidInput(f"--scale must be positive, got {scale!r}")
    settings = ready(settings=("primary_dsn",), servers=("primary_dsn",))
    dsn = primary_dsn(settings)
    with _audited_reset(settings, reset, operator or settings.operator, justification):
        seeding.prepare(dsn, reset=reset, scale=scale)
    counts = seeding.seed(dsn, scale)
    err.print(f"seeded {len(counts)} tables, {sum(counts.values()):,} rows (scale {scale})")


@contextmanager
def _audited_reset(settings: Settings, reset: bool, operator: str, why: str) -> Iterator[None]:
    """The reset's audit row: ``success`` once the tables are dropped and recreated,
    ``refused`` when the sample-database guard turned it down (nothing dropped)."""
    if not reset or not settings.ops_dsn.get_secret_value():
        yield
        return
    from wedefi_dr.errors import InvalidInput
    from wedefi_dr.observability import audit
    from wedefi_dr.postgres.primary import primary_target

    require_text(why, "--justification", "why reset it (audit log)")
    ops = settings.ops_dsn.get_secret_value()
    target = primary_target(settings)
    audit_id = audit.recovery_started(
        ops,
        recovery_type="seed_reset",
        backup_id=None,
        target=target.location[:300],
        operator=operator,
        justification=why,
    )
    try:
        yield
    except InvalidInput as exc:
        audit.recovery_finished(ops, audit_id, status="refused", error=audit.scrub(str(exc)))
        raise
    except Exception as exc:
        error = audit.scrub(f"{type(exc).__name__}: {exc}")
        audit.recovery_finished(ops, audit_id, status="failed", error=error)
        raise
    audit.recovery_finished(ops, audit_id, status="success")
