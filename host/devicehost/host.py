"""The host: config -> devices -> transports, running until it is told to stop.

One :class:`Host` owns an anyio task group (where device ``run`` tasks and transport tasks live),
the devices built from the config, and one instance of each transport in use. Adding a device
never fails the host: a device whose plugin cannot build it, or whose ``offer`` raises, is logged
and left out (or marked failed); the other devices keep serving.

Save and restore
----------------

:meth:`Host.save` quiesces the host (guest requests wait at :attr:`Host.gate`, a
:class:`~devicehost.gate.GuestGate`, so that nothing runs between the save and the restore), stops
every running device (last added first) and returns ONE saved-state envelope
(:mod:`devicehost.savedstate`). :meth:`Host.resume` undoes it; closing the host fails the held
requests. Its entries, in this order:

==================  ==========  ================================================================
``device``          ``plugin``  ``type`` and payload
==================  ==========  ================================================================
``"@vmbus"``        ``"host"``  ``vmbus.ServerSavedState``: the VMBus server's channel ids,
                                GPADLs and open requests (only when the host serves VMBus)
each device's name  its plugin  the value its ``save_open`` returned, or ``host.NotSaved``
                                (``reason``) when there is nothing to restore
==================  ==========  ================================================================

A device is recorded as ``host.NotSaved`` when its ``save_open`` returns None (save not
supported), when it has no open runner (a closed VMBus channel, a failed device), when its hook or
its value fails to save (logged; the other devices are still saved), and for every device of a
transport that keeps no state (virtio, intercepted client devices: the intercept relay device
saves their progress itself). On restore such a device is offered fresh, as facts §5.2 asks of a
device that cannot save. Exception: in a save for a handoff, a device whose transport hands it
over live itself (a virtio device served over vhost-user: ``transport.hands_over``) is saved by
its transport, session included (``virtio.VhostUserHandover``), and in the takeover's restore
its transport rebuilds it (``restore_handed``) and starts it after the commit
(``start_handed``); every device's handed descriptors are loaded into its ``ctx.fds`` before its
offer. Device names cannot begin with ``@`` (config rule), so ``@vmbus`` never
collides with a device.

``open_host(..., saved=DATA)`` restores. ``DATA`` is hostile input: the envelope and every
device's state are decoded (:func:`devicehost.savedstate.decode_envelope_untrusted`,
:func:`~devicehost.savedstate.decode_state_untrusted`) and checked against the config *before*
anything is served; any problem raises :class:`SavedStateError` and the host does not start.
Then the transports get their state before their devices are added (the VMBus transport's
``restore``), every device is offered, local devices are rebuilt with ``restore_open`` and all
are started. Decisions:

- A saved device the config does not have, or has under another plugin, is an error: dropping a
  device's state silently would lose what its guest relies on. Remove it from the state file (or
  start without one) deliberately.
- A configured device the saved state does not name is new: it is offered fresh.
- A device's state type is looked up among the registered saved-state types, so a plugin must
  register its types in the modules its entry point imports (an unknown type is refused).
- A device whose ``restore_open`` fails is offered (local devices: opened) fresh, and the failure
  logged, as the VMBus transport does for its devices.

VMBus devices are saved by the host (the server's state, then each open channel's device with
``Device.save``) rather than by ``VmbusTransport.save``, so that one device whose ``save_open``
fails is recorded as not saved instead of failing the whole save.

What survives where: a VMBus channel's rings and GPADLs live in guest memory. Channel state
(``@vmbus`` and the VMBus devices' states) is restored only into guest memory that survived,
handed to :func:`open_host` as ``guest_memory`` (in process: the memory of the guest that keeps
running across the host's restart, which then calls ``VmbusClient.reconnect``). Without it (a new
process, whose in-process guest did not survive) the VMBus devices are offered fresh, and the
saved channel state is checked but not applied. Local devices' states need no guest memory and
are restored in both cases. :attr:`Host.restore_report` says, per device, what happened.
Closing the saved host revokes its offers on its own server, as any host does when it goes away;
a guest that survived continues on the restored host with ``VmbusClient.reconnect``, which keeps
every channel the restored server offers again under the same channel id and rings.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Final, TypeVar

import anyio
import anyio.abc

from devicehost.config import HostSettings
from devicehost.context import DeviceContext
from devicehost.detached import Deadlines
from devicehost.errors import (
    ConfigError,
    DeviceHostError,
    SavedStateError,
    StartupError,
    ends_the_host,
)
from devicehost.excerpt import bounded_message
from devicehost.gate import GuestGate
from devicehost.handoff import Handoff, HandoffError, HandoffFd
from devicehost.lifecycle import Device, DeviceState, new_device_manager
from devicehost.restoreplan import (
    HOST_PLUGIN,
    VMBUS_ENTRY,
    NotSaved,
    RestorePlan,
    plan_for,
    short_reason,
)
from devicehost.savedstate import (
    SavedEntry,
    encode_envelope,
    entry_for,
)
from devicehost.statefile import read_state_file, remove_stale_temporaries, write_state_file
from devicehost.takeover import take_over
from devicehost.transport import LocalTransport, transport_class_for

if TYPE_CHECKING:
    from devicehost.memory import GuestMemory

__all__ = [
    "DEFAULT_GUEST_MEMORY",
    "VMBUS_ENTRY",
    "Host",
    "NotSaved",
    "open_host",
    "read_state_file",
    "remove_stale_temporaries",
    "write_state_file",
]

log = logging.getLogger("devicehost.host")

#: Size of the in-process guest memory shared by the VMBus server and client.
DEFAULT_GUEST_MEMORY: Final = 64 * 1024 * 1024
#: The envelope entry (device name) that holds the VMBus server's state.

T = TypeVar("T")


class Host:
    """A running set of devices. Build it with :func:`open_host`."""

    def __init__(
        self,
        registry: Any,
        task_group: anyio.abc.TaskGroup,
        *,
        guest_memory_size: int = DEFAULT_GUEST_MEMORY,
        cross_cutting: Iterable[object] = (),
        guest_memory: GuestMemory | None = None,
        settings: HostSettings | None = None,
    ) -> None:
        self.registry = registry
        #: The config's ``[host]`` table (defaults when the host was built without one).
        self.settings = settings if settings is not None else HostSettings()
        self.task_group = task_group
        self.logger = log
        self.devices: dict[str, Device] = {}
        self.failures: dict[str, str] = {}
        #: After a restore: per configured device, "restored", "new", "fresh: <why>" or
        #: "failed: <why>".
        self.restore_report: dict[str, str] = {}
        self._transports: dict[Callable[[Host], Any], Any] = {}
        self._device_transport: dict[str, Any] = {}
        self._guest_memory: GuestMemory | None = guest_memory
        self._owns_memory = guest_memory is None
        self._guest_memory_size = guest_memory_size
        #: Per device name, its worker settings (``isolation``, ``restart``...), if it has any.
        self.worker_settings: dict[str, Any] = {}
        #: The supervisor of the devices that run in worker processes, once there is one.
        self.workers: Any = None
        self._cross_cutting = list(cross_cutting)
        #: Guest requests wait here while the host is saved (:meth:`save`, :meth:`resume`).
        self.gate = GuestGate()
        self._stopped_by_save: list[Device] = []
        #: True once the devices are no longer this process's to close: handed over to a new
        #: process (live servicing), or taken over but not committed. :meth:`aclose` then
        #: runs no device's ``close`` (their descriptors are shared with the other process).
        self.abandon_devices = False
        #: The live-servicing state of a host started by ``devicehost run``
        #: (:class:`devicehost.takeover.Servicing`); None: it cannot be taken over.
        self.servicing: Any = None
        #: The devices removed after they missed a hook's deadline, with their failure.
        self._missed_deadlines: dict[str, str] = {}
        #: Per device name, its config's own deadlines (:class:`~devicehost.config.
        #: DeviceDeadlines`), which replace the ``[host]`` ones.
        self.device_deadlines: dict[str, Any] = {}
        #: Where the devices' config came from (a file name), named in device-build errors.
        self.config_source = "<config>"
        #: The VMBus socket parked for a handoff (devicehost.vmbus.handover), until resumed.
        self._parked_vmbus: Any = None

    @property
    def guest_memory(self) -> GuestMemory:
        """The in-process guest memory (memfd-backed), made on first use unless handed in."""
        if self._guest_memory is None:
            from devicehost.memory import GuestMemory

            self._guest_memory = GuestMemory.memfd(self._guest_memory_size)
        return self._guest_memory

    def transport(self, cls: Callable[[Host], T]) -> T:
        """The host's one instance of transport class ``cls``, made on first use."""
        instance: T | None = self._transports.get(cls)
        if instance is None:
            instance = self._transports[cls] = cls(self)
        return instance

    def transport_of(self, name: str) -> Any:
        """The transport serving device ``name``."""
        return self._device_transport[name]

    @property
    def transports(self) -> list[Any]:
        """The transports in use, in the order they were made."""
        return list(self._transports.values())

    async def add_devices(self, configs: Iterable[Any], *, strict: bool = False) -> None:
        """Build every device of ``configs`` first, then offer and attach each in order: a device
        that cannot be built (a config value its constructor refuses) is found before anything
        is served. ``strict``: StartupError, before anything is offered, if any cannot be built.
        """
        built = [self._build(c.name, c.plugin, c.config) for c in configs]
        if strict and self.failures:
            raise StartupError(f"{len(self.failures)} device(s) cannot be built (strict mode);"
                               " nothing was served")
        for device in built:
            if device is not None:
                await self._offer_and_attach(device, hold_local=False)

    async def add_device(self, name: str, plugin: str, config: Any) -> Device | None:
        """Build, offer and attach one device. Returns None (and records why) on failure."""
        device = self._build(name, plugin, config)
        if device is not None:
            await self._offer_and_attach(device, hold_local=False)
        return device

    def _build(self, name: str, plugin: str, config: Any) -> Device | None:
        if name in self.devices or name in self.failures:
            raise DeviceHostError(f"a device named {name!r} already exists")
        own = self.device_deadlines.get(name)
        hook = None if own is None else own.hook_deadline
        stop = None if own is None else own.stop_deadline
        deadlines = Deadlines(self.settings.hook_deadline if hook is None else hook,
                              self.settings.stop_deadline if stop is None else stop)
        try:
            instance = self._isolated(name, plugin, config, deadlines)
            if instance is None:
                instance = self.registry.create_device(plugin, config)
            pm = new_device_manager(
                instance, name, [*self.registry.cross_cutting, *self._cross_cutting]
            )
        except ConfigError as exc:
            # A configured value the device refuses: one line naming file, device, key, value.
            self.failures[name] = exc.keyed()
            log.error("%s", exc.located(f"{self.config_source}: device {name!r}"))
            return None
        except BaseException as exc:  # a constructor's sys.exit() too: only this device fails
            if ends_the_host(exc):
                raise
            why = str(exc) if isinstance(exc, DeviceHostError) else f"{type(exc).__name__}: {exc}"
            self._record_failure(name, f"cannot build device: {why}")
            return None
        ctx = DeviceContext(
            name=name,
            plugin=plugin,
            config=config,
            logger=logging.getLogger(f"devicehost.device.{name}"),
            host=self,
        )
        device = Device(ctx, pm, deadlines=deadlines)
        self.devices[name] = device
        return device

    def _isolated(self, name: str, plugin: str, config: Any, deadlines: Deadlines) -> Any:
        """The proxy of device ``name`` if it runs in a worker (``docs/workers.md``), else
        None."""
        from devicehost.worker.settings import WorkerSettings

        own = self.worker_settings.get(name) or WorkerSettings()
        if (own.isolation or self.settings.isolation) != "process":
            return None
        if self.workers is None:
            from devicehost.worker.supervisor import Supervisor

            self.workers = Supervisor(self.task_group)
        return self.workers.proxy(self.registry, name, plugin, config, own, self.settings,
                                  deadlines)

    async def _offer_and_attach(self, device: Device, *, hold_local: bool) -> bool:
        """Offer ``device`` and hand it to its transport; a local device is left offered (not
        opened) if ``hold_local``, for a restore. False if the device failed."""
        try:
            if self.workers is not None:  # its worker's start is not the offer's to wait for
                await self.workers.start(device.name)
            offer = await device.offer()
            transport = self.transport(transport_class_for(offer))
            if not (hold_local and isinstance(transport, LocalTransport)):
                await transport.add(device, offer)
        except Exception as exc:
            # A configured value refused (by the transport, or by a hook: then it is the cause of
            # the hook's DeviceError) is one line naming the config file, device, key and value.
            keyed = exc if isinstance(exc, ConfigError) else exc.__cause__
            if isinstance(keyed, ConfigError) and keyed.key is not None:
                device.failure = device.failure or keyed.keyed()
                device.state = DeviceState.FAILED
                self.failures[device.name] = keyed.keyed()
                log.error("%s", keyed.located(f"{self.config_source}: device {device.name!r}"))
                return False
            why = str(exc)
            device.failure = device.failure or why
            device.state = DeviceState.FAILED
            self._record_failure(device.name, why)
            return False
        self._device_transport[device.name] = transport
        return True

    def _record_failure(self, name: str, why: str) -> None:
        self.failures[name] = why
        log.error("device %r is not served: %s", name, why)

    async def remove_device(self, name: str) -> None:
        """Revoke and forget device ``name``; a failure is logged, never raised."""
        device = self.devices.pop(name)
        transport = self._device_transport.pop(name, None)
        before = device.failure
        try:
            if transport is not None:
                await transport.remove(device)
            else:
                await device.close()
        except Exception:
            log.exception("removing device %r failed", name)
        if self.workers is not None:
            await self.workers.remove(name)
        if device.abandoned or (device.failure is not None and device.failure != before):
            self._missed_deadlines[name] = device.failure or "abandoned"

    def missed_deadlines(self) -> dict[str, str]:
        """Every device that missed a hook's deadline and was abandoned (removed ones too), or
        failed while it was removed (a worker killed when its run would not stop), with its
        failure."""
        now = {n: d.failure or "abandoned" for n, d in self.devices.items() if d.abandoned}
        return {**self._missed_deadlines, **now}

    async def inspect(self) -> dict[str, Any]:
        """A JSON-able view of every device (and of the VMBus server, when VMBus is served)."""
        tree = {
            "devices": [await d.inspect() for d in self.devices.values()],
            "failures": dict(self.failures),
        }
        vmbus = self._vmbus_transport()
        if vmbus is not None:
            tree["vmbus"] = vmbus.inspect()
        return tree

    async def _serve_vmbus_socket(self) -> None:
        """Serve the VMBus server on ``[host] vmbus_socket`` (docs/vmbus-socket.md); it stops
        when the VMBus transport closes."""
        from devicehost.vmbus.transport import VmbusTransport

        path = self.settings.vmbus_socket
        assert path is not None
        if self.transport(VmbusTransport).socket is not None:
            return  # handed over from the process this one took over (serving already)
        await self.transport(VmbusTransport).serve_socket(
            path, allow_unsealed_memory=self.settings.allow_unsealed_memory)
        log.info("serving VMBus to a guest process on %s", path)

    # -- save / restore ---------------------------------------------------------------------------

    def _vmbus_transport(self) -> Any:
        # The VMBus transport exists only if its module was imported: never import it here.
        module = sys.modules.get("devicehost.vmbus.transport")
        return None if module is None else self._transports.get(module.VmbusTransport)

    async def save(self) -> bytes:
        """Quiesce the host, stop every device and return the saved-state envelope (layout:
        module docstring).

        The host stays quiesced: no device runs, and a guest request that would run one (a
        VMBus guest opening a channel) waits at :attr:`gate` until :meth:`resume` (the devices
        run again, the request goes on) or until the host is closed (the request fails). So
        nothing happens between the save and the restore that the returned state misses.
        """
        return await self._save(carry_fds=False)

    async def save_for_handoff(self) -> Handoff:
        """:meth:`save`, with the descriptors every device declared (``ctx.fds``) while it saved:
        the caller owns them (:meth:`Handoff.close`). A device that saved nothing carries none.
        A VMBus socket guest is parked first and travels too (devicehost.vmbus.handover)."""
        if self._vmbus_transport() is not None:
            from devicehost.vmbus.handover import park

            self._parked_vmbus = await park(self)
        envelope = await self._save(carry_fds=True)
        fds: list[HandoffFd] = []
        for name, device in self.devices.items():
            fds += [HandoffFd(name, handle, kind, fd)
                    for handle, kind, fd in device.ctx.fds.drain()]
        if self._parked_vmbus is not None:
            try:
                envelope, extra = self._parked_vmbus.capture(envelope)
            except BaseException:
                Handoff(envelope, tuple(fds)).close()
                raise
            fds += extra
        return Handoff(envelope, tuple(fds))

    async def _save(self, *, carry_fds: bool) -> bytes:
        await self.gate.quiesce()
        for device in reversed(list(self.devices.values())):
            if await device.stop():
                self._stopped_by_save.append(device)
        for device in self.devices.values():
            device.ctx.fds.begin_save(carry=carry_fds)
        entries: list[SavedEntry] = []
        vmbus = self._vmbus_transport()
        if vmbus is not None:
            entries.append(entry_for(VMBUS_ENTRY, HOST_PLUGIN, vmbus.server.save()))
        for name, device in self.devices.items():
            transport = self._device_transport.get(name)
            if transport is None:
                why = device.failure or "not served"
                device.ctx.fds.discard()
                entries.append(entry_for(name, device.ctx.plugin, NotSaved(f"failed: {why}")))
            elif transport is vmbus and not vmbus.handle_of(device).is_open:
                entries.append(entry_for(name, device.ctx.plugin, NotSaved("channel closed")))
            elif transport is vmbus or isinstance(transport, LocalTransport):
                entries.append(await self._save_device(device))
            elif carry_fds and _hands_over(transport, device):
                entries.append(await self._save_handed(transport, device))
            else:
                reason = f"{type(transport).__name__} keeps no saved state"
                entries.append(entry_for(name, device.ctx.plugin, NotSaved(reason)))
        for entry in entries:
            # A file carries no descriptors; a device that saved nothing needs none.
            if entry.device in self.devices and (
                not carry_fds or entry.type_name == "host.NotSaved"
            ):
                self.devices[entry.device].ctx.fds.discard()
        return encode_envelope(entries)

    async def resume(self) -> None:
        """Undo a :meth:`save` that is not followed by a close: start again every device the
        save stopped (first added first), then let the waiting guest requests through."""
        stopped, self._stopped_by_save = self._stopped_by_save, []
        for device in reversed(stopped):
            if device.name in self.devices:
                await device.start()
        self.gate.resume()
        parked, self._parked_vmbus = self._parked_vmbus, None
        if parked is not None:
            parked.resume()

    async def _save_handed(self, transport: Any, device: Device) -> SavedEntry:
        """A device its transport hands over live (vhost-user): the transport saves it, with the
        device's own ``save_open``; a device that saves nothing is NotSaved (closed, re-offered
        by the new process)."""
        try:
            state = await transport.save_for_handoff(device)
        except DeviceHostError as exc:
            log.error("device %r could not be saved (it will be offered fresh): %s",
                      device.name, exc)
            return entry_for(device.name, device.ctx.plugin, NotSaved(f"save failed: {exc}"))
        except BaseException:
            device.ctx.fds.discard()
            raise
        if state is None:
            return entry_for(device.name, device.ctx.plugin, NotSaved("save not supported"))
        return entry_for(device.name, device.ctx.plugin, state)

    async def _save_device(self, device: Device) -> SavedEntry:
        plugin = device.ctx.plugin
        try:
            try:
                state = await device.save()
            except BaseException:
                device.ctx.fds.discard()
                raise
            if state is None:
                reason = "not open" if device.runner is None else "save not supported"
                return entry_for(device.name, plugin, NotSaved(reason))
            return entry_for(device.name, plugin, state)
        except DeviceHostError as exc:
            # One device's failure to save never stops the others from being saved.
            log.error("device %r could not be saved (it will be offered fresh): %s",
                      device.name, exc)
            return entry_for(device.name, plugin, NotSaved(f"save failed: {exc}"))

    async def _restore(
        self,
        plan: RestorePlan,
        devices: Iterable[Any],
        *,
        handed: dict[str, dict[int, tuple[int, str]]] | None = None,
        before_start: Callable[[], Any] | None = None,
    ) -> None:
        """Restore ``plan``. ``handed`` (a takeover): the descriptors per device, and every
        device must come back as it was: the first that cannot raises :class:`HandoffError`
        naming it (nothing is opened fresh instead), and ``before_start`` is awaited between the
        restore and the start of the restored devices."""
        configured = list(devices)
        strict = handed is not None
        vmbus_restored = False
        resumption = None  # a VMBus socket guest handed over (devicehost.vmbus.handover)
        if plan.vmbus is not None:
            if handed is not None and plan.vmbus_socket is not None:
                from devicehost.vmbus.handover import VMBUS_FDS, restore_socket_guest

                resumption = restore_socket_guest(
                    self, plan, {d.name: plan.states.get(d.name) for d in configured},
                    handed.pop(VMBUS_FDS, {}))
                vmbus_restored = True
            elif self._owns_memory:
                log.warning("VMBus channels are not restored: they lived in guest memory that "
                            "did not survive; VMBus devices are offered fresh")
            else:
                from devicehost.vmbus.transport import VmbusSavedState, VmbusTransport

                transport = self.transport(VmbusTransport)
                names = {d.name: plan.states.get(d.name) for d in configured}
                try:
                    transport.restore(VmbusSavedState(plan.vmbus, names))
                except ValueError as exc:
                    raise SavedStateError(f"device '@vmbus': {exc}") from exc
                vmbus_restored = True
        held: list[tuple[Device, Any]] = []
        for spec in configured:
            if spec.name in self.devices:  # built ahead (a takeover builds before it asks)
                device: Device | None = self.devices[spec.name]
            elif spec.name in self.failures:
                device = None
            else:
                device = self._build(spec.name, spec.plugin, spec.config)
            state = plan.states.get(spec.name)
            if device is not None and handed is not None and state is not None:
                # Before the offer: a device that binds at offer (a listener) sees
                # ctx.fds.carries_fds and takes its handed-over one in restore_open instead.
                device.ctx.fds.load(handed.pop(spec.name, {}))
            if device is None or not await self._offer_and_attach(
                device, hold_local=state is not None
            ):
                if device is not None:
                    device.ctx.fds.discard()
                failure = self.failures.get(spec.name, "failed")
                self.restore_report[spec.name] = f"failed: {failure}"
                if strict:
                    raise HandoffError(f"device {spec.name!r} (plugin {spec.plugin!r}):"
                                       f" {bounded_message(failure)}")
                continue
            transport = self._device_transport[spec.name]
            if strict and not isinstance(transport, LocalTransport) and not _hands_over(
                    transport, device) and not (
                    resumption is not None and transport is resumption.transport):
                raise HandoffError(f"device {spec.name!r} is served by"
                                   f" {type(transport).__name__}, which cannot be taken over")
            if spec.name not in plan.states:
                self.restore_report[spec.name] = "new"
            elif state is None:
                why = plan.not_saved.get(spec.name, "not saved")
                self.restore_report[spec.name] = f"fresh: not saved ({short_reason(why)})"
            elif isinstance(transport, LocalTransport) or (strict and _hands_over(transport,
                                                                                   device)):
                held.append((device, state))
            elif transport is self._vmbus_transport() and vmbus_restored:
                restored = device.runner is not None
                self.restore_report[spec.name] = (
                    "restored" if restored else "fresh: its channel could not be restored")
            elif transport is self._vmbus_transport():
                self.restore_report[spec.name] = "fresh: its VMBus channel did not survive"
            else:
                self.restore_report[spec.name] = (
                    f"fresh: {type(transport).__name__} restores nothing")
        if handed is not None:
            # Each device's stash owns its descriptors (loaded before its offer; closed if not
            # taken back).
            for name in [n for n in handed if not n.startswith("@")]:
                log.warning("descriptors for %r, which restores nothing, closed", name)
                for fd, _kind in handed.pop(name).values():
                    os.close(fd)
        for device, state in held:
            try:
                transport = self._device_transport[device.name]
                if isinstance(transport, LocalTransport):
                    await self._restore_local(device, state, strict=strict)
                else:
                    await transport.restore_handed(device, state)
                    self.restore_report[device.name] = "restored"
            finally:
                untaken = device.ctx.fds.discard()
                if untaken:
                    log.warning("device %r did not take back descriptors %s; closed them",
                                device.name, untaken)
        if resumption is not None:
            resumption.finish_restore()
        if before_start is not None:
            await before_start()
        for device, _ in held:
            transport = self._device_transport[device.name]
            if isinstance(transport, LocalTransport):
                await device.start()
            else:
                await transport.start_handed(device)
        if resumption is not None:
            await resumption.start()

    async def _restore_local(self, device: Device, state: Any, *, strict: bool = False) -> None:
        transport: LocalTransport = self._device_transport[device.name]
        try:
            await device.restore(state, transport.resources_for_restore(device))
        except DeviceHostError as exc:
            if strict:
                raise HandoffError(f"device {device.name!r} (plugin {device.ctx.plugin!r})"
                                   f" failed to restore: {bounded_message(str(exc))}") from exc
            log.warning("device %r failed to restore (%s); opening it fresh", device.name, exc)
            self.restore_report[device.name] = f"fresh: restore failed ({short_reason(str(exc))})"
            try:
                await device.open(device.offer_value, start=False)
            except DeviceHostError as open_exc:
                self._record_failure(device.name, str(open_exc))
            return
        self.restore_report[device.name] = "restored"

    async def aclose(self) -> None:
        """Remove every device (last added first), then close the transports. Guest requests
        waiting at the gate of a saved host fail."""
        self.gate.shut()
        with anyio.CancelScope(shield=True), self.gate.bypass():
            if self.abandon_devices:
                # Another process serves them now: close nothing they share with it.
                for device in self.devices.values():
                    device.ctx.fds.discard()
                for transport in self._transports.values():
                    getattr(transport, "abandon", lambda: None)()
                self.devices.clear()
                self._transports.clear()
            for name in reversed(list(self.devices)):
                await self.remove_device(name)
            for transport in reversed(list(self._transports.values())):
                try:
                    await transport.aclose()
                except Exception:
                    log.exception("closing transport %s failed", type(transport).__name__)
            self._transports.clear()
            if self.workers is not None:
                await self.workers.aclose()
            if self._guest_memory is not None and self._owns_memory:
                self._guest_memory.close()
            self._guest_memory = None


