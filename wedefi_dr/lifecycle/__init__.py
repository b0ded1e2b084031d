"""Storage tiers and the backup lifecycle: the DR copy, the Glacier tier, GFS expiry, verify."""
