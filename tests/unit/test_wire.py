"""Unit tests for tether.wire: the control protocol codec.

Frames fed to the decoder are built here by hand (``ref_frame``: struct + json.dumps), independently
of ``encode``; fds are fake ints (nothing is opened).  Fds are fed the way Linux hands them out
on a Unix stream socket (checked on 6.18 with a socketpair): with the first ``recvmsg`` that reads
any byte of the frame that carries them. That read ends inside that frame, and may begin with the
tail of earlier frames.  Every malformed kind is named in the test ids.  Hypothesis checks the
security property, that every fd fed comes out exactly once (in a message or from
``take_unclaimed_fds``), over random frame sequences, split points and fd placements, and that
random or mutated bytes raise nothing but ProtocolError.
"""

from __future__ import annotations

import itertools
import json
import re
import struct
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from tether import wire
from tether.wire import MAX_FDS, MAX_FRAME, Decoder, Message, ProtocolError, encode, negotiate

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
MAX_ID = 2**53 - 1

# ---------------------------------------------------------------------------------------------
# Reference encoding and feeding helpers (no tether code)


def ref_frame(body: bytes | str | dict | list | int | None) -> bytes:
    """Length prefix + body; a non-bytes body is dumped as JSON (``str`` is taken as JSON text)."""
    if isinstance(body, str):
        body = body.encode("utf-8")
    elif not isinstance(body, bytes):
        body = json.dumps(body).encode("utf-8")
    return struct.pack("!I", len(body)) + body


def fd_numbers(start: int = 100):
    return itertools.count(start)


def drain(decoder: Decoder, into: list[Message] | None = None) -> list[Message]:
    """``next()`` until None, appending to ``into`` as it goes (so a later error loses nothing)."""
    into = [] if into is None else into
    while (message := decoder.next()) is not None:
        into.append(message)
    return into


def decode(chunks: list[tuple[bytes, tuple[int, ...]]], *, eof: bool = True) -> list[Message]:
    """Feed (data, fds) chunks, draining after each; raises ProtocolError."""
    decoder = Decoder()
    messages = []
    for data, fds in chunks:
        decoder.feed(data, fds)
        messages += drain(decoder)
    if eof:
        decoder.eof()
        messages += drain(decoder)
    assert decoder.take_unclaimed_fds() == []
    return messages


def run(chunks: list[tuple[bytes, tuple[int, ...]]], decoder: Decoder | None = None):
    """Feed everything however it goes; return (messages, error, unclaimed fds) after checking that
    the error is sticky and every fd fed is accounted for exactly once."""
    decoder = decoder or Decoder()
    messages: list[Message] = []
    error: ProtocolError | None = None
    for data, fds in chunks:
        if error is None:
            try:
                decoder.feed(data, fds)
                drain(decoder, messages)
            except ProtocolError as exc:
                error = exc
        else:
            with pytest.raises(ProtocolError) as again:
                decoder.feed(data, fds)
            assert (again.value.code, again.value.message) == (error.code, error.message)
    if error is None:
        try:
            decoder.eof()
            drain(decoder, messages)
        except ProtocolError as exc:
            error = exc
    if error is not None:
        assert decoder.error is not None and decoder.error.code == error.code
        for operation in (decoder.next, decoder.eof, lambda: decoder.feed(b"x")):
            with pytest.raises(ProtocolError) as again:
                operation()
            assert (again.value.code, again.value.message) == (error.code, error.message)
    unclaimed = decoder.take_unclaimed_fds()
    fed = [fd for _, fds in chunks for fd in fds]
    handed = [fd for message in messages for fd in message.fds]
    assert len(set(fed)) == len(fed), "test bug: fake fds must be unique"
    assert sorted(handed + unclaimed) == sorted(fed), "an fd was lost or handed out twice"
    assert decoder.take_unclaimed_fds() == []
    return messages, error, unclaimed


def one_byte_chunks(stream: bytes, fd_at: dict[int, tuple[int, ...]]) -> list[tuple[bytes, tuple[int, ...]]]:
    """The stream one byte per feed; ``fd_at[offset]`` fds come with that byte."""
    return [(stream[i:i + 1], fd_at.get(i, ())) for i in range(len(stream))]


# ---------------------------------------------------------------------------------------------
# Round trips

MESSAGES = {
    "hello": (wire.hello("tether 0.1"),
              {"type": "hello", "versions": (1,), "software": "tether 0.1"}),
    "hello-several-versions": (wire.hello("tether 9.0", [1, 2, 7]),
                               {"type": "hello", "versions": (1, 2, 7), "software": "tether 9.0"}),
    "request": (wire.request(1, "ps", {"all": True}),
                {"type": "request", "id": 1, "method": "ps", "params": {"all": True}}),
    "request-no-params": (wire.request(MAX_ID, "attach"),
                          {"type": "request", "id": MAX_ID, "method": "attach", "params": {}}),
    "request-params-omitted": ({"type": "request", "id": 5, "method": "x"},
                               {"type": "request", "id": 5, "method": "x", "params": {}}),
    "response": (wire.response(2, {"sandboxes": [{"name": "web", "pid": 42}]}),
                 {"type": "response", "id": 2, "result": {"sandboxes": [{"name": "web", "pid": 42}]}}),
    "response-null": (wire.response(3, None), {"type": "response", "id": 3, "result": None}),
    "response-scalar": (wire.response(3, -1.5e300), {"type": "response", "id": 3, "result": -1.5e300}),
    "error": (wire.error(4, "not-found", "no sandbox named \"db\""),
              {"type": "error", "id": 4, "code": "not-found", "message": "no sandbox named \"db\""}),
    "error-connection": (wire.error(None, "frame-too-large", "too big"),
                         {"type": "error", "id": None, "code": "frame-too-large", "message": "too big"}),
    "error-unknown-code": (wire.error(4, "from-the-future", ""),
                           {"type": "error", "id": 4, "code": "from-the-future", "message": ""}),
    "event": (wire.event(5, {"kind": "connect", "dst": "203.0.113.10:443"}),
              {"type": "event", "id": 5, "event": {"kind": "connect", "dst": "203.0.113.10:443"}}),
    "unicode": (wire.request(6, "ctl", {"path": "/tmp/ünïcødé 🐍"}),
                {"type": "request", "id": 6, "method": "ctl", "params": {"path": "/tmp/ünïcødé 🐍"}}),
}


