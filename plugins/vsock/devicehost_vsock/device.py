"""The virtio-vsock device: offer, open, run and close over the virtio transport.

Config (TOML table of the device, every key optional)::

    guest_cid = 3            # the guest's CID, read by the guest from config space (3..2**32-2)
    base_path = ""           # hybrid vsock base path; "" = a fresh temporary directory's "vsock"
    vhost_user_socket = ""   # serve to a VMM over vhost-user at this path ("" = in process)
    tx_buffer_size = 65536   # buf_alloc advertised to the guest (power of two, 4 KiB..16 MiB)
    connect_timeout = 2.0    # seconds a host connection has to send CONNECT and be answered
    seqpacket = true         # offer VIRTIO_VSOCK_F_SEQPACKET (SOCK_SEQPACKET relayed to Unix ones)

``connect_timeout`` (upstream's fixed 2 s, facts section 9.9) bounds how long a host connection to
``base_path`` may take to send its CONNECT line and get the guest's answer; one that has sent no
CONNECT line by then is closed even while the guest posts no rx buffers, so peers that connect
and say nothing cannot hold the host's file descriptors (see ``docs/security.md``).

``tx_buffer_size`` is a deliberate devicehost extension; its default is upstream's fixed 65536
(``TX_BUF_SIZE``, facts section 9.3). It sets, together, the buf_alloc in every non-RST packet
to the guest, the capacity of each connection's host-bound buffer (allocated only while the host
socket back-pressures, so idle connections cost nothing more) and the longest RW accepted from
the guest (longer ones are dropped without RST). A larger window lets a guest keep several large
packets in flight instead of waiting a credit round trip per 64 KiB. It must be a power of two
from 4096 to 16 MiB: the guest's credit arithmetic is u32 and the buffer is per connection, so
the upper bound keeps 1024 back-pressured connections within 16 GiB.

Identity (facts section 9.1): virtio device id 19, features STREAM | NO_IMPLIED_STREAM, plus
SEQPACKET unless ``seqpacket = false`` (a devicehost extension: OpenVMM only negotiates it),
queues rx, tx and event (the event queue carries only a TRANSPORT_RESET after a worker restart,
below). Over vhost-user the VMM keeps the event queue itself (QEMU's ``vhost-user-vsock-pci``
hands over two vrings), so the device then offers two queues; ``open`` accepts two or three.

Socket types: STREAM unless the driver negotiated NO_IMPLIED_STREAM without STREAM, SEQPACKET
when it negotiated that feature; packets of another type get RST. Opening fails (the guest is to
blame) when that leaves no type at all. No features at all means stream.

Config space: ``le64 guest_cid``; reads beyond its 8 bytes return zeros (a read straddling the end
returns zeros too, as upstream's 32-bit rule gives); writes are ignored with a warning.

A worker that dies (``isolation = "process"``, docs/workers.md): the device reports the
connections the guest knows (``ctx.host.report("vsock.connections", [[device port, guest port,
type], ...])``, once per tx or rx pass that changed them). The supervisor keeps the VMM
connection and the rings and starts a new worker, whose ``open`` sees the dead worker's last
report (``ctx.host.restart``): with two queues (vhost-user: QEMU keeps the event queue) it sends
an RST for each of those connections before any other packet; with three queues (the device owns
the event queue) it sends one VIRTIO_VSOCK_EVENT_TRANSPORT_RESET, on which the guest drops every
connection. The host sockets of those connections died with the worker. New connections work at
once.

The device's Unix listener at ``base_path`` (a stale socket file is replaced) and, with SEQPACKET
offered, the ``SOCK_SEQPACKET`` listener at ``<base_path>_seqpacket`` are bound when the device
is offered and stay while it is served: with no guest driver attached a host connection is
refused as when no guest listens (:mod:`devicehost_vsock.listeners`). Opening builds a fresh
connection table over them; closing (any queue stopped, the driver reset) drops every
connection and hands the listeners back to refusing.

Save/restore (``docs/plugins/vsock.md``): in a live handoff (``devicehost run --takeover``,
``ctx.fds.carries_fds``) ``save_open`` saves the whole connection table with every host socket and
both listeners (:mod:`devicehost_vsock.saved`, :mod:`devicehost_vsock.servicing`) and
``restore_open`` rebuilds it in the new process: peers and guest connections carry on. Offered in
such a takeover (the handed descriptors are in ``ctx.fds`` already), the device binds no
listener: they come back in ``restore_open``, and accept again once ``run`` starts (after the
takeover committed). For a ``--state`` file ``save_open`` returns None, because a connection is a
host socket, which cannot outlive the process: the host offers the device anew after the restart
and guest connections see a reset, as on any restart.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from typing import Any

import attrs

from devicehost import ConfigError, DeviceContext, DeviceError, hookimpl
from devicehost.virtio import DeviceTraits, QueueResources
from devicehost_vsock.listeners import MAX_REFUSING, HostListeners
from devicehost_vsock.manager import ConnectionManager
from devicehost_vsock.protocol import (
    CONNECTION_TIMEOUT,
    DEVICE_ID,
    FEATURE_NO_IMPLIED_STREAM,
    FEATURE_SEQPACKET,
    FEATURE_STREAM,
    MAX_ACTIVE_CONNECTIONS,
    MAX_TX_BUF_SIZE,
    MIN_TX_BUF_SIZE,
    QUEUE_EVENT,
    QUEUE_RX,
    QUEUE_TX,
    TX_BUF_SIZE,
    TYPE_SEQPACKET,
    TYPE_STREAM,
)
from devicehost_vsock.relay import Relay
from devicehost_vsock.saved import VsockSavedState
from devicehost_vsock.servicing import check_state, restore_listeners, restore_table, save_runner
from devicehost_vsock.worker import VsockWorker

__all__ = ["CONNECTIONS_REPORT", "VsockConfig", "VsockDevice", "VsockRunner", "stale_connections"]

#: The report key under which a device in a worker tells the supervisor the connections the guest
#: knows: a list of [device port, guest port, socket type] (``ctx.host.report``).
CONNECTIONS_REPORT = "vsock.connections"


def _check_cid(instance: VsockConfig, attribute: attrs.Attribute[int], value: int) -> None:
    if not isinstance(value, int) or not 3 <= value <= 0xFFFF_FFFE:
        raise ValueError(
            f"guest_cid must be an integer from 3 to 4294967294 (0-2 are reserved), not {value!r}"
        )


def _check_tx_buffer_size(
    instance: VsockConfig, attribute: attrs.Attribute[int], value: int
) -> None:
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or not MIN_TX_BUF_SIZE <= value <= MAX_TX_BUF_SIZE
        or value & (value - 1)
    ):
        raise ValueError(
            f"tx_buffer_size must be a power of two from {MIN_TX_BUF_SIZE} to {MAX_TX_BUF_SIZE}"
            f" bytes, not {value!r}"
        )


def _check_timeout(instance: VsockConfig, attribute: attrs.Attribute[float], value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 3600:
        raise ValueError(f"{attribute.name} must be a number of seconds above 0 and at most 3600,"
                         f" not {value!r}")


@attrs.frozen
class VsockConfig:
    """The device's configuration."""

    guest_cid: int = attrs.field(default=3, validator=_check_cid)
    base_path: str = attrs.field(default="", validator=attrs.validators.instance_of(str))
    vhost_user_socket: str = attrs.field(default="", validator=attrs.validators.instance_of(str))
    #: buf_alloc advertised to the guest = per-connection host-bound buffer = longest guest RW
    #: (an extension; the default is upstream's fixed value).
    tx_buffer_size: int = attrs.field(default=TX_BUF_SIZE, validator=_check_tx_buffer_size)
    #: Seconds from accepting a host connection to its CONNECT line and the guest's answer.
    connect_timeout: float = attrs.field(default=CONNECTION_TIMEOUT, validator=_check_timeout)
    #: Offer VIRTIO_VSOCK_F_SEQPACKET: guest SOCK_SEQPACKET sockets relayed to host ones.
    seqpacket: bool = attrs.field(default=True, validator=attrs.validators.instance_of(bool))


