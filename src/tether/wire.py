"""The control protocol codec: length-prefixed JSON frames with file descriptors attached (sans-IO).

Rules of this file: no sockets, no fds opened or closed, no clocks; bytes and fd *numbers* in,
messages out.  Everything that decides whether a frame is valid lives here, so every speaker of the
protocol (per-sandbox control socket, ``tether ps``/``ctl``, daemon, attach, OCI hook) accepts and
rejects the same frames with the same error codes.  ``docs/protocol.md`` is the specification; this
file implements it, and ``tests/unit/test_wire.py`` checks that the two list the same error codes.

Theory of operation
-------------------
**Frames.**  A frame is a 4-byte big-endian length N followed by N bytes of UTF-8 JSON that must be
an object; 1 <= N <= ``MAX_FRAME``.  The length is checked as soon as its 4 bytes are buffered, so
a peer announcing a 4 GiB frame is refused before it sends any of it.  The JSON is parsed strictly,
so that no two implementations can read one frame two ways: ``NaN``/``Infinity`` and numbers that
overflow a double (``1e400``) are refused, a duplicate key in an object is refused (parsers differ
on which one wins, a classic smuggling trick), and so is a string holding a lone UTF-16 surrogate
(``"\\ud800"``: valid JSON syntax, but no Unicode character, so it cannot be written back as UTF-8).
Arrays and objects may nest ``MAX_DEPTH`` levels deep, a fixed limit (the parser's own, ~1000,
depends on how deep the caller's stack already is).

**Messages.**  ``"type"`` selects a row of ``MESSAGE_FIELDS``: the required and optional keys of
that type and the check each value must pass.  The table is the whole schema; ``_decode_body`` walks it
and nothing else knows message layouts.  Keys the table does not name are allowed (forward
compatibility: a newer peer may add keys) and are kept in ``Message.raw``.  Ids are integers
1..2**53-1 (exact in every JSON implementation); ``true`` is not an integer here even though Python
thinks so.

**File descriptors.**  A frame carrying fds says so (``"fds": n``), and its sender passes them with
the one ``sendmsg`` that sends the frame.  The kernel (``unix_stream_read_generic``) attaches them
to the frame's first skb and, on the receiving side, hands them out with the first ``recvmsg`` that
reads any byte of that skb, and that ``recvmsg`` stops at the end of the skb at the latest.  It
may, though, return the tail of *earlier* frames first: with frames A (no fds) and B (fds) queued, one
``recvmsg`` returns A's bytes and B's first bytes with B's fds (checked on Linux 6.18).  So the rule
here is: **the fds that came with one ``feed()`` belong to the frame holding the last byte of that
feed's data, and that frame must begin inside that same data.**  Fds arriving in the middle of a
frame (a sender that attached them to a later ``sendmsg`` of the frame) or with no data at all
cannot be placed and are a protocol error.  When a frame is complete, the number of fds it got must
equal its declared ``"fds"``.

The decoder never loses an fd (design principle 5): every fd given to ``feed()`` is either handed
out in exactly one ``Message.fds`` (the caller owns it from then on) or returned by
``take_unclaimed_fds()``, which the connection's owner calls once at teardown and closes what it
gets.  Fds of a frame that fails to decode are never handed out.

**Errors.**  Every malformed input raises ``ProtocolError`` with a stable ``code`` (``ERRORS``) and
a message saying what was wrong and where ("frame 3 (at stream byte 120): ...").  A byte stream
cannot resynchronise after a bad frame, so every codec error is fatal to the connection: the
decoder stays dead and raises the same error again from ``feed``, ``next`` and ``eof``, and the
shell sends an ``error`` with ``id`` null and closes.  Other connections are untouched (the decoder
has no shared state).  Misuse by the caller (``feed`` after ``eof``, anything after
``take_unclaimed_fds``) raises ``RuntimeError``; bad arguments to ``encode`` raise ``ValueError``.
``encode`` validates by decoding what it produced, so it never emits a frame a peer would reject.

Limits: ``MAX_FRAME`` bytes of JSON per frame, ``MAX_FDS`` fds per frame and per ``recvmsg`` (the
shell's ancillary buffer needs ``CMSG_SPACE(4 * MAX_FDS)``; a truncated one (``MSG_CTRUNC``) is the
shell's error to report, fds the kernel dropped never reach this file).  What this file does not
do: the hello-first ordering, version selection per connection and request/response matching are
session state, kept by the shell; ``negotiate`` is the one rule it needs.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

MAX_FRAME: Final = 65536  # bytes of JSON in one frame (the length prefix not counted)
MAX_FDS: Final = 16  # fds per frame and per recvmsg (the kernel's SCM_MAX_FD is 253)
MAX_DEPTH: Final = 64  # nesting of arrays/objects, the frame's own object being level 1
MAX_ID: Final = 2**53 - 1  # largest id: exact as a double, so safe in every JSON implementation
PROTOCOL_VERSIONS: Final = (1,)  # what this build speaks; a new version is appended, never replaced
LENGTH_PREFIX: Final = 4
_LENGTH = struct.Struct("!I")
_COMPACT_AFTER = 65536  # consumed bytes kept at the front of the buffer before it is compacted

# ---------------------------------------------------------------------------------------------
# Error codes (stable: peers and scripts match on them; docs/protocol.md has the same table)

# Raised by this codec; each one ends the connection.
FRAME_TOO_LARGE: Final = "frame-too-large"
EMPTY_FRAME: Final = "empty-frame"
TRUNCATED: Final = "truncated"
BAD_UTF8: Final = "bad-utf8"
BAD_JSON: Final = "bad-json"
NOT_AN_OBJECT: Final = "not-an-object"
UNKNOWN_TYPE: Final = "unknown-type"
BAD_FIELD: Final = "bad-field"
FD_COUNT: Final = "fd-count"
TOO_MANY_FDS: Final = "too-many-fds"
VERSION: Final = "version"
BUSY: Final = "busy"
UNEXPECTED_FD: Final = "unexpected-fd"
# Sent by the control server in an ``error`` answering one request; the connection stays open.
UNKNOWN_METHOD: Final = "unknown-method"
BAD_PARAMS: Final = "bad-params"
PERMISSION_DENIED: Final = "permission-denied"
NOT_FOUND: Final = "not-found"
CONFLICT: Final = "conflict"
INVALID_CONFIG: Final = "invalid-config"
INTERNAL: Final = "internal"


class ErrorCode(NamedTuple):
    """One row of the error table in docs/protocol.md."""

    closes: bool  # True: the sender closes the connection after sending it (id null)
    meaning: str


ERRORS: Final[dict[str, ErrorCode]] = {
    FRAME_TOO_LARGE: ErrorCode(True, "the length prefix announces more than the frame limit"),
    EMPTY_FRAME: ErrorCode(True, "the length prefix is 0"),
    TRUNCATED: ErrorCode(True, "the peer closed in the middle of a frame"),
    BAD_UTF8: ErrorCode(True, "the frame body is not valid UTF-8"),
    BAD_JSON: ErrorCode(True, "the body is not strict JSON (syntax, NaN/Infinity, a number out of "
                              "range, a duplicate key, a lone surrogate, nesting over the limit)"),
    NOT_AN_OBJECT: ErrorCode(True, "the JSON is valid but not an object"),
    UNKNOWN_TYPE: ErrorCode(True, "\"type\" names no message type of the negotiated version"),
    BAD_FIELD: ErrorCode(True, "a required key is missing or a key has the wrong type or range "
                               "(type, id, fds, method, ...)"),
    FD_COUNT: ErrorCode(True, "the fds that arrived with a frame differ from its \"fds\", or fds "
                              "arrived where no frame begins"),
    TOO_MANY_FDS: ErrorCode(True, "more fds arrived at once than the per-frame limit"),
    VERSION: ErrorCode(True, "the hello exchange found no protocol version both sides speak"),
    UNEXPECTED_FD: ErrorCode(True, "a request carried fds its method does not take, or an fd of the wrong kind"),
    BUSY: ErrorCode(True, "the server has as many connections as it serves at once; retry later"),
    UNKNOWN_METHOD: ErrorCode(False, "the request's method does not exist (on this socket)"),
    BAD_PARAMS: ErrorCode(False, "the method exists but its params are missing, mistyped or invalid"),
    PERMISSION_DENIED: ErrorCode(False, "the peer (SO_PEERCRED, or the socket it reached) may not "
                                        "do this"),
    NOT_FOUND: ErrorCode(False, "the sandbox, profile or object named does not exist"),
    CONFLICT: ErrorCode(False, "the request collides with the current state (exists already, busy, "
                               "stopping)"),
    INVALID_CONFIG: ErrorCode(False, "a configuration file the request reads is invalid; the message says "
                                     "where, and nothing changed"),
    INTERNAL: ErrorCode(False, "the server failed; the message says what, the request may be retried"),
}


class ProtocolError(Exception):
    """The peer broke the protocol.  ``code`` is one of ``ERRORS``; ``message`` says what and where,
    for a human (it goes into the ``error`` frame sent before closing, and into the log)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.message} [{self.code}]"


