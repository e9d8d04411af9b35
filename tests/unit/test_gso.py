"""Unit tests for tether.net.gso: splitting a batch of datagrams into runs the kernel can segment.

What must hold for every input (hypothesis): the runs, concatenated, are the input (same
datagrams, same order, nothing merged); every run obeys the kernel's rules (all but the last of
the first one's size, the last not longer, at most ``max_segments`` datagrams and ``max_bytes``
bytes; alone when empty or larger than ``max_segment``); and no two neighbouring runs could have
been one (a split only where a rule demands it).  Examples pin the shapes the relay meets:
iperf3's equal datagrams, a short tail, a path that segments nothing.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tether.net.gso import MAX_BYTES, MAX_SEGMENTS, runs


def ok_run(run: list[bytes], max_segment: int, max_segments: int, max_bytes: int) -> bool:
    if len(run) == 1:
        return True
    size = len(run[0])
    return (0 < size <= max_segment and len(run) <= max_segments and sum(map(len, run)) <= max_bytes
            and all(len(d) == size for d in run[:-1]) and len(run[-1]) <= size)


def mergeable(run: list[bytes], nxt: bytes, max_segment: int, max_segments: int, max_bytes: int) -> bool:
    return ok_run(run + [nxt], max_segment, max_segments, max_bytes)


sizes = st.one_of(st.sampled_from([0, 1, 1400, 1472, 9000, 65507]), st.integers(0, 3000))
batches = st.lists(sizes, max_size=200).map(lambda ns: [bytes([i % 256]) * n for i, n in enumerate(ns)])


@given(batches, st.integers(0, 70000), st.integers(1, 130), st.integers(1, 70000))
def test_runs_keep_every_datagram_and_obey_the_kernel(datagrams, max_segment, max_segments, max_bytes):
    out = runs(datagrams, max_segment, max_segments, max_bytes)
    assert [d for run in out for d in run] == datagrams
    assert all(run for run in out), "no empty run"
    for run in out:
        assert ok_run(run, max_segment, max_segments, max_bytes), [len(d) for d in run]
    for run, nxt in zip(out, out[1:]):
        assert not mergeable(run, nxt[0], max_segment, max_segments, max_bytes), \
            f"split without a reason: {[len(d) for d in run]} | {len(nxt[0])}"


def shape(out: list[list[bytes]]) -> list[tuple[int, int]]:
    return [(len(run), len(run[0])) for run in out]


def test_iperf_like_equal_datagrams_fill_ipv4_packets():
    out = runs([b"x" * 1400] * 100, 65507)
    assert shape(out) == [(46, 1400), (46, 1400), (8, 1400)]  # 46 * 1400 = 64400 <= 65507 < 47 * 1400


def test_small_datagrams_stop_at_max_segments():
    assert shape(runs([b"a"] * 130, 65507)) == [(MAX_SEGMENTS, 1), (MAX_SEGMENTS, 1), (2, 1)]


def test_short_datagram_ends_a_run_and_a_longer_one_starts_the_next():
    out = runs([b"a" * 10, b"b" * 10, b"c" * 4, b"d" * 10, b"e" * 12, b"f" * 12], 65507)
    assert [[len(d) for d in run] for run in out] == [[10, 10, 4], [10], [12, 12]]


@pytest.mark.parametrize("max_segment, expect", [
    (0, [[1400], [1400], [1400]]),          # the path segments nothing (no checksum offload)
    (1399, [[1400], [1400], [1400]]),       # the MTU is below this size
    (1400, [[1400, 1400, 1400]]),
], ids=["no-gso", "over-limit", "at-limit"])
def test_max_segment(max_segment, expect):
    assert [[len(d) for d in run] for run in runs([b"x" * 1400] * 3, max_segment)] == expect


def test_empty_datagrams_travel_alone():
    assert [[len(d) for d in run] for run in runs([b"", b"", b"x", b"x"], 100)] == [[0], [0], [1, 1]]


def test_nothing_in_nothing_out():
    assert runs([], 65507) == []


def test_defaults_are_the_kernel_limits():
    assert (MAX_SEGMENTS, MAX_BYTES) == (64, 65507)


@pytest.mark.parametrize("kw", [{"max_segments": 0}, {"max_bytes": 0}], ids=["no-segments", "no-bytes"])
def test_bad_limits(kw):
    with pytest.raises(ValueError, match="must be positive"):
        runs([b"x"], 100, **kw)
