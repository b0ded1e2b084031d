"""The alert rules, checked and unit-tested by promtool; the rendered Prometheus and
Alertmanager configurations accepted by their own checkers; the rules' thresholds the
same as the settings the direct evaluation uses."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from wedefi_dr.config import Settings
from wedefi_dr.observability import prometheus_config as pc


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=pc.DEPLOYMENT)


def test_promtool_checks_the_rules_and_their_unit_tests_pass():
    checked = run("promtool", "check", "rules", str(pc.RULES_FILE))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 11 rules found" in checked.stdout
    tested = run("promtool", "test", "rules", *map(str, pc.RULE_TESTS))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_a_broken_expectation_fails_promtool(tmp_path: Path):
    """The unit tests can fail: the same tests against a rule with the wrong threshold."""
    rules = pc.RULES_FILE.read_text().replace("> 52428800 <= 104857600", "> 72428800 <= 104857600")
    (tmp_path / "rules.yml").write_text(rules)
    tests = pc.RULE_TESTS[0].read_text().replace("../rules.yml", str(tmp_path / "rules.yml"))
    (tmp_path / "rules_test.yml").write_text(tests)
    tested = run("promtool", "test", "rules", str(tmp_path / "rules_test.yml"))
    assert tested.returncode != 0
    assert "ReplicationLagHigh" in tested.stdout + tested.stderr


def test_rendered_configurations_pass_promtool_and_amtool(tmp_path: Path):
    key = tmp_path / "routing_key"
    key.write_text("k" * 32)
    prom = tmp_path / "prometheus.yml"
    prom.write_text(pc.prometheus_yml(pushgateway="127.0.0.1:9091", alertmanager="127.0.0.1:9093"))
    am = tmp_path / "alertmanager.yml"
    am.write_text(pc.alertmanager_yml(routing_key_file=key))
    checked = run("promtool", "check", "config", str(prom))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    checked = run("amtool", "check-config", str(am))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "k" * 32 not in am.read_text()  # the secret stays in its own file


def test_the_rules_thresholds_are_the_settings_defaults():
    rules = {
        (r["alert"], r["labels"]["severity"]): r["expr"]
        for group in yaml.safe_load(pc.RULES_FILE.read_text())["groups"]
        for r in group["rules"]
    }
    s = Settings()
    assert (
        f"> {s.replication_lag_warning_bytes} <= {s.replication_lag_critical_bytes}"
        in (rules[("ReplicationLagHigh", "warning")])
    )
    assert f"> {s.replication_lag_critical_bytes}" in rules[("ReplicationLagHigh", "critical")]
    assert f"> {s.backup_max_age_seconds:.0f}" in rules[("BackupAge", "critical")]
    assert f"> {s.dr_test_max_age_days:.0f} * 86400" in rules[("DRTestStale", "warning")]
    assert f"> {s.sync_max_lag_seconds:.0f}" in rules[("SyncBehind", "warning")]
    assert "wal_archive_rpo_seconds" in rules[("WALArchiveStale", "critical")]
