"""Two hosts in one process: the second takes the first over (its VMBus socket guest included)
through the same host code a ``devicehost run --takeover`` uses, without the control socket."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import anyio.abc

from devicehost.config import HostSettings
from devicehost.handoff import Handoff, HandoffError, HandoffFd
from devicehost.host import Host, open_host
from devicehost.testing.registry import DeviceSpec, StaticRegistry, _Config


class InProcessTakeover:
    """The new host's takeover client, talking to ``old`` directly: the handoff's descriptors
    are duplicated as SCM_RIGHTS would; confirm commits (the old host abandons its devices),
    refuse rolls the old host back."""

    def __init__(self, old: Host, *, before_confirm: Callable[[], None] | None = None) -> None:
        self.old = old
        self.before_confirm = before_confirm
        self._handoff: Handoff | None = None
        self.committed = False
        self.refused: str | None = None

    async def request(self) -> Handoff:
        try:
            self._handoff = await self.old.save_for_handoff()
        except BaseException:
            await self.old.resume()
            raise
        fds = tuple(HandoffFd(f.device, f.handle, f.kind, os.dup(f.fd))
                    for f in self._handoff.fds)
        return Handoff(self._handoff.envelope, fds)

    async def confirm(self) -> None:
        if self.before_confirm is not None:
            self.before_confirm()
        assert self._handoff is not None
        self._handoff.close()
        self.old.abandon_devices = True
        self.committed = True

    async def refuse(self, reason: str) -> None:
        self.refused = reason
        if self._handoff is not None:
            self._handoff.close()
            self._handoff = None
            await self.old.resume()


class RunningHost:
    """A host running in its own task until :meth:`stop`."""

    def __init__(self) -> None:
        self.host: Host | None = None
        self.error: BaseException | None = None
        self._stop = anyio.Event()
        self.stopped = anyio.Event()

    async def run(self, registry: Any, config: Any, takeover: Any,
                  task_status: anyio.abc.TaskStatus[None]) -> None:
        try:
            async with open_host(registry, config, takeover=takeover) as host:
                self.host = host
                task_status.started()
                await self._stop.wait()
        except HandoffError as exc:
            self.error = exc
            task_status.started()
        finally:
            self.stopped.set()

    async def stop(self) -> None:
        self._stop.set()
        await self.stopped.wait()


async def start_host(tg: anyio.abc.TaskGroup, classes: dict[str, type[Any]],
                     specs: Sequence[DeviceSpec], settings: HostSettings,
                     takeover: Any = None) -> RunningHost:
    """Run a host (taking over with ``takeover``) in ``tg``; returns once it serves or was
    refused (``.error``)."""
    running = RunningHost()
    config = _Config(tuple(specs), settings)
    await tg.start(running.run, StaticRegistry(classes), config, takeover)
    return running
