"""The DR report: one HTML file (with a timeline against the RTO) and a markdown summary.

Rendered with jinja2 from ``templates/``, written next to the validation's Data Docs in
the report folder, and uploaded beside the backup it tested
(``<prefix>/logical/<backup_id>/dr-tests/<run>/``), so that the evidence of a backup's last
DR test lives where the backup lives. It holds names, counts, timings and reasons, never
a DSN with credentials or a secret.
"""

from __future__ import annotations

import mimetypes
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader

from wedefi_dr.catalog import listing
from wedefi_dr.config import Settings
from wedefi_dr.runbook import DRTest
from wedefi_dr.storage.repository import Repository
from wedefi_dr.storage.secretfiles import owned_private_dir, product_home

TEMPLATES = Path(__file__).parent / "templates"


def _env() -> Environment:
    return Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=lambda name: bool(name and name.endswith(".html.j2")),
        trim_blocks=True,
        lstrip_blocks=True,
    )


def rto_seconds(steps: list[dict[str, Any]]) -> float | None:
    """Restore start → validation end; None when the copy was never validated."""
    by_name = {s["name"]: s for s in steps}
    restore, validate = by_name.get(DRTest.RESTORE), by_name.get(DRTest.VALIDATE)
    if not restore or not validate or validate.get("finished") is None:
        return None
    if restore.get("started") is None:
        return None
    return round(validate["finished"] - restore["started"], 3)


def failed_expectations(validation: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not validation:
        return []
    return [
        {"suite": name, **check}
        for name, suite in validation.get("suites", {}).items()
        for check in suite.get("checks", [])
        if not check["success"]
    ]


def build_context(
    *,
    run_name: str,
    manifest: dict[str, Any],
    environment: str,
    operator: str,
    steps: list[dict[str, Any]],
    validation: dict[str, Any] | None,
    smoke: dict[str, Any] | None,
    benchmark: dict[str, Any] | None,
    rto_objective_seconds: float,
    success: bool,
) -> dict[str, Any]:
    timed = [s for s in steps if s.get("started") is not None and s.get("seconds") is not None]
    origin = min((s["started"] for s in timed), default=0.0)
    timeline = [
        {
            "name": s["name"],
            "status": s["status"],
            "offset": s["started"] - origin,
            "seconds": s["seconds"],
        }
        for s in timed
    ]
    span = max((t["offset"] + t["seconds"] for t in timeline), default=1.0) or 1.0
    restore_offset = next(
        (t["offset"] for s, t in zip(timed, timeline, strict=False) if s["name"] == DRTest.RESTORE),
        0,
    )
    rto = rto_seconds(steps)
    return {
        "run_name": run_name,
        "backup_id": manifest["backup_id"],
        "backup_finished_at": manifest.get("finished_at"),
        "source": f"{manifest['source']['dbname']} on {manifest['source']['host']}:"
        f"{manifest['source']['port']} (PostgreSQL {manifest['source']['server_version']})",
        "environment": environment,
        "operator": operator,
        "generated_at": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "steps": steps,
        "timeline": timeline,
        "chart_span": span,
        "restore_offset": restore_offset,
        "rto_seconds": rto,
        "rto_objective_seconds": rto_objective_seconds,
        "rto_met": rto is not None and rto <= rto_objective_seconds,
        "validation": validation,
        "failed_expectations": failed_expectations(validation),
        "smoke": smoke,
        "benchmark": benchmark,
        "success": success,
        "data_docs_href": "data_docs/index.html",
    }


def report_dir(settings: Settings, run_name: str) -> Path:
    """The run's local report folder (HTML, markdown, Data Docs) before it is uploaded:
    under ``dr_report_dir``, else ``.wedefi-dr/dr-reports`` (0700, ours, refused if a link
    or someone else's), not a fixed name another local user could create first in the
    shared temporary folder and read the reports (row counts, failed rows) from."""
    base = settings.dr_report_dir or owned_private_dir(product_home() / "dr-reports")
    return Path(base) / run_name


def report_prefix(store: Repository, backup_id: str, run_name: str) -> str:
    return store.key(listing.KIND, backup_id, "dr-tests", run_name)


def _upload_tree(store: Repository, folder: Path, prefix: str) -> int:
    count = 0
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        store.put_bytes(
            f"{prefix}/{path.relative_to(folder).as_posix()}",
            path.read_bytes(),
            content_type=mimetypes.guess_type(path.name)[0] or "application/octet-stream",
        )
        count += 1
    return count


def write_report(
    context: dict[str, Any], report_dir: Path, store: Repository | None
) -> dict[str, Any]:
    """Render both forms, write the HTML into ``report_dir`` and upload the folder."""
    report_dir.mkdir(parents=True, exist_ok=True)
    html_path = report_dir / "report.html"
    prefix = report_prefix(store, context["backup_id"], context["run_name"]) if store else None
    context = {
        **context,
        "html_location": (store.url(prefix + "/report.html") if store else "")
        + f" (local copy {html_path})",
        "data_docs_location": (store.url(prefix + "/data_docs/index.html") if store else "")
        + f" (local copy {report_dir / 'data_docs' / 'index.html'})",
    }
    env = _env()
    html_path.write_text(env.get_template("dr_report.html.j2").render(r=context), encoding="utf-8")
    markdown = env.get_template("dr_report.md.j2").render(r=context)
    (report_dir / "report.md").write_text(markdown, encoding="utf-8")
    uploaded = _upload_tree(store, report_dir, prefix) if store else 0
    return {
        "html": str(html_path),
        "markdown": markdown,
        "s3_html": store.url(prefix + "/report.html") if store else None,
        "uploaded_objects": uploaded,
    }
