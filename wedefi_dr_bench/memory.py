"""Peak memory of the bench process and of every process it starts, per phase.

The flows run in this process and start ``pg_dump``, ``gpg`` and ``pg_restore`` as
children, so the RSS of the whole process tree, split by kind, is what compares with the
bare tools. Read from ``/proc``: Linux only, like the stack.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SAMPLE_SECONDS = 0.2
SELF_KIND = "python (bench)"
TOOL_KINDS = ("pg_dump", "gpg", "pg_restore")


def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, comm) for every process we can see in /proc."""
    table: dict[int, tuple[int, str]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            raw = Path(entry.path, "stat").read_text()
        except OSError:  # the process exited while we walked
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        head, _, rest = raw.rpartition(")")
        comm = head.partition("(")[2]
        fields = rest.split()
        table[int(entry.name)] = (int(fields[1]), comm)
    return table


def _descendants(root: int, table: dict[int, tuple[int, str]]) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _vm_rss(pid: int) -> int:
    """Resident set size in bytes (0 when the process is gone or is a zombie)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


FRESH_MEMORY_BYTES = 3 << 29  # 1.5 GiB: above a base backup's tar, below dirty writeback's start
_FILL_CHUNK = 1 << 20


def back_free_memory(folder: Path, nbytes: int = FRESH_MEMORY_BYTES) -> float:
    """Write ``nbytes`` to a scratch file in ``folder`` and delete it; returns the seconds.

    This host is a VM that takes back memory nobody touched for a while (``kdamond``
    runs DAMON's ``pageout`` scheme), and the next gigabyte written to files pays for
    it: ``dd`` of 1.1 GB took 2.0 s after a quiet minute and 0.23 s right after a file as
    big was written and deleted. A restore that extracts a base backup is such a write, so
    whichever restore or replay ran first after a pause paid ~1.8 s per GB that the others
    did not (one zstd extract took 4.6 s, the same extract later 1.8 s). Called before
    each timed replay, ours and ``cp``'s, so each starts from the same state (the restores
    run in rounds instead, back to back: ``physical.restores``). The logical restores do
    not need it: a 1 GB ``pg_restore`` took 14.8 s after a quiet minute and 15.2-15.5 s
    after this (its writes go through shared buffers, at the pace of the CPU-bound
    server)."""
    started = time.monotonic()
    scratch = folder / ".fresh-memory"
    block = bytes(_FILL_CHUNK)
    try:
        with open(scratch, "wb") as f:
            for _ in range(nbytes // _FILL_CHUNK):
                f.write(block)
    finally:
        scratch.unlink(missing_ok=True)
    return round(time.monotonic() - started, 2)


def _cmdline(pid: int) -> str:
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return ""


def _kind(pid: int, comm: str, root: int) -> str | None:
    """Which column a process counts in; None for processes that are not the project's.

    PostgreSQL servers and the moto S3 server are infrastructure (they are not children
    of this process anyway; the check only guards against a stack started from here).
    """
    if pid == root:
        return SELF_KIND
    if comm in TOOL_KINDS:
        return comm
    if comm.startswith("postgres"):
        return None
    cmdline = _cmdline(pid)
    if "moto" in cmdline:
        return None
    if "prefect" in cmdline:
        return "prefect server"
    return comm


def rss_by_kind(root: int | None = None) -> dict[str, int]:
    """Summed VmRSS of ``root`` (default: this process) and its descendants, per kind."""
    root = root or os.getpid()
    table = _proc_table()
    usage: dict[str, int] = {SELF_KIND: _vm_rss(root)}
    for pid in _descendants(root, table):
        kind = _kind(pid, table[pid][1], root)
        if kind is not None:
            usage[kind] = usage.get(kind, 0) + _vm_rss(pid)
    return usage


class RssSampler(threading.Thread):
    """Samples :func:`rss_by_kind` every 0.2 s and keeps the peak of each kind per phase.

    Peaks of short-lived children can fall between two samples; the tools' memory is
    steady while they stream, so 0.2 s is enough to see it.
    """

    def __init__(self, interval: float = SAMPLE_SECONDS) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.interval = interval
        self.phase: str | None = None
        self.peaks: dict[str, dict[str, int]] = {}
        self.samples = 0
        self._lock = threading.Lock()
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            self.sample()

    def sample(self) -> dict[str, int]:
        usage = rss_by_kind()
        with self._lock:
            self.samples += 1
            if self.phase is not None:
                peaks = self.peaks.setdefault(self.phase, {})
                for kind, rss in usage.items():
                    peaks[kind] = max(peaks.get(kind, 0), rss)
        return usage

    @contextmanager
    def measuring(self, phase: str) -> Iterator[None]:
        with self._lock:
            self.phase = phase
        self.sample()
        try:
            yield
        finally:
            self.sample()
            with self._lock:
                self.phase = None

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)

    def peak_over(self, phases: tuple[str, ...]) -> dict[str, int]:
        """The highest RSS of each kind over several phases (the 'bare' or 'flow' variant)."""
        result: dict[str, int] = {}
        for phase in phases:
            for kind, rss in self.peaks.get(phase, {}).items():
                result[kind] = max(result.get(kind, 0), rss)
        return result
