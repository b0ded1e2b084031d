"""PostgreSQL itself: client and server binaries, connections, fingerprints, cluster handles."""
