"""The resident half of the WAL stream: ``pg_receivewal`` and the uploader's loop.

Kept apart from :mod:`wedefi_dr.physical.walstream` (what the archive holds and how
recovery reads it), which ``wal-fetch`` imports and which must stay free of libpq
tooling; this module finds and runs the PostgreSQL client.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from psycopg2.extensions import make_dsn, parse_dsn

from wedefi_dr.errors import DRError
from wedefi_dr.physical import wal
from wedefi_dr.physical.walstream import Uploader
from wedefi_dr.postgres.conninfo import ConnTarget
from wedefi_dr.postgres.tools import tool

if TYPE_CHECKING:
    from wedefi_dr.config import Settings

APP_NAME = "wedefi-wal-stream"


class StreamFailed(DRError):
    """pg_receivewal could not be started or stopped streaming; its words follow."""


def _target(conninfo: str) -> ConnTarget:
    """The stream's connection, named ``wedefi-wal-stream`` unless the conninfo names it:
    the name ``synchronous_standby_names`` lists to make the primary wait for it."""
    if "application_name" not in parse_dsn(conninfo):
        conninfo = make_dsn(conninfo, application_name=APP_NAME)
    return ConnTarget.parse(conninfo, allow_password=True)


def receivewal_argv(conninfo: str, directory: Path, slot: str, *, synchronous: bool) -> list[str]:
    """pg_receivewal's command line: the conninfo without its password (that goes in the
    child's ``PGPASSWORD``, never on a command line ``ps`` shows)."""
    return [
        tool("pg_receivewal"),
        *_target(conninfo).tool_args(),
        "-D",
        str(directory),
        "-S",
        slot,
        "--status-interval=1",
        "--no-password",
        *(["--synchronous"] if synchronous else []),
    ]


def create_slot(conninfo: str, slot: str) -> None:
    """The stream's own physical slot (the server keeps what it has not received)."""
    target = _target(conninfo)
    argv = [tool("pg_receivewal"), *target.tool_args(), "-S", slot]
    result = subprocess.run(
        [*argv, "--create-slot", "--if-not-exists", "--no-password"],
        capture_output=True,
        text=True,
        timeout=60,
        env=target.tool_env(),
    )
    if result.returncode != 0:
        raise StreamFailed(f"pg_receivewal --create-slot {slot}: {result.stderr.strip()[-500:]}")


class WalStream:
    """``pg_receivewal`` plus the uploader, until :meth:`stop` (or a signal in :func:`main`)."""

    def __init__(
        self,
        settings: Settings,
        conninfo: str,
        directory: Path,
        slot: str,
        *,
        synchronous: bool = False,
        interval: float = 1.0,
        log_path: Path | None = None,
    ) -> None:
        self.settings, self.conninfo, self.slot = settings, conninfo, slot
        self.directory = Path(directory)
        self.synchronous, self.interval = synchronous, max(0.2, float(interval))
        self.log_path = log_path
        self.uploader = Uploader(settings, self.directory)
        self.proc: subprocess.Popen | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        create_slot(self.conninfo, self.slot)
        log = self.log_path.open("ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            receivewal_argv(
                self.conninfo,
                self.directory,
                self.slot,
                synchronous=self.synchronous,
            ),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            env=_target(self.conninfo).tool_env(),
        )
        time.sleep(0.3)
        if self.proc.poll() is not None:
            raise StreamFailed(
                f"pg_receivewal exited {self.proc.returncode} at start"
                + (f"; see {self.log_path}" if self.log_path else "")
            )
        self._thread = threading.Thread(target=self._loop, name="wal-stream", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            self.uploader.tick()
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - started)))

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 15) -> None:
        """pg_receivewal ends (SIGINT: it flushes what it has), then one last upload pass."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.uploader.tick()

    def run_forever(self) -> int:
        """The resident process: until SIGTERM/SIGINT or pg_receivewal gives up."""
        self.start()
        done = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: done.set())
        while not done.wait(1.0):
            if not self.alive():
                break
        code = self.proc.returncode if self.proc and self.proc.poll() is not None else 0
        self.stop()
        return code or 0


def main(argv: list[str] | None = None) -> int:
    """``python -I -m wedefi_dr.physical.walreceiver --env-file F --dir D --slot S --conninfo C``
    (what the local stack starts in the background; ``wedefi-dr wal-stream`` in front)."""
    parser = argparse.ArgumentParser(
        prog="wedefi-dr-wal-stream", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--env-file", help="KEY=VALUE settings file (mode 600)")
    parser.add_argument("--dir", required=True, help="pg_receivewal's directory")
    parser.add_argument("--slot", required=True)
    parser.add_argument("--conninfo", required=True, help="password-less; PGPASSFILE has it")
    parser.add_argument("--synchronous", action="store_true")
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--log", help="pg_receivewal's own output")
    args = parser.parse_args(argv)
    if args.env_file:
        wal.load_env_file(args.env_file)
    from wedefi_dr.config import Settings

    settings = Settings()
    settings.require("gpg_passphrase", "bucket")
    stream = WalStream(
        settings,
        args.conninfo,
        Path(args.dir),
        args.slot,
        synchronous=args.synchronous,
        interval=args.interval,
        log_path=Path(args.log) if args.log else None,
    )
    try:
        return stream.run_forever()
    except DRError as exc:
        print(f"wedefi-dr wal-stream: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    os.umask(0o077)
    sys.exit(main())
