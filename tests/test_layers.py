"""The layering is a test, not a hope: import-linter's contracts (pyproject.toml) over the tree.

The contracts say what DESIGN.md's architecture says: command line and benchmarks above the
flows, flows above tasks, tasks above a core that imports no Prefect and never the dev stack,
and an archive_command whose import chain stays small so that it starts fast.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_hold() -> None:
    lint_imports = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run(
        [str(lint_imports), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_archive_command_imports_no_heavy_library() -> None:
    """What the server runs per WAL segment, measured by the interpreter itself."""
    probe = (
        "import sys, wedefi_dr.physical.wal as w; "
        "heavy = [m for m in ('prefect', 'great_expectations', 'pandas', 'psycopg2', "
        "'sqlalchemy', 'pydantic', 'typer', 'rich', 'yaml') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    result = subprocess.run(
        [sys.executable, "-I", "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == ""