@attrs.define
class VsockRunner:
    """The per-open state: the worker, and the listeners it borrows (or owns, when the device
    is driven without a host and was never offered in one)."""

    worker: VsockWorker
    listeners: HostListeners
    owns_listeners: bool = False

    @property
    def base_path(self) -> str:
        return self.listeners.base_path

    async def run(self) -> None:
        # The device's listeners hand connections over only while the worker runs: a stopped
        # runner (being saved) takes none, they wait in the backlog.
        if not self.owns_listeners:
            self.listeners.resume()
        try:
            await self.worker.run()
        finally:
            if not self.owns_listeners:
                self.listeners.pause()

    def close(self) -> None:
        self.worker.manager.close_all()
        self.worker.relay.close()
        if self.owns_listeners:
            self.listeners.close()
        else:
            self.listeners.detach()


def _follow_worker_restarts(ctx: DeviceContext, worker: VsockWorker,
                            resources: QueueResources) -> None:
    """In a worker process (``isolation = "process"``): report the connections the guest knows
    to the supervisor whenever they change, and after a restart make the guest drop those the
    dead worker held (module docstring: "A worker that dies"). Inline this does nothing."""
    host = ctx.host
    if not getattr(host, "worker", False):
        return
    report = host.report
    worker.on_connections = lambda known: report(CONNECTIONS_REPORT, [list(c) for c in known])
    restart = getattr(host, "restart", None)
    if restart is None:
        return
    if len(resources.queues) > QUEUE_EVENT:
        # The device owns the event queue: one TRANSPORT_RESET drops every connection.
        worker.transport_reset = resources.queues[QUEUE_EVENT]
        ctx.logger.info("vsock: worker restarted (%s); sending TRANSPORT_RESET", restart.cause)
        return
    stale = stale_connections(restart.reports.get(CONNECTIONS_REPORT))
    worker.manager.reset_stale(stale)
    ctx.logger.info("vsock: worker restarted (%s); resetting the %d connection(s) the guest had",
                    restart.cause, len(stale))


