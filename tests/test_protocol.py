"""The wire format: every client frame parses or fails with bad_frame; encoders round-trip."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import msgpack
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chat import protocol
from chat.protocol import (
    CloseCode,
    Encoded,
    ErrorCode,
    HistoryRequest,
    Join,
    Leave,
    Ping,
    Pong,
    Post,
    ProtocolError,
    Typing,
    WireFormat,
)

JSON, MSGPACK = WireFormat.JSON, WireFormat.MSGPACK


def both(frame: dict[str, Any]) -> list[tuple[str | bytes, WireFormat]]:
    return [(json.dumps(frame), JSON), (msgpack.packb(frame), MSGPACK)]


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        ({"type": "join", "room": "lobby"}, Join("lobby")),
        ({"type": "join", "room": "lobby", "since": 41}, Join("lobby", 41)),
        ({"type": "join", "room": "lobby", "since": None}, Join("lobby")),
        ({"type": "leave", "room": "lobby"}, Leave("lobby")),
        ({"type": "message", "room": "r", "body": "gg"}, Post("r", "gg")),
        ({"type": "message", "room": "r", "body": "gg", "client_id": "c1"}, Post("r", "gg", "c1")),
        ({"type": "typing", "room": "r"}, Typing("r")),
        ({"type": "history", "room": "r"}, HistoryRequest("r")),
        ({"type": "history", "room": "r", "before": 9, "limit": 20}, HistoryRequest("r", 9, 20)),
        ({"type": "ping"}, Ping()),
        ({"type": "pong", "n": 7}, Pong(7)),
        ({"type": "join", "room": "r", "extra": [1, 2]}, Join("r")),
    ],
)
def test_valid_frames_parse_in_both_formats(frame: dict[str, Any], expected: Any) -> None:
    """Each client frame type parses to its frame class from JSON and from msgpack."""
    for data, fmt in both(frame):
        assert protocol.parse(data, fmt) == expected


@pytest.mark.parametrize(
    "frame",
    [
        [],
        "join",
        42,
        {},
        {"type": 5},
        {"type": "teleport"},
        {"type": "join"},
        {"type": "join", "room": ""},
        {"type": "join", "room": "x" * 65},
        {"type": "join", "room": 12},
        {"type": "join", "room": "r", "since": -1},
        {"type": "join", "room": "r", "since": "12"},
        {"type": "join", "room": "r", "since": True},
        {"type": "join", "room": "r", "since": 1.5},
        {"type": "join", "room": "r", "since": 2**63},
        {"type": "message", "room": "r"},
        {"type": "message", "room": "r", "body": ["gg"]},
        {"type": "message", "room": "r", "body": "gg", "client_id": ""},
        {"type": "message", "room": "r", "body": "gg", "client_id": "c" * 65},
        {"type": "message", "room": "r", "body": "gg", "client_id": 3},
        {"type": "history", "room": "r", "limit": 0},
        {"type": "history", "room": "r", "before": 0},
        {"type": "pong", "n": "x"},
    ],
)
def test_malformed_frames_are_bad_frame(frame: Any) -> None:
    """Wrong shapes, missing or mistyped fields and unknown types all raise bad_frame."""
    for data, fmt in both(frame):
        with pytest.raises(ProtocolError) as info:
            protocol.parse(data, fmt)
        assert info.value.code is ErrorCode.BAD_FRAME


@pytest.mark.parametrize(
    ("data", "fmt"),
    [
        ("{not json", JSON),
        ("", JSON),
        (b"\xff\xfe", JSON),
        ("[" * 5000 + "]" * 5000, JSON),
        (b"\xc1", MSGPACK),
        (b"\x81", MSGPACK),  # truncated map
        (msgpack.packb({"type": "ping"}) + b"\x00", MSGPACK),  # trailing bytes
        ("text on a msgpack socket", MSGPACK),
        (b"\x91" * 5000 + b"\x90", MSGPACK),  # nesting deeper than the unpacker allows
    ],
)
def test_undecodable_input_is_bad_frame(data: str | bytes, fmt: WireFormat) -> None:
    """Garbage, truncation, trailing bytes and absurd nesting never escape as other errors."""
    with pytest.raises(ProtocolError) as info:
        protocol.parse(data, fmt)
    assert info.value.code is ErrorCode.BAD_FRAME


def test_message_errors_carry_the_client_id_as_ref() -> None:
    """A rejected message tells the sender which of its messages it was."""
    with pytest.raises(ProtocolError) as info:
        protocol.parse(json.dumps({"type": "message", "room": "", "client_id": "c9"}), JSON)
    assert info.value.ref == "c9"


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(
    value=json_values
    | st.fixed_dictionaries(
        {
            "type": st.sampled_from(
                ["join", "leave", "message", "typing", "history", "ping", "pong"]
            )
        },
        optional={
            "room": json_values,
            "body": json_values,
            "since": json_values,
            "before": json_values,
            "limit": json_values,
            "client_id": json_values,
            "n": json_values,
        },
    )
)
def test_any_decoded_value_parses_or_raises_protocol_error(value: Any) -> None:
    """Whatever a client sends, the parser returns a frame or a ProtocolError, nothing else."""
    for fmt, data in ((JSON, orjson.dumps(value)), (MSGPACK, msgpack.packb(value))):
        with contextlib.suppress(ProtocolError):
            protocol.parse(data, fmt)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=256))
def test_random_bytes_parse_or_raise_protocol_error(data: bytes) -> None:
    """Random bytes never crash the parser in either format."""
    for fmt in (JSON, MSGPACK):
        with contextlib.suppress(ProtocolError):
            protocol.parse(data, fmt)


def test_select_subprotocol_prefers_msgpack_and_defaults_to_json() -> None:
    assert protocol.select_subprotocol(["chat.json", "chat.msgpack"]) == (MSGPACK, "chat.msgpack")
    assert protocol.select_subprotocol(["chat.json"]) == (JSON, "chat.json")
    assert protocol.select_subprotocol([]) == (JSON, None)
    assert protocol.select_subprotocol(["graphql-ws"]) == (JSON, None)


def test_encoded_frame_is_built_once_per_format_and_reused() -> None:
    """The fan-out shares one encoded event object per wire format."""
    frame = protocol.message(room="r", id=1, user="u", body="é gg", ts=1, client_id="c")
    encoded = Encoded(frame)
    text_event = encoded.event(JSON)
    assert encoded.event(JSON) is text_event
    assert json.loads(text_event["text"]) == frame
    assert encoded.size(JSON) == len(text_event["text"].encode())
    binary = encoded.event(MSGPACK)
    assert msgpack.unpackb(binary["bytes"]) == frame
    assert encoded.size(MSGPACK) == len(binary["bytes"])


def test_server_frames_have_the_documented_shapes() -> None:
    """Spot checks of the contract in docs/protocol.md."""
    assert protocol.ack(room="r", client_id=None, id=3, ts=5) == {
        "type": "ack",
        "room": "r",
        "client_id": None,
        "id": 3,
        "ts": 5,
        "duplicate": False,
    }
    assert protocol.error(ErrorCode.TOO_LONG, "d", ref="c", limit=500) == {
        "type": "error",
        "code": "too_long",
        "detail": "d",
        "ref": "c",
        "limit": 500,
    }
    assert "client_id" not in protocol.message(room="r", id=1, user="u", body="b", ts=1)
    assert protocol.batch([{"type": "x"}]) == {"type": "batch", "messages": [{"type": "x"}]}
    assert CloseCode.SLOW_CONSUMER == 4008
