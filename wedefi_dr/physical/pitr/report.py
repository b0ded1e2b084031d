"""The report of a finished point-in-time recovery, rendered from ``templates/``.

It holds names, positions, counts and timings against the RTO objective, never a DSN or
a secret: it becomes a Prefect artifact that anyone who can see the run can read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined

TEMPLATES = Path(__file__).parent / "templates"


def render_markdown(result: dict[str, Any]) -> str:
    """The markdown report of ``result`` (what the PITR flow returns)."""
    env = Environment(
        loader=FileSystemLoader(TEMPLATES),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return env.get_template("pitr_report.md.j2").render(r=result)