def check_message(message: Message, expected: dict, fds: tuple[int, ...] = ()) -> None:
    for name, value in expected.items():
        assert getattr(message, name) == value, name
    unused = {"id", "method", "params", "result", "code", "message", "event", "versions", "software"}
    for name in unused - set(expected):
        assert getattr(message, name) is None, name
    assert message.fds == fds


@pytest.mark.parametrize("nfds", [0, 1, MAX_FDS])
@pytest.mark.parametrize("obj, expected", MESSAGES.values(), ids=MESSAGES.keys())
def test_round_trip(obj, expected, nfds):
    frame = encode(obj, nfds)
    (length,) = struct.unpack_from("!I", frame)
    assert length == len(frame) - 4
    raw = json.loads(frame[4:])
    assert raw == ({**obj, "fds": nfds} if nfds else obj)
    fds = tuple(range(10, 10 + nfds))
    (message,) = decode([(frame, fds)])
    check_message(message, expected, fds)
    assert message.raw == raw


def test_every_type_byte_by_byte_with_fds():
    frames, fd_at, expected = b"", {}, []
    numbers = fd_numbers()
    for i, (obj, fields) in enumerate(MESSAGES.values()):
        nfds = i % 3
        fds = tuple(next(numbers) for _ in range(nfds))
        if fds:
            fd_at[len(frames)] = fds
        frames += ref_frame({**obj, "fds": nfds} if nfds else obj)
        expected.append((fields, fds))
    messages = decode(one_byte_chunks(frames, fd_at))
    assert len(messages) == len(expected)
    for message, (fields, fds) in zip(messages, expected):
        check_message(message, fields, fds)


def test_many_frames_in_one_feed():
    objs = [wire.request(i, "m", {"i": i}) for i in range(1, 501)]
    messages = decode([(b"".join(encode(o) for o in objs), ())])
    assert [m.raw for m in messages] == objs


def test_large_buffer_is_compacted_as_it_is_consumed():
    objs = [wire.response(i, "x" * 200) for i in range(1, 3001)]  # ~700 KB in one feed
    decoder = Decoder()
    decoder.feed(b"".join(encode(o) for o in objs) + ref_frame(wire.response(1, None))[:3])
    assert [m.id for m in drain(decoder)] == list(range(1, 3001))
    decoder.feed(ref_frame(wire.response(1, None))[3:])
    assert decoder.next().result is None and decoder.next() is None


def test_largest_frame_byte_by_byte():
    obj = wire.response(1, "")
    obj["result"] = "y" * (MAX_FRAME - len(json.dumps(obj, separators=(",", ":"))))
    frame = encode(obj)
    assert len(frame) == 4 + MAX_FRAME
    assert decode(one_byte_chunks(frame, {}))[0].raw == obj


def test_unknown_keys_are_kept_in_raw():
    obj = {"type": "request", "id": 1, "method": "ps", "trace": {"span": 7}, "priority": "high"}
    (message,) = decode([(ref_frame(obj), ())])
    assert message.raw == obj and message.method == "ps"
    assert message.raw["trace"] == {"span": 7}


def test_whitespace_and_key_order_do_not_matter():
    text = '  {\n "result" : [1, 2] ,\t"id":9, "type" :"response" }\r\n'
    (message,) = decode([(ref_frame(text), ())])
    assert (message.type, message.id, message.result) == ("response", 9, [1, 2])


def test_next_before_anything_and_partial_prefix():
    decoder = Decoder()
    assert decoder.next() is None
    decoder.feed(b"\x00\x00")
    assert decoder.next() is None
    decoder.feed(b"")  # an empty read that is not EOF is harmless
    assert decoder.next() is None


# ---------------------------------------------------------------------------------------------
# Fd placement: what the kernel does

A = ref_frame(wire.request(1, "a"))
B1 = ref_frame({**wire.request(2, "b"), "fds": 1})
B2 = ref_frame({**wire.request(2, "b"), "fds": 2})
C = ref_frame(wire.request(3, "c"))


def test_fds_glued_after_the_tail_of_a_previous_frame():
    # Kernel case: A (no fds) and B (1 fd) queued; one recvmsg returns A + B with B's fd.
    a, b = decode([(A + B1, (7,))])
    assert a.fds == () and b.fds == (7,)
    # The same, with A's head in an earlier read and only a prefix of B in this one.
    a, b = decode([(A[:5], ()), (A[5:] + B1[:3], (7,)), (B1[3:], ())])
    assert a.fds == () and b.fds == (7,)


def test_fds_with_a_read_inside_the_length_prefix():
    (b,) = decode([(B2[:1], (7, 8)), (B2[1:2], ()), (B2[2:], ())])
    assert b.fds == (7, 8)


def test_fds_with_a_read_that_is_exactly_the_frame():
    a, b, c = decode([(A, ()), (B1, (7,)), (C, ())])
    assert (a.fds, b.fds, c.fds) == ((), (7,), ())


def test_fds_of_consecutive_frames_in_consecutive_reads():
    b1, b2 = decode([(B1, (7,)), (B2[:10], (8, 9)), (B2[10:], ())])
    assert (b1.fds, b2.fds) == ((7,), (8, 9))


# ---------------------------------------------------------------------------------------------
# Malformed input: every kind named


def long_string(n: int) -> str:
    return "x" * n


def _deep(n: int) -> list:
    """An array nested ``n`` levels deep."""
    value: list = []
    for _ in range(n - 1):
        value = [value]
    return value


def _deep_object(n: int) -> dict:
    """A response whose own object is level 1 and that nests objects ``n`` levels deep in all."""
    value: dict = {}
    for _ in range(n - 2):
        value = {"k": value}
    return {"type": "response", "id": 1, "result": value}