@asynccontextmanager
async def open_host(
    registry: Any,
    config: Any,
    *,
    guest_memory_size: int = DEFAULT_GUEST_MEMORY,
    cross_cutting: Iterable[object] = (),
    saved: bytes | None = None,
    saved_source: str = "saved state",
    guest_memory: GuestMemory | None = None,
    strict: bool = False,
    takeover: Any = None,
) -> AsyncIterator[Host]:
    """Run a host with the devices of ``config`` (a HostConfig) until the block exits.

    ``saved``: an envelope from :meth:`Host.save` to restore (see the module docstring);
    :class:`SavedStateError`, whose message starts with ``saved_source``, if it cannot be used —
    raised before any device is served. ``guest_memory``: guest memory that survived the saving
    host (the host uses it and does not close it); VMBus channels are restored only into it.
    With ``[host] vmbus_socket`` the VMBus socket is served once the devices are added;
    :class:`ConfigError` if it cannot be (a live host answers there): the host does not start.
    ``strict``: :class:`StartupError` if any device cannot be built (then nothing is offered) or
    offered; the devices already started are stopped first, and the block never runs.
    ``takeover`` (a :class:`devicehost.takeover.TakeoverClient`): take the devices over from the
    running host instead (``docs/servicing.md``): every device is built first, then the handoff
    is asked for and restored with its descriptors; :class:`HandoffError` naming the device if
    any cannot be (the running host rolls back and serves on), and the block never runs.
    """
    plan = None if saved is None else plan_for(saved, config.devices, saved_source)
    cross_cutting = _with_tracing(registry, cross_cutting)
    refused: SavedStateError | ConfigError | StartupError | HandoffError | None = None
    async with anyio.create_task_group() as tg:
        host = Host(registry, tg, guest_memory_size=guest_memory_size,
                    cross_cutting=cross_cutting, guest_memory=guest_memory,
                    settings=getattr(config, "host", None))
        host.config_source = getattr(config, "source", host.config_source)
        host.device_deadlines = {d.name: d.deadlines for d in config.devices
                                 if getattr(d, "deadlines", None) is not None}
        host.worker_settings = {d.name: d.worker for d in config.devices
                                if getattr(d, "worker", None) is not None}
        try:
            if takeover is not None:
                try:
                    await take_over(host, takeover, config.devices)
                except (HandoffError, SavedStateError) as exc:
                    host.abandon_devices = True
                    refused = HandoffError(str(exc))
                    refused.__cause__ = exc
            elif plan is None:
                try:
                    await host.add_devices(config.devices, strict=strict)
                except StartupError as exc:
                    refused = exc
            else:
                try:
                    await host._restore(plan, config.devices)
                except SavedStateError as exc:
                    # Raised once the task group is gone, so that it is not an ExceptionGroup.
                    refused = SavedStateError(f"{saved_source}: {exc}; the host does not start")
                    refused.__cause__ = exc
            if refused is None and strict and host.failures:
                refused = StartupError(
                    f"{len(host.failures)} of {len(config.devices)} device(s) failed at start"
                    " (strict mode); the started ones were stopped")
            if refused is None and host.settings.vmbus_socket is not None:
                try:
                    await host._serve_vmbus_socket()
                except ConfigError as exc:
                    refused = exc  # e.g. the socket is in use: the host does not start
            if refused is None:
                yield host
        finally:
            await host.aclose()
            tg.cancel_scope.cancel()
    if refused is not None:
        raise refused


def _hands_over(transport: Any, device: Device) -> bool:
    """True if ``transport`` hands ``device`` over live itself (vhost-user virtio devices)."""
    hands_over = getattr(transport, "hands_over", None)
    return hands_over is not None and bool(hands_over(device))


def _with_tracing(registry: Any, cross_cutting: Iterable[object]) -> list[object]:
    """``cross_cutting`` plus the tracing plugin when ``DEVICEHOST_TRACE`` asks for it and
    nobody registered one (so that every host traces: ``run``, ``demo``, the test kit)."""
    from devicehost.tracing import TracePlugin, tracing_plugins

    plugins = list(cross_cutting)
    if not any(isinstance(p, TracePlugin)
               for p in [*plugins, *getattr(registry, "cross_cutting", [])]):
        plugins += tracing_plugins()
    return plugins
