"""Blobs: one-entry envelopes, decoded as hostile input."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devicehost import SavedStateError
from devicehost.savedstate import NoSavedState, decode_state_untrusted, encode_envelope, entry_for
from devicehost_intercept.state import (
    blob_for,
    decode_blob_untrusted,
    encode_blob,
    no_saved_state_blob,
)

from .harness import EchoState


def test_blob_round_trip() -> None:
    blob = blob_for("dev", "plug", EchoState(7))
    again = decode_blob_untrusted(encode_blob(blob))
    assert again == blob
    assert decode_state_untrusted(again, EchoState) == EchoState(7)
    assert decode_blob_untrusted(encode_blob(no_saved_state_blob("d", "p"))).type_name == (
        "save_restore.NoSavedState")


def test_a_blob_holds_exactly_one_entry() -> None:
    nothing = NoSavedState()
    two = encode_envelope([entry_for("a", "p", nothing), entry_for("b", "p", nothing)])
    with pytest.raises(SavedStateError, match="exactly one entry"):
        decode_blob_untrusted(two)
    with pytest.raises(SavedStateError, match="exactly one entry"):
        decode_blob_untrusted(encode_envelope([]))


@settings(max_examples=250, deadline=None)
@given(st.binary(max_size=600))
def test_decoding_garbage_raises_only_saved_state_error(data: bytes) -> None:
    with contextlib.suppress(SavedStateError):
        decode_blob_untrusted(data)


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=len(encode_blob(blob_for("d", "p", EchoState(3))))),
       st.binary(min_size=1, max_size=8))
def test_corrupted_blobs_raise_only_saved_state_error(at: int, junk: bytes) -> None:
    data = bytearray(encode_blob(blob_for("d", "p", EchoState(3))))
    data[at:at + len(junk)] = junk
    try:
        blob = decode_blob_untrusted(bytes(data))
        decode_state_untrusted(blob, EchoState)
    except SavedStateError:
        pass
