"""What backups exist: manifests (one per backup, written last) and their listing."""