BAD_FRAMES = {
    # framing
    "length-over-max": (struct.pack("!I", MAX_FRAME + 1), "frame-too-large",
                        f"frame 1 \\(at stream byte 0\\): frame of {MAX_FRAME + 1} bytes exceeds "
                        f"the {MAX_FRAME}-byte limit"),
    "length-70000": (struct.pack("!I", 70000) + b"{", "frame-too-large", "frame of 70000 bytes exceeds"),
    "length-4GiB": (b"\xff\xff\xff\xff", "frame-too-large", "4294967295 bytes"),
    "length-zero": (b"\x00\x00\x00\x00", "empty-frame", "length 0"),
    "length-zero-then-data": (b"\x00\x00\x00\x00" + A, "empty-frame", "length 0"),
    "truncated-in-prefix-1": (b"\x00", "truncated", "after 1 of the 4 length bytes"),
    "truncated-in-prefix-3": (b"\x00\x00\x01", "truncated", "after 3 of the 4 length bytes"),
    "truncated-after-prefix": (A[:4], "truncated", f"after 0 of the frame's {len(A) - 4} bytes"),
    "truncated-in-body": (A[:-1], "truncated", f"after {len(A) - 5} of the frame's {len(A) - 4} bytes"),
    "truncated-second-frame": (A + C[:6], "truncated", f"frame 2 \\(at stream byte {len(A)}\\)"),
    # UTF-8
    "bad-utf8-ff": (ref_frame(b'{"type":"\xff"}'), "bad-utf8", "invalid UTF-8 at byte 9 of the body"),
    "bad-utf8-continuation-first": (ref_frame(b"\x80{}"), "bad-utf8", "at byte 0"),
    "bad-utf8-overlong-slash": (ref_frame(b'{"a":"\xc0\xaf"}'), "bad-utf8", "at byte 6"),
    "bad-utf8-encoded-surrogate": (ref_frame(b'{"a":"\xed\xa0\x80"}'), "bad-utf8", "at byte 6"),
    "bad-utf8-cut-sequence": (ref_frame(b'{"a":"\xe2\x82"}'), "bad-utf8", "at byte 6"),
    "bad-utf8-latin1": (ref_frame('{"a":"é"}'.encode("latin-1")), "bad-utf8", "invalid UTF-8"),
    # JSON syntax and strictness
    "bad-json-syntax": (ref_frame("{'type': 'hello'}"), "bad-json", "invalid JSON: Expecting property name"),
    "bad-json-unclosed": (ref_frame('{"type": "hello"'), "bad-json", "invalid JSON"),
    "bad-json-trailing-garbage": (ref_frame('{"type":"response","id":1,"result":1} {}'), "bad-json",
                                  "Extra data"),
    "bad-json-two-objects": (ref_frame("{}{}"), "bad-json", "Extra data"),
    "bad-json-bom": (ref_frame(b"\xef\xbb\xbf{}"), "bad-json", "starts with a byte order mark"),
    "bad-json-whitespace-only": (ref_frame(" "), "bad-json", "Expecting value"),
    "bad-json-trailing-comma": (ref_frame('{"type":"response","id":1,"result":1,}'), "bad-json", "invalid JSON"),
    "bad-json-comment": (ref_frame('{"type":"response"/*x*/}'), "bad-json", "invalid JSON"),
    "bad-json-nan": (ref_frame('{"type":"response","id":1,"result":NaN}'), "bad-json",
                     "NaN is not a JSON number"),
    "bad-json-infinity": (ref_frame('{"type":"response","id":1,"result":Infinity}'), "bad-json",
                          "Infinity is not a JSON number"),
    "bad-json-minus-infinity": (ref_frame('{"type":"response","id":1,"result":-Infinity}'), "bad-json",
                                "-Infinity is not a JSON number"),
    "bad-json-float-overflow": (ref_frame('{"type":"response","id":1,"result":1e400}'), "bad-json",
                                "1e400 is out of range"),
    "bad-json-negative-float-overflow": (ref_frame('{"result":[-2.5E+999]}'), "bad-json", "out of range"),
    "bad-json-huge-int": (ref_frame('{"type":"response","id":1,"result":' + "9" * 5000 + "}"),
                          "bad-json", "invalid JSON"),
    "bad-json-duplicate-key": (ref_frame('{"type":"request","id":1,"method":"a","method":"b"}'),
                               "bad-json", 'duplicate key "method"'),
    "bad-json-duplicate-nested-key": (ref_frame('{"type":"response","id":1,"result":[{"a":1,"a":1}]}'),
                                      "bad-json", 'duplicate key "a"'),
    "bad-json-duplicate-type": (ref_frame('{"type":"hello","type":"request"}'), "bad-json",
                                'duplicate key "type"'),
    "bad-json-lone-high-surrogate": (ref_frame('{"type":"response","id":1,"result":"a\\ud800"}'),
                                     "bad-json", "lone UTF-16 surrogate"),
    "bad-json-lone-low-surrogate": (ref_frame('{"type":"response","id":1,"result":["\\udc00"]}'),
                                    "bad-json", "lone UTF-16 surrogate"),
    "bad-json-swapped-surrogates": (ref_frame('{"result":"\\ude00\\ud83d"}'), "bad-json", "lone"),
    "bad-json-lone-surrogate-in-key": (ref_frame('{"type":"response","id":1,"result":{"\\ud800":1}}'),
                                       "bad-json", "lone UTF-16 surrogate"),
    "bad-json-deep-nesting": (ref_frame("[" * 30000 + "]" * 30000), "bad-json", "nested deeper than 64 levels"),
    "bad-json-deep-objects": (ref_frame('{"a":' * 5000 + "1" + "}" * 5000), "bad-json", "nested deeper than 64"),
    "bad-json-depth-65-arrays": (ref_frame({"type": "response", "id": 1, "result": _deep(64)}), "bad-json",
                                 "nested deeper than 64 levels"),
    "bad-json-depth-65-objects": (ref_frame(_deep_object(65)), "bad-json", "nested deeper than 64 levels"),
    # not an object
    "json-array": (ref_frame([{"type": "hello"}]), "not-an-object", "the JSON is an array, not an object"),
    "json-number": (ref_frame("42"), "not-an-object", "the JSON is 42, not an object"),
    "json-string": (ref_frame('"hello"'), "not-an-object", 'the JSON is "hello", not an object'),
    "json-null": (ref_frame("null"), "not-an-object", "the JSON is null"),
    "json-true": (ref_frame("true"), "not-an-object", "the JSON is true"),
    # type
    "type-missing": (ref_frame({"id": 1, "method": "ps"}), "bad-field", 'the "type" key is missing'),
    "type-number": (ref_frame({"type": 1}), "bad-field", '"type" must be a string, got 1'),
    "type-null": (ref_frame({"type": None}), "bad-field", '"type" must be a string, got null'),
    "type-array": (ref_frame({"type": ["request"]}), "bad-field", "got an array"),
    "type-unknown": (ref_frame({"type": "subscribe", "id": 1}), "unknown-type",
                     'unknown message type "subscribe" \\(known: error, event, hello, request, response\\)'),
    "type-wrong-case": (ref_frame({"type": "Request", "id": 1, "method": "x"}), "unknown-type", '"Request"'),
    "type-empty": (ref_frame({"type": ""}), "unknown-type", 'unknown message type ""'),
    "type-long": (ref_frame({"type": long_string(1000)}), "unknown-type", 'x{39}\\.\\.\\."'),
    # the "fds" key
    "fds-negative": (ref_frame({**wire.request(1, "a"), "fds": -1}), "bad-field",
                     f'"fds" must be an integer from 0 to {MAX_FDS}, got -1'),
    "fds-over-max": (ref_frame({**wire.request(1, "a"), "fds": MAX_FDS + 1}), "bad-field", "got 17"),
    "fds-bool": (ref_frame({**wire.request(1, "a"), "fds": True}), "bad-field", "got true"),
    "fds-float": (ref_frame({**wire.request(1, "a"), "fds": 1.0}), "bad-field", "got 1.0"),
    "fds-string": (ref_frame({**wire.request(1, "a"), "fds": "1"}), "bad-field", 'got "1"'),
    "fds-null": (ref_frame({**wire.request(1, "a"), "fds": None}), "bad-field", "got null"),
}

