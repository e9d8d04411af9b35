"""Reading a small text file that a user hands tether (the daemon's config, a wg-quick file).

One place decides what is wrong with such a file before its parser sees it: unreadable, too large
to be what it claims (``/dev/zero`` must not hang us), or not UTF-8 (with the line and byte where
it stops being so).  Each caller turns ``TextFileError`` into its own problem report.
"""

from __future__ import annotations

import os


class TextFileError(Exception):
    """What is wrong with the file; ``line`` when it can be pointed at."""

    def __init__(self, line: int | None, message: str) -> None:
        super().__init__(message)
        self.line, self.message = line, message


def read_text(path: str | os.PathLike[str], limit: int, kind: str) -> str:
    """The UTF-8 text of ``path`` (at most ``limit`` bytes; ``kind`` names what it should be)."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise TextFileError(None, f"cannot read: {e.strerror or e}") from None
    if len(data) > limit:
        raise TextFileError(None, f"larger than {limit} bytes: not {kind}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise TextFileError(line, f"not UTF-8: byte 0x{data[e.start]:02x} at offset {e.start} ({e.reason})") from None
