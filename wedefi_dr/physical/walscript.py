"""What the server's WAL command scripts share: WAL file names, their env file, file records.

``archive_command`` (``archiver_handoff.py``) and ``restore_command`` (``prefetch.py``) are
executed by the server as ``python -I -S FILE``, once per file, while it waits: no
site-packages, no package on the path, and every import is paid on every call (``re`` alone
was 7–8 ms of a call here). So this module uses only ``os``; the scripts load it from beside
them (their directory appended to ``sys.path``, after the standard library's), the package
imports it as ``wedefi_dr.physical.walscript``.

A *file record* names one file as the kernel knows it: the boot, inode, size, modification
and change times. A process that verified a file's contents (the prefetcher, against the
archive's authenticated checksums; the archiver, by storing exactly what it read) records
it, and a script that finds the same record later knows the file is the one verified
without reading 16 MB again. Only the server's OS user can write ``pg_wal``; any write,
rename or ``utime`` of the file changes its change time, and a reboot its boot id.
"""

from __future__ import annotations

import os

HEX_UPPER = frozenset("0123456789ABCDEF")
BOOT_ID = "/proc/sys/kernel/random/boot_id"


def _hex(text: str, length: int) -> bool:
    return len(text) == length and HEX_UPPER.issuperset(text)


def is_segment(name: str) -> bool:
    """A WAL segment's file name (24 upper-case hex digits)."""
    return _hex(name, 24)


def is_wal_name(name: str) -> bool:
    """A name the server archives or asks for: a segment, a segment's ``.partial`` or
    ``.backup`` label, or a timeline's ``.history``."""
    if is_segment(name):
        return True
    head, dot, tail = name.partition(".")
    if _hex(head, 8):
        return tail == "history"
    if not _hex(head, 24):
        return False
    if tail == "partial":
        return True
    label, dot, kind = tail.partition(".")
    return bool(dot) and _hex(label, 8) and kind == "backup"


def read_env(path: str) -> dict[str, str]:
    """``KEY=VALUE`` lines of the env file: the scripts read only their own switches."""
    values = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                key, value = line.split("=", 1)
                values[key.strip()] = value
    return values


def unlink(path: str) -> None:
    """``os.unlink``, quiet when the file is gone (``contextlib`` would add to the start-up)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return


def boot_id() -> str:
    try:
        with open(BOOT_ID) as f:
            return f.read().strip()
    except OSError:
        return "unknown"


def file_record(st: os.stat_result) -> str:
    """The record of the file ``st`` describes, in this boot (see the module docstring)."""
    return f"{boot_id()} {st.st_ino} {st.st_size} {st.st_mtime_ns} {st.st_ctime_ns}"
