"""The by-hand runbook is executed as written: its ```bash blocks, in order, in one shell
with ``set -euo pipefail``, against the test stack (as pgBackRest executes its user
guide). Stock tools only: the aws CLI, jq, sha256sum, gpg, createdb, pg_restore, psql.

The other runbooks name deployments and commands: each command they name must exist.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from psycopg2.extensions import parse_dsn

from wedefi_dr.catalog import listing
from wedefi_dr.logical import restore
from wedefi_dr.postgres.conninfo import ConnTarget
from wedefi_dr.postgres.tools import tool
from wedefi_dr.storage.s3 import ObjectStore

RUNBOOKS = Path(__file__).resolve().parent.parent / "docs" / "runbooks"
BLOCK = re.compile(r"^```bash\n(.*?)^```", re.M | re.S)


def bash_blocks(page: Path) -> list[str]:
    return BLOCK.findall(page.read_text())


def test_restore_by_hand_runs_as_written(good_backup, settings, scratch_dsn, tmp_path):
    blocks = bash_blocks(RUNBOOKS / "restore-by-hand.md")
    assert len(blocks) >= 6
    script = "set -euo pipefail\n" + "".join(
        f"echo '### block {i}'\n{block}" for i, block in enumerate(blocks, 1)
    )
    primary = parse_dsn(settings.primary_dsn.get_secret_value())
    target_db = parse_dsn(scratch_dsn)["dbname"]
    env = {
        **os.environ,
        "PGHOST": primary["host"],
        "PGPORT": primary["port"],
        "PGUSER": primary["user"],
        "TARGET_DB": target_db,
        # The stock PostgreSQL client tools, whichever major version the stack found.
        "PATH": f"{Path(tool('pg_restore')).parent}:{os.environ['PATH']}",
    }
    done = subprocess.run(
        ["bash", "-c", script],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert f"### block {len(blocks)}" in done.stdout
    assert "verified" in done.stdout and "tables against the manifest" in done.stdout
    # Exactly what the backup holds: the manifest's tables, rows and content hashes.
    [backup_id] = re.findall(r"restoring from \S+/logical/([^/]+)/manifest.json", done.stdout)
    manifest = listing.resolve(ObjectStore(settings), backup_id)
    counts = restore.verify(manifest, ConnTarget.parse(scratch_dsn, allow_password=False))
    assert counts["tables"] == len(manifest.tables) > 0
    assert settings.gpg_passphrase.get_secret_value() not in done.stdout + done.stderr


def test_every_runbook_names_commands_that_exist():
    """A runbook step names a deployment or a `wedefi-dr` command; those commands exist."""
    from typer.main import get_command

    from wedefi_dr_cli.app import app

    cli = get_command(app)
    pages = sorted(RUNBOOKS.glob("*.md"))
    assert {p.stem for p in pages} >= {
        "daily-checks",
        "failed-backup",
        "restore-logical",
        "pitr",
        "break-glass",
        "restore-by-hand",
    }
    for page in pages:
        for line in re.findall(r"wedefi-dr ([a-z][a-z-]*(?: [a-z][a-z-]*)?)", page.read_text()):
            words = line.split()
            command = cli.commands.get(words[0])
            assert command is not None, f"{page.name}: `wedefi-dr {words[0]}` does not exist"
            sub = getattr(command, "commands", None)
            if sub and len(words) > 1 and not words[1].startswith("-"):
                assert words[1] in sub, f"{page.name}: `wedefi-dr {line}` does not exist"


def test_work_pool_templates_declare_every_variable_they_use():
    """Each ``{{ name }}`` a job template uses is a declared variable, and no secret has a
    default (secrets come from the platform's secret store)."""
    import json

    pools = Path(__file__).resolve().parent.parent / "deployments" / "work-pools"
    for kind in ("docker", "kubernetes"):
        template = json.loads((pools / f"{kind}.json").read_text())
        used = set(re.findall(r"\{\{ *(\w+) *\}\}", json.dumps(template["job_configuration"])))
        declared = set(template["variables"]["properties"])
        assert used <= declared, f"{kind}: undeclared {used - declared}"
        defaults = json.dumps(template["variables"]).lower()
        assert 'passphrase": ' not in defaults and "password" not in defaults
