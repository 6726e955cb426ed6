"""The worker's messages: what a worker sends is decoded as hostile (fuzzed), one error type."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devicehost.worker.messages import (
    MAX_REPORT_BYTES,
    Ended,
    Failure,
    Pong,
    Report,
    Result,
    WorkerProtocolError,
    decode_from_worker_untrusted,
    decode_to_worker,
    encode_message,
)


def test_each_message_of_a_worker_decodes() -> None:
    cases: list[tuple[dict[str, Any], Any]] = [
        ({"op": "result", "id": 3, "value": [1]}, Result(3, [1])),
        ({"op": "error", "id": 3, "type": "ValueError", "message": "m", "key": None},
         Failure(3, "ValueError", "m")),
        ({"op": "ended", "runner": 1, "outcome": "raised", "error": "E: x"},
         Ended(1, "raised", "E: x")),
        ({"op": "report", "key": "k", "value": {"a": 1}}, Report("k", {"a": 1})),
        ({"op": "pong", "id": 9}, Pong(9)),
    ]
    for message, expected in cases:
        assert decode_from_worker_untrusted(encode_message(message)) == expected


@pytest.mark.parametrize("message,match", [
    (b"\xff", "not JSON"),
    (b"[]", "without an op"),
    (json.dumps({"op": "result", "id": -1, "value": 1}).encode(), "non-negative"),
    (json.dumps({"op": "result", "id": 1}).encode(), "keys"),
    (json.dumps({"op": "ended", "runner": 1, "outcome": "won", "error": None}).encode(),
     "outcome"),
    (json.dumps({"op": "report", "key": "", "value": 1}).encode(), "report key"),
    (json.dumps({"op": "report", "key": "k", "value": "x" * MAX_REPORT_BYTES}).encode(),
     "over"),
    (json.dumps({"op": "init"}).encode(), "unknown op"),
])
def test_malformed_messages_of_a_worker_are_refused(message: bytes, match: str) -> None:
    with pytest.raises(WorkerProtocolError, match=match):
        decode_from_worker_untrusted(message)


def test_a_call_of_an_unknown_hook_is_refused_by_the_worker() -> None:
    with pytest.raises(WorkerProtocolError, match="unknown hook"):
        decode_to_worker(encode_message({"op": "call", "id": 1, "hook": "exec", "args": {}}))


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["op", "id", "value", "type", "message", "key", "runner",
                                        "outcome", "error"]),
                       st.none() | st.integers() | st.text(max_size=6)
                       | st.sampled_from(["result", "error", "ended", "report", "pong",
                                          "returned"]),
                       max_size=6)
       | st.binary(max_size=40).map(lambda b: {"raw": b.hex()}))
def test_hostile_messages_raise_only_worker_protocol_error(message: dict[str, Any]) -> None:
    with contextlib.suppress(WorkerProtocolError):
        decode_from_worker_untrusted(encode_message(message))
