"""The transport counters' replay window: edge cases, and agreement with a set-based reference."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.engine.wireguard.replay import REJECT_AFTER_MESSAGES, WINDOW_SIZE, ReplayFilter


def test_constants_are_wireguards() -> None:
    assert WINDOW_SIZE == 8128  # wireguard-go: (ringBlocks - 1) * blockBits with 128 blocks of 64 bits
    assert REJECT_AFTER_MESSAGES == 0xFFFFFFFFFFFFFFFF - (1 << 13)


def test_in_order_counters_are_fresh_once() -> None:
    f = ReplayFilter()
    assert all(f.validate(c) for c in range(20000))
    assert not any(f.validate(c) for c in range(20000 - WINDOW_SIZE - 1, 20000))


def test_counter_zero_first_and_after_reset() -> None:
    f = ReplayFilter()
    assert f.validate(0) and not f.validate(0)
    f.reset()
    assert f.validate(0) and f.validate(5) and not f.validate(5)


def test_out_of_order_within_the_window() -> None:
    f = ReplayFilter()
    assert f.validate(100)
    assert f.validate(3) and f.validate(99) and f.validate(0)
    assert not f.validate(3) and not f.validate(100)
    assert f.validate(50) and f.validate(101)


def test_edges_of_the_window() -> None:
    f = ReplayFilter()
    top = 10 * WINDOW_SIZE
    assert f.validate(top)
    assert f.validate(top - WINDOW_SIZE)  # the oldest counter still inside
    assert not f.validate(top - WINDOW_SIZE - 1)  # just outside: too old to tell, refused
    assert not f.validate(top - WINDOW_SIZE)
    assert f.validate(top + 1)  # the window slid by one: top - WINDOW_SIZE is out now
    assert not f.would_accept(top - WINDOW_SIZE)
    assert f.validate(top + 1 - WINDOW_SIZE)


def test_a_huge_jump_forgets_the_old_window() -> None:
    f = ReplayFilter()
    for c in range(10):
        f.validate(c)
    assert f.validate(2**40)
    assert not f.validate(5) and not f.validate(9)  # far behind now
    assert f.validate(2**40 - 1) and not f.validate(2**40)
    assert f.validate(2**40 + WINDOW_SIZE + 1)  # a jump of exactly one more than the window
    assert not f.validate(2**40)
    assert f.validate(2**40 + 1 + 1)  # inside the new window, unseen


def test_the_limit() -> None:
    f = ReplayFilter()
    assert f.validate(REJECT_AFTER_MESSAGES - 1)
    assert not f.validate(REJECT_AFTER_MESSAGES)
    assert not f.validate(2**64 - 1)
    assert not f.validate(-1)
    assert f.validate(REJECT_AFTER_MESSAGES - 2) and not f.validate(REJECT_AFTER_MESSAGES - 1)


def test_would_accept_marks_nothing() -> None:
    f = ReplayFilter()
    assert f.would_accept(7) and f.would_accept(7)
    assert f.validate(7) and not f.would_accept(7)


def test_window_must_be_positive() -> None:
    with pytest.raises(ValueError):
        ReplayFilter(window=0)


# ---------------------------------------------------------------------------------------------
# Against a reference: fresh iff below the limit, never seen, and no further than the window below
# the highest counter accepted so far.


class Reference:
    def __init__(self, window: int, limit: int) -> None:
        self.window, self.limit, self.seen = window, limit, set()

    def validate(self, counter: int) -> bool:
        top = max(self.seen, default=0)
        if counter >= self.limit or counter in self.seen or top - counter > self.window:
            return False
        self.seen.add(counter)
        return True


class WireGuardGoRing:
    """wireguard-go's replay.Filter.ValidateCounter, transcribed: 128 blocks of 64 bits in a ring."""

    def __init__(self) -> None:
        self.last, self.ring = 0, [0] * 128

    def validate(self, counter: int) -> bool:
        if counter >= REJECT_AFTER_MESSAGES:
            return False
        index = counter >> 6
        if counter > self.last:
            current = self.last >> 6
            for i in range(current + 1, current + min(index - current, 128) + 1):
                self.ring[i & 127] = 0
            self.last = counter
        elif self.last - counter > (128 - 1) * 64:
            return False
        old = self.ring[index & 127]
        self.ring[index & 127] = old | 1 << (counter & 63)
        return self.ring[index & 127] != old


def _counters(base: int, span: int) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(0, span).map(lambda n: base + n), max_size=120)


@settings(max_examples=300)
@given(st.sampled_from([1, 2, 63, 64, 65, 200]), st.integers(0, 2**64 - 1000), st.data())
def test_small_windows_match_the_reference(window: int, base: int, data: st.DataObject) -> None:
    limit = base + data.draw(st.integers(0, 600))
    f, ref = ReplayFilter(window, limit), Reference(window, limit)
    if base:  # start with the window already up at base, the reference too
        assert f.validate(base) == ref.validate(base)
    for counter in data.draw(_counters(base, 700)):
        assert f.validate(counter) == ref.validate(counter), counter


@settings(max_examples=100)
@given(st.lists(st.one_of(st.integers(0, 3 * WINDOW_SIZE), st.integers(0, 40).map(lambda n: n * 64 + 63),
                          st.integers(0, 200).map(lambda n: n * 64),
                          st.integers(REJECT_AFTER_MESSAGES - 3 * WINDOW_SIZE, 2**64 - 1)), max_size=200))
def test_default_window_matches_the_reference_and_wireguard_go(counters: list[int]) -> None:
    f, ref, go = ReplayFilter(), Reference(WINDOW_SIZE, REJECT_AFTER_MESSAGES), WireGuardGoRing()
    for counter in counters:
        assert f.validate(counter) == ref.validate(counter) == go.validate(counter), counter
