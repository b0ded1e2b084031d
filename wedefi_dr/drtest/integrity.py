"""Validate a restored copy: the three GX suites through a PostgreSQL SQL data source, and amcheck.

Each suite in ``expectations/<name>.json`` names, in its ``meta.wedefi_dr``, the SQL asset
(``expectations/sql/*.sql``) it validates. The asset becomes a GX query asset on a
PostgreSQL data source, so every expectation is evaluated by the server (counts, sums,
``NOT IN``, ``UnexpectedRowsExpectation`` queries): no table is loaded into pandas. The
thresholds are ``$PARAMETER`` values taken from the manifest's ``integrity_facts`` (what the
source held in the dump's snapshot), never constants.

The GX context is ephemeral: nothing is written to disk except the Data Docs site kept
with the DR report, and the data source's URL carries no password (libpq reads it from
PGPASSFILE or a peer-authenticated socket), so no secret can reach the docs. Results are
kept at the ``SUMMARY`` level with no example values: the docs say how many rows broke an
expectation, never which rows (they are production data, and the docs are not encrypted).
``import great_expectations`` takes seconds: it happens inside :func:`validate_suites` only.
"""

from __future__ import annotations

import getpass
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from psycopg2 import sql

from wedefi_dr.drtest.facts import EXPECTATIONS_DIR, render_asset, suite_parameters
from wedefi_dr.errors import DRError, InvalidInput
from wedefi_dr.postgres.conninfo import ConnTarget
from wedefi_dr.postgres.tools import connect

log = logging.getLogger(__name__)
SUITES: tuple[str, ...] = ("portfolio_integrity", "timeseries_completeness", "alert_integrity")
DOCS_SITE = "dr_report"
MAX_LISTED = 10


class MissingIntegrityFacts(DRError):
    """The backup's manifest predates integrity facts: there is nothing honest to compare with."""


class SuiteLoadError(DRError):
    """A suite file is broken: GX would silently drop an invalid expectation, we refuse."""


def load_suite_document(name: str, directory: Path = EXPECTATIONS_DIR) -> dict[str, Any]:
    path = directory / f"{name}.json"
    if not path.is_file():
        raise SuiteLoadError(f"suite {name!r} not found: expected {path}")
    document = json.loads(path.read_text(encoding="utf-8"))
    if document.get("name") != name:
        raise SuiteLoadError(f"{path} names suite {document.get('name')!r}, not {name!r}")
    if "wedefi_dr" not in document.get("meta", {}):
        raise SuiteLoadError(f"{path} has no meta.wedefi_dr (which SQL asset it validates)")
    return document


def sqlalchemy_url(dsn: str) -> str:
    """A libpq DSN as a SQLAlchemy URL carrying every key of the conninfo, without a
    password (refused: it would reach GX).

    SQLAlchemy's psycopg2 dialect passes a URL's query arguments to ``psycopg2.connect``
    after the URL's own parts, so they win: every key of the parsed conninfo (``hostaddr``,
    ``service``, ``sslmode``, ``options``, ``target_session_attrs``...) goes there, and GX
    connects to exactly the server and database the DR test restored into. The URL's own
    host is only for GX's URL check, which wants a host name.
    """
    from sqlalchemy.engine import URL

    target = ConnTarget.parse(dsn, allow_password=True)
    params = dict(target.params)
    if params.get("password"):
        raise InvalidInput(
            "the DSN given to validation carries a password: use PGPASSFILE, so that no "
            "secret reaches the GX configuration or the Data Docs"
        )
    url = URL.create(
        "postgresql+psycopg2",
        # GX's URL check wants a user and a host; the query's keys are what connects.
        username=params.get("user") or getpass.getuser(),
        host="localhost",
        database=target.dbname or None,
        query=params,
    )
    return url.render_as_string(hide_password=False)


