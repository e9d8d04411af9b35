"""The WireGuard engine: a userspace WireGuard peer between the sandbox's tun and a host UDP socket.

The protocol lives in sans-IO modules (``crypto``: the primitives, ``noise``: the handshake, cookies
and transport framing, plus the config, key, routing, replay and timer modules beside them); the
shell that owns the tun and the socket only moves bytes and events between them.
"""
