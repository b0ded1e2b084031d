"""Prometheus and Alertmanager configuration for this system, from the templates in
``deployments/prometheus/``.

Rendered, not hand-copied, so that the rules file, the Pushgateway and the PagerDuty
endpoint an operator deploys are the ones the end-to-end test ran against. Placeholders
are ``[[ name ]]``: ``{{ }}`` belongs to Prometheus' and Alertmanager's own templates.
"""

from __future__ import annotations

from pathlib import Path

from jinja2 import Environment, FileSystemLoader, StrictUndefined

from wedefi_dr.config import PROJECT_ROOT

DEPLOYMENT = PROJECT_ROOT / "deployments" / "prometheus"
RULES_FILE = DEPLOYMENT / "rules.yml"
RULE_TESTS = (DEPLOYMENT / "tests" / "rules_test.yml", DEPLOYMENT / "tests" / "rules_long_test.yml")


def _env() -> Environment:
    return Environment(
        loader=FileSystemLoader(DEPLOYMENT),
        undefined=StrictUndefined,
        variable_start_string="[[",
        variable_end_string="]]",
        keep_trailing_newline=True,
    )


def prometheus_yml(
    *,
    pushgateway: str,
    alertmanager: str,
    rules_file: Path = RULES_FILE,
    scrape_interval: str = "15s",
    evaluation_interval: str = "15s",
) -> str:
    """``pushgateway``/``alertmanager``: ``host:port``."""
    return (
        _env()
        .get_template("prometheus.yml.j2")
        .render(
            pushgateway=pushgateway,
            alertmanager=alertmanager,
            rules_file=str(rules_file),
            scrape_interval=scrape_interval,
            evaluation_interval=evaluation_interval,
        )
    )


def alertmanager_yml(
    *,
    routing_key_file: Path,
    events_url: str = "https://events.pagerduty.com/v2/enqueue",
    group_wait: str = "30s",
    group_interval: str = "5m",
    repeat_interval: str = "4h",
) -> str:
    return (
        _env()
        .get_template("alertmanager.yml.j2")
        .render(
            routing_key_file=str(routing_key_file),
            events_url=events_url,
            group_wait=group_wait,
            group_interval=group_interval,
            repeat_interval=repeat_interval,
        )
    )
