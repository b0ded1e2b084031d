"""Moments as the WeDefiDaily schema stores them: ``timestamp(3)`` without time zone, in UTC.

Comparing an aware Python datetime with such a column makes PostgreSQL interpret it in the
session's zone; converting once, here, keeps every cutoff and every fact in one frame.
"""

from __future__ import annotations

from datetime import UTC, datetime


def naive_utc(moment: datetime | None = None) -> datetime:
    """``moment`` (default: now) in UTC with the zone dropped; a naive input is taken as UTC."""
    moment = moment or datetime.now(UTC)
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC).replace(tzinfo=None)
    return moment
