"""Notifications: always the console (the run's log), SNS when a topic is configured, and
PagerDuty (Events API v2) for alerts when a routing key is.

The plan publishes to ``dr-success``/``dr-failure`` topics; here one topic carries both,
with a ``status`` message attribute that subscriptions filter on.

A page carries what an alert is (its name, labels, severity, a summary built from numbers)
and never what a failed run printed: an error message can quote rows of the protected
database (``pg_restore`` stderr), and PagerDuty is outside the encryption.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Literal

import httpx

from wedefi_dr.config import Settings
from wedefi_dr.errors import DRError
from wedefi_dr.storage.clients import aws_client

log = logging.getLogger("wedefi_dr.observability.notify")

PAGERDUTY_SEVERITIES = ("critical", "error", "warning", "info")
SOURCE = "wedefi-dr"


class PageFailed(DRError):
    """PagerDuty did not accept an event (it is sent again on the next evaluation)."""


def notify(settings: Settings, *, subject: str, status: str, details: dict) -> str | None:
    """Log the event and publish it; returns the SNS message id (None without a topic)."""
    line = f"[{status.upper()}] {subject}"
    (log.error if status == "failure" else log.info)(
        "%s %s", line, json.dumps(details, default=str)
    )
    if not settings.sns_topic_arn:
        return None
    sns = aws_client(settings, "sns")
    response = sns.publish(
        TopicArn=settings.sns_topic_arn,
        Subject=subject[:100],
        Message=json.dumps({"subject": subject, "status": status, **details}, default=str),
        MessageAttributes={"status": {"DataType": "String", "StringValue": status}},
    )
    return response["MessageId"]


def pagerduty_event(
    routing_key: str,
    action: Literal["trigger", "resolve"],
    dedup_key: str,
    *,
    summary: str,
    severity: str,
    details: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One Events API v2 event. ``dedup_key`` is the alert's stable identity: the trigger
    opens one incident however often it is sent, the resolve with the same key closes it."""
    if severity not in PAGERDUTY_SEVERITIES:
        raise ValueError(f"severity must be one of {PAGERDUTY_SEVERITIES}, not {severity!r}")
    event: dict[str, Any] = {
        "routing_key": routing_key,
        "event_action": action,
        "dedup_key": dedup_key[:255],
        "payload": {
            "summary": summary[:1024],
            "source": SOURCE,
            "severity": severity,
            "component": "backup-and-recovery",
            "custom_details": details or {},
        },
    }
    return event


def page(
    settings: Settings,
    action: Literal["trigger", "resolve"],
    dedup_key: str,
    *,
    summary: str,
    severity: str,
    details: dict[str, Any] | None = None,
) -> bool:
    """Send one event to PagerDuty; False when no routing key is configured (console and
    SNS then carry the alert alone). Raises :class:`PageFailed` when PagerDuty refuses."""
    key = settings.pagerduty_routing_key.get_secret_value()
    if not key:
        return False
    event = pagerduty_event(
        key, action, dedup_key, summary=summary, severity=severity, details=details
    )
    try:
        response = httpx.post(settings.pagerduty_events_url, json=event, timeout=10)
    except httpx.HTTPError as exc:
        raise PageFailed(f"PagerDuty unreachable ({type(exc).__name__})") from None
    if response.status_code != 202:
        raise PageFailed(f"PagerDuty answered {response.status_code} to {action} {dedup_key}")
    return True