def stale_connections(value: Any) -> list[tuple[int, int, int]]:
    """The connections of a dead worker's last :data:`CONNECTIONS_REPORT`, checked: at most
    :data:`MAX_ACTIVE_CONNECTIONS` entries of [device port, guest port, socket type]; anything
    malformed is left out (a report comes from a worker that may have been corrupted)."""
    out: list[tuple[int, int, int]] = []
    if not isinstance(value, list):
        return out
    for item in value[:MAX_ACTIVE_CONNECTIONS]:
        if (isinstance(item, list) and len(item) == 3
                and all(type(v) is int and 0 <= v <= 0xFFFF_FFFF for v in item)
                and item[2] in (TYPE_STREAM, TYPE_SEQPACKET)):
            out.append((item[0], item[1], item[2]))
    return out


class VsockDevice:
    """virtio-vsock with a hybrid vsock relay to host Unix sockets."""

    config_class = VsockConfig

    def __init__(self, config: VsockConfig | None = None) -> None:
        self.config = config if config is not None else VsockConfig()
        #: Bound at the first offer in a host (or handed over in a takeover), kept until the
        #: host stops (see listeners.py).
        self._listeners: HostListeners | None = None
        self._serving = False

    @staticmethod
    def _handed_over(ctx: DeviceContext) -> Callable[[], bool]:
        """Whether the host gave its devices to a successor (then the listeners' files stay)."""
        host = ctx.host
        return lambda: bool(getattr(host, "abandon_devices", False))

    def _bind(self, ctx: DeviceContext) -> HostListeners:
        try:
            return HostListeners.bind(
                self.config.base_path, seqpacket=self.config.seqpacket, logger=ctx.logger,
                connect_timeout=self.config.connect_timeout, handed_over=self._handed_over(ctx),
            )
        except OSError as exc:
            # The operator's value: one line naming the key (the host adds file and device).
            raise ConfigError(f"cannot listen: {exc.strerror or exc}", key="base_path",
                              value=self.config.base_path) from exc

    def _serve(self, ctx: DeviceContext, listeners: HostListeners) -> None:
        """Run the listeners' accept loops in the host for as long as it serves the device."""
        if not self._serving and ctx.host is not None:
            self._serving = True
            ctx.host.task_group.start_soon(listeners.serve)
            ctx.logger.info("vsock: CONNECT listener at %s", listeners.base_path)

    @staticmethod
    def max_fds(config: VsockConfig) -> int:
        """Descriptors one device holds at most besides its transport's (read by ``devicehost
        doctor``): one per connection, the listeners (two with SEQPACKET), the epoll instance,
        and the host connections being refused while no driver has the device open."""
        return MAX_ACTIVE_CONNECTIONS + (3 if config.seqpacket else 2) + MAX_REFUSING

    def traits(self) -> DeviceTraits:
        return DeviceTraits(
            device_id=DEVICE_ID,
            device_features=FEATURE_STREAM | FEATURE_NO_IMPLIED_STREAM
            | (FEATURE_SEQPACKET if self.config.seqpacket else 0),
            queue_count=2 if self.config.vhost_user_socket else 3,
            config=struct.pack("<Q", self.config.guest_cid),
        )

    # Config space (plain methods the virtio transport calls).

    def virtio_config_read(self, offset: int, size: int) -> bytes:
        config = struct.pack("<Q", self.config.guest_cid)
        if offset < 0 or size < 0 or offset + size > len(config):
            return bytes(max(size, 0))
        return config[offset : offset + size]

    def virtio_config_write(self, offset: int, data: bytes) -> None:
        logging.getLogger("devicehost_vsock").warning(
            "vsock: guest wrote %d bytes at %d of the read-only config space; ignored",
            len(data), offset,
        )  # fmt: skip

    # Lifecycle hooks.

    @hookimpl
    def offer(self, ctx: DeviceContext) -> DeviceTraits:
        if self._listeners is None and ctx.host is not None:
            if ctx.fds.carries_fds:
                # A takeover: the listeners come with the handed-over state (restore_open).
                # Binding here would replace the running host's listener before the takeover
                # commits. A device that was not open saved nothing: it binds them anew when a
                # driver opens it (docs/plugins/vsock.md).
                ctx.logger.info("vsock: listeners are taken over with the device's state")
            else:
                # The CONNECT listeners exist while the device is served, guest driver or not.
                self._listeners = listeners = self._bind(ctx)
                self._serve(ctx, listeners)
        return self.traits()

    def _socket_types(self, ctx: DeviceContext, resources: QueueResources) -> tuple[bool, bool]:
        """(stream, seqpacket): the socket types the driver negotiated."""
        features = resources.features & 0xFF_FFFF
        stream = bool(features & FEATURE_STREAM or not features & FEATURE_NO_IMPLIED_STREAM)
        seqpacket = bool(features & FEATURE_SEQPACKET) and self.config.seqpacket
        if not stream and not seqpacket:
            raise DeviceError(
                f"device {ctx.name!r}: the guest does not support stream sockets"
                " (NO_IMPLIED_STREAM without STREAM) and did not negotiate SEQPACKET"
            )
        if len(resources.queues) not in (2, 3):
            raise DeviceError(
                f"device {ctx.name!r}: vsock needs 2 or 3 queues, the transport started"
                f" {len(resources.queues)}"
            )
        return stream, seqpacket

    @hookimpl
    def open(self, ctx: DeviceContext, resources: QueueResources) -> VsockRunner:
        stream, seqpacket = self._socket_types(ctx, resources)
        listeners = self._listeners
        if listeners is None and ctx.host is not None:
            # Offered in a takeover that brought no listeners (the device was not open then).
            self._listeners = listeners = self._bind(ctx)
            self._serve(ctx, listeners)
        owns = listeners is None
        if listeners is None:  # driven without a host: the listeners live as long as this open
            listeners = self._bind(ctx)
        return self._assemble(ctx, resources, listeners, owns, stream, seqpacket)

    def _assemble(self, ctx: DeviceContext, resources: QueueResources,
                  listeners: HostListeners, owns: bool, stream: bool,
                  seqpacket: bool) -> VsockRunner:
        base_path = listeners.base_path
        if owns:
            # The worker's relay accepts on listeners that live as long as this open.
            relay = Relay(base_path, listeners.stream, seqpacket_listener=listeners.seqpacket)
        else:
            # The device's accept loops hand connections over from now on.
            relay = Relay(base_path, None)
            listeners.attach(relay.take)
        manager = ConnectionManager(
            self.config.guest_cid, relay.connect, tx_buffer_size=self.config.tx_buffer_size,
            connection_timeout=self.config.connect_timeout, logger=ctx.logger, stream=stream,
            seqpacket=seqpacket,
        )
        relay.manager = manager
        worker = VsockWorker(
            resources.queues[QUEUE_RX], resources.queues[QUEUE_TX], manager, relay
        )
        relay.wake = worker.wake
        _follow_worker_restarts(ctx, worker, resources)
        ctx.logger.info("vsock: guest CID %d, host sockets at %s", self.config.guest_cid, base_path)
        return VsockRunner(worker, listeners, owns)

    @hookimpl
    def run(self, ctx: DeviceContext, runner: VsockRunner) -> Any:
        if not runner.owns_listeners:
            # Listeners restored in a takeover serve from the first run (after the commit).
            self._serve(ctx, runner.listeners)
        return runner.run()

    @hookimpl
    def close(self, ctx: DeviceContext, runner: VsockRunner) -> None:
        runner.close()

    @hookimpl
    def save_open(self, ctx: DeviceContext, runner: VsockRunner) -> VsockSavedState | None:
        if not ctx.fds.carries_fds:
            # A state file: every connection is a host socket, which cannot outlive this
            # process, so there is nothing a restart could resume; the device is offered anew.
            return None
        return save_runner(ctx.fds, runner.worker, runner.listeners,
                           guest_cid=self.config.guest_cid)

    @hookimpl
    def restore_open(self, ctx: DeviceContext, state: VsockSavedState,
                     resources: QueueResources) -> VsockRunner:
        stream, seqpacket = self._socket_types(ctx, resources)
        types = frozenset(t for t, ok in ((TYPE_STREAM, stream), (TYPE_SEQPACKET, seqpacket))
                          if ok)
        config = self.config
        state = check_state(state, guest_cid=config.guest_cid,
                            tx_buffer_size=config.tx_buffer_size, base_path=config.base_path,
                            seqpacket=config.seqpacket, types=types)
        listeners = restore_listeners(ctx.fds, state, logger=ctx.logger,
                                      connect_timeout=config.connect_timeout,
                                      handed_over=self._handed_over(ctx))
        owns = ctx.host is None
        if self._listeners is not None:
            # Bound at offer (the host offered the device before loading its descriptors):
            # those serve; the handed ones are dropped (their backlog goes with them).
            ctx.logger.warning("vsock: listeners were bound anew at offer; the handed-over"
                               " ones are closed")
            listeners.release()
            listeners.close()
            listeners = self._listeners
        runner = self._assemble(ctx, resources, listeners, owns, stream, seqpacket)
        try:
            restore_table(ctx.fds, state, runner.worker)
        except BaseException:
            runner.worker.relay.close()
            if self._listeners is listeners:
                listeners.detach()
            else:
                listeners.release()
                listeners.close()
            raise
        if not owns:
            self._listeners = listeners
        ctx.logger.info("vsock: restored %d connection(s)", len(state.connections))
        return runner

    @hookimpl
    def inspect(self, ctx: DeviceContext, runner: VsockRunner | None) -> dict[str, Any]:
        info: dict[str, Any] = {
            "guest_cid": self.config.guest_cid,
            "tx_buffer_size": self.config.tx_buffer_size,
            "seqpacket": self.config.seqpacket,
            "vhost_user_socket": self.config.vhost_user_socket,
            "open": runner is not None,
        }
        if self._listeners is not None:
            info["base_path"] = self._listeners.base_path
        # Where host programs reach the device (``devicehost run``'s ready line).
        base_path = info.get("base_path") or (runner.base_path if runner is not None else "")
        info["endpoints"] = {"guest_cid": self.config.guest_cid,
                             **({"connect": base_path} if base_path else {})}
        if runner is not None:
            worker = runner.worker
            info.update(
                base_path=runner.base_path,
                connections=len(worker.manager),
                packets_from_guest=worker.packets_in,
                packets_to_guest=worker.packets_out,
            )
        return info
