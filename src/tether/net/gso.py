"""Grouping datagrams for UDP generic segmentation offload (sans-IO).

Theory of operation
-------------------
With GSO the kernel takes one buffer and one *segment size* S and cuts the buffer into datagrams
of S bytes (the last may be shorter) as late as possible: one pass through routing, netfilter and
the device for what would otherwise be dozens.  ``sendmsg`` with ``UDP_SEGMENT`` does this for a
UDP socket; a tun opened with a virtio-net header accepts the same thing as one "super packet".
At 1 Gbit/s of 1400-byte datagrams the per-datagram path is most of the relay's cost, so the UDP
relay hands every batch it drained from one socket to :func:`runs`, which splits it into the
longest stretches the kernel can segment back into exactly the same datagrams:

* every datagram of a run has the run's first size, except the last, which may be shorter (a
  shorter datagram therefore ends a run);
* a run holds at most ``max_segments`` datagrams and ``max_bytes`` bytes (the kernel's limits:
  UDP_MAX_SEGMENTS, and one IP packet's payload);
* datagrams larger than ``max_segment`` (what the path's MTU allows, or 0 when the device cannot
  segment at all) travel alone.

Order is kept, and a run of one is sent the ordinary way, so grouping never changes what the
receiver sees: the same datagrams, in the same order.
"""

from __future__ import annotations

from collections.abc import Sequence

MAX_SEGMENTS = 64  # UDP_MAX_SEGMENTS of every kernel with UDP GSO (later kernels allow more)
MAX_BYTES = 65507  # UDP payload of one IPv4 packet; the IPv6 limit (65527) is larger


def runs(datagrams: Sequence[bytes], max_segment: int, max_segments: int = MAX_SEGMENTS,
         max_bytes: int = MAX_BYTES) -> list[list[bytes]]:
    """Split ``datagrams`` (in order) into runs the kernel can segment: see the module docstring."""
    if max_segments < 1 or max_bytes < 1:
        raise ValueError("max_segments and max_bytes must be positive")
    count = len(datagrams)
    if 1 < count <= max_segments:  # the usual batch, one run: checked with C-level loops only
        sizes = list(map(len, datagrams))
        first = sizes[0]
        if (0 < first <= max_segment and sizes[-1] <= first and sum(sizes) <= max_bytes
                and min(sizes[:-1]) == first == max(sizes[:-1]) and sizes[-1] > 0):
            return [list(datagrams)]
    out: list[list[bytes]] = []
    current: list[bytes] = []
    size = total = 0
    for datagram in datagrams:
        n = len(datagram)
        if current and (n > size or len(current) >= max_segments or total + n > max_bytes
                        or len(current[-1]) < size):
            out.append(current)
            current = []
        if not current:
            current, size, total = [datagram], n, n
            if not 0 < n <= max_segment:  # too big to segment (or empty): alone
                out.append(current)
                current = []
            continue
        current.append(datagram)
        total += n
    if current:
        out.append(current)
    return out
