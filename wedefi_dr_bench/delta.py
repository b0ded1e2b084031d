"""``wedefi-dr bench delta``: the delta restore against a full staging of the same backup.

One base backup of a cluster of the bench's own (pgbench's tables at ``scale``), then,
``rounds`` times: a full staging (download, decrypt, extract, ``pg_verifybackup``) into an
empty directory; a delta restore into that same directory with nothing changed; and a
delta restore after one page of every ``changed_every``-th relation file was flipped. The
best of the rounds is reported, with the ratios delta ÷ full (the same backup, the same
run; figures of a loaded host move from round to round).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from wedefi_dr.config import Settings
from wedefi_dr.physical import basebackup
from wedefi_dr.physical.pitr import delta, recovery
from wedefi_dr_bench import pitr as pitr_bench

PAGE = 8192


def _flip_pages(data_dir: Path, every: int) -> int:
    """One byte of the second page of every ``every``-th relation file; how many."""
    files = sorted(
        p for p in (data_dir / "base").rglob("*") if p.is_file() and p.stat().st_size > PAGE
    )
    for path in files[::every]:
        with path.open("r+b") as f:
            f.seek(PAGE)
            byte = f.read(1)
            f.seek(PAGE)
            f.write(bytes([byte[0] ^ 0xFF]))
    return len(files[::every])


def run_bench(
    settings: Settings, *, scale: int = 10, rounds: int = 3, changed_every: int = 10
) -> dict[str, Any]:
    settings.require("gpg_passphrase")
    bench = pitr_bench.prepare(settings)
    try:
        pitr_bench.start_source(bench, scale)
        source = bench.settings.model_copy(
            update={"primary_dsn": SecretStr(bench.src.dsn("postgres"))}
        )
        base = basebackup.take(source, "bench")
        dst, spool = bench.dst, bench.work / "spool"
        runs = []
        for _ in range(rounds):
            t = time.monotonic()
            recovery.stage_base_backup(bench.settings, base, dst, spool).rename(dst.data_dir)
            full = time.monotonic() - t
            t = time.monotonic()
            same = delta.delta_restore(bench.settings, base, dst, spool)
            unchanged = time.monotonic() - t
            flipped = _flip_pages(dst.data_dir, changed_every)
            t = time.monotonic()
            changed = delta.delta_restore(bench.settings, base, dst, spool)
            partly = time.monotonic() - t
            runs.append(
                {
                    "full_stage_s": round(full, 2),
                    "delta_unchanged_s": round(unchanged, 2),
                    "delta_unchanged_written": same["written"],
                    "delta_changed_s": round(partly, 2),
                    "files_changed": flipped,
                    "delta_changed_written": changed["written"],
                    "delta_changed_kept": changed["kept"],
                }
            )
            shutil.rmtree(dst.data_dir)
        best = {key: min(r[key] for r in runs) for key in runs[0] if key.endswith("_s")}
        return {
            "tar_mb": round(base.plaintext_size_bytes / 1e6, 1),
            "stored_mb": round(base.object.size_bytes / 1e6, 1),
            "rounds": runs,
            "best": best,
            "ratio_delta_unchanged_vs_full": round(
                best["delta_unchanged_s"] / best["full_stage_s"], 2
            ),
            "ratio_delta_changed_vs_full": round(best["delta_changed_s"] / best["full_stage_s"], 2),
        }
    finally:
        pitr_bench.cleanup(bench)