FIELD_CASES = {
    # hello
    "hello-versions-missing": ({"type": "hello", "software": "t"}, 'hello without the required key "versions"'),
    "hello-software-missing": ({"type": "hello", "versions": [1]}, 'hello without the required key "software"'),
    "hello-versions-not-a-list": ({"type": "hello", "versions": 1, "software": "t"}, '"versions" must be a list'),
    "hello-versions-object": ({"type": "hello", "versions": {"1": 1}, "software": "t"}, "got an object"),
    "hello-versions-string-item": ({"type": "hello", "versions": ["1"], "software": "t"}, "got an array"),
    "hello-versions-bool-item": ({"type": "hello", "versions": [True], "software": "t"}, '"versions"'),
    "hello-versions-zero": ({"type": "hello", "versions": [1, 0], "software": "t"}, '"versions"'),
    "hello-versions-negative": ({"type": "hello", "versions": [-1], "software": "t"}, '"versions"'),
    "hello-versions-float": ({"type": "hello", "versions": [1.0], "software": "t"}, '"versions"'),
    "hello-versions-null": ({"type": "hello", "versions": None, "software": "t"}, "got null"),
    "hello-software-number": ({"type": "hello", "versions": [1], "software": 1}, '"software" must be a string'),
    "hello-software-null": ({"type": "hello", "versions": [1], "software": None}, '"software" must be a string'),
    # request
    "request-id-missing": ({"type": "request", "method": "a"}, 'request without the required key "id"'),
    "request-method-missing": ({"type": "request", "id": 1}, 'request without the required key "method"'),
    "request-method-empty": ({"type": "request", "id": 1, "method": ""}, '"method" must be a non-empty string'),
    "request-method-number": ({"type": "request", "id": 1, "method": 7}, '"method" must be a non-empty string, got 7'),
    "request-method-null": ({"type": "request", "id": 1, "method": None}, "got null"),
    "request-params-array": ({"type": "request", "id": 1, "method": "a", "params": []},
                             '"params" must be an object, got an array'),
    "request-params-null": ({"type": "request", "id": 1, "method": "a", "params": None}, '"params" must be an object'),
    "request-params-string": ({"type": "request", "id": 1, "method": "a", "params": "{}"}, '"params" must be an object'),
    # response
    "response-id-missing": ({"type": "response", "result": 1}, 'response without the required key "id"'),
    "response-result-missing": ({"type": "response", "id": 1}, 'response without the required key "result"'),
    # error
    "error-id-missing": ({"type": "error", "code": "internal", "message": "m"}, 'error without the required key "id"'),
    "error-code-missing": ({"type": "error", "id": 1, "message": "m"}, 'error without the required key "code"'),
    "error-message-missing": ({"type": "error", "id": 1, "code": "internal"}, 'without the required key "message"'),
    "error-code-empty": ({"type": "error", "id": 1, "code": "", "message": "m"}, '"code" must be a non-empty string'),
    "error-code-number": ({"type": "error", "id": 1, "code": 500, "message": "m"}, '"code" must be a non-empty string'),
    "error-message-null": ({"type": "error", "id": 1, "code": "internal", "message": None},
                           '"message" must be a string, got null'),
    "error-message-object": ({"type": "error", "id": None, "code": "internal", "message": {}}, '"message" must be'),
    # event
    "event-id-missing": ({"type": "event", "event": {}}, 'event without the required key "id"'),
    "event-event-missing": ({"type": "event", "id": 1}, 'event without the required key "event"'),
    "event-event-array": ({"type": "event", "id": 1, "event": []}, '"event" must be an object, got an array'),
    "event-event-null": ({"type": "event", "id": 1, "event": None}, '"event" must be an object, got null'),
}

ID_FIELDS = {"request": {"method": "a"}, "response": {"result": None},
             "error": {"code": "internal", "message": "m"}, "event": {"event": {}}}
BAD_IDS = {"0": 0, "negative": -1, "true": True, "false": False, "float": 1.0, "float-fraction": 1.5,
           "2**53": 2**53, "huge": 10**30, "string": "1", "array": [1], "object": {}}
for kind, rest in ID_FIELDS.items():
    for name, value in BAD_IDS.items():
        FIELD_CASES[f"{kind}-id-{name}"] = ({"type": kind, "id": value, **rest}, f'{kind} "id" must be an integer')
    if kind != "error":
        FIELD_CASES[f"{kind}-id-null"] = ({"type": kind, "id": None, **rest}, f'{kind} "id" must be an integer '
                                          f"from 1 to {MAX_ID}, got null")

