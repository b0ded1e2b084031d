"""The DR test's step record on its own: what an error stops, what decides the verdict."""

from __future__ import annotations

import pytest

from wedefi_dr.drtest.record import StepRecord
from wedefi_dr.runbook import DRTest, timed

VALIDATION_OK = {"success": True, "suites": {}, "amcheck": {"failures": [], "seconds": 0.1}}
SMOKE_OK = {"success": True, "queries": []}
BENCH_SLOW = {"flagged": ["latest price per token"], "max_ratio": 3.0}


def _result(**values) -> dict:
    with timed() as t:
        pass
    return {**values, **t}


def _record(fail_when_slower: bool = False) -> StepRecord:
    return StepRecord(fail_when_slower=fail_when_slower, scrub=lambda s: s.replace("s3cret", "***"))


def _run_all(rec: StepRecord, bench: dict) -> None:
    rec.run(DRTest.PROVISION, lambda: _result(environment={}, description="local env"))
    rec.run(DRTest.RESTORE, lambda: _result(tables=2, rows=10))
    rec.run(DRTest.VALIDATE, lambda: _result(**VALIDATION_OK))
    rec.run(DRTest.SMOKE, lambda: _result(**SMOKE_OK))
    rec.run(DRTest.BENCHMARK, lambda: _result(**bench))


def test_an_error_stops_the_later_steps_and_is_scrubbed():
    rec = _record()
    ran: list[str] = []

    def restore() -> dict:
        raise ConnectionError("lost the DR server (password=s3cret)")

    rec.run(DRTest.PROVISION, lambda: _result(environment={}, description="local env"))
    rec.run(DRTest.RESTORE, restore)
    assert rec.run(DRTest.VALIDATE, lambda: ran.append("validate") or {}) is None
    assert ran == []
    assert rec.errored == DRTest.RESTORE
    assert rec.error == "ConnectionError: lost the DR server (password=***)"
    assert [(s["key"], s["status"]) for s in rec.timeline()] == [
        ("provision", "passed"),
        ("restore", "failed"),
    ]
    assert rec.timeline()[1]["name"] == "2. restore the backup"
    assert rec.success is False
    assert (
        rec.summary()
        == "2. restore the backup (ConnectionError: lost the DR server (password=***))"
    )


@pytest.mark.parametrize(
    ("fail_when_slower", "status", "success"), [(False, "flagged", True), (True, "failed", False)]
)
def test_a_slow_benchmark_flags_or_fails_as_configured(fail_when_slower, status, success):
    rec = _record(fail_when_slower)
    _run_all(rec, BENCH_SLOW)
    bench = rec.timeline()[-1]
    assert (bench["key"], bench["status"]) == ("benchmark", status)
    assert "latest price per token" in bench["reason"]
    assert rec.success is success


def test_a_failed_expectation_fails_the_verdict_with_its_reason():
    rec = _record()
    failing = {
        "success": False,
        "suites": {
            "portfolio_integrity": {
                "checks": [{"check": "wallet count", "success": False}],
                "seconds": 1.0,
            }
        },
        "amcheck": {"failures": [], "seconds": 0.1},
    }
    rec.run(DRTest.PROVISION, lambda: _result(environment={}, description="local env"))
    rec.run(DRTest.VALIDATE, lambda: _result(**failing))
    rec.run(DRTest.SMOKE, lambda: _result(**SMOKE_OK))
    rec.run(DRTest.BENCHMARK, lambda: _result(flagged=[], max_ratio=3.0))
    assert rec.error is None and rec.success is False
    assert rec.failed_steps() == ["3. validate: GX suites and amcheck"]
    assert rec.timeline()[1]["reason"] == "portfolio_integrity: wallet count"
    assert rec.validation_split() == {"portfolio_integrity": 1.0, "amcheck": 0.1}


def test_a_step_that_never_ran_cannot_pass():
    rec = _record()
    rec.run(DRTest.PROVISION, lambda: _result(environment={}, description="local env"))
    rec.run(DRTest.VALIDATE, lambda: _result(**VALIDATION_OK))
    rec.run(DRTest.SMOKE, lambda: _result(**SMOKE_OK))
    assert rec.success is False  # no benchmark result: not a pass
