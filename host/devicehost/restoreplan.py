"""A saved-state envelope decoded and checked against the config, before anything is served.

The envelope (:mod:`devicehost.savedstate`) is hostile input. :func:`plan_for` decodes it into a
:class:`RestorePlan`: per configured device its state (``None``: offer it fresh, with the reason
in ``not_saved``) and the VMBus server's state (entry :data:`VMBUS_ENTRY`). A device the config
does not have, or serves with another plugin, and any undecodable entry is a
:class:`~devicehost.errors.SavedStateError`; the layout and the decisions are in
:mod:`devicehost.host`'s docstring.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Final

import attrs

from devicehost.errors import SavedStateError
from devicehost.excerpt import excerpt
from devicehost.savedstate import (
    SavedEntry,
    decode_envelope_untrusted,
    decode_state_untrusted,
    saved_state,
)

if TYPE_CHECKING:
    from devicehost.vmbus.server import ServerSavedState

__all__ = [
    "HOST_PLUGIN",
    "VMBUS_ENTRY",
    "VMBUS_SOCKET_ENTRY",
    "NotSaved",
    "RestorePlan",
    "plan_for",
    "plan_untrusted",
    "short_reason",
]

#: The envelope entry (device name) that holds the VMBus server's state.
VMBUS_ENTRY: Final = "@vmbus"
#: The envelope entry of the VMBus socket's guest in a live handover.
VMBUS_SOCKET_ENTRY: Final = "@vmbus-socket"
#: The plugin name of the host's own envelope entries.
HOST_PLUGIN: Final = "host"
_MAX_REASON: Final = 200


@saved_state("host.NotSaved", 1)
@attrs.frozen
class NotSaved:
    """The envelope entry of a device that saved nothing: it is offered fresh on restore."""

    reason: str


@attrs.frozen
class RestorePlan:
    """A decoded, checked saved state: per device its state (None: offer fresh) and why not."""

    states: dict[str, Any]
    not_saved: dict[str, str]
    vmbus: ServerSavedState | None
    #: The VMBus socket's guest (a live handover only: devicehost.vmbus.handover).
    vmbus_socket: Any = None


def short_reason(text: str) -> str:
    """``text`` (a saved reason or an error: untrusted) bounded for a restore report."""
    return excerpt(text, _MAX_REASON)


def plan_for(data: bytes, devices: Iterable[Any], source: str) -> RestorePlan:
    """Decode ``data`` against the configured ``devices``; SavedStateError naming ``source``."""
    try:
        return plan_untrusted(data, {d.name: d.plugin for d in devices})
    except SavedStateError as exc:
        raise SavedStateError(f"{source}: {exc}; the host does not start") from exc


def plan_untrusted(data: bytes, configured: dict[str, str]) -> RestorePlan:
    """Decode ``data`` against ``configured`` (device name -> plugin); SavedStateError."""
    states: dict[str, Any] = {}
    not_saved: dict[str, str] = {}
    vmbus: ServerSavedState | None = None
    vmbus_socket = None
    for entry in decode_envelope_untrusted(data):
        if entry.device == VMBUS_SOCKET_ENTRY and entry.plugin == HOST_PLUGIN:
            from devicehost.vmbus.handover import SocketHandoverState

            vmbus_socket = decode_state_untrusted(entry, SocketHandoverState)
            continue
        if entry.device.startswith("@"):
            vmbus = _decode_vmbus_entry(entry)
            continue
        plugin = configured.get(entry.device)
        if plugin is None:
            raise SavedStateError(
                f"it holds device {excerpt(entry.device)} (plugin {excerpt(entry.plugin)}), which"
                " the config does not have; add the device back, or start without this saved"
                " state"
            )
        if plugin != entry.plugin:
            raise SavedStateError(
                f"device {entry.device!r} was saved by plugin {excerpt(entry.plugin)}, but the"
                f" config serves it with plugin {plugin!r}"
            )
        if entry.type_name == "host.NotSaved":
            not_saved[entry.device] = decode_state_untrusted(entry, NotSaved).reason
            states[entry.device] = None
        else:
            states[entry.device] = decode_state_untrusted(entry)
    if vmbus_socket is not None and vmbus is None:
        raise SavedStateError(f"it holds {VMBUS_SOCKET_ENTRY!r} without '@vmbus'")
    return RestorePlan(states, not_saved, vmbus, vmbus_socket)


def _decode_vmbus_entry(entry: SavedEntry) -> ServerSavedState:
    if entry.device != VMBUS_ENTRY or entry.plugin != HOST_PLUGIN:
        raise SavedStateError(
            f"unknown host entry {excerpt(entry.device)} (plugin {excerpt(entry.plugin)})"
        )
    from devicehost.vmbus.server import ServerSavedState

    state: ServerSavedState = decode_state_untrusted(entry, ServerSavedState)
    keys, ids = set(), set()
    for channel in state.channels:
        try:
            key = channel.key
        except ValueError as exc:
            raise SavedStateError(f"device '@vmbus': a channel's GUID is invalid: {exc}") from exc
        if key in keys or channel.channel_id in ids or channel.channel_id <= 0:
            raise SavedStateError(
                f"device '@vmbus': channel {channel.channel_id} repeats an offer or a channel id"
            )
        keys.add(key)
        ids.add(channel.channel_id)
    return state