for case, (obj, match) in FIELD_CASES.items():
    BAD_FRAMES[case] = (ref_frame(obj), "bad-field", match)


@pytest.mark.parametrize("stream, code, match", BAD_FRAMES.values(), ids=BAD_FRAMES.keys())
def test_malformed(stream, code, match):
    for chunks in ([(stream, ())], one_byte_chunks(stream, {}) if len(stream) < 2000 else [(stream, ())]):
        messages, error, unclaimed = run(chunks)
        assert unclaimed == [] and all(m.raw == json.loads(A[4:]) for m in messages)  # only a leading A
        assert error is not None and error.code == code, error
        assert re.search(match, error.message), error.message
        assert code in wire.ERRORS


def test_malformed_after_a_good_frame_names_the_frame_and_keeps_the_good_one():
    stream = A + C + ref_frame({"type": "request", "id": 0, "method": "x"})
    messages, error, _ = run([(stream, ())])
    assert [m.id for m in messages] == [1, 3]
    assert error.code == "bad-field"
    assert error.message.startswith(f"frame 3 (at stream byte {len(A) + len(C)}): request \"id\"")


def test_nesting_up_to_the_limit_is_accepted():
    for obj in ({"type": "response", "id": 1, "result": _deep(63)}, _deep_object(64),
                {"type": "event", "id": 1, "event": {"a": [{"b": [[]]}]}}):
        (message,) = decode([(ref_frame(obj), ())])
        assert message.raw == obj
        assert encode(obj) == ref_frame(json.dumps(obj, separators=(",", ":")))


def test_ids_at_the_edges_are_accepted():
    for value in (1, 2, MAX_ID - 1, MAX_ID):
        (message,) = decode([(ref_frame(wire.request(value, "a")), ())])
        assert message.id == value


def test_length_is_refused_before_the_body_arrives():
    decoder = Decoder()
    decoder.feed(struct.pack("!I", 70000))
    with pytest.raises(ProtocolError, match="frame of 70000 bytes exceeds the 65536-byte limit"):
        decoder.next()


def test_custom_limits():
    decoder = Decoder(max_frame=10, max_fds=1)
    decoder.feed(ref_frame({"a": 1}))  # 8 bytes: fits
    with pytest.raises(ProtocolError) as exc:
        decoder.next()
    assert exc.value.code == "bad-field"  # past the length check
    messages, error, _ = run([(ref_frame({"abc": 123}), ())], Decoder(max_frame=10))
    assert error.code == "frame-too-large" and "10-byte limit" in error.message
    messages, error, _ = run([(B2, (1, 2))], Decoder(max_fds=1))
    assert error.code == "too-many-fds"
    messages, error, _ = run([(B1, (1,))], Decoder(max_fds=0))
    assert error.code == "too-many-fds"


@pytest.mark.parametrize("kwargs", [{"max_frame": 0}, {"max_frame": 2**32}, {"max_frame": True},
                                    {"max_fds": -1}, {"max_fds": 1.0}],
                         ids=["frame-0", "frame-2**32", "frame-bool", "fds-negative", "fds-float"])
def test_decoder_bad_limits(kwargs):
    with pytest.raises(ValueError, match="must be"):
        Decoder(**kwargs)


# ---------------------------------------------------------------------------------------------
# Malformed fd placement: every kind named

FD_CASES = {
    "fds-declared-not-sent": ([(B1, ())], "declares 1 fds but 0 arrived"),
    "fds-declared-2-sent-1": ([(B2, (7,))], "declares 2 fds but 1 arrived"),
    "fds-declared-1-sent-2": ([(B1, (7, 8))], "declares 1 fds but 2 arrived"),
    "fds-sent-not-declared": ([(A, (7,))], "frame 1 .*declares 0 fds but 1 arrived"),
    "fds-with-the-next-frame": ([(B1, ()), (A, (7,))], "frame 1 .*declares 1 fds but 0 arrived"),
    "fds-with-the-previous-frame": ([(A, (7,)), (B1, ())], "frame 1 .*declares 0 fds but 1 arrived"),
    "fds-for-a-middle-frame-glued": ([(A + B1 + C, (7,))], "frame 2 .*declares 1 fds but 0 arrived"),
    "fds-glued-to-the-wrong-frame": ([(B1 + A, (7,))], "frame 1 .*declares 1 fds but 0 arrived"),
    "fds-mid-frame": ([(B1[:6], ()), (B1[6:], (7,))],
                      "1 fds arrived with stream bytes 6..[0-9]+, inside frame 1 \\(at stream byte 0\\) "
                      "but not with its first byte"),
    "fds-mid-frame-in-the-prefix": ([(B1[:1], ()), (B1[1:], (7,))], "inside frame 1 .*but not with its first"),
    "fds-mid-second-frame": ([(A + B1[:8], ()), (B1[8:], (7,))], "inside frame 2"),
    "fds-tail-only-of-previous-frame": ([(A[:5], ()), (A[5:], (7,)), (B1, ())], "inside frame 1"),
    "fds-split-over-two-reads": ([(B2[:5], (7,)), (B2[5:], (8,))], "inside frame 1"),
    "fds-with-empty-data": ([(b"", (7,))], "1 fds arrived with no data at stream byte 0"),
    "fds-with-empty-data-between-frames": ([(B1, (7,)), (b"", (8,)), (A, ())], "no data at stream byte"),
    "fds-17-in-one-read": ([(B1, tuple(range(17)))], "17 fds arrived at stream byte 0 \\(the limit is 16\\)"),
    "fds-17-with-empty-data": ([(b"", tuple(range(17)))], "17 fds arrived"),
    "fds-after-a-bad-length": ([(b"\x00\x00\x00\x00", ()), (B1, (7,))], "length 0"),
}


