"""Unit tests for tether.ns.holder.exit_code: the shell convention for a child's wait status.

Statuses come from real child processes (fork, then ``os._exit`` or a signal sent by the
parent), and, for the cases a test cannot produce cheaply (a core dump), from status words
built the way the kernel builds them.  The rest of the holder runs as pid 1 of a sandbox and is
covered by the integration tests.
"""

from __future__ import annotations

import os
import signal

import pytest

from tether.ns.holder import FORWARDED_SIGNALS, exit_code


def _child_status(body) -> int:
    """Fork; the child runs ``body`` and must never return into pytest."""
    pid = os.fork()
    if pid == 0:
        try:
            body()
        finally:
            os._exit(99)
    _, status = os.waitpid(pid, 0)
    return status


def _killed_child_status(sig: signal.Signals) -> int:
    """A child that resets ``sig`` to its default action, says so over a pipe, then waits to be killed."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            if sig not in (signal.SIGKILL, signal.SIGSTOP):
                signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, set())
            os.write(w, b"r")
            while True:
                signal.pause()
        finally:
            os._exit(99)
    os.close(w)
    try:
        assert os.read(r, 1) == b"r"
    finally:
        os.close(r)
    os.kill(pid, sig)
    _, status = os.waitpid(pid, 0)
    return status


EXITS = [0, 1, 3, 42, 126, 127, 128, 255]


@pytest.mark.parametrize("code", EXITS, ids=[f"exit-{c}" for c in EXITS])
def test_exit_code_of_normal_exit(code):
    status = _child_status(lambda: os._exit(code))
    assert os.WIFEXITED(status)
    assert exit_code(status) == code


def test_exit_status_wraps_at_256():
    status = _child_status(lambda: os._exit(256 + 3))
    assert exit_code(status) == 3


SIGNALS = [signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2,
           signal.SIGPIPE, signal.SIGALRM]


@pytest.mark.parametrize("sig", SIGNALS, ids=[s.name for s in SIGNALS])
def test_exit_code_of_death_by_signal_is_128_plus_n(sig):
    status = _killed_child_status(sig)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == sig
    assert exit_code(status) == 128 + sig


def test_well_known_values():
    assert exit_code(_killed_child_status(signal.SIGKILL)) == 137
    assert exit_code(_killed_child_status(signal.SIGTERM)) == 143
    assert exit_code(_killed_child_status(signal.SIGINT)) == 130


# Status words as the kernel builds them: exit code in bits 8-15, signal in 0-6, core flag 0x80.
SYNTHETIC = [
    ("exit-0", 0 << 8, 0),
    ("exit-3", 3 << 8, 3),
    ("exit-255", 255 << 8, 255),
    ("SIGKILL", signal.SIGKILL, 137),
    ("SIGSEGV-core-dumped", signal.SIGSEGV | 0x80, 128 + signal.SIGSEGV),
    ("SIGABRT-core-dumped", signal.SIGABRT | 0x80, 134),
    ("SIGQUIT-core-dumped", signal.SIGQUIT | 0x80, 131),
    ("SIGSYS", signal.SIGSYS, 128 + signal.SIGSYS),
    ("realtime-signal-64", 64, 192),
]


@pytest.mark.parametrize("status,expected", [c[1:] for c in SYNTHETIC], ids=[c[0] for c in SYNTHETIC])
def test_exit_code_of_status_words(status, expected):
    assert exit_code(status) == expected


def test_forwarded_signals_are_the_documented_set():
    assert set(FORWARDED_SIGNALS) == {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT,
                                      signal.SIGUSR1, signal.SIGUSR2}
    # never SIGKILL/SIGSTOP (cannot be caught) nor SIGCHLD (the holder's own reaping wakeup)
    assert not {signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD} & set(FORWARDED_SIGNALS)
