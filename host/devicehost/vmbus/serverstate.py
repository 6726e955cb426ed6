"""The VMBus server's saved state: which channels were offered, open, and which GPADLs existed.

Saved-state values are wire-stable (facts §7): they are separate from the server's runtime types
and are decoded from hostile input by :mod:`devicehost.savedstate` before the server sees them.
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs

from devicehost.savedstate import saved_state
from devicehost.vmbus.guid import Guid
from devicehost.vmbus.protocol import OfferKey

__all__ = ["SavedChannel", "SavedGpadl", "SavedOpen", "ServerSavedState"]


def _int_tuple(values: Iterable[int]) -> tuple[int, ...]:
    return tuple(values)


def _saved_gpadl_tuple(values: Iterable[SavedGpadl]) -> tuple[SavedGpadl, ...]:
    return tuple(values)


def _saved_channel_tuple(values: Iterable[SavedChannel]) -> tuple[SavedChannel, ...]:
    return tuple(values)


@attrs.frozen
class SavedGpadl:
    """A GPADL that existed: its id, range count and range buffer."""

    id: int
    count: int
    buf: tuple[int, ...] = attrs.field(converter=_int_tuple)


@attrs.frozen
class SavedOpen:
    """The open data of a channel that was open."""

    ring_gpadl_id: int
    ring_offset: int
    target_vp: int | None
    event_flag: int
    connection_id: int
    user_data: bytes


@attrs.frozen
class SavedChannel:
    """One offer's server state: its key (as text), channel id, GPADLs and open data."""

    interface_id: str
    instance_id: str
    subchannel_index: int
    channel_id: int
    gpadls: tuple[SavedGpadl, ...] = attrs.field(converter=_saved_gpadl_tuple)
    open: SavedOpen | None = None

    @property
    def key(self) -> OfferKey:
        return OfferKey(
            Guid.parse(self.interface_id), Guid.parse(self.instance_id), self.subchannel_index
        )


@saved_state("vmbus.ServerSavedState", 1)
@attrs.frozen
class ServerSavedState:
    """What :meth:`VmbusServer.save` records."""

    channels: tuple[SavedChannel, ...] = attrs.field(converter=_saved_channel_tuple)
    next_channel_id: int = 1
