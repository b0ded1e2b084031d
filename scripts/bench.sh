#!/usr/bin/env bash
# The benchmark: the flows against bare `pg_dump | gpg` and `pg_restore`, on the local
# stack, in one process tree. Arguments go to `wedefi-dr bench` (e.g. --scale 1 --json f).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"

wedefi-dr stack up
eval "$(wedefi-dr stack env)"
wedefi-dr bench "$@"
