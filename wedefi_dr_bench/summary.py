"""The one table of ``wedefi-dr bench``: every figure beside its reference, and the ratio.

The logical and physical reports keep every figure (``--json``); this table picks the ones
the targets are stated in, so a run is read at a glance: what this project took, what the
reference (bare tools, pgBackRest, ``cp``, ``/bin/true``) took on the same host in the
same run, and the ratio between them.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def _get(report: dict[str, Any], *path: str) -> Any:
    for key in path:
        if not isinstance(report, dict) or key not in report:
            return None
        report = report[key]
    return report


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.3f}{unit}" if value < 10 else f"{value:,.1f}{unit}"
    return f"{value}{unit}"


# The logical ratios whose spread over several runs (``wedefi-dr bench --rounds N``) the
# table shows.
ROUNDED_RATIOS = (
    ("backup_flow_vs_bare_pg_dump_gpg", "logical backup ÷ bare"),
    ("backup_flow_to_completed_vs_bare_pg_dump_gpg", "same until the run is Completed"),
    ("restore_flow_vs_bare_pg_restore", "logical restore, verified ÷ bare"),
    ("restore_flow_without_verify_vs_bare_pg_restore", "same without the proof"),
    ("restore_flow_vs_bare_pg_restore_jobs", "logical restore, verified ÷ bare --jobs"),
    (
        "restore_flow_to_completed_vs_bare_pg_restore_jobs",
        "same until the run is Completed ÷ bare --jobs",
    ),
)


def rows(report: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(figure, this project, reference, ratio) for each figure present in ``report``."""
    out: list[tuple[str, str, str, str]] = []
    lg = report.get("logical")
    if lg:
        t, r = lg["times_seconds"], lg["ratios"]
        out += [
            (
                "logical backup (flow ÷ bare pg_dump | gpg)",
                _fmt(t.get("flow_backup"), " s"),
                _fmt(t.get("bare_pg_dump_gpg"), " s"),
                _fmt(r.get("backup_flow_vs_bare_pg_dump_gpg")),
            ),
            (
                "logical backup, until the run is Completed (÷ bare pg_dump | gpg)",
                _fmt(t.get("flow_backup_to_completed"), " s"),
                _fmt(t.get("bare_pg_dump_gpg"), " s"),
                _fmt(r.get("backup_flow_to_completed_vs_bare_pg_dump_gpg")),
            ),
            (
                "logical restore, verified (flow ÷ bare pg_restore)",
                _fmt(t.get("flow_restore"), " s"),
                _fmt(t.get("bare_pg_restore"), " s"),
                _fmt(r.get("restore_flow_vs_bare_pg_restore")),
            ),
            (
                "logical restore, verified (flow ÷ bare pg_restore --jobs)",
                _fmt(t.get("flow_restore"), " s"),
                _fmt(t.get("bare_pg_restore_jobs"), " s"),
                _fmt(r.get("restore_flow_vs_bare_pg_restore_jobs")),
            ),
            (
                "logical restore, verified, until the run is Completed (÷ bare --jobs)",
                _fmt(t.get("flow_restore_to_completed"), " s"),
                _fmt(t.get("bare_pg_restore_jobs"), " s"),
                _fmt(r.get("restore_flow_to_completed_vs_bare_pg_restore_jobs")),
            ),
            (
                "logical backup, posix repo (flow ÷ bare pg_dump | gpg)",
                _fmt(t.get("flow_backup_posix"), " s"),
                _fmt(t.get("bare_pg_dump_gpg"), " s"),
                _fmt(r.get("backup_flow_posix_vs_bare_pg_dump_gpg")),
            ),
            (
                "logical restore, verified, posix repo (flow ÷ bare pg_restore)",
                _fmt(t.get("flow_restore_posix"), " s"),
                _fmt(t.get("bare_pg_restore"), " s"),
                _fmt(r.get("restore_flow_posix_vs_bare_pg_restore")),
            ),
        ]
    for key, what in ROUNDED_RATIOS:
        values = [r[key] for r in (lg or {}).get("rounds", []) if r.get(key) is not None]
        if len(values) > 1:
            out.append(
                (
                    f"{what}: median of {len(values)} runs (lowest–highest)",
                    "",
                    "",
                    f"{lg['ratios_median'][key]:.3f} ({min(values):.2f}–{max(values):.2f})",
                )
            )
    ph = report.get("physical")
    if ph:
        bb, rs = ph.get("base_backup", {}), ph.get("restore", {})
        labels = [(c, f"{c}, to S3") for c in ("zstd", "lz4")]
        labels += [(f"posix_{c}", f"{c}, posix repo") for c in ("zstd", "lz4")]
        for c, what in labels:
            out.append(
                (
                    f"base backup, encrypted ({what}) ÷ pgBackRest full (posix, lz4, aes, 2 proc)",
                    _fmt(bb.get(f"ours_{c}_s"), " s"),
                    _fmt(bb.get("pgbackrest_s"), " s"),
                    _fmt(bb.get(f"ratio_ours_{c}_vs_pgbackrest")),
                )
            )
        for c, what in labels:
            out.append(
                (
                    f"physical restore ({what}, pg_verifybackup incl.) ÷ pgbackrest restore",
                    _fmt(rs.get(f"ours_{c}_stage_verified_s"), " s"),
                    _fmt(rs.get("pgbackrest_restore_s"), " s"),
                    _fmt(rs.get(f"ratio_ours_{c}_vs_pgbackrest")),
                )
            )
        single = ph.get("single_segment", {})
        for kind, what in (
            ("handoff", "one segment, nothing ahead, {}: hand-off ÷ pgbackrest archive-push"),
            ("handoff_posix", "same, {}, into a posix repository (as pgBackRest's)"),
        ):
            for label, key in (("p50", "p50_s"), ("p95", "p95_s")):
                ours, pgbr = _get(single, kind, key), _get(single, "pgbackrest", key)
                out.append(
                    (
                        what.format(label),
                        _fmt(ours, " s"),
                        _fmt(pgbr, " s"),
                        _fmt(ours / pgbr if ours and pgbr else None),
                    )
                )
        out.append(
            (
                "one segment p50: hand-off ÷ cp",
                _fmt(_get(single, "handoff", "p50_s"), " s"),
                _fmt(_get(single, "cp", "p50_s"), " s"),
                _fmt(single.get("ratio_p50_handoff_vs_cp")),
            )
        )
        out.append(
            (
                "one segment p50: synchronous wal-push (fallback) ÷ pgbackrest",
                _fmt(_get(single, "wal_push_sync", "p50_s"), " s"),
                _fmt(_get(single, "pgbackrest", "p50_s"), " s"),
                "-",
            )
        )
        for suffix, where in (("", ""), ("_posix", ", into a posix repository")):
            out.extend(_loaded_rows(ph, suffix, where))
        replay = ph.get("replay", {})
        pre = next((v for k, v in replay.items() if k.startswith("wal_fetch_prefetch")), {})
        out.append(
            (
                "replay MB/s: restore_command (prefetch) ÷ cp of decrypted files",
                _fmt(pre.get("replay_mb_s")),
                _fmt(_get(replay, "bare_cp_local_plaintext", "replay_mb_s")),
                _fmt(replay.get("replay_mb_s_vs_cp")),
            )
        )
        handed = pre.get("handed_over", {})
        out.append(
            (
                "replay: hand-over script per spooled segment p50 / p95 (its log, after start-up)",
                f"{_fmt(handed.get('p50_s'), ' s')} / {_fmt(handed.get('p95_s'), ' s')}",
                f"{handed.get('n', 0)} segments",
                "-",
            )
        )
        for phase, peaks in ph.get("peak_rss_mb", {}).items():
            if isinstance(peaks, dict):
                text = ", ".join(f"{k} {v:.0f} MB" for k, v in sorted(peaks.items()) if v)
            else:
                text = f"{peaks:.0f} MB"
            out.append((f"peak RSS: {phase}", text, "", ""))
        host = ph.get("host", {})
        out.append(
            (
                "load average 1/5/15 before → after (max 1-min during)",
                f"{host.get('loadavg_before')} → {host.get('loadavg_after')}",
                f"max {host.get('loadavg_1min_max_during')}",
                f"{host.get('cpus')} CPUs",
            )
        )
    return out


