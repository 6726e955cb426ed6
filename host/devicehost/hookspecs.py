"""The device lifecycle hook specifications.

A device type is a class named by an entry point of group ``devicehost``. The host builds one
instance per configured device and registers it, alone, in a plugin manager of its own, together
with the cross-cutting plugins (tracing, metrics, fault injection). A call for one device therefore
never reaches another device's implementation, while a cross-cutting plugin sees every device's
calls and can wrap them with ``@hookimpl(wrapper=True)``.

Every hook receives ``ctx``, the :class:`devicehost.DeviceContext` of the device being called:
its name, its plugin, its validated config and its logger. Implementations may accept any subset
of a hook's arguments, as pluggy allows.

The lifecycle, for a server device (VMBus channel, virtio device, local device)::

    offer -> open -> run (cancelled by stop, called again by start) -> close
                  \\-> save_open (while open) ... restore_open -> run

A VMBus *client* device (``devicehost-intercept``) uses the same hooks in client form: ``offer``
is first called with ``incoming=None`` and returns an :class:`devicehost.vmbus.InterceptClaim`
naming the instance id it intercepts; it is then called with each matching incoming offer and
answers :data:`devicehost.vmbus.OfferAction.OPEN` or ``IGNORE``; ``open`` and ``restore_open``
get a :class:`devicehost.vmbus.ClientOpenResources` (subchannel index and the raw channel);
``close`` gets the subchannel index; ``save_open`` (None = not supported) and ``restore_open``
are optional, and ``restore_open`` gets resources over a *new* channel (the wrapper closes the
channel on every stop). Such a device may declare the class attributes ``saved_state_class`` (the
type a restored blob must have) and ``intercept_ring_pages`` (data pages per ring, default 1);
see ``docs/plugins/intercept.md``.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from devicehost.context import DeviceContext

__all__ = [
    "close",
    "hookspec",
    "inspect",
    "offer",
    "open",
    "restore_open",
    "run",
    "save_open",
]

hookspec = pluggy.HookspecMarker("devicehost")
#: Marker for device hook implementations; public as ``devicehost.hookimpl`` (not listed in
#: ``__all__`` here, which names the specs).
hookimpl = pluggy.HookimplMarker("devicehost")


@hookspec(firstresult=True)
def offer(ctx: DeviceContext, incoming: Any | None) -> Any | None:
    """Describe what the device offers on its transport.

    :param ctx: The device being offered.
    :param incoming: ``None`` for a server device and for a client device's claim; for a VMBus
        client device, the incoming offer (:class:`devicehost.vmbus.IncomingOffer`) it claimed.
    :returns: The offer: :class:`devicehost.vmbus.OfferParams` for a VMBus channel,
        :class:`devicehost.virtio.DeviceTraits` for a virtio device, :class:`devicehost.LocalOffer`
        for a device without a bus, :class:`devicehost.vmbus.InterceptClaim` for a VMBus client
        device's claim, or :class:`devicehost.vmbus.OfferAction` for a client device answering an
        incoming offer.

    Stops at first non-None result.

    Called once when the device is added to the host, and again after the device was revoked and
    is offered anew.
    """


@hookspec(firstresult=True)
def open(ctx: DeviceContext, resources: Any) -> Any | None:
    """Open the device over its transport's resources and build its runner.

    :param ctx: The device being opened.
    :param resources: What the transport made ready: for VMBus
        :class:`devicehost.vmbus.OpenResources` (raw channel, guest memory, open request); for
        virtio :class:`devicehost.virtio.QueueResources` (started queues, negotiated features,
        guest memory); for a local device the :class:`devicehost.LocalOffer` it returned.
    :returns: The runner: a value holding all per-open state. It is handed to ``run``, ``close``,
        ``save_open`` and ``inspect`` and dropped after ``close``. Raising fails the open; the
        transport reports the failure to its peer (VMBus: OpenResult status 0x8000FFFF).

    Stops at first non-None result.

    Called when the transport's resources are ready: the guest opened the channel, the driver
    started all queues, or (local devices) right after ``offer``.
    """


@hookspec(firstresult=True)
def run(ctx: DeviceContext, runner: Any) -> Awaitable[None] | None:
    """Return the awaitable that processes the device's work until it is cancelled.

    :param ctx: The device being run.
    :param runner: The runner ``open`` or ``restore_open`` returned.
    :returns: An awaitable. Stopping the device cancels it; starting it again calls ``run`` anew
        with the same runner, so it must be cancel-safe at every await point. If it returns, the
        device is *done*: nothing more runs until it is closed and opened again. If it raises, the
        device (and only it) moves to the failed state.

    Stops at first non-None result.

    Called after ``open`` or ``restore_open`` and after every start that follows a stop.
    """


@hookspec
def close(ctx: DeviceContext, runner: Any, subchannel_index: int) -> None:
    """Release what ``open`` acquired.

    :param ctx: The device being closed.
    :param runner: The runner being dropped; ``run`` is no longer executing.
    :param subchannel_index: The VMBus subchannel index (0 for everything else).

    Called when the channel closes, the queues stop for good, the device is revoked, or the host
    shuts down. The runner is dropped after this hook returns.
    """


@hookspec(firstresult=True)
def save_open(ctx: DeviceContext, runner: Any) -> Any | None:
    """Save the state of an open device.

    :param ctx: The device being saved.
    :param runner: The runner of the open device; ``run`` is stopped while saving.
    :returns: A saved-state value: a frozen attrs class decorated with
        :func:`devicehost.saved_state`, or ``None`` if the device does not support save/restore.
        A device that returns ``None`` is revoked and offered anew on restore.

    Stops at first non-None result.

    Called while the device is open and stopped, when the host saves.
    """


@hookspec(firstresult=True)
def restore_open(ctx: DeviceContext, state: Any, resources: Any) -> Any | None:
    """Rebuild the runner of a device that was saved while open.

    :param ctx: The device being restored.
    :param state: The value ``save_open`` returned, decoded from the saved-state file and checked
        to be of the device's saved-state type and version.
    :param resources: The transport resources of the restored channel, as for ``open``.
    :returns: The runner over the restored resources; it starts on the next start.

    Stops at first non-None result.

    Called when the host restores a device whose saved state has an open channel.
    """


@hookspec(firstresult=True)
def inspect(ctx: DeviceContext, runner: Any | None) -> dict[str, Any] | None:
    """Describe the device's state for diagnostics.

    :param ctx: The device being inspected.
    :param runner: The runner, or ``None`` while the device is not open.
    :returns: A JSON-able mapping. An ``"endpoints"`` entry (a mapping of label to where host
        programs reach the device, e.g. ``{"guest_cid": 3, "connect": "/run/vm/vsock"}``) is
        added to the device's ``ready:`` line in ``devicehost run``'s log.

    Stops at first non-None result.

    Called by ``devicehost run`` when the device is ready, by ``devicehost inspect`` (over the
    host's control socket) and by the test kit.
    """
