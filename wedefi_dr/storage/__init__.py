"""Where backups are kept and how they are sealed: the object store and gpg encryption."""
