"""Test devices and helpers for the intercept tests: an echo server, an echo client device, a
recorder of the requests the VMBus server receives, and a host serving them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import anyio
import attrs
import pytest

from devicehost import DeviceContext, hookimpl
from devicehost.host import Host
from devicehost.savedstate import saved_state
from devicehost.testing.registry import DeviceSpec, host_with
from devicehost.vmbus import (
    ChannelRequest,
    ClientChannel,
    ClientOpenResources,
    DeviceChannel,
    Guid,
    IncomingOffer,
    InterceptClaim,
    MessagePipe,
    OfferAction,
    OfferParams,
    OpenResources,
    VmbusServer,
    VmbusTransport,
)
from devicehost.vmbus.channel import Signal
from devicehost_intercept import InterceptRelay, InterceptTransport, InterceptWrapper

ECHO_INTERFACE = Guid.parse("4a8c4b9e-36f1-4e55-9d2b-1f0e5e0c7a11")
ECHO_INSTANCE = Guid.parse("9b0f5c2d-0f5e-4c38-8d63-3f4f4d8e2b22")
OTHER_INSTANCE = Guid.parse("2f6b1a77-5d1c-4a0e-b6a8-0c1d2e3f4a33")
STEP = 10.0

_R = TypeVar("_R")


@attrs.frozen
class EchoServerConfig:
    instance_id: str = str(ECHO_INSTANCE)


class EchoServerRunner:
    def __init__(self, resources: OpenResources) -> None:
        self.resources = resources
        self.pipe = MessagePipe(resources.channel)
        self.echoed = 0

    async def run(self) -> None:
        while True:
            message = await self.pipe.recv(4000)
            await self.pipe.send(message)
            self.echoed += 1


class EchoServer:
    """A VMBus server device that echoes every message; records each open's resources."""

    config_class = EchoServerConfig

    def __init__(self, config: EchoServerConfig | None = None) -> None:
        self.config = config or EchoServerConfig()
        self.opens: list[OpenResources] = []

    @hookimpl
    def offer(self, ctx: DeviceContext) -> OfferParams:
        return OfferParams(interface_name="echo", instance_id=Guid.parse(self.config.instance_id),
                           interface_id=ECHO_INTERFACE,
                           channel_type=DeviceChannel(pipe_packets=True))

    @hookimpl
    def open(self, ctx: DeviceContext, resources: OpenResources) -> EchoServerRunner:
        self.opens.append(resources)
        return EchoServerRunner(resources)

    @hookimpl
    def run(self, ctx: DeviceContext, runner: EchoServerRunner) -> Awaitable[None]:
        return runner.run()


@saved_state("intercepttest.EchoState", 1)
@attrs.frozen
class EchoState:
    rounds: int


@saved_state("intercepttest.OtherState", 1)
@attrs.frozen
class OtherState:
    value: int


@attrs.frozen
class EchoClientConfig:
    instance_id: str = str(ECHO_INSTANCE)
    #: Hook that raises (fault isolation tests): "", "offer", "open", "run", "save_open".
    fail_in: str = ""
    answer: str = "open"


class EchoClientRunner:
    def __init__(self, pipe: MessagePipe, rounds: int) -> None:
        self.pipe = pipe
        self.rounds = rounds
        self.restored_from: int | None = None
        self.progress = anyio.Event()

    async def run(self, fail: bool) -> None:
        while True:
            message = f"ping {self.rounds}".encode()
            await self.pipe.send(message)
            reply = await self.pipe.recv(4000)
            if reply != message:
                raise AssertionError(f"echo returned {reply!r} for {message!r}")
            self.rounds += 1
            self.progress.set()
            if fail:
                raise RuntimeError("echo client broke on purpose")
            await anyio.sleep(0.001)


