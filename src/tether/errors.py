"""Errors that reach the user as one message plus, when we know it, how to fix the cause."""

from __future__ import annotations


class TetherError(Exception):
    """A failure the user can act on: ``str()`` says what failed, ``hint`` how to fix it."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint
