"""A live handoff of the vsock device, driven in one process (the test stands in for the host).

What ``devicehost run --takeover`` does between two processes, with two device instances: the
served one is stopped and saved with its descriptors (``ctx.fds`` carrying them), the state goes
through the saved-state envelope (encoded and decoded as untrusted, as the handoff carries it),
the descriptors are duplicated (as ``SCM_RIGHTS`` would), and a new :class:`VsockDevice` is
offered with them loaded and restored over new queues on the same rings. The old instance is
then left without ``close`` (its listeners released), as the old process exits.

The transport's part is done here too: the new queues resume at the saved positions
(``QueueState``), whose chains in flight -- the rx buffers the old runner held, popped but not
filled -- ``pop`` returns again, once each; and the driver is interrupted once.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import anyio
import anyio.abc
import attrs

from devicehost.context import DeviceContext
from devicehost.handoff import FdStash
from devicehost.host import Host
from devicehost.savedstate import (
    decode_envelope_untrusted,
    decode_state_untrusted,
    encode_envelope,
    entry_for,
)
from devicehost.virtio import QueueResources, VirtioTransport
from devicehost.virtio.queue import QueueState
from devicehost.virtio.transport import build_queues
from devicehost_vsock import VsockDevice, VsockRunner
from devicehost_vsock.saved import VsockSavedState

__all__ = ["Handed", "Served", "hand_over", "save_for_handoff"]


@attrs.define
class Served:
    """The device instance serving the guest now, and how to stop it."""

    device: VsockDevice
    ctx: DeviceContext
    runner: VsockRunner
    resources: QueueResources
    #: The scope of its run task (None: the host's lifecycle runs it).
    scope: anyio.CancelScope | None = None
    done: anyio.Event | None = None
    lifecycle: Any = None  # the host's Device, for the instance the host offered


@attrs.frozen
class Handed:
    """What the old instance handed over: the decoded state, the descriptors (handle -> fd,
    kind; the receiver's to close) and the queue positions with held rx buffers rewound."""

    state: VsockSavedState
    fds: dict[int, tuple[int, str]]
    states: list[QueueState]


def served_by_host(host: Host, name: str = "vsock") -> Served:
    device = host.devices[name]
    link = host.transport(VirtioTransport)._link(name)
    assert link.resources is not None
    plugin = device.pm.get_plugin(name)
    assert isinstance(plugin, VsockDevice)
    return Served(plugin, device.ctx, device.runner, link.resources, lifecycle=device)


async def stop(served: Served) -> None:
    if served.lifecycle is not None:
        await served.lifecycle.stop()
    else:
        assert served.scope is not None and served.done is not None
        served.scope.cancel()
        await served.done.wait()


async def save_for_handoff(served: Served) -> Handed:
    """Stop ``served`` and save it as a takeover does (the old instance stays intact)."""
    await stop(served)
    stash = served.ctx.fds
    stash.begin_save(carry=True)
    state = served.device.save_open(served.ctx, served.runner)
    assert state is not None
    drained = stash.drain()
    envelope = encode_envelope([entry_for(served.ctx.name, "vsock", state)])
    decoded = decode_state_untrusted(decode_envelope_untrusted(envelope)[0], VsockSavedState)
    states = [q.state() for q in served.resources.queues]
    # The chains in flight are exactly the rx buffers the runner held (tx chains are pushed in
    # the step that handles them): the new queues replay those.
    assert states[0].inflight == tuple(c.head for c in served.runner.worker._held)
    assert states[1].inflight == ()
    # SCM_RIGHTS duplicates the descriptors into the receiver; the stash's copies are closed.
    fds = {handle: (os.dup(fd), kind) for handle, kind, fd in drained}
    for _, _, fd in drained:
        os.close(fd)
    return Handed(decoded, fds, states)


async def resume(served: Served, tg: anyio.abc.TaskGroup) -> None:
    """Rollback: start the old instance again from its live state."""
    if served.lifecycle is not None:
        await served.lifecycle.start()
    else:
        await start(served, tg)


async def start(served: Served, tg: anyio.abc.TaskGroup) -> None:
    done = anyio.Event()
    scope = anyio.CancelScope()

    async def run() -> None:
        try:
            with scope:
                await served.device.run(served.ctx, served.runner)
        finally:
            done.set()

    served.scope, served.done = scope, done
    tg.start_soon(run)


def restore(host: Host, old: Served, handed: Handed, *, config: Any = None) -> Served:
    """A new instance restored from ``handed`` (raises what restore_open raises; every
    descriptor it did not take is closed)."""
    device = VsockDevice(config if config is not None else old.device.config)
    ctx = DeviceContext(old.ctx.name, "vsock", device.config, logging.getLogger("vsock-new"),
                        host=host, fds=FdStash())
    ctx.fds.load(handed.fds)
    try:
        device.offer(ctx)
        link = host.transport(VirtioTransport)._link(old.ctx.name)
        memory = old.resources.memory
        setups = link.setups
        queues = build_queues(memory, old.resources.features, setups, handed.states)
        resources = QueueResources(queues, old.resources.features, memory)
        runner = device.restore_open(ctx, handed.state, resources)
    finally:
        untaken = ctx.fds.discard()
    assert not untaken, f"descriptors not taken back: {untaken}"
    return Served(device, ctx, runner, resources)


def abandon(old: Served) -> None:
    """The old instance after a committed handoff: no close, its listeners released."""
    if old.lifecycle is not None:
        old.lifecycle.forget_runner()
    listeners = old.device._listeners
    if listeners is not None:
        listeners.release()


async def hand_over(host: Host, old: Served, tg: anyio.abc.TaskGroup) -> Served:
    """One committed takeover: ``old`` saved, a new instance restored and started."""
    handed = await save_for_handoff(old)
    new = restore(host, old, handed)
    abandon(old)
    await start(new, tg)
    for queue in new.resources.queues:
        queue.notify()
    return new


async def close(served: Served) -> None:
    """Stop and close an instance this module started."""
    if served.scope is not None and served.done is not None:
        served.scope.cancel()
        await served.done.wait()
    served.device.close(served.ctx, served.runner)
