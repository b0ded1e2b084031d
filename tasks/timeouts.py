"""Every task's ``timeout_seconds``: nothing a runbook waits for may wait forever.

A task that exceeds its timeout raises ``TimeoutError`` inside the task (Prefect's alarm in
the flow's thread interrupts even a blocking read), so it fails like any other error:
through the flow's failure path (audit row failed, one notification), after killing its
child processes (the streaming pipeline kills them when interrupted).

The long steps scale with the database and the network, so an operator sets them
(``WEDEFI_DR_*_TIMEOUT_SECONDS``, read when the tasks are imported: restart the worker
after a change); the short steps (an audit row, a manifest, a notification, a request
check) get one constant that is generous for a few round trips.
"""

from __future__ import annotations

from wedefi_dr.config import Settings

_settings = Settings()

SHORT = 300.0  # audit rows, manifests, notifications, metrics, request checks
MEDIUM = 1800.0  # a DR environment, the application's stop/start commands, a promote

DUMP = float(_settings.dump_timeout_seconds)
RESTORE = float(_settings.restore_timeout_seconds)
BASE_BACKUP = float(_settings.base_backup_timeout_seconds)
# The replay wait has its own deadline (a clear "target not reached" error); the task's
# timeout is the backstop behind it.
REPLAY = float(_settings.pitr_replay_timeout_seconds) + SHORT
CHECKS = float(_settings.checks_timeout_seconds)
RETENTION = float(_settings.retention_timeout_seconds)
SYNC = float(_settings.sync_timeout_seconds)
LIFECYCLE = float(_settings.lifecycle_timeout_seconds)