@pytest.mark.parametrize("chunks, match", FD_CASES.values(), ids=FD_CASES.keys())
def test_fds_misplaced(chunks, match):
    messages, error, unclaimed = run(chunks)
    assert error is not None and re.search(match, error.message), error
    expected = {"fds-17-in-one-read": "too-many-fds", "fds-17-with-empty-data": "too-many-fds",
                "fds-after-a-bad-length": "empty-frame"}
    assert error.code in ("fd-count", *expected.values())
    fed = sorted(fd for _, fds in chunks for fd in fds)
    assert sorted(unclaimed) == fed or messages, "a failed frame hands out nothing"


def test_fds_with_a_good_frame_before_the_bad_one_are_handed_out():
    messages, error, unclaimed = run([(B1, (7,)), (B2, (8,))])
    assert [m.fds for m in messages] == [(7,)]
    assert error.code == "fd-count" and unclaimed == [8]


# ---------------------------------------------------------------------------------------------
# Sticky errors, EOF, teardown


def test_error_is_sticky_and_fds_fed_after_it_are_unclaimed():
    decoder = Decoder()
    decoder.feed(ref_frame("[]"), )
    with pytest.raises(ProtocolError) as first:
        decoder.next()
    assert first.value.code == "not-an-object" and decoder.error.code == "not-an-object"
    for _ in range(2):
        with pytest.raises(ProtocolError) as again:
            decoder.next()
        assert str(again.value) == str(first.value)
    with pytest.raises(ProtocolError, match="not an object"):
        decoder.feed(B1, (5,))
    with pytest.raises(ProtocolError, match="not an object"):
        decoder.eof()
    assert decoder.take_unclaimed_fds() == [5]
    with pytest.raises(ProtocolError, match="not an object"):
        decoder.feed(A, (6,))  # still the protocol error, even after teardown
    assert decoder.take_unclaimed_fds() == [6]


def test_pending_fds_are_taken_at_teardown_and_the_decoder_closes():
    decoder = Decoder()
    decoder.feed(B2[:10], (3, 4))
    assert decoder.next() is None
    assert decoder.take_unclaimed_fds() == [3, 4]
    assert decoder.take_unclaimed_fds() == []
    for operation in (decoder.next, decoder.eof):
        with pytest.raises(RuntimeError, match="after take_unclaimed_fds"):
            operation()
    with pytest.raises(RuntimeError, match="after take_unclaimed_fds"):
        decoder.feed(B1, (9,))
    assert decoder.take_unclaimed_fds() == [9]


def test_eof_at_a_frame_boundary():
    decoder = Decoder()
    decoder.eof()
    assert decoder.next() is None
    decoder = Decoder()
    decoder.feed(A + B1, (5,))
    decoder.eof()  # complete frames stay available
    decoder.eof()
    assert [m.id for m in drain(decoder)] == [1, 2]
    with pytest.raises(RuntimeError, match="feed\\(\\) after eof\\(\\)"):
        decoder.feed(C, (6,))
    assert decoder.take_unclaimed_fds() == [6]


@pytest.mark.parametrize("stream, code", [(b"\x00\x00\x00\x00", "empty-frame"),
                                          (b"\x00\x01\x00\x01", "frame-too-large"),
                                          (A + b"\x00\x00\x00\x00", "empty-frame"),
                                          (A + b"\x00\x00\x00\x05{", "truncated")],
                         ids=["zero-length", "over-max", "zero-length-after-a-frame", "short-body"])
def test_eof_without_next_reports_the_real_error(stream, code):
    decoder = Decoder()
    decoder.feed(stream)
    with pytest.raises(ProtocolError) as exc:
        decoder.eof()
    assert exc.value.code == code


def test_eof_inside_a_frame_keeps_its_fds_unclaimed():
    messages, error, unclaimed = run([(A + B2[:-1], (5, 6))])
    assert [m.id for m in messages] == [1]
    assert error.code == "truncated" and "frame 2" in error.message and unclaimed == [5, 6]


def test_protocol_error_str_and_pickle():
    import pickle
    exc = ProtocolError("bad-json", "frame 1 (at stream byte 0): invalid JSON")
    assert str(exc) == "frame 1 (at stream byte 0): invalid JSON [bad-json]"
    back = pickle.loads(pickle.dumps(exc))
    assert (back.code, back.message) == (exc.code, exc.message)


# ---------------------------------------------------------------------------------------------
# encode


class Opaque:
    pass


circular: dict = {"type": "response", "id": 1}
circular["result"] = circular

ENCODE_ERRORS = {
    "not-a-dict": ([{"type": "hello"}], {}, "a message is a dict"),
    "nfds-negative": (wire.request(1, "a"), {"nfds": -1}, "nfds must be an integer from 0 to 16"),
    "nfds-17": (wire.request(1, "a"), {"nfds": 17}, "nfds must be"),
    "nfds-bool": (wire.request(1, "a"), {"nfds": True}, "nfds must be"),
    "fds-key-disagrees": ({**wire.request(1, "a"), "fds": 2}, {"nfds": 1}, 'declares "fds": 2 but nfds is 1'),
    "fds-key-without-nfds": ({**wire.request(1, "a"), "fds": 1}, {}, 'declares "fds": 1 but nfds is 0'),
    "fds-key-bool": ({**wire.request(1, "a"), "fds": True}, {"nfds": 1}, 'declares "fds": True but nfds is 1'),
    "too-large": (wire.response(1, "x" * MAX_FRAME), {}, f"frame of {MAX_FRAME + 38} bytes exceeds the "
                                                         f"{MAX_FRAME}-byte limit"),
    "nan": (wire.response(1, float("nan")), {}, "cannot encode as JSON: Out of range float"),
    "infinity": (wire.response(1, float("inf")), {}, "Out of range float"),
    "not-serializable": (wire.response(1, Opaque()), {}, "Opaque is not JSON serializable"),
    "bytes": (wire.response(1, b"x"), {}, "bytes is not JSON serializable"),
    "circular": (circular, {}, "Circular reference"),
    "lone-surrogate": (wire.response(1, "\udc80"), {}, "lone UTF-16 surrogate"),
    "keys-collide": (wire.response(1, {1: "a", "1": "b"}), {}, 'duplicate key "1"'),
    "missing-type": ({"id": 1}, {}, 'outgoing message: the "type" key is missing'),
    "unknown-type": ({"type": "ping"}, {}, 'unknown message type "ping"'),
    "id-zero": (wire.request(0, "a"), {}, '"id" must be an integer from 1'),
    "id-bool": (wire.response(True, 1), {}, '"id" must be an integer from 1'),
    "id-2**53": (wire.event(2**53, {}), {}, '"id" must be an integer'),
    "method-empty": (wire.request(1, ""), {}, '"method" must be a non-empty string'),
    "params-list": (wire.request(1, "a", [1]), {}, '"params" must be an object'),  # type: ignore[arg-type]
    "event-not-object": (wire.event(1, [1]), {}, '"event" must be an object'),  # type: ignore[arg-type]
    "code-none": (wire.error(1, None, "m"), {}, '"code" must be a non-empty string'),  # type: ignore[arg-type]
    "versions-tuple-of-str": (wire.hello("t", ("1",)), {}, '"versions" must be a list'),  # type: ignore[arg-type]
}

