"""WAL positions and file names, computed as the server does (``xlog_internal.h``).

A position (LSN) is written ``X/Y``: the high and low 32 bits in hex. A segment file's
name is its timeline, then its number split into a "log id" (how many segments fit in
4 GiB) and the segment within it, eight hex digits each. Plain Python only: the
archive_command imports this.
"""

from __future__ import annotations


def lsn_to_int(lsn: str) -> int:
    """``X/Y`` as a byte position."""
    high, low = lsn.split("/")
    return (int(high, 16) << 32) | int(low, 16)


def int_to_lsn(value: int) -> str:
    """A byte position as ``X/Y``."""
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


def _per_log_id(segment_bytes: int) -> int:
    return 0x100000000 // segment_bytes


def segment_number(name: str, segment_bytes: int) -> int:
    """A WAL file's position in segments, on any timeline."""
    return int(name[8:16], 16) * _per_log_id(segment_bytes) + int(name[16:24], 16)


def segment_file(timeline: int, number: int, segment_bytes: int) -> str:
    """The file name of segment ``number`` on ``timeline``."""
    per = _per_log_id(segment_bytes)
    return f"{timeline:08X}{number // per:08X}{number % per:08X}"


def segment_of(timeline: int, lsn: str, segment_bytes: int) -> str:
    """The file holding ``lsn`` on ``timeline``, as ``pg_walfile_name``."""
    return segment_file(timeline, lsn_to_int(lsn) // segment_bytes, segment_bytes)


def segment_end_lsn(name: str, segment_bytes: int) -> int:
    """The position just past the last byte of segment ``name`` (what replay reaches)."""
    return (segment_number(name, segment_bytes) + 1) * segment_bytes


def next_segments(name: str, count: int, segment_bytes: int) -> list[str]:
    """The ``count`` segment names after ``name`` on the same timeline."""
    timeline, number = int(name[:8], 16), segment_number(name, segment_bytes)
    return [segment_file(timeline, n, segment_bytes) for n in range(number + 1, number + 1 + count)]
