"""WAL names and timeline histories computed as the server does (no server needed)."""

from __future__ import annotations

from wedefi_dr.physical import rejoin, walnames

SEG = 16 * 2**20


def test_names_and_positions_round_trip_across_a_log_id():
    name = walnames.segment_of(2, "1/FF000028", SEG)
    assert name == "0000000200000001000000FF"
    assert walnames.next_segments(name, 2, SEG) == [
        "000000020000000200000000",
        "000000020000000200000001",
    ]
    assert walnames.int_to_lsn(walnames.segment_end_lsn(name, SEG)) == "2/0"
    assert walnames.lsn_to_int("2/0") == 2 * 2**32


def test_the_file_replay_reads_follows_the_history_past_a_skipped_timeline():
    """Timeline 4 came from 3, which came from 1 (2 was another branch): the segment where
    a timeline began is read under that timeline, never under its parent's divergent copy."""
    history = "1\t0/90000A0\tno recovery target specified\n3\t0/B000000\tbefore 2026\n"
    begins = rejoin.timeline_begins(history, 4)
    assert begins == {1: 0, 3: 0x90000A0, 4: 0xB000000}
    assert [rejoin.segment_timeline(begins, n, SEG) for n in (8, 9, 10, 11, 12)] == [1, 3, 3, 4, 4]
    assert rejoin.timeline_begins("", 1) == {1: 0}
