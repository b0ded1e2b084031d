"""The errors an operator can meet, each named for what went wrong.

Every error that stops a backup or a restore is one of these, so the CLI and the flows
can print one clear line (and the tests can assert the exact kind) instead of a stack
trace from deep inside a subprocess.
"""


class DRError(Exception):
    """Base class: a failure with a message meant for the on-call engineer."""


class InvalidInput(DRError, ValueError):
    """Bad input, refused before any side effect."""


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