# ---------------------------------------------------------------------------------------------
# Messages


@dataclass(frozen=True, slots=True)
class Message:
    """One decoded message.  Fields not used by ``type`` are None; ``raw`` is the whole JSON object,
    unknown keys included.  ``fds`` are now the caller's to use and close."""

    type: str
    raw: dict[str, Any]
    id: int | None = None
    method: str | None = None
    params: dict[str, Any] | None = None
    result: Any = None
    code: str | None = None
    message: str | None = None
    event: dict[str, Any] | None = None
    versions: tuple[int, ...] | None = None
    software: str | None = None
    fds: tuple[int, ...] = ()


def _is_id(value: Any) -> bool:
    return type(value) is int and 1 <= value <= MAX_ID


def _is_id_or_null(value: Any) -> bool:
    return value is None or _is_id(value)


def _is_name(value: Any) -> bool:
    return type(value) is str and value != ""


def _is_string(value: Any) -> bool:
    return type(value) is str


def _is_object(value: Any) -> bool:
    return type(value) is dict


def _is_any(value: Any) -> bool:
    return True


def _is_versions(value: Any) -> bool:
    return type(value) is list and all(type(v) is int and 1 <= v <= MAX_ID for v in value)


class FieldSpec(NamedTuple):
    name: str
    required: bool
    check: Callable[[Any], bool]
    expected: str  # what the check wants, for the error message


