"""Daemon mode: ``tether serve`` gives containers started by someone else (runc, crun, podman) their
network.  See ``server`` for the theory of operation."""
