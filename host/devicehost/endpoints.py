"""Where a served device can be reached, and the host's diagnostics tree.

``devicehost run`` logs one line per device when it is ready, built by :func:`endpoints`, and the
control socket's ``inspect`` answers :func:`host_tree`. Both read what the host already knows:

- the device's **offer**: a :class:`~devicehost.LocalOffer`'s ``description`` (as given), a VMBus
  offer's interface name and instance id, a virtio device's device id, a VMBus client device's
  claimed instance id;
- its **transport**: a transport with ``describe(device_name)`` (the virtio transport) adds its
  view; its ``socket`` is where a VMM connects (vhost-user);
- the device's own word: when its ``inspect`` hook's mapping holds ``"endpoints"``, a mapping of
  label to where (``{"guest_cid": 3, "connect": "/run/vm/vsock"}``), those entries are added.
  This is the documented way for a device to say where host programs reach it.

Nothing here raises because of a device: a device whose hook fails is described without its
own entries, and the failure is shown in the tree.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from devicehost.context import LocalOffer

if TYPE_CHECKING:
    from devicehost.host import Host
    from devicehost.lifecycle import Device

__all__ = ["describe_offer", "endpoints", "format_endpoints", "host_tree", "unclaimed_intercepts"]


def _kind(offer: Any) -> str:
    return f"{type(offer).__module__}.{type(offer).__qualname__}"


def describe_offer(offer: Any) -> dict[str, Any]:
    """A JSON-able summary of an offer value (empty for None)."""
    if offer is None:
        return {}
    if isinstance(offer, LocalOffer):
        return dict(offer.description)
    kind = _kind(offer)
    if kind == "devicehost.vmbus.protocol.OfferParams":
        return {"vmbus": offer.interface_name, "instance": str(offer.instance_id)}
    if kind == "devicehost.virtio.traits.DeviceTraits":
        return {"virtio_device_id": offer.device_id}
    if kind == "devicehost.vmbus.protocol.InterceptClaim":
        return {"intercepts": str(offer.instance_id)}
    return {"offer": type(offer).__name__}


def _transport_view(host: Host, device: Device) -> dict[str, Any] | None:
    try:
        transport = host.transport_of(device.name)
    except KeyError:
        return None
    describe = getattr(transport, "describe", None)
    if describe is None:
        return {"transport": type(transport).__name__}
    try:
        view = dict(describe(device.name))
    except Exception as exc:
        return {"transport": type(transport).__name__, "error": f"{type(exc).__name__}: {exc}"}
    view["transport"] = type(transport).__name__
    return view


async def endpoints(host: Host, device: Device) -> dict[str, Any]:
    """Where ``device`` can be reached: offer, transport socket and the device's own
    ``endpoints`` (see the module docstring), as one flat mapping."""
    where = describe_offer(device.offer_value)
    view = _transport_view(host, device)
    if view is not None and view.get("socket"):
        where[str(view.get("mode", "socket")).replace("-", "_")] = view["socket"]
    tree = await device.inspect()
    own = tree.get("device", {}).get("endpoints") if isinstance(tree.get("device"), dict) else None
    if isinstance(own, dict):
        where.update({str(k): v for k, v in own.items()})
    return where


def format_endpoints(where: dict[str, Any]) -> str:
    """``key=value`` pairs for a log line (``nothing to report`` for an empty mapping)."""
    if not where:
        return "nothing to report"
    return ", ".join(f"{key}={value}" for key, value in where.items())


def unclaimed_intercepts(host: Host) -> list[tuple[str, str]]:
    """(device, instance id) of each VMBus client device whose claimed instance no device of
    this host offers: such a device waits and does nothing."""
    offered = {
        str(d.offer_value.instance_id) for d in host.devices.values()
        if _kind(d.offer_value) == "devicehost.vmbus.protocol.OfferParams"
    }
    return [
        (d.name, str(d.offer_value.instance_id)) for d in host.devices.values()
        if _kind(d.offer_value) == "devicehost.vmbus.protocol.InterceptClaim"
        and str(d.offer_value.instance_id) not in offered
    ]


async def host_tree(host: Host) -> dict[str, Any]:
    """The running host's device tree: per device its state, offer, transport view (sockets,
    connections, queues), its ``inspect`` hook's mapping (counters); the failures; the
    transports' own views."""
    devices = []
    for device in list(host.devices.values()):
        tree = await device.inspect()
        tree["offer"] = describe_offer(device.offer_value)
        view = _transport_view(host, device)
        if view is not None:
            tree["transport"] = view
        devices.append(tree)
    transports: dict[str, Any] = {}
    for transport in host.transports:
        inspect = getattr(transport, "inspect", None)
        if inspect is None:
            continue
        try:
            transports[type(transport).__name__] = inspect()
        except Exception as exc:
            transports[type(transport).__name__] = {"error": f"{type(exc).__name__}: {exc}"}
    return {
        "devices": devices,
        "failures": dict(host.failures),
        "transports": transports,
        "settings": {"strict": host.settings.strict,
                     "control_socket": _path(host.settings.control_socket)},
    }


def _path(value: Any) -> str | None:
    return None if value is None else str(value)