_ID = FieldSpec("id", True, _is_id, f"an integer from 1 to {MAX_ID}")

# The schema: for each message type, its keys.  An optional key that is absent takes the default in
# ``_DEFAULTS``; a key not listed is kept in ``raw`` and otherwise ignored.
MESSAGE_FIELDS: Final[dict[str, tuple[FieldSpec, ...]]] = {
    "hello": (FieldSpec("versions", True, _is_versions, f"a list of integers from 1 to {MAX_ID}"),
              FieldSpec("software", True, _is_string, "a string")),
    "request": (_ID,
                FieldSpec("method", True, _is_name, "a non-empty string"),
                FieldSpec("params", False, _is_object, "an object")),
    "response": (_ID,
                 FieldSpec("result", True, _is_any, "any JSON value")),
    "error": (FieldSpec("id", True, _is_id_or_null, f"an integer from 1 to {MAX_ID}, or null"),
              FieldSpec("code", True, _is_name, "a non-empty string"),
              FieldSpec("message", True, _is_string, "a string")),
    "event": (_ID,
              FieldSpec("event", True, _is_object, "an object")),
}
_DEFAULTS: Final[dict[str, Callable[[], Any]]] = {"params": dict}


# ---------------------------------------------------------------------------------------------
# Strict JSON


