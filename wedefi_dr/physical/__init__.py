"""The physical path: WAL archive (archive/restore_command), base backups, PITR."""