def require_facts(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest's facts, or a loud refusal: an old backup must not pass by default."""
    facts = manifest.get("integrity_facts")
    if not facts:
        raise MissingIntegrityFacts(
            f"backup {manifest.get('backup_id')} has no integrity_facts in its manifest (it was "
            "taken before the backup recorded them): the suites' thresholds must be what the "
            "source held at backup time, so this backup cannot be validated. Take a new backup "
            "and test that one"
        )
    return facts


def _summarise_result(result: dict[str, Any]) -> str:
    """One line for the report: what was observed, what was unexpected or missing."""

    def show(value: Any, limit: int = 300) -> str:
        return json.dumps(value, default=str)[:limit]

    parts = []
    details = result.get("details") or {}
    if result.get("observed_value") is not None:
        parts.append(f"observed {show(result['observed_value'])}")
    if details.get("unexpected_rows"):
        rows = [dict(r) if hasattr(r, "keys") else r for r in details["unexpected_rows"]]
        parts.append(f"unexpected rows {show(rows[:MAX_LISTED], 600)}")
    if result.get("unexpected_count"):
        parts.append(f"{result['unexpected_count']} unexpected")
        if result.get("partial_unexpected_list"):
            parts.append(f"e.g. {show(result['partial_unexpected_list'][:MAX_LISTED])}")
    if result.get("partial_unexpected_index_list"):
        parts.append(f"at {show(result['partial_unexpected_index_list'][:MAX_LISTED])}")
    if result.get("partial_missing_list"):
        parts.append(f"missing {show(result['partial_missing_list'][:MAX_LISTED])}")
    return "; ".join(parts) or "no details"


def _reason(item: Any) -> str:
    """Why an expectation failed: its observations, or the error that stopped it."""
    info = item.exception_info or {}
    # GX 1.x nests exception info per metric: {metric id: {"raised_exception": ...}}.
    errors = [info] if "raised_exception" in info else list(info.values())
    for error in errors:
        if isinstance(error, dict) and error.get("raised_exception"):
            return "error: " + str(error.get("exception_message", "")).splitlines()[0][:300]
    return _summarise_result(item.result or {})


def _expected_of(kwargs: dict[str, Any], parameters: dict[str, Any]) -> str:
    """The expectation's thresholds with $PARAMETERs resolved, for the report."""
    shown = {}
    for key, value in kwargs.items():
        if key in {"column", "batch_id", "unexpected_rows_query", "result_format"}:
            continue
        if isinstance(value, dict) and "$PARAMETER" in value:
            value = parameters.get(value["$PARAMETER"], value)
        shown[key] = value
    return json.dumps(shown, default=str)[:400]


def validate_suites(
    dsn: str,
    facts: dict[str, Any],
    docs_dir: Path,
    suites: tuple[str, ...] = SUITES,
    suites_dir: Path = EXPECTATIONS_DIR,
) -> dict[str, Any]:
    """Run the suites against ``dsn`` with thresholds from ``facts``; build Data Docs.

    Returns plain data (picklable, for persisted task results): per suite its success,
    statistics and each expectation's outcome with a reason, plus the Data Docs index path.
    """
    from datetime import datetime

    parameters = suite_parameters(facts)
    as_of = datetime.fromisoformat(facts["as_of"])
    documents = {name: load_suite_document(name, suites_dir) for name in suites}
    with connect(dsn) as conn:
        queries = {
            name: render_asset(conn, doc["meta"]["wedefi_dr"]["asset"], as_of)
            for name, doc in documents.items()
        }
    context = _ephemeral_context(docs_dir)
    datasource = context.data_sources.add_postgres(
        name="restored_copy",
        connection_string=sqlalchemy_url(dsn),
        # Each asset query runs once into a temp table; the metrics read that table instead
        # of re-running the query (the 7-day price scan) once per metric.
        create_temp_table=True,
        kwargs={"connect_args": {"options": "-c TimeZone=UTC", "application_name": "wedefi-dr gx"}},
    )
    outcome: dict[str, Any] = {"suites": {}, "parameters": parameters}
    for name, document in documents.items():
        outcome["suites"][name] = _run_suite(
            context, datasource, name, document, queries[name], parameters
        )
    outcome["success"] = all(s["success"] for s in outcome["suites"].values())
    outcome["data_docs"] = str(docs_dir / "index.html")
    return outcome


def _ephemeral_context(docs_dir: Path) -> Any:
    """A GX context in memory whose only Data Docs site is ``docs_dir`` (beside the report).

    ``import great_expectations`` takes seconds, so it happens here, not at module import.
    """
    t0 = time.monotonic()
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    log.info("great_expectations %s imported in %.1f s", gx.__version__, time.monotonic() - t0)
    docs_dir.mkdir(parents=True, exist_ok=True)
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    # An ephemeral context comes with a default docs site in a fresh temp folder: drop it
    # (and the folder), the docs belong with the report.
    for site, config in list(context.list_data_docs_sites().items()):
        base = (config.get("store_backend") or {}).get("base_directory")
        context.delete_data_docs_site(site)
        if base and Path(base).parent == Path(tempfile.gettempdir()):
            shutil.rmtree(base, ignore_errors=True)
    context.add_data_docs_site(
        DOCS_SITE,
        {
            "class_name": "SiteBuilder",
            "store_backend": {
                "class_name": "TupleFilesystemStoreBackend",
                "base_directory": str(docs_dir),
            },
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        },
    )
    return context


def _run_suite(
    context: Any,
    datasource: Any,
    name: str,
    document: dict[str, Any],
    query_sql: str,
    parameters: dict[str, Any],
) -> dict[str, Any]:
    """One suite as one checkpoint over its query asset; its summary as plain data."""
    import great_expectations as gx
    from great_expectations.checkpoint import UpdateDataDocsAction

    meta = document["meta"]["wedefi_dr"]
    expectations = document["expectations"]
    suite = gx.ExpectationSuite(
        name=name,
        expectations=expectations,
        meta=document.get("meta"),
        notes=document.get("notes"),
    )
    if len(suite.expectations) != len(expectations):
        raise SuiteLoadError(
            f"suite {name}: GX accepted {len(suite.expectations)} of {len(expectations)} "
            "expectations (see the GX log for the invalid one)"
        )
    suite = context.suites.add(suite)
    # GX wants the query to start with SELECT; the asset files start with comments/WITH.
    query = f"SELECT * FROM (\n{query_sql}\n) AS {meta['asset']}"
    asset = datasource.add_query_asset(name=meta["asset"], query=query)
    batch = asset.add_batch_definition_whole_table("whole asset")
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name=f"{name} on the restored copy", data=batch, suite=suite)
    )
    checkpoint = context.checkpoints.add(
        gx.Checkpoint(
            name=f"dr test: {name}",
            validation_definitions=[definition],
            actions=[UpdateDataDocsAction(name="data docs", site_names=[DOCS_SITE])],
            # Counts and aggregates only: the Data Docs, the validation results and the
            # report outlive the DR copy and sit outside the encryption, so no restored
            # row (unexpected values, unexpected rows, their ids) may be written there.
            result_format={"result_format": "SUMMARY", "partial_unexpected_count": 0},
        )
    )
    t = time.monotonic()
    result = checkpoint.run(expectation_parameters=parameters)
    elapsed = time.monotonic() - t
    (run_result,) = result.run_results.values()
    checks = _checks_of(run_result, parameters)
    failed = sum(1 for c in checks if not c["success"])
    log.info(
        "suite %s: %s (%d/%d expectations met) in %.1f s",
        name,
        "passed" if result.success else "FAILED",
        len(checks) - failed,
        len(checks),
        elapsed,
    )
    return {
        "success": bool(result.success),
        "asset": meta["asset"],
        "evaluated": len(checks),
        "failed": failed,
        "seconds": round(elapsed, 3),
        "checks": checks,
        "statistics": result.describe_dict()["statistics"],
    }