class _Reject(ValueError):
    """Raised from inside the JSON parser's hooks; becomes ``bad-json``."""


def _reject_constant(name: str) -> Any:
    raise _Reject(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Reject(f"number {text[:40]} is out of range for a double")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _Reject(f"duplicate key {_show(key)}")
            seen.add(key)
    return obj


_DECODER = json.JSONDecoder(object_pairs_hook=_unique_keys, parse_constant=_reject_constant,
                            parse_float=_finite_float)
_SURROGATE = re.compile("[\ud800-\udfff]")


def _check_strings_and_depth(value: Any) -> str | None:
    """What is wrong with a parsed value that the parser let through (a lone surrogate in a key or a
    string, nesting deeper than ``MAX_DEPTH``), or None.  Iterative: it may be nested deeply."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if type(item) is str:
            if not item.isascii() and _SURROGATE.search(item):
                return f"the string {_show(item)} holds a lone UTF-16 surrogate, which is not a character"
        elif type(item) is dict or type(item) is list:
            if depth > MAX_DEPTH:
                return f"nested deeper than {MAX_DEPTH} levels"
            if type(item) is dict:
                stack.extend((key, depth) for key in item)
                stack.extend((child, depth + 1) for child in item.values())
            else:
                stack.extend((child, depth + 1) for child in item)
    return None


def _show(value: Any) -> str:
    """A short rendering of a JSON value for an error message (never recursive: it may be deep)."""
    if type(value) is dict:
        return "an object"
    if type(value) is list:
        return "an array"
    if type(value) is str:
        text = json.dumps(value[:40])
        return text if len(value) <= 40 else text[:-1] + '..."'
    text = json.dumps(value)  # null, true/false, a number (an int may have thousands of digits)
    return text if len(text) <= 40 else text[:40] + "..."


def _decode_body(body: bytes, fds: tuple[int, ...], max_fds: int, where: str) -> Message:
    """Decode one frame's body that arrived with ``fds``; ``where`` names the frame in errors."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(BAD_UTF8, f"{where}: invalid UTF-8 at byte {exc.start} of the body "
                                      f"({body[exc.start:exc.start + 4].hex(' ')})") from None
    if text.startswith("\ufeff"):
        raise ProtocolError(BAD_JSON, f"{where}: invalid JSON: starts with a byte order mark (U+FEFF)")
    try:
        obj = _DECODER.decode(text)
    except RecursionError:  # far deeper than MAX_DEPTH: the parser's own limit (~1000) hit first
        raise ProtocolError(BAD_JSON, f"{where}: invalid JSON: nested deeper than {MAX_DEPTH} "
                                      "levels") from None
    except ValueError as exc:  # JSONDecodeError, _Reject, an int of more than 4300 digits
        raise ProtocolError(BAD_JSON, f"{where}: invalid JSON: {exc}") from None
    problem = _check_strings_and_depth(obj)
    if problem is not None:
        raise ProtocolError(BAD_JSON, f"{where}: invalid JSON: {problem}")
    if type(obj) is not dict:
        raise ProtocolError(NOT_AN_OBJECT, f"{where}: the JSON is {_show(obj)}, not an object")

    declared = obj.get("fds", 0)
    if not (type(declared) is int and 0 <= declared <= max_fds):
        raise ProtocolError(BAD_FIELD, f'{where}: "fds" must be an integer from 0 to {max_fds}, '
                                       f"got {_show(declared)}")
    if declared != len(fds):
        raise ProtocolError(FD_COUNT, f"{where}: declares {declared} fds but {len(fds)} arrived "
                                      "with its first bytes")

    if "type" not in obj:
        raise ProtocolError(BAD_FIELD, f'{where}: the "type" key is missing')
    kind = obj["type"]
    if type(kind) is not str:
        raise ProtocolError(BAD_FIELD, f'{where}: "type" must be a string, got {_show(kind)}')
    specs = MESSAGE_FIELDS.get(kind)
    if specs is None:
        raise ProtocolError(UNKNOWN_TYPE, f"{where}: unknown message type {_show(kind)} "
                                          f"(known: {', '.join(sorted(MESSAGE_FIELDS))})")
    values: dict[str, Any] = {}
    for spec in specs:
        if spec.name not in obj:
            if spec.required:
                raise ProtocolError(BAD_FIELD, f'{where}: {kind} without the required key "{spec.name}"')
            values[spec.name] = _DEFAULTS[spec.name]()
        elif spec.check(obj[spec.name]):
            values[spec.name] = obj[spec.name]
        else:
            raise ProtocolError(BAD_FIELD, f'{where}: {kind} "{spec.name}" must be {spec.expected}, '
                                           f"got {_show(obj[spec.name])}")
    if "versions" in values:
        values["versions"] = tuple(values["versions"])
    return Message(type=kind, raw=obj, fds=fds, **values)


