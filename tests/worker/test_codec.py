"""The codec registry: values cross as JSON and descriptors; hostile encodings are refused with
CodecError only (fuzzed)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devicehost import LocalOffer, saved_state
from devicehost.worker.codec import (
    CodecError,
    Decoder,
    Encoder,
    decode_value,
    encode_value,
    register_codec,
)


@saved_state("tests.CodecState", 1)
@attrs.frozen
class State:
    count: int
    data: bytes


def round_trip(value: Any) -> Any:
    data, fds = encode_value(value)
    return decode_value(json.loads(json.dumps(data)), [os.dup(fd) for fd in fds])


def test_plain_values_local_offers_and_saved_states_cross() -> None:
    value = {"a": [1, 2.5, None, True], "b": (b"\x00\xff", "x"), "offer": LocalOffer({"n": 1}),
             "state": State(3, b"abc")}
    assert round_trip(value) == value


def test_a_type_without_a_codec_is_refused_naming_it() -> None:
    with pytest.raises(CodecError, match="no codec is registered"):
        encode_value(object())


@attrs.frozen
class Pipe:
    sock: socket.socket
    label: str


def _encode_pipe(value: Pipe, out: Encoder) -> Any:
    return {"fd": out.fd(value.sock), "label": value.label}


def _decode_pipe(data: Any, inp: Decoder) -> Pipe:
    fields = inp.fields(data, "fd", "label")
    return Pipe(socket.socket(fileno=inp.fd(fields["fd"], "socket")), str(fields["label"]))


register_codec(Pipe, "tests.Pipe", _encode_pipe, _decode_pipe)


def test_a_codec_moves_a_descriptor() -> None:
    left, right = socket.socketpair()
    with left, right:
        moved = round_trip(Pipe(left, "x"))
        with moved.sock:
            assert moved.label == "x" and moved.sock.fileno() != left.fileno()
            moved.sock.sendall(b"ping")
            assert right.recv(4) == b"ping"


def test_a_descriptor_of_the_wrong_kind_is_refused_and_closed() -> None:
    read, write = os.pipe()
    os.close(write)
    data = {"@": "tests.Pipe", "v": {"fd": 0, "label": "x"}}
    with pytest.raises(CodecError, match="is a fifo, not a socket"):
        decode_value(data, [read])
    with pytest.raises(OSError):
        os.fstat(read)


def test_untaken_descriptors_are_closed() -> None:
    read, write = os.pipe()
    os.close(write)
    assert decode_value(5, [read]) == 5
    with pytest.raises(OSError):
        os.fstat(read)


def test_a_tag_taken_by_another_type_is_refused() -> None:
    with pytest.raises(ValueError, match="taken"):
        register_codec(State, "tests.Pipe", _encode_pipe, _decode_pipe)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(["@", "v", "x", "type", "version", "payload",
                                       "description"]), children, max_size=4),
    max_leaves=30)
tags = st.sampled_from(["bytes", "list", "tuple", "dict", "saved-state", "devicehost.LocalOffer",
                        "tests.Pipe", "nope"])


@settings(max_examples=300, deadline=None)
@given(st.one_of(json_values, st.builds(lambda t, v: {"@": t, "v": v}, tags, json_values)))
def test_decoding_hostile_values_raises_only_codec_error(data: Any) -> None:
    with contextlib.suppress(CodecError):
        decode_value(data)


def test_nesting_is_bounded() -> None:
    data: Any = 1
    for _ in range(200):
        data = {"@": "list", "v": [data]}
    with pytest.raises(CodecError, match="deeper"):
        decode_value(data)


@attrs.frozen
class Held:
    name: str


released: list[str] = []


def _release_held(value: Held) -> None:
    if value.name == "bad":
        raise RuntimeError("cannot release")
    released.append(value.name)


register_codec(Held, "tests.Held", lambda v, out: {"name": v.name},
               lambda d, inp: Held(str(inp.fields(d, "name")["name"])), _release_held)


def test_release_runs_the_codecs_release_and_logs_its_failure(
        caplog: pytest.LogCaptureFixture) -> None:
    from devicehost.worker.codec import release_value

    release_value(Held("a"))
    release_value(Held("bad"))
    release_value(LocalOffer())  # a codec without release: nothing to do
    assert released == ["a"]
    assert "releasing a Held failed" in caplog.text
