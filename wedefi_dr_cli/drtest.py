"""``wedefi-dr`` commands of the drtest area (registered by cli.py).

Imports of Prefect, Great Expectations and the flows stay inside the command functions,
so that ``wedefi-dr --help`` and the fast commands start in a fraction of a second.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console

err = Console(stderr=True)
DAMAGE_HELP = "drills only: delete_wallets, orphan_balance, remove_price_day (repeatable)"


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    """Add this area's commands to ``app`` and its benchmark to ``bench_app``."""
    dr_app = typer.Typer(no_args_is_help=True, help="The monthly DR test.")
    app.add_typer(dr_app, name="dr-test")

    @dr_app.command("run")
    def dr_test_run(
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
    ) -> None:
        """Restore → validate → smoke → benchmark → report → notify → metrics → teardown."""
        from wedefi_dr.config import apply_prefect_run_defaults, get_settings
        from wedefi_dr.errors import DRError

        apply_prefect_run_defaults()
        from flows.dr_test import DRTestFailed, dr_test

        try:
            result = dr_test(
                backup_id=backup_id,
                random_within_days=random_within_days,
                provider=provider,
                target_dsn=target_dsn,
                operator=operator or get_settings().operator,
                justification=justification,
                keep_environment=keep_environment,
                drill_damage=damage or None,
            )
        except DRTestFailed as exc:
            err.print(f"[bold red]DR test failed[/]: {exc}")
            raise typer.Exit(1) from exc
        except (DRError, ValueError) as exc:
            err.print(f"[bold red]error[/] ({type(exc).__name__}): {exc}")
            raise typer.Exit(2) from exc
        print(json.dumps(result, indent=2, default=str))

    @dr_app.command("teardown")
    def dr_test_teardown(
        name: Annotated[str, typer.Argument(help="the environment (run) name, e.g. dr-2026...")],
    ) -> None:
        """Remove a local DR environment that was kept (keep_environment, or an errored run)."""
        from tasks.dr_test import env_dir
        from wedefi_dr.config import get_settings
        from wedefi_dr.drtest.environments import DREnvironment, LocalClusterProvider

        settings = get_settings()
        home = env_dir(settings) / name
        if not (home / "data").exists():
            err.print(f"[bold red]error[/]: no local DR environment {name} under {home.parent}")
            raise typer.Exit(2)
        provider = LocalClusterProvider(env_dir(settings), settings.dr_app_role)
        env = DREnvironment(
            provider="local",
            name=name,
            admin_dsn="",
            app_role=settings.dr_app_role,
            home=str(home),
        )
        provider.teardown(env)
        err.print(f"removed {home}")

    @bench_app.command("dr-test")
    def bench_dr_test(
        backup_id: Annotated[str, typer.Argument(help="a backup id, or 'latest'")] = "latest",
    ) -> None:
        """One DR test, printing the split: restore / validate / smoke / benchmark seconds."""
        from wedefi_dr.config import apply_prefect_run_defaults

        apply_prefect_run_defaults()
        from flows.dr_test import dr_test

        result = dr_test(backup_id=backup_id, operator="bench", justification="DR test benchmark")
        split = {s["key"]: round(s["seconds"], 2) for s in result["steps"] if s["seconds"]}
        print(
            json.dumps(
                {
                    "rto_seconds": result["rto_seconds"],
                    "split_seconds": split,
                    "validate_split_seconds": result["validation_seconds"],
                    "report": result["report_html"],
                },
                indent=2,
            )
        )
