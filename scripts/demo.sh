#!/usr/bin/env bash
# The whole DR cycle on the embedded local stack: stack up, seed, backup, list,
# restore into a scratch database, verification summary, the monthly DR test.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
SCALE=${SCALE:-1}

step() { printf '\n\033[1m== %s\033[0m\n' "$*" >&2; }

step "1. local stack (PostgreSQL primary + ops, S3 endpoint, Prefect server + worker)"
wedefi-dr stack up
eval "$(wedefi-dr stack env)"

step "2. WeDefiDaily schema and sample data (scale $SCALE)"
wedefi-dr seed --scale "$SCALE" --reset

step "3. logical backup (pg_dump -Fc -Z9 | gpg AES256 | S3 multipart, SSE, STANDARD_IA)"
backup_id=$(wedefi-dr backup --operator demo)
echo "backup id: $backup_id" >&2

step "4. catalog"
wedefi-dr backups list

step "5. restore into a scratch database, verified against the manifest"
wedefi-dr restore "$backup_id" --target-dsn "$WEDEFI_DR_SCRATCH_DSN" \
  --operator demo --justification "demo: prove the backup restores"

step "6. monthly DR test: fresh cluster, restore latest, GX suites + amcheck, smoke, benchmark, report"
report_json=$(mktemp)
wedefi-dr dr-test run latest --operator demo --json >"$report_json"
python - "$report_json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"DR test {'passed' if r['success'] else 'FAILED'}: RTO {r['rto_seconds']:.1f} s "
      f"(objective {r['rto_objective_seconds']:.0f} s)\n"
      f"report: {r['report']}\nlocal copy: {r['report_html']}")
PY
rm -f "$report_json"

step "7. point-in-time recovery: a base backup, and the window WAL archiving makes recoverable"
wedefi-dr base-backup --operator demo
wedefi-dr pitr window

step "8. the control plane: every deployment registered; every run above is in the UI's history"
wedefi-dr stack deploy >/dev/null

step "done: the stack is still running (wedefi-dr stack down stops it)"
echo "Prefect UI (the runs of this demo): $(wedefi-dr stack url)/runs"