# ---------------------------------------------------------------------------------------------
# Encoding


def encode(obj: dict[str, Any], nfds: int = 0, *, max_frame: int = MAX_FRAME) -> bytes:
    """One frame for ``obj``, declaring ``nfds`` fds (send them with this frame's ``sendmsg``).

    Validated by decoding it as a peer would: ``ValueError`` says what is wrong, so a bug on our
    side is caught here instead of closing the connection at the peer.
    """
    if type(obj) is not dict:
        raise ValueError(f"a message is a dict (a JSON object), not {type(obj).__name__}")
    if not (type(nfds) is int and 0 <= nfds <= MAX_FDS):
        raise ValueError(f"nfds must be an integer from 0 to {MAX_FDS}, got {nfds!r}")
    if "fds" in obj and not (type(obj["fds"]) is int and obj["fds"] == nfds):
        raise ValueError(f'the message declares "fds": {obj["fds"]!r} but nfds is {nfds}')
    if nfds:
        obj = {**obj, "fds": nfds}
    try:
        text = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except RecursionError:
        raise ValueError(f"cannot encode as JSON: nested deeper than {MAX_DEPTH} levels") from None
    except (TypeError, ValueError) as exc:
        raise ValueError(f"cannot encode as JSON: {exc}") from None
    try:
        body = text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("cannot encode as JSON: a string holds a lone UTF-16 surrogate") from None
    if len(body) > max_frame:
        raise ValueError(f"frame of {len(body)} bytes exceeds the {max_frame}-byte limit")
    try:
        _decode_body(body, (0,) * nfds, MAX_FDS, "outgoing message")
    except ProtocolError as exc:
        raise ValueError(exc.message) from None
    return _LENGTH.pack(len(body)) + body


def hello(software: str, versions: Sequence[int] = PROTOCOL_VERSIONS) -> dict[str, Any]:
    """The first message each side sends; ``software`` is e.g. "tether 0.1"."""
    return {"type": "hello", "versions": list(versions), "software": software}