class EchoClient:
    """A VMBus client device (default ring size) that pings the echo server."""

    config_class = EchoClientConfig
    saved_state_class = EchoState

    def __init__(self, config: EchoClientConfig | None = None) -> None:
        self.config = config or EchoClientConfig()
        self.offers_seen: list[IncomingOffer] = []
        self.closes: list[int] = []

    def _maybe_fail(self, hook: str) -> None:
        if self.config.fail_in == hook:
            raise RuntimeError(f"echo client fails in {hook} on purpose")

    @hookimpl
    def offer(self, ctx: DeviceContext, incoming: IncomingOffer | None
              ) -> InterceptClaim | OfferAction:
        if incoming is None:
            return InterceptClaim(Guid.parse(self.config.instance_id))
        self.offers_seen.append(incoming)
        self._maybe_fail("offer")
        return OfferAction.OPEN if self.config.answer == "open" else OfferAction.IGNORE

    @hookimpl
    def open(self, ctx: DeviceContext, resources: ClientOpenResources) -> EchoClientRunner:
        self._maybe_fail("open")
        return EchoClientRunner(MessagePipe(resources.channel), 0)

    @hookimpl
    def run(self, ctx: DeviceContext, runner: EchoClientRunner) -> Awaitable[None]:
        return runner.run(self.config.fail_in == "run")

    @hookimpl
    def close(self, ctx: DeviceContext, runner: EchoClientRunner, subchannel_index: int) -> None:
        self.closes.append(subchannel_index)

    @hookimpl
    def save_open(self, ctx: DeviceContext, runner: EchoClientRunner) -> EchoState:
        self._maybe_fail("save_open")
        return EchoState(runner.rounds)

    @hookimpl
    def restore_open(self, ctx: DeviceContext, state: EchoState,
                     resources: ClientOpenResources) -> EchoClientRunner:
        runner = EchoClientRunner(MessagePipe(resources.channel), state.rounds)
        runner.restored_from = state.rounds
        return runner


class Recorder:
    """Records every guest request the VMBus server receives (channel id, request); ``patch``
    replaces the server's ``request`` method until it is undone."""

    def __init__(self, server: VmbusServer, patch: pytest.MonkeyPatch) -> None:
        self.requests: list[tuple[int, ChannelRequest]] = []
        self.refuse: Callable[[ChannelRequest], bool] = lambda _r: False
        original = server.request

        async def request(channel_id: int, req: ChannelRequest) -> Signal | None:
            from devicehost.vmbus.server import ChannelRequestError

            self.requests.append((channel_id, req))
            if self.refuse(req):
                raise ChannelRequestError(f"refused by the test: {type(req).__name__}")
            return await original(channel_id, req)

        patch.setattr(server, "request", request)

    def of(self, kind: type[_R]) -> list[_R]:
        return [r for _c, r in self.requests if isinstance(r, kind)]

    def clear(self) -> None:
        self.requests.clear()


CLASSES: dict[str, type[Any]] = {"echo": EchoServer, "echo-client": EchoClient,
                                 "intercept": InterceptRelay}


@asynccontextmanager
async def intercept_host(
    devices: Sequence[DeviceSpec], classes: dict[str, type[Any]] | None = None
) -> AsyncIterator[tuple[Host, Recorder]]:
    """A host serving ``devices``; the recorder sees every request made after the first device
    is added (the VMBus transport is made, and wrapped, before any device)."""
    all_classes = dict(CLASSES)
    all_classes.update(classes or {})
    # Build the VMBus transport first so the recorder sees the very first GPADL.
    with pytest.MonkeyPatch.context() as patch:
        async with host_with(all_classes, []) as host:
            recorder = Recorder(host.transport(VmbusTransport).server, patch)
            for spec in devices:
                await host.add_device(spec.name, spec.plugin, spec.config)
            yield host, recorder


def wrapper_of(host: Host, name: str) -> InterceptWrapper:
    return host.transport(InterceptTransport).wrapper_of(host.devices[name])


def channel_of(wrapper: InterceptWrapper) -> ClientChannel | None:
    """The wrapper's channel as it is now: read through a call, so that a check made before a
    stop or start does not narrow the checks made after it."""
    return wrapper.channel


def stash_of(wrapper: InterceptWrapper) -> object:
    """The wrapper's stash as it is now (read through a call, as :func:`channel_of`)."""
    return wrapper.stash


async def until(predicate: Callable[[], object]) -> None:
    with anyio.fail_after(STEP):
        while not predicate():
            await anyio.sleep(0.002)
