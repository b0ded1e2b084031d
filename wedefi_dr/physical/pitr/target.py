"""The recovery target: what the operator asks for, checked before anything is touched.

A time needs a zone, an LSN its ``X/Y`` form, a restore point its name; ``inclusive``
false (the plan) stops just before the target. :meth:`RecoveryTarget.settings` turns the
target into the PostgreSQL 12+ ``recovery_target_*`` settings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime

from wedefi_dr.errors import InvalidInput

TARGET_KINDS = ("time", "lsn", "name", "latest")
LSN_RE = re.compile(r"^[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}$")
# Printable, no backslash: postgresql.auto.conf unescapes backslashes and a newline inside a
# quoted value is a syntax error (the server would refuse to start).
NAME_RE = re.compile(r"^[^\x00-\x1f\x7f\\]+$")


@dataclass(frozen=True)
class RecoveryTarget:
    """What to recover to; ``inclusive`` false (the plan) stops just before the target."""

    kind: str
    value: str = ""
    inclusive: bool = False
    timeline: str = "latest"

    @classmethod
    def parse(
        cls, kind: str, value: str = "", inclusive: bool = False, timeline: str = "latest"
    ) -> RecoveryTarget:
        kind = (kind or "").strip().lower()
        value = (value or "").strip()
        if kind not in TARGET_KINDS:
            raise InvalidInput(f"target kind must be one of {TARGET_KINDS}, not {kind!r}")
        if kind == "time":
            try:
                parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError as exc:
                raise InvalidInput(
                    f"target time {value!r} is not ISO 8601 (e.g. 2026-11-24T14:05:00Z)"
                ) from exc
            if parsed.tzinfo is None:
                raise InvalidInput(f"target time {value!r} needs a time zone (e.g. Z for UTC)")
            value = parsed.astimezone(UTC).isoformat()
        elif kind == "lsn" and not LSN_RE.match(value):
            raise InvalidInput(f"target LSN {value!r} is not of the form 0/5A000028")
        elif kind == "name" and not (0 < len(value) < 64):
            raise InvalidInput("a named restore point needs its name (1-63 characters)")
        elif kind == "name" and not NAME_RE.match(value):
            raise InvalidInput(
                f"restore point name {value!r} has a control character or a backslash: the "
                "server would fail to start on it (newline) or look for another name "
                "(backslash escapes)"
            )
        elif kind == "latest" and value:
            raise InvalidInput("target 'latest' takes no value")
        timeline = (timeline or "latest").strip().lower()
        if timeline not in ("latest", "current") and not timeline.isdigit():
            raise InvalidInput(
                f"timeline must be 'latest', 'current' or a number, not {timeline!r}"
            )
        return cls(kind, value, bool(inclusive), timeline)

    @property
    def time(self) -> datetime | None:
        return datetime.fromisoformat(self.value) if self.kind == "time" else None

    def describe(self) -> str:
        if self.kind == "latest":
            return "latest (end of archived WAL)"
        edge = "inclusive" if self.inclusive else "exclusive"
        return f"{self.kind} {self.value} ({edge}, timeline {self.timeline})"

    def settings(self) -> dict[str, str]:
        """The ``recovery_target_*`` settings (values unquoted)."""
        out: dict[str, str] = {"recovery_target_timeline": self.timeline}
        if self.kind == "latest":
            return out  # no target: replay to the end of the archive, then promote
        out[f"recovery_target_{self.kind}"] = self.value
        out["recovery_target_inclusive"] = "on" if self.inclusive else "off"
        out["recovery_target_action"] = "pause"
        return out
