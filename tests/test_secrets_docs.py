"""What the DR test writes outside the encryption carries no restored row.

The Data Docs site and the validation results are kept with the DR report, in clear, long
after the DR copy is gone. A violating row is planted in a real restore of the session
backup; the suite must fail on it, and its value must appear nowhere in what GX wrote.
"""

from __future__ import annotations

import json

from sqlalchemy import create_engine
from sqlalchemy.engine import make_url

from wedefi_dr.catalog import listing
from wedefi_dr.drtest import integrity
from wedefi_dr.logical import restore
from wedefi_dr.postgres.conninfo import ConnTarget
from wedefi_dr.postgres.tools import connect

NEEDLE = "planted-price-5ac1e7d0"


def test_data_docs_and_results_name_no_restored_row(
    good_backup, store, settings, scratch_dsn, tmp_path
):
    manifest = listing.resolve(store, good_backup)
    spool = restore.fetch_verified(settings, manifest, tmp_path / "spool")
    restore.decrypt_and_restore(
        settings, manifest, spool, ConnTarget.parse(scratch_dsn, allow_password=True)
    )
    with connect(scratch_dsn) as conn, conn.cursor() as cur:
        cur.execute(
            'INSERT INTO "PriceSnapshot" ("id", "tokenId", "priceUsd", "source", "recordedAt") '
            "SELECT %s, \"id\", 1, 'planted', '2999-01-01' FROM \"Token\" LIMIT 1",
            (NEEDLE,),
        )
    docs = tmp_path / "docs"
    result = integrity.validate_suites(
        scratch_dsn, manifest.integrity_facts, docs, suites=("timeseries_completeness",)
    )
    checks = {c["check"]: c for c in result["suites"]["timeseries_completeness"]["checks"]}
    future = checks["recordedAt not in the future"]
    assert not future["success"] and "1" in future["reason"]  # seen, and counted
    written = [p for p in docs.rglob("*") if p.is_file()]
    assert any(p.suffix == ".html" for p in written)
    everything = json.dumps(result, default=str) + "".join(
        p.read_text(errors="replace") for p in written
    )
    assert "timeseries_completeness" in everything  # the scan reads real content
    assert NEEDLE not in everything


def test_validation_connects_with_every_key_of_the_conninfo():
    dsn = (
        "host=/run/sock hostaddr=127.0.0.1 port=6543 user=dr dbname='we di' sslmode=disable "
        "options='-c statement_timeout=0' target_session_attrs=read-write connect_timeout=7"
    )
    url = make_url(integrity.sqlalchemy_url(dsn))
    _, kwargs = create_engine(url).dialect.create_connect_args(url)
    assert kwargs == dict(ConnTarget.parse(dsn, allow_password=False).params)
