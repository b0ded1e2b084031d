"""Logical backups: pg_dump to the object store, and the verified restore."""