def _loaded_rows(ph: dict[str, Any], suffix: str, where: str) -> list[tuple[str, str, str, str]]:
    """The pgbench run with the resident archiver (``suffix`` names its repository)."""
    loaded = ph.get(f"pgbench_archiver{suffix}", {})
    if not loaded:
        return []
    wait = loaded.get("server_wait_per_segment", {})
    return [
        (
            f"under pgbench{where}: server's wait per segment p50 / p95",
            f"{_fmt(wait.get('p50_s'), ' s')} / {_fmt(wait.get('p95_s'), ' s')}",
            f"{wait.get('n', 0)} segments",
            "-",
        ),
        (
            f".ready backlog under pgbench{where} (sampled 1/s): max / p95",
            f"{loaded.get('ready_backlog_max', '-')} / {_fmt(loaded.get('ready_backlog_p95'))}",
            "target ≤ 2",
            "-",
        ),
        (
            f"pgbench TPS{where}: resident archiver ÷ archive_command=/bin/true",
            _fmt(loaded.get("tps")),
            _fmt(_get(ph, "pgbench_bin_true", "tps")),
            _fmt(ph.get(f"tps_ratio_archiver{suffix}_vs_bin_true")),
        ),
    ]


def render(report: dict[str, Any], console: Console) -> None:
    """Print the table."""
    table = Table(title="wedefi-dr bench: this project against the reference, one run")
    for column in ("figure", "this project", "reference", "ratio"):
        table.add_column(column, justify="left" if column == "figure" else "right")
    for row in rows(report):
        table.add_row(*row)
    console.print(table)
