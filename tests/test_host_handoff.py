"""Host.save_for_handoff: the descriptors the devices declare travel with the state, only theirs."""

from __future__ import annotations

import gc
import os
from typing import Any

import anyio
import attrs
import pytest

from devicehost import DeviceContext, LocalOffer, hookimpl, saved_state
from devicehost.fds import fd_kind
from devicehost.savedstate import decode_envelope_untrusted
from devicehost.testing.registry import host_with

pytestmark = pytest.mark.anyio


@saved_state("test_host_handoff.State", 1)
@attrs.frozen
class State:
    handle: int


class Holder:
    """A local device holding one eventfd; ``mode`` says how its save_open behaves."""

    mode = "save"
    put: list[int] = []

    def __init__(self, config: Any) -> None:
        self.efd = os.eventfd(0, os.EFD_CLOEXEC)

    @hookimpl
    def offer(self, ctx: DeviceContext) -> LocalOffer:
        return LocalOffer()

    @hookimpl
    def open(self, ctx: DeviceContext, resources: Any) -> int:
        return self.efd

    @hookimpl
    def run(self, ctx: DeviceContext, runner: int) -> Any:
        return anyio.sleep_forever()

    @hookimpl
    def save_open(self, ctx: DeviceContext, runner: int) -> State | None:
        handle = ctx.fds.put(runner)
        if self.mode == "raise":
            raise RuntimeError("save refused")
        if self.mode == "none":
            return None
        return State(handle)

    @hookimpl
    def close(self, ctx: DeviceContext, runner: int) -> None:
        os.close(runner)


@pytest.mark.parametrize("mode", ["save", "raise", "none"])
async def test_only_saved_devices_carry_their_descriptors(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Holder, "mode", mode)
    gc.collect()  # descriptors earlier tests left to the collector must not close mid-count
    before = len(os.listdir("/proc/self/fd"))
    async with host_with({"holder": Holder}) as host:
        handoff = await host.save_for_handoff()
        entries = {e.device: e for e in decode_envelope_untrusted(handoff.envelope)}
        runner = host.devices["holder"].runner
        if mode == "save":
            assert entries["holder"].type_name == "test_host_handoff.State"
            assert [(f.device, f.handle, f.kind) for f in handoff.fds] == [
                ("holder", 0, "eventfd")]
            os.eventfd_write(handoff.fds[0].fd, 5)
            assert os.eventfd_read(runner) == 5, "a duplicate of the device's own eventfd"
        else:
            assert entries["holder"].type_name == "host.NotSaved"
            assert handoff.fds == ()
        handoff.close()
        assert fd_kind(runner) == "eventfd", "the device keeps its own descriptor"
        await host.resume()
    assert len(os.listdir("/proc/self/fd")) == before, "no descriptor leaked"


async def test_a_state_file_save_carries_no_descriptors() -> None:
    before = len(os.listdir("/proc/self/fd"))
    async with host_with({"holder": Holder}) as host:
        data = await host.save()
        entries = {e.device: e for e in decode_envelope_untrusted(data)}
        assert entries["holder"].payload == {"handle": 0}
        assert not host.devices["holder"].ctx.fds.carries_fds
        await host.resume()
    assert len(os.listdir("/proc/self/fd")) == before


async def test_a_takeover_that_fails_after_the_quiesce_resumes_the_host(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Whatever fails between the quiesce and the commit, the host serves on (rollback)."""
    import socket

    from devicehost import takeover
    from devicehost.handoff import HandoffError
    from devicehost.lifecycle import DeviceState

    def broken(envelope: bytes) -> set[str]:
        raise HandoffError("injected failure after the save")

    monkeypatch.setattr(takeover, "_not_saved", broken)
    async with host_with({"holder": Holder}) as host:
        host.servicing = takeover.Servicing(None)
        left, right = socket.socketpair()
        with left, right:
            left.setblocking(False)
            with pytest.raises(HandoffError, match="rolled back: injected failure"):
                await takeover.serve_takeover(host, {"handoff": 1}, left)
        assert host.gate.is_open
        assert host.devices["holder"].state is DeviceState.RUNNING
        assert not host.servicing.handed_over.is_set() and not host.abandon_devices