def _checks_of(run_result: Any, parameters: dict[str, Any]) -> list[dict[str, Any]]:
    """Each expectation's outcome, with the threshold it was held to and why it failed."""
    checks = []
    for item in run_result.results:
        config = item.expectation_config
        checks.append(
            {
                "expectation": config.type,
                "column": config.kwargs.get("column"),
                "check": (config.meta or {}).get("check") or config.description or config.type,
                "success": bool(item.success),
                "expected": _expected_of(config.kwargs, parameters),
                "reason": "" if item.success else _reason(item),
            }
        )
    return checks


def amcheck(dsn: str) -> dict[str, Any]:
    """``bt_index_check`` on every btree index of the restored copy (amcheck, read-only).

    ``CREATE EXTENSION amcheck`` changes the copy's catalog, which is fine on a DR copy and
    needs a superuser or the database owner. Each index is checked separately so that one
    corrupt index is named instead of stopping the check.
    """
    checked, failures = 0, []
    t0 = time.monotonic()
    with connect(dsn, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("CREATE EXTENSION IF NOT EXISTS amcheck")
        cur.execute(
            """SELECT n.nspname, c.relname FROM pg_index i
               JOIN pg_class c ON c.oid = i.indexrelid
               JOIN pg_namespace n ON n.oid = c.relnamespace
               JOIN pg_am am ON am.oid = c.relam
               WHERE am.amname = 'btree' AND c.relpersistence <> 't'
                 AND n.nspname NOT IN ('pg_catalog', 'information_schema')
                 AND n.nspname NOT LIKE 'pg_toast%%'
               ORDER BY 1, 2"""
        )
        for schema, index in cur.fetchall():
            try:
                cur.execute(
                    sql.SQL("SELECT bt_index_check({}::regclass)").format(
                        sql.Literal(sql.Identifier(schema, index).as_string(conn))
                    )
                )
                checked += 1
            except Exception as exc:  # a corrupt index raises; name it and go on
                failures.append(f"{schema}.{index}: {str(exc).strip()[:300]}")
    return {
        "success": not failures and checked > 0,
        "indexes_checked": checked,
        "failures": failures,
        "seconds": round(time.monotonic() - t0, 3),
    }


def validate_copy(
    dsn: str, manifest: dict[str, Any], docs_dir: Path, *, amcheck_dsn: str | None = None
) -> dict[str, Any]:
    """The DR test's validation: the three suites with the manifest's facts as thresholds
    (a manifest without facts fails with its reason, never passes by default), then
    ``bt_index_check``. Plain dicts, since a GX CheckpointResult does not pickle.

    The suites read the copy's content, which came from the source, as ``dsn`` — the copy's
    unprivileged owner, so a view or function planted in the source runs with no server
    program or file at hand; ``bt_index_check`` (superuser-only by default) reads index
    pages only, at ``amcheck_dsn`` (default: ``dsn``)."""
    try:
        facts = require_facts(manifest)
    except MissingIntegrityFacts as exc:
        result: dict[str, Any] = {"success": False, "suites": {}, "reason": str(exc)}
    else:
        result = validate_suites(dsn, facts, docs_dir)
    result["amcheck"] = amcheck(amcheck_dsn or dsn)
    result["success"] = bool(result["success"] and result["amcheck"]["success"])
    return result
