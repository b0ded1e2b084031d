"""``wedefi-dr verify [--deep]``: the repository (primary and DR) checked without restoring."""

from __future__ import annotations

from typing import Annotated

import typer

from wedefi_dr.errors import IntegrityError
from wedefi_dr_cli.common import print_json, ready, summarize


def verify(
    deep: Annotated[
        bool, typer.Option("--deep", help="also decrypt every object end to end")
    ] = False,
    region: Annotated[
        list[str] | None,
        typer.Option(help="primary and/or dr (default: every copy the repository has)"),
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="the full report on stdout")] = False,
) -> None:
    """Every object present, authentic and matching its checksum; WAL continuous from each
    base backup (gaps and timeline breaks named); what each backup can restore to. Exit 1
    when anything is wrong."""
    from wedefi_dr.errors import InvalidInput
    from wedefi_dr.lifecycle.verify import verify as run_verify

    regions = tuple(region) if region else None
    unknown = [r for r in regions or () if r not in ("primary", "dr")]
    if unknown:
        raise InvalidInput(f"--region must be primary or dr, not {', '.join(unknown)}")
    settings = ready(settings=("gpg_passphrase",))
    reports = run_verify(settings, deep=deep, regions=regions)
    if json_out:
        print_json(reports)
    else:
        for r in reports:
            lines = [f"{r['region']}: {r['location']} — {r['objects']} objects checked"]
            for b in r["restorable"]:
                if not b["restorable"]:
                    lines.append(f"  {b['kind']} {b['backup_id']}: NOT restorable")
                elif b["kind"] == "logical":
                    lines.append(f"  logical {b['backup_id']}: restorable to {b['to_time']}")
                else:
                    lines.append(
                        f"  base {b['backup_id']}: restorable from {b['from']} to "
                        f"{b['to_time']} (WAL {b['to_wal']}, LSN {b['to_lsn']})"
                    )
            lines += [f"  PROBLEM {p}" for p in r["problems"]]
            summarize(lines)
    problems = sum(len(r["problems"]) for r in reports)
    if problems:
        raise IntegrityError(f"verify found {problems} problem(s) (listed above)")
