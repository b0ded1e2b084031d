"""Notifications: always the console (the run's log), and SNS when a topic is configured.

The plan publishes to ``dr-success``/``dr-failure`` topics; here one topic carries both,
with a ``status`` message attribute that subscriptions filter on.
"""

from __future__ import annotations

import json
import logging

from wedefi_dr.config import Settings
from wedefi_dr.storage.clients import aws_client

log = logging.getLogger("wedefi_dr.observability.notify")


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
