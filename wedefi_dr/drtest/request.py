"""A DR test request, checked before anything is created (invariant 7)."""

from __future__ import annotations

from wedefi_dr.config import Settings
from wedefi_dr.drtest.drill import check_damage
from wedefi_dr.drtest.environments import provider_from_settings
from wedefi_dr.errors import InvalidInput
from wedefi_dr.postgres.conninfo import refuse_password_in_dsn


def check_request(
    settings: Settings,
    *,
    backup_id: str,
    random_within_days: int | None,
    provider: str,
    target_dsn: str | None,
    operator: str,
    justification: str,
    drill_damage: list[str] | None,
) -> list[str]:
    """Every refusal of a DR test request; returns the drill damage to apply (checked)."""
    if target_dsn:
        refuse_password_in_dsn(target_dsn)
    damage = check_damage(drill_damage)
    provider_from_settings(settings, provider, target_dsn)
    if not operator.strip() or not justification.strip():
        raise InvalidInput("operator and justification are required (recovery audit log)")
    if random_within_days is not None and (random_within_days < 1 or backup_id != "latest"):
        raise InvalidInput(
            "--random-within-days takes a positive number of days, without a backup id"
        )
    return damage
