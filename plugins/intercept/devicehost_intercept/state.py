"""Saved state of the intercept plugin: blobs of intercepted devices, and the relay's state.

A *blob* is one saved-state value wrapped with its type name and version (facts §7: upstream's
``SavedStateBlob``, a protobuf Any). Here a blob is a :class:`devicehost.savedstate.SavedEntry`
and its bytes are a one-entry saved-state envelope, so decoding reuses the host's hostile-input
checks: :func:`decode_blob_untrusted` raises only :class:`devicehost.SavedStateError`.

The relay saves, per intercepted channel, the instance id it routes by, the intercepted device's
blob as bytes, and ``is_open`` (always false: a wrapper closes its channel on every stop, and a
relay restore refuses a channel saved open, facts §10.1).
"""

from __future__ import annotations

from typing import Any

import attrs

from devicehost.errors import SavedStateError
from devicehost.savedstate import (
    NoSavedState,
    SavedEntry,
    decode_envelope_untrusted,
    encode_envelope,
    entry_for,
    saved_state,
)

__all__ = [
    "InterceptedChannel",
    "RelaySavedState",
    "blob_for",
    "decode_blob_untrusted",
    "encode_blob",
    "no_saved_state_blob",
]


def blob_for(device: str, plugin: str, value: Any) -> SavedEntry:
    """The blob of ``value`` (a registered saved-state value) saved by ``device`` of ``plugin``."""
    return entry_for(device, plugin, value)


def no_saved_state_blob(device: str, plugin: str) -> SavedEntry:
    """The blob that says "nothing to save" (``save_restore.NoSavedState``)."""
    return entry_for(device, plugin, NoSavedState())


def encode_blob(blob: SavedEntry) -> bytes:
    """The bytes of ``blob``: a saved-state envelope holding exactly that one entry."""
    return encode_envelope([blob])


def decode_blob_untrusted(data: bytes) -> SavedEntry:
    """The blob held by ``data``; raises only :class:`SavedStateError`."""
    entries = decode_envelope_untrusted(data)
    if len(entries) != 1:
        raise SavedStateError(
            f"intercepted saved state: a blob holds exactly one entry, this one holds "
            f"{len(entries)}"
        )
    return entries[0]


@attrs.frozen
class InterceptedChannel:
    """One intercepted channel in the relay's saved state."""

    #: The instance id (a GUID string) whose offers the relay routes to the intercepting device.
    instance_id: str
    #: The intercepted device's blob (:func:`encode_blob`).
    intercepted_save_state: bytes
    #: Whether the channel was saved open: never, since stopping closes it (facts §10.1).
    is_open: bool = False


@saved_state("intercept.RelaySavedState", 1)
@attrs.frozen
class RelaySavedState:
    """The saved state of the intercept relay (``intercept.RelaySavedState`` version 1)."""

    channels: tuple[InterceptedChannel, ...] = ()