def request(id: int, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """A call of ``method``; ``id`` must be unique among the caller's unanswered requests."""
    return {"type": "request", "id": id, "method": method, "params": {} if params is None else params}


def response(id: int, result: Any) -> dict[str, Any]:
    """The answer to request ``id``; for a subscription, also its end."""
    return {"type": "response", "id": id, "result": result}


def error(id: int | None, code: str, message: str) -> dict[str, Any]:
    """A refusal of request ``id``, or with ``id`` None a connection-level error sent before closing."""
    return {"type": "error", "id": id, "code": code, "message": message}


def event(id: int, ev: dict[str, Any]) -> dict[str, Any]:
    """One item of the subscription that request ``id`` started."""
    return {"type": "event", "id": id, "event": ev}


def negotiate(ours: Sequence[int], theirs: Sequence[int]) -> int:
    """The highest version in both hellos; ``ProtocolError("version")`` if there is none."""
    common = {v for v in ours if type(v) is int} & {v for v in theirs if type(v) is int}
    if not common:
        def spoken(versions: Sequence[int]) -> str:
            return "none" if not versions else ", ".join(map(str, versions))
        raise ProtocolError(VERSION, f"no protocol version in common: we speak {spoken(ours)}, "
                                     f"the peer speaks {spoken(theirs)}")
    return max(common)


# ---------------------------------------------------------------------------------------------
# Decoding


class Decoder:
    """Bytes and fds from one connection in, messages out.

    State, in stream offsets (bytes since the connection began): the buffer holds the bytes from
    ``_base`` (the first frame not yet returned by ``next``) to the end of what was fed.  ``_scan``
    is the start of the frame holding the last byte fed so far, found by walking length prefixes
    from ``_base`` (frames before it are complete); fds are filed under the frame start they belong
    to in ``_pending`` until ``next`` returns that frame.  ``_unclaimed`` holds the fds that can no
    longer belong to any message.
    """

    def __init__(self, max_frame: int = MAX_FRAME, max_fds: int = MAX_FDS) -> None:
        if not (type(max_frame) is int and 1 <= max_frame <= 0xFFFFFFFF):
            raise ValueError(f"max_frame must be an integer from 1 to {0xFFFFFFFF}, got {max_frame!r}")
        if not (type(max_fds) is int and 0 <= max_fds):
            raise ValueError(f"max_fds must be a non-negative integer, got {max_fds!r}")
        self._max_frame = max_frame
        self._max_fds = max_fds
        self._buf = bytearray()
        self._pos = 0  # index in _buf of stream offset _base (consumed bytes before it)
        self._base = 0
        self._index = 0  # frames returned (or failed) before _base
        self._scan = 0
        self._scan_index = 0  # frames before _scan
        self._pending: dict[int, tuple[int, ...]] = {}
        self._unclaimed: list[int] = []
        self._error: ProtocolError | None = None
        self._eof = False
        self._closed = False

    # --- the caller's interface ------------------------------------------------------------

    def feed(self, data: bytes | bytearray | memoryview, fds: Sequence[int] = ()) -> None:
        """Add the bytes one ``recvmsg`` returned, and the fds that came with them."""
        fds = tuple(fds)
        self._unclaimed.extend(fds)  # until they are filed under their frame below
        self._check_usable("feed")
        if self._eof:
            raise RuntimeError("feed() after eof()")
        if len(fds) > self._max_fds:
            self._fail(TOO_MANY_FDS, f"{len(fds)} fds arrived at stream byte {self._end} "
                                     f"(the limit is {self._max_fds})")
        if fds and not data:
            self._fail(FD_COUNT, f"{len(fds)} fds arrived with no data at stream byte {self._end}: "
                                 "they belong to no frame")
        first = self._end
        self._buf += data
        if not fds:
            return
        self._advance(self._end - 1)  # to the frame holding the last byte
        if self._scan < first:
            self._fail(FD_COUNT, f"{len(fds)} fds arrived with stream bytes {first}..{self._end - 1}, "
                                 f"inside {self._where(self._scan, self._scan_index)} but not with "
                                 "its first byte")
        self._pending[self._scan] = fds
        del self._unclaimed[len(self._unclaimed) - len(fds):]

    def next(self) -> Message | None:
        """The next complete message, or None until more bytes are fed."""
        self._check_usable("next")
        available = len(self._buf) - self._pos
        if available < LENGTH_PREFIX:
            return None
        where = self._where(self._base, self._index)
        (length,) = _LENGTH.unpack_from(self._buf, self._pos)
        self._check_length(length, where)
        end = self._pos + LENGTH_PREFIX + length
        if end > len(self._buf):
            return None
        body = bytes(self._buf[self._pos + LENGTH_PREFIX:end])
        start = self._base
        self._consume(LENGTH_PREFIX + length)
        fds = self._pending.pop(start, ())
        try:
            return _decode_body(body, fds, self._max_fds, where)
        except ProtocolError as exc:
            self._unclaimed.extend(fds)
            self._error = exc
            raise

    def eof(self) -> None:
        """The peer closed its end.  Raises ``truncated`` if it stopped inside a frame; complete
        frames still buffered remain available from ``next`` (a loop that drains ``next`` after
        every ``feed`` has none)."""
        self._check_usable("eof")
        self._eof = True
        self._advance(self._end)
        have = self._end - self._scan
        if have == 0:
            return
        where = self._where(self._scan, self._scan_index)
        if have < LENGTH_PREFIX:
            self._fail(TRUNCATED, f"{where}: the peer closed after {have} of the "
                                  f"{LENGTH_PREFIX} length bytes")
        (length,) = _LENGTH.unpack_from(self._buf, self._pos + self._scan - self._base)
        self._fail(TRUNCATED, f"{where}: the peer closed after {have - LENGTH_PREFIX} of the "
                              f"frame's {length} bytes")

    def take_unclaimed_fds(self) -> list[int]:
        """Every fd fed and not handed out in a ``Message``, for the caller to close; call it once
        at teardown.  Fds waiting for the rest of their frame are included, so the decoder is
        closed afterwards (a dead decoder still raises its ``ProtocolError``)."""
        fds = self._unclaimed
        for batch in self._pending.values():
            fds.extend(batch)
        self._unclaimed, self._pending = [], {}
        self._closed = True
        return fds

    @property
    def error(self) -> ProtocolError | None:
        """The error that killed the decoder, if one did."""
        return self._error

    # --- internals -------------------------------------------------------------------------

    @property
    def _end(self) -> int:
        """Stream offset just past the last byte fed."""
        return self._base + len(self._buf) - self._pos

    @staticmethod
    def _where(start: int, index: int) -> str:
        return f"frame {index + 1} (at stream byte {start})"

    def _check_usable(self, operation: str) -> None:
        if self._error is not None:
            raise ProtocolError(self._error.code, self._error.message)
        if self._closed:
            raise RuntimeError(f"{operation}() after take_unclaimed_fds()")

    def _fail(self, code: str, message: str) -> None:
        self._error = ProtocolError(code, message)
        raise self._error

    def _check_length(self, length: int, where: str) -> None:
        if length == 0:
            self._fail(EMPTY_FRAME, f"{where}: length 0 (a frame holds at least 1 byte of JSON)")
        if length > self._max_frame:
            self._fail(FRAME_TOO_LARGE, f"{where}: frame of {length} bytes exceeds the "
                                        f"{self._max_frame}-byte limit")

    def _advance(self, limit: int) -> None:
        """Move ``_scan`` past every frame that ends at or before stream offset ``limit``."""
        while True:
            at = self._pos + self._scan - self._base
            if at + LENGTH_PREFIX > len(self._buf):
                return
            (length,) = _LENGTH.unpack_from(self._buf, at)
            self._check_length(length, self._where(self._scan, self._scan_index))
            end = self._scan + LENGTH_PREFIX + length
            if end > limit:
                return
            self._scan = end
            self._scan_index += 1

    def _consume(self, size: int) -> None:
        """Drop the frame at ``_base`` (``size`` bytes with its prefix) from the buffer."""
        self._pos += size
        self._base += size
        self._index += 1
        if self._scan < self._base:
            self._scan, self._scan_index = self._base, self._index
        if self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        elif self._pos >= _COMPACT_AFTER:
            del self._buf[:self._pos]
            self._pos = 0

