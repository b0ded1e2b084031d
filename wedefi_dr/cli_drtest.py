"""``wedefi-dr`` commands of the drtest area (registered by cli.py).

Imports of Prefect, Great Expectations and the flows stay inside the command functions,
so that ``wedefi-dr --help`` and the fast commands start in a fraction of a second.
"""

from __future__ import annotations

import typer


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    """Add this area's commands to ``app`` and its benchmark to ``bench_app``."""
