"""The errors an operator can meet, each named for what went wrong.

Every error that stops a backup or a restore is one of these, so the CLI and the flows
can print one clear line (and the tests can assert the exact kind) instead of a stack
trace from deep inside a subprocess. The operator-caused classes (bad input, settings
missing, a binary missing, a server unreachable) each get their own exit code from the
CLI (``wedefi_dr_cli.common.EXIT_CODES``), so a script can tell "fix your command" from
"fix your environment" from "the operation failed".

This module imports nothing: ``archive_command`` imports it once per WAL segment.
"""


class DRError(Exception):
    """Base class: a failure with a message meant for the on-call engineer."""


class InvalidInput(DRError, ValueError):
    """Bad input, refused before any side effect."""


class SettingsMissing(DRError):
    """Settings a command needs are not set (usually: the stack's environment was not loaded).

    ``names`` are the environment variables, so a caller can list them without parsing.
    """

    def __init__(self, names: list[str]) -> None:
        self.names = list(names)
        super().__init__(
            "missing settings: "
            + ", ".join(self.names)
            + ' (for the local stack: eval "$(wedefi-dr stack env)")'
        )

    def __reduce__(self) -> tuple[type, tuple[list[str]]]:
        # Prefect pickles a task's exception into its state: rebuild from the names.
        return (type(self), (self.names,))


class ToolNotFound(DRError):
    """A binary (a PostgreSQL tool, gpg) is missing: says which, and how to get it."""


class ServerUnreachable(DRError):
    """A PostgreSQL server refused or did not answer a connection (the DSN is redacted)."""


class UnknownBackup(InvalidInput):
    """No backup with a manifest has this id."""


class TargetRefused(InvalidInput):
    """The restore target is one we were not allowed to overwrite."""


class PreflightFailed(DRError):
    """A precondition of the backup does not hold (server, tools, bucket)."""


class BackupFailed(DRError):
    """The backup stream failed; nothing that looks like a backup was left behind."""


class IntegrityError(DRError):
    """Stored data does not match what the manifest promises."""


class NotAuthentic(IntegrityError):
    """Metadata (a manifest) that this system did not write, or that changed since: refused."""


class ChecksumMismatch(IntegrityError):
    """The bytes read back do not hash to the manifest's sha256."""


class TruncatedObject(IntegrityError):
    """The stored object is shorter (or longer) than the manifest says."""


class DecryptionFailed(IntegrityError):
    """gpg could not decrypt: wrong passphrase, or a damaged/foreign ciphertext."""


class WrongPassphrase(DecryptionFailed):
    """gpg reported a bad session key: the passphrase is not the one used to encrypt."""


class RestoreFailed(DRError):
    """pg_restore failed; with --single-transaction the target was left as it was."""


class VerificationFailed(IntegrityError):
    """The restored database does not reproduce the manifest's row counts and hashes."""


class OperationBusy(DRError):
    """Another run of the same operation on the same target holds its lock: refused at once,
    so two backups never share a snapshot window and two PITRs never race on one cluster."""


class SpoolFull(DRError):
    """The spool's filesystem ran out of space while a download was written to it."""


class SyncRefused(DRError):
    """The cross-region sync would copy a mass deletion to the DR copy: nothing deleted."""


class ArchivedObjectNotRestored(DRError):
    """An object in the archive tier (GLACIER, DEEP_ARCHIVE) must be restored before a read."""