ENCODE_ERRORS["too-deep-for-json"] = ({"type": "response", "id": 1, "result": _deep(5000)}, {},
                                      "nested deeper than 64 levels")
ENCODE_ERRORS["depth-65"] = ({"type": "response", "id": 1, "result": _deep(64)}, {},
                             "outgoing message: invalid JSON: nested deeper than 64 levels")


@pytest.mark.parametrize("obj, kwargs, match", ENCODE_ERRORS.values(), ids=ENCODE_ERRORS.keys())
def test_encode_refuses(obj, kwargs, match):
    with pytest.raises(ValueError, match=match):
        encode(obj, **kwargs)


def test_encode_is_compact_utf8_and_keeps_an_agreeing_fds_key():
    frame = encode({**wire.request(1, "ctl", {"p": "é"}), "fds": 2}, 2)
    assert frame[4:] == '{"type":"request","id":1,"method":"ctl","params":{"p":"é"},"fds":2}'.encode()
    assert encode({**wire.request(1, "a"), "fds": 0}) == ref_frame(b'{"type":"request","id":1,"method":"a",'
                                                                   b'"params":{},"fds":0}')
    assert encode(wire.request(1, "a"), 0)[4:] == b'{"type":"request","id":1,"method":"a","params":{}}'
    assert encode(wire.hello("t", range(1, 3)))[4:] == b'{"type":"hello","versions":[1,2],"software":"t"}'


def test_encode_custom_limit():
    assert len(encode(wire.response(1, 1), max_frame=37)) == 4 + 37
    with pytest.raises(ValueError, match="frame of 37 bytes exceeds the 36-byte limit"):
        encode(wire.response(1, 1), max_frame=36)


def test_encode_does_not_modify_its_argument():
    obj = wire.request(1, "a")
    encode(obj, 3)
    assert "fds" not in obj


# ---------------------------------------------------------------------------------------------
# negotiate


@pytest.mark.parametrize("ours, theirs, chosen", [
    ((1,), (1,), 1),
    ((1, 2, 3), (2, 3, 4), 3),
    ((3, 1), (1, 3), 3),
    ((1, 5), (5, 1, 9), 5),
    ([1], [1, 1, 1], 1),
], ids=["same", "overlap-highest", "unordered", "newer-peer", "duplicates"])
def test_negotiate(ours, theirs, chosen):
    assert negotiate(ours, theirs) == chosen == negotiate(theirs, ours)


@pytest.mark.parametrize("ours, theirs, match", [
    ((1,), (2,), "no protocol version in common: we speak 1, the peer speaks 2"),
    ((1, 2), (3, 4), "we speak 1, 2, the peer speaks 3, 4"),
    ((1,), (), "the peer speaks none"),
    ((), (1,), "we speak none"),
    ((), (), "we speak none, the peer speaks none"),
], ids=["disjoint", "disjoint-lists", "theirs-empty", "ours-empty", "both-empty"])
def test_negotiate_fails(ours, theirs, match):
    with pytest.raises(ProtocolError, match=match) as exc:
        negotiate(ours, theirs)
    assert exc.value.code == "version"


def test_negotiate_with_decoded_hellos():
    (message,) = decode([(encode(wire.hello("tether 2.0", [1, 2])), ())])
    assert negotiate(wire.PROTOCOL_VERSIONS, message.versions) == 1
    assert wire.PROTOCOL_VERSIONS == (1,)


# ---------------------------------------------------------------------------------------------
# The specification lists the same codes


def test_docs_list_every_error_code_with_whether_it_closes():
    text = DOC.read_text()
    rows = dict(re.findall(r"^\| `([a-z0-9-]+)` \| .* \| (yes|no[^|]*) \|$", text, re.M))
    assert set(rows) == set(wire.ERRORS), "docs/protocol.md and wire.ERRORS list different codes"
    for code, spec in wire.ERRORS.items():
        assert rows[code].startswith("yes" if spec.closes else "no"), code
        assert spec.meaning
    assert "## Methods" in text and "`status`" in text, "the methods are documented"
    for number in (str(MAX_FRAME), str(MAX_FDS)):
        assert number in text


def test_code_constants_match_the_table():
    constants = {value for name, value in vars(wire).items() if name.isupper() and isinstance(value, str)
                 and name not in ("LENGTH_PREFIX",)}
    assert constants == set(wire.ERRORS)


# ---------------------------------------------------------------------------------------------
# Properties: round trips over random messages, random reads and kernel-like fd placement

json_scalars = (st.none() | st.booleans() | st.integers(-(2**64), 2**64)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=12)
json_objects = st.dictionaries(st.text(max_size=6), json_values, max_size=4)
ids = st.integers(1, MAX_ID)
extra_keys = st.dictionaries(st.text(max_size=6).filter(
    lambda k: k not in {"type", "id", "method", "params", "result", "code", "message", "event", "versions",
                        "software", "fds"}), json_values, max_size=2)
message_dicts = st.one_of(
    st.builds(wire.hello, st.text(max_size=20), st.lists(st.integers(1, MAX_ID), max_size=4)),
    st.builds(wire.request, ids, st.text(min_size=1, max_size=20), st.none() | json_objects),
    st.builds(wire.response, ids, json_values),
    st.builds(wire.error, st.none() | ids, st.text(min_size=1, max_size=20), st.text(max_size=40)),
    st.builds(wire.event, ids, json_objects),
)
messages_with_extras = st.builds(lambda m, extra: {**extra, **m}, message_dicts, extra_keys)


