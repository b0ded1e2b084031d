"""``wedefi-dr dr-test``: the monthly DR test, and removal of an environment kept for a retry.

The summary answers the three questions of the monthly report: did it pass, where is the
report, and was the RTO within the objective; ``--json`` gives the whole record.
"""

from __future__ import annotations

from typing import Annotated

import typer

from wedefi_dr.errors import InvalidInput
from wedefi_dr_cli.common import err, print_json, ready, require_text, rto_line, run_flow, summarize

app = typer.Typer(no_args_is_help=True, help="The monthly DR test.")
DAMAGE_HELP = "drills only: delete_wallets, orphan_balance, remove_price_day (repeatable)"


def check_request(
    provider: str, target_dsn: str | None, random_within_days: int | None, backup_id: str
) -> None:
    """The refusals that need no server (the flow repeats them, for runs from Prefect)."""
    from wedefi_dr.drtest.environments import PROVIDERS
    from wedefi_dr.postgres.conninfo import refuse_password_in_dsn

    if provider not in PROVIDERS:
        raise InvalidInput(f"unknown DR environment provider {provider!r}: one of {PROVIDERS}")
    if provider == "dsn" and not target_dsn:
        raise InvalidInput("--provider dsn needs --target-dsn (the DR server, no password)")
    if target_dsn:
        if provider != "dsn":
            raise InvalidInput(f"--target-dsn is only for --provider dsn, not {provider!r}")
        refuse_password_in_dsn(target_dsn)
    if random_within_days is not None and (random_within_days < 1 or backup_id != "latest"):
        raise InvalidInput(
            "--random-within-days takes a positive number of days, without a backup id"
        )


@app.command("run")
def run(
    backup_id: Annotated[str, typer.Argument(help="a backup id, or 'latest'")] = "latest",
    random_within_days: Annotated[
        int | None, typer.Option(help="test a random backup of the last N days instead")
    ] = None,
    provider: Annotated[str, typer.Option(help="local | dsn | docker")] = "local",
    target_dsn: Annotated[
        str | None, typer.Option(help="--provider dsn: the DR server (no password)")
    ] = None,
    operator: Annotated[str, typer.Option(help="who runs it (audit log)")] = "",
    justification: Annotated[str, typer.Option(help="why (audit log)")] = "monthly DR test",
    keep_environment: Annotated[bool, typer.Option(help="do not tear down")] = False,
    damage: Annotated[list[str] | None, typer.Option(help=DAMAGE_HELP)] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="print the full record instead of a summary")
    ] = False,
) -> None:
    """Restore → validate → smoke → benchmark → report → notify → metrics → teardown."""
    require_text(justification, "--justification", "why this DR test (audit log)")
    check_request(provider, target_dsn, random_within_days, backup_id)
    settings = ready(
        settings=("primary_dsn", "ops_dsn", "gpg_passphrase"),
        tools=("pg_restore",),
        servers=("primary_dsn", "ops_dsn"),
    )
    flow_run = run_flow(
        "dr_test",
        "dr_test",
        backup_id=backup_id,
        random_within_days=random_within_days,
        provider=provider,
        target_dsn=target_dsn,
        operator=operator or settings.operator,
        justification=justification,
        keep_environment=keep_environment,
        drill_damage=damage or None,
    )
    record = {**flow_run.result, "flow_run_id": flow_run.run_id}
    if as_json:
        print_json(record)
        return
    summarize(
        [
            f"DR test {record['run']} {'PASSED' if record['success'] else 'FAILED'}: "
            f"backup {record['backup_id']} restored, validated, smoke-tested, benchmarked",
            rto_line("DR test RTO", record["rto_seconds"], record["rto_objective_seconds"]),
            f"report: {record['report']} (local copy {record['report_html']})",
        ]
    )


@app.command("teardown")
def teardown(
    name: Annotated[str, typer.Argument(help="the environment (run) name, e.g. dr-2026...")],
    operator: Annotated[str, typer.Option(help="who removes it (audit log)")] = "",
    justification: Annotated[
        str, typer.Option(help="why (audit log)")
    ] = "remove a kept DR environment",
) -> None:
    """Remove a local DR environment that was kept (keep_environment, or an errored run).

    Only a folder a DR test provisioned (its marker file) directly under the environments
    folder, named by its plain name; anything else is refused before anything is stopped.
    The refusal or the removal is in the audit log.
    """
    from wedefi_dr.drtest.environments import (
        DREnvironment,
        LocalClusterProvider,
        env_dir,
        kept_environment,
    )
    from wedefi_dr.observability import audit

    require_text(justification, "--justification", "why remove it (audit log)")
    settings = ready(settings=("ops_dsn",), servers=("ops_dsn",))
    who = operator or settings.operator
    require_text(who, "--operator", "who removes it (audit log)")
    ops = settings.ops_dsn.get_secret_value()
    audit_id = audit.recovery_started(
        ops,
        recovery_type="dr_teardown",
        backup_id=None,
        target=f"local:{name}"[:300],
        operator=who,
        justification=justification,
    )
    try:
        home = kept_environment(env_dir(settings), name)
    except InvalidInput as exc:
        audit.recovery_finished(ops, audit_id, status="refused", error=audit.scrub(str(exc)))
        raise
    provider = LocalClusterProvider(env_dir(settings), settings.dr_app_role)
    env = DREnvironment(
        provider="local",
        name=name,
        admin_dsn="",
        app_role=settings.dr_app_role,
        home=str(home),
    )
    try:
        provider.teardown(env)
    except Exception as exc:
        audit.recovery_finished(
            ops, audit_id, status="failed", error=audit.scrub(f"{type(exc).__name__}: {exc}")
        )
        raise
    audit.recovery_finished(ops, audit_id, status="success")
    err.print(f"removed {home}")
