"""The DR test's record: each runbook step's outcome, the verdict, and what is reported.

A step's result is a *finding* (passed, failed, flagged: judged here from its plain
result) or an *error* (it raised). After an error no later step runs: each step needs the
one before it, and the DR environment is kept so a Retry of the flow run continues from
the failed step (completed steps are served from their persisted results, timings
included, so the report shows when the work was really done).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from wedefi_dr.drtest.report import failed_expectations
from wedefi_dr.errors import DRError
from wedefi_dr.runbook import DRTest, step_key, timed

# The steps whose findings decide the verdict; each must have run and not failed.
JUDGED = (DRTest.VALIDATE, DRTest.SMOKE, DRTest.BENCHMARK)


class DRTestFailed(DRError):
    """The DR test ran and found the backup (or its copy) not fit for a failover."""


def _failed_checks(validation: dict[str, Any]) -> list[str]:
    failed = [
        f"{name}: {check['check']}"
        for name, suite in validation["suites"].items()
        for check in suite["checks"]
        if not check["success"]
    ]
    if validation.get("reason"):
        failed.insert(0, validation["reason"])
    if validation["amcheck"]["failures"]:
        failed.append(f"amcheck: {len(validation['amcheck']['failures'])} index(es) corrupt")
    return failed


def judge(step: DRTest, result: dict[str, Any], fail_when_slower: bool) -> tuple[str, str]:
    """A completed step's status (passed, failed, flagged) and the reason the report shows."""
    if step == DRTest.PROVISION:
        return "passed", result["description"]
    if step == DRTest.RESTORE:
        return "passed", (
            f"{result['tables']} tables, {result['rows']:,} rows identical to the manifest"
        )
    if step == DRTest.DRILL_DAMAGE:
        return "passed", "; ".join(result["damage"])
    if step == DRTest.VALIDATE:
        return ("passed" if result["success"] else "failed"), "; ".join(_failed_checks(result))
    if step == DRTest.SMOKE:
        bad = [
            f"{q['query']}: {'; '.join(q['problems'])}"
            for q in result["queries"]
            if not q["success"]
        ]
        return ("passed" if result["success"] else "failed"), "; ".join(bad)
    if step == DRTest.BENCHMARK:
        slow = result["flagged"]
        if not slow:
            return "passed", ""
        reason = f"slower than {result['max_ratio']}x on the DR copy: {', '.join(slow)}"
        return ("failed" if fail_when_slower else "flagged"), reason
    raise ValueError(f"step {step!r} is not judged by the DR test record")


@dataclass
class StepRecord:
    """Runs the DR test's steps in order and keeps what the report, the notification and
    the metrics need. ``scrub`` removes secrets from an error before it is kept."""

    fail_when_slower: bool
    scrub: Callable[[str], str]
    steps: list[dict[str, Any]] = field(default_factory=list)
    results: dict[DRTest, dict[str, Any]] = field(default_factory=dict)
    error: str | None = None
    errored: DRTest | None = None

    def run(self, step: DRTest, call: Callable[..., dict[str, Any]], *args: Any) -> Any:
        """``call(*args)`` as runbook ``step``; its result, or None if it (or an earlier
        step) raised. Timings come from the result (``timed()`` in the step), which a
        cached result keeps from the run that did the work."""
        if self.error is not None:
            return None
        with timed() as timing:
            try:
                result = call(*args)
            except Exception as exc:
                self.error = self.scrub(f"{type(exc).__name__}: {exc}")
                self.errored = step
        if self.errored == step:
            self.steps.append(self._entry(step, timing, "failed", self.error or ""))
            return None
        status, reason = judge(step, result, self.fail_when_slower)
        self.steps.append(self._entry(step, result, status, reason))
        self.results[step] = result
        return result

    @staticmethod
    def _entry(step: DRTest, timing: dict[str, Any], status: str, reason: str) -> dict:
        return {
            "key": step_key(step),
            "name": str(step),
            "status": status,
            "reason": reason,
            "started": timing.get("started"),
            "finished": timing.get("finished"),
            "seconds": timing.get("seconds"),
        }

    @property
    def success(self) -> bool:
        """No error, and every judged step ran without a failed finding."""
        statuses = {s["name"]: s["status"] for s in self.steps}
        return self.error is None and all(
            statuses.get(step) in {"passed", "flagged"} for step in JUDGED
        )

    def timeline(self) -> list[dict[str, Any]]:
        """The steps in the order they really started (a retry's cached ones first)."""
        return sorted(self.steps, key=lambda s: s["started"] or 0)

    def elapsed(self) -> float:
        """Seconds from the first step's start (a cached one's, on a retry) until now."""
        first = min((s["started"] for s in self.steps if s["started"]), default=None)
        return time.time() - first if first is not None else 0.0

    def failed_steps(self) -> list[str]:
        return [s["name"] for s in self.timeline() if s["status"] == "failed"]

    def summary(self) -> str:
        """Why the test failed, for the audit row and the exception (already scrubbed)."""
        text = "; ".join(self.failed_steps() or ["see the report"])
        return text + (f" ({self.error})" if self.error else "")

    def audit_error(self) -> str | None:
        """The audit row's error: None for a pass, else why it failed (already scrubbed)."""
        return None if self.success else self.summary()

    def findings(self) -> dict[str, dict[str, Any] | None]:
        """The judged steps' results, for the report (None for a step that never ran)."""
        return {step_key(step): self.results.get(step) for step in JUDGED}

    def validation_split(self) -> dict[str, float]:
        """Seconds per suite and for amcheck: where the validation's time went."""
        validation = self.results.get(DRTest.VALIDATE)
        if not validation:
            return {}
        split = {name: suite["seconds"] for name, suite in validation["suites"].items()}
        return {**split, "amcheck": validation["amcheck"]["seconds"]}

    def details(
        self,
        *,
        run_name: str,
        backup_id: str,
        report: dict[str, Any],
        rto_objective_seconds: float,
        environment_kept: bool,
    ) -> dict[str, Any]:
        """What the notification carries: names, numbers and reasons, never a secret."""
        return {
            "backup_id": backup_id,
            "run": run_name,
            "rto_seconds": report["rto_seconds"],
            "rto_objective_seconds": rto_objective_seconds,
            "report": report["s3_html"] or report["html"],
            "failed_steps": self.failed_steps(),
            "failed_expectations": [
                f"{f['suite']}: {f['expectation']} ({f['check']})"
                for f in failed_expectations(self.results.get(DRTest.VALIDATE))
            ],
            "error": self.error,
            "environment_kept": environment_kept,
        }