@st.composite
def streams(draw, frames):
    """(chunks, frames): frames is [(bytes, nfds)]; chunks [(data, fds)] as recvmsg could return
    them: random cuts, but the read holding a frame's first byte ends inside that frame (the kernel
    stops after the fd-carrying skb) and brings its fds."""
    stream, starts, fd_frames = b"", [], []
    for frame, nfds in frames:
        starts.append(len(stream))
        if nfds:
            fd_frames.append((len(stream), len(stream) + len(frame), nfds))
        stream += frame
    cuts = set(draw(st.lists(st.integers(1, max(1, len(stream) - 1)), max_size=12)))
    numbers = iter(range(1000, 1000 + 17 * len(frames)))
    fd_at = {}
    for start, end, nfds in fd_frames:
        if not any(start < cut <= end for cut in cuts):
            cuts.add(draw(st.integers(start + 1, end)))
        fd_at[start] = tuple(next(numbers) for _ in range(nfds))
    bounds = sorted(c for c in cuts | {len(stream)} if 0 < c <= len(stream))
    chunks, begin = [], 0
    for end in bounds:
        fds = tuple(fd for start, batch in fd_at.items() if begin <= start < end for fd in batch)
        chunks.append((stream[begin:end], fds))
        begin = end
    return chunks, fd_at


frame_lists = st.lists(st.tuples(messages_with_extras, st.integers(0, 3)), min_size=1, max_size=6)


@given(frame_lists, st.data())
def test_property_round_trip_any_reads(frames, data):
    encoded = [(encode(obj, nfds), nfds) for obj, nfds in frames]
    chunks, fd_at = data.draw(streams(encoded))
    got, error, unclaimed = run(chunks)
    assert error is None and unclaimed == []
    assert [m.raw for m in got] == [{**obj, "fds": nfds} if nfds else obj for obj, nfds in frames]
    expected_fds = []
    offset = 0
    for frame, nfds in encoded:
        expected_fds.append(fd_at.get(offset, ()))
        offset += len(frame)
    assert [m.fds for m in got] == expected_fds
    for message, (obj, _) in zip(got, frames):
        assert message.type == obj["type"]
        if "id" in obj:
            assert message.id == obj["id"]


BAD_BODIES = [b"", b"\xff", b"[]", b"{}", b"nul", b'{"type":"nope"}', b'{"type":"request","id":0,"method":"a"}',
              b'{"a":1,"a":2}', b'{"x":NaN}', b'"\\ud800"']


@st.composite
def messy_streams(draw):
    """Random mixes of good and bad frames, declared fd counts that may lie, fds fed with random
    reads (empty ones included), random truncation."""
    stream = b""
    for _ in range(draw(st.integers(1, 5))):
        if draw(st.booleans()):
            obj = draw(message_dicts)
            declared = draw(st.integers(0, 3))
            stream += ref_frame({**obj, "fds": declared} if declared else obj)
        else:
            body = draw(st.sampled_from(BAD_BODIES))
            stream += struct.pack("!I", len(body) if draw(st.booleans()) else draw(st.integers(0, 2**32 - 1)))
            stream += body
    if draw(st.booleans()):
        stream = stream[:draw(st.integers(0, len(stream)))]
    cuts = sorted(set(draw(st.lists(st.integers(0, len(stream)), max_size=10))) | {len(stream)})
    numbers = fd_numbers()
    chunks, begin = [], 0
    for end in cuts:
        count = draw(st.sampled_from([0, 0, 0, 1, 2, 3, 17]))
        chunks.append((stream[begin:end], tuple(next(numbers) for _ in range(count))))
        begin = end
    return chunks


@given(messy_streams())
def test_property_every_fd_accounted_for(chunks):
    messages_, error, unclaimed = run(chunks)  # run() asserts the accounting and stickiness
    for message in messages_:
        assert len(message.fds) == message.raw.get("fds", 0)


@given(st.lists(st.tuples(st.binary(max_size=40), st.lists(st.integers(0, 10**6), max_size=3, unique=True)),
                max_size=8))
@example([(b"\x00\x00\x00\x02{}", [])])
@example([(b"\x00\x00\x00\x02[]", [1])])
def test_property_random_bytes_raise_only_protocol_error(parts):
    seen: set[int] = set()
    chunks = []
    for data, fds in parts:  # unique fake fds across the whole run
        fresh = tuple(fd for fd in fds if fd not in seen)
        seen.update(fresh)
        chunks.append((data, fresh))
    run(chunks)  # anything but ProtocolError fails the test


@given(st.binary(max_size=200))
def test_property_random_bodies_raise_only_protocol_error(body):
    stream = ref_frame(body)
    messages_, error, _ = run([(stream, ())])
    assert error is not None or len(messages_) == 1


@given(frame_lists, st.lists(st.tuples(st.sampled_from(["flip", "delete", "insert"]), st.integers(0, 10**6),
                                       st.integers(0, 255)), min_size=1, max_size=4), st.data())
def test_property_mutated_streams(frames, mutations, data):
    encoded = [(encode(obj, nfds), nfds) for obj, nfds in frames]
    chunks, _ = data.draw(streams(encoded))
    stream = bytearray(b"".join(c for c, _ in chunks))
    for kind, where, value in mutations:
        at = where % (len(stream) + 1)
        if kind == "insert":
            stream[at:at] = bytes([value])
        elif at < len(stream):
            if kind == "flip":
                stream[at] ^= value or 1
            else:
                del stream[at]
    # Keep the original fd placement by offset, clipped to the mutated length.
    remapped, begin = [], 0
    for piece, fds in chunks:
        end = min(begin + len(piece), len(stream))
        remapped.append((bytes(stream[begin:end]), fds))
        begin = end
    remapped.append((bytes(stream[begin:]), ()))
    run(remapped)


@given(json_values)
def test_property_strict_json_agrees_with_json_dumps(value):
    """Whatever json.dumps emits for finite values (no surrogates) the decoder accepts unchanged."""
    (message,) = decode([(ref_frame({"type": "response", "id": 1, "result": value}), ())])
    assert message.result == value
