"""The virtio transport: in-process driver <-> device through the host lifecycle."""

from __future__ import annotations

import struct
from typing import Any

import anyio
import pytest

from devicehost import Device, DeviceState
from devicehost.testing import host_with
from devicehost.testing.registry import DeviceSpec
from devicehost.virtio import (
    RING_EVENT_IDX,
    RING_INDIRECT_DESC,
    VERSION_1,
    DriverQueue,
    EventDoorbell,
    FeatureError,
    QueueError,
    QueueState,
    VirtioTransport,
    VirtQueue,
)

from .echo_device import MAGIC, EchoConfig, EchoDevice, EchoSaved


def state_of(device: Device) -> DeviceState:
    """The device's state as of now: a call, so that mypy does not carry an earlier narrowing
    of ``device.state`` past the awaits that change it."""
    return device.state


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_echo_through_in_process_driver() -> None:
    async with host_with({"echo": EchoDevice}) as host:
        transport = host.transport(VirtioTransport)
        driver = await transport.connect_driver("echo", queue_size=64)
        device = host.devices["echo"]
        assert device.state is DeviceState.RUNNING
        assert driver.features == (0b101 | 1 << VERSION_1 | 1 << RING_INDIRECT_DESC
                                   | 1 << RING_EVENT_IDX)
        assert len(driver.queues) == 2 and driver.queues[0].size == 64
        requests, replies = driver.queues
        with anyio.fail_after(5):
            for i, payload in enumerate([b"hello", b"x" * 5000, bytes(range(256))]):
                replies.add(writable=[len(payload)], fragment=1000 if i == 1 else None)
                replies.kick()
                requests.add([payload], indirect=i == 2, fragment=777 if i == 1 else None)
                requests.kick()
                done = await requests.wait_used()
                assert done.written == 0
                reply = await replies.wait_used()
                assert reply.data == payload[::-1]
        assert struct.unpack("<II", driver.read_config(0, 8)) == (MAGIC, 3)
        tree = transport.describe("echo")
        assert tree["mode"] == "in-process" and tree["device_id"] == 0x7E
        assert [(q["last_avail_idx"], q["used_idx"], q["broken"]) for q in tree["queues"]] == [
            (3, 3, None), (3, 3, None)]
        driver.write_config(4, b"\x01")
        obj = device.pm.get_plugin("echo")
        assert isinstance(obj, EchoDevice)
        assert obj.config_writes == [(4, b"\x01")]
        await driver.reset()
        assert state_of(device) is DeviceState.CLOSED and obj.closed == 1
        # The device can be started again by a new driver.
        driver2 = await transport.connect_driver("echo", features=1 << VERSION_1)
        assert driver2.features == 1 << VERSION_1
        assert device.state is DeviceState.RUNNING
        await driver2.reset()


@pytest.mark.anyio
async def test_driver_must_accept_version_1_and_only_offered_bits() -> None:
    async with host_with({"echo": EchoDevice}) as host:
        transport = host.transport(VirtioTransport)
        with pytest.raises(FeatureError, match="VERSION_1"):
            await transport.connect_driver("echo", features=0b1)
        with pytest.raises(FeatureError, match="not offered"):
            await transport.connect_driver("echo", features=1 << VERSION_1 | 0b10)
        assert host.devices["echo"].state is DeviceState.OFFERED


async def _round(requests: DriverQueue, replies: DriverQueue, payload: bytes) -> bytes:
    replies.add(writable=[len(payload)])
    replies.kick()
    requests.add([payload])
    requests.kick()
    await requests.wait_used()
    return (await replies.wait_used()).data


@pytest.mark.anyio
async def test_save_and_restore_resume_the_queues() -> None:
    async with host_with({"echo": EchoDevice}) as host:
        transport = host.transport(VirtioTransport)
        driver = await transport.connect_driver("echo", queue_size=8)
        requests, replies = driver.queues
        device = host.devices["echo"]
        with anyio.fail_after(5):
            for i in range(5):
                assert await _round(requests, replies, b"%d" % i * 3) == b"%d" % i * 3
            saved = await transport.save("echo")
            assert device.state is DeviceState.OPEN
            assert [q.state for q in saved.queues] == [QueueState(5, 5)] * 2
            assert saved.device_state == EchoSaved(5)
            # While saved, the guest posts more work; it is served after the restore.
            replies.add(writable=[3])
            requests.add([b"abc"])
            requests.kick()
            await transport.restore("echo", saved)
            assert state_of(device) is DeviceState.RUNNING
            await requests.wait_used()
            assert (await replies.wait_used()).data == b"cba"
            # 16-bit indices keep counting past the 8-entry ring.
            for i in range(10):
                assert await _round(requests, replies, b"w%d" % i) == b"%dw" % i
            assert struct.unpack("<II", driver.read_config(0, 8)) == (MAGIC, 16)


@pytest.mark.anyio
async def test_a_chain_the_device_held_when_saved_is_replayed_once_after_restore() -> None:
    """The echo device pops a request, then waits for a reply buffer: saved then, the request
    is in flight; the restored device gets it again (once) and answers it."""
    async with host_with({"echo": EchoDevice}) as host:
        transport = host.transport(VirtioTransport)
        driver = await transport.connect_driver("echo", queue_size=8)
        requests, replies = driver.queues
        with anyio.fail_after(30):
            assert await _round(requests, replies, b"first") == b"tsrif"
            requests.add([b"held"])
            requests.kick()
            while transport._link("echo").resources.queues[0].state().last_avail_idx < 2:  # type: ignore[union-attr]
                await anyio.wait_all_tasks_blocked()
            saved = await transport.save("echo")
            assert saved.queues[0].state.last_avail_idx == 2
            assert len(saved.queues[0].state.inflight) == 1  # popped, never pushed
            assert saved.queues[1].state.inflight == ()
            replies.add(writable=[8])
            replies.kick()
            await transport.restore("echo", saved)
            await requests.wait_used()
            assert (await replies.wait_used()).data == b"dleh"
            assert await _round(requests, replies, b"next") == b"txen"
            assert struct.unpack("<II", driver.read_config(0, 8)) == (MAGIC, 3)
            assert requests.in_flight == 0 and replies.in_flight == 0  # nothing answered twice


@pytest.mark.anyio
async def test_restore_without_device_state_reoffers() -> None:
    specs = [DeviceSpec("echo", "echo", EchoConfig(savable=False))]
    async with host_with({"echo": EchoDevice}, specs) as host:
        transport = host.transport(VirtioTransport)
        driver = await transport.connect_driver("echo")
        saved = await transport.save("echo")
        assert saved.device_state is None
        await transport.restore("echo", saved)
        assert host.devices["echo"].state is DeviceState.OFFERED
        await driver.reset()
        driver = await transport.connect_driver("echo")
        assert state_of(host.devices["echo"]) is DeviceState.RUNNING


def test_deferred_pushes_ring_the_call_doorbell_once() -> None:
    from devicehost.memory import GuestMemory
    from devicehost.virtio import VirtQueue
    from devicehost.virtio.queue import QueueLayout, SplitQueue

    memory = GuestMemory.anonymous(1 << 16)
    size, desc, avail, used = 4, 0x1000, 0x2000, 0x3000
    for i in range(3):
        memory.write(desc + 16 * i, struct.pack("<QIHH", 0x8000, 1, 0, 0))
        memory.write(avail + 4 + 2 * i, struct.pack("<H", i))
    memory.write(avail + 2, struct.pack("<H", 3))
    call = EventDoorbell()
    queue = VirtQueue(1, SplitQueue(memory, QueueLayout(size, desc, avail, used)),
                      EventDoorbell(), call)
    queue.signal_used()
    assert call.rings == 0  # nothing returned yet
    while (chain := queue.pop()) is not None:
        queue.push_deferred(chain, chain.head + 1)
        assert call.rings == 0
    queue.signal_used()
    queue.signal_used()
    assert call.rings == 1 and queue.interrupts == 1
    elems = [struct.unpack("<II", memory.read(used + 4 + 8 * i, 8)) for i in range(3)]
    assert struct.unpack("<H", memory.read(used + 2, 2))[0] == 3
    assert elems == [(0, 1), (1, 2), (2, 3)]


def _queue_with(heads: list[int], error: EventDoorbell | None) -> VirtQueue:
    from devicehost.memory import GuestMemory
    from devicehost.virtio.queue import DESC_F_NEXT, QueueLayout, SplitQueue

    memory = GuestMemory.anonymous(1 << 16)
    size, desc, avail, used = 4, 0x1000, 0x2000, 0x3000
    for i in range(3):
        memory.write(desc + 16 * i, struct.pack("<QIHH", 0x8000, 1, 0, 0))
    memory.write(desc + 16 * 3, struct.pack("<QIHH", 0x8000, 1, DESC_F_NEXT, 3))  # a loop
    for i, head in enumerate(heads):
        memory.write(avail + 4 + 2 * i, struct.pack("<H", head))
    memory.write(avail + 2, struct.pack("<H", len(heads)))
    queue = VirtQueue(0, SplitQueue(memory, QueueLayout(size, desc, avail, used)),
                      EventDoorbell(), EventDoorbell(), error)
    return queue


def test_pop_many_rings_the_error_doorbell_when_the_queue_breaks() -> None:
    error = EventDoorbell()
    queue = _queue_with([0, 1, 3], error)
    chains = queue.pop_many()
    assert [c.head for c in chains] == [0, 1]
    assert error.rings == 1  # broken during the call, although chains came back
    with pytest.raises(QueueError, match="descriptor loop"):
        queue.pop_many()
    with pytest.raises(QueueError, match="descriptor loop"):
        queue.pop()
    assert error.rings == 1  # rung once, when it broke

    error = EventDoorbell()
    queue = _queue_with([3, 0], error)
    with pytest.raises(QueueError, match="descriptor loop"):
        queue.pop_many(5)
    assert error.rings == 1

    error = EventDoorbell()
    queue = _queue_with([0, 1, 2], error)
    assert [c.head for c in queue.pop_many(2)] == [0, 1]
    assert [c.head for c in queue.pop_many()] == [2]
    assert queue.pop_many() == [] and error.rings == 0
    queue = _queue_with([3], None)  # no error doorbell: raises all the same
    with pytest.raises(QueueError, match="descriptor loop"):
        queue.pop_many()


class _ExitingConfig(EchoDevice):
    """Its config-space methods call sys.exit(), as a broken plugin might."""

    def virtio_config_read(self, offset: int, size: int) -> bytes:
        raise SystemExit(5)

    def virtio_config_write(self, offset: int, data: bytes) -> None:
        raise SystemExit(6)


def test_a_config_method_that_calls_sys_exit_is_a_device_error() -> None:
    import logging

    from devicehost import DeviceContext, DeviceError, new_device_manager
    from devicehost.virtio.transport import device_config_read, device_config_write

    async def check() -> None:
        async with anyio.create_task_group() as tg:
            ctx = DeviceContext("cfg", "echo", None, logging.getLogger("test.cfg"))
            plugin = _ExitingConfig(EchoConfig())
            device = Device(ctx, new_device_manager(plugin, "cfg"), tg)
            traits = plugin.offer(ctx)
            with pytest.raises(DeviceError, match="failed in virtio_config_read: 5"):
                device_config_read(device, traits, 0, 4)
            with pytest.raises(DeviceError, match="failed in virtio_config_write: 6"):
                device_config_write(device, 0, b"\0")

    anyio.run(check)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_a_driver_start_after_a_host_save_waits_until_resume() -> None:
    with anyio.fail_after(30):
        async with host_with({"echo": EchoDevice}) as host:
            transport = host.transport(VirtioTransport)
            device = host.devices["echo"]
            await host.save()
            drivers: list[Any] = []

            async def start() -> None:
                drivers.append(await transport.connect_driver("echo", queue_size=16))

            async with anyio.create_task_group() as tg:
                tg.start_soon(start)
                await host.gate.until_waiting(1)
                await anyio.wait_all_tasks_blocked()
                assert drivers == [] and state_of(device) is DeviceState.OFFERED
                await host.resume()
            assert state_of(device) is DeviceState.RUNNING
            await drivers[0].reset()


@pytest.mark.anyio
async def test_pop_wait_yields_while_the_guest_keeps_the_queue_full() -> None:
    """A queue that always has chains (a guest refilling as fast as the device pops) must not
    keep the device's task running: pop_wait yields once every POP_BUDGET chains."""
    from devicehost.memory import GuestMemory
    from devicehost.virtio.queue import QueueLayout, SplitQueue
    from devicehost.virtio.transport import POP_BUDGET

    size, desc, avail, used = 256, 0x1000, 0x3000, 0x4000
    memory = GuestMemory.anonymous(1 << 16)
    for i in range(size):
        memory.write(desc + 16 * i, struct.pack("<QIHH", 0x8000, 1, 0, 0))
        memory.write(avail + 4 + 2 * i, struct.pack("<H", i))
    memory.write(avail + 2, struct.pack("<H", size))
    queue = VirtQueue(0, SplitQueue(memory, QueueLayout(size, desc, avail, used)),
                      EventDoorbell(), EventDoorbell())
    turns = 0
    done = False

    async def bystander() -> None:
        nonlocal turns
        while not done:
            turns += 1
            await anyio.lowlevel.checkpoint()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(bystander)
            await anyio.lowlevel.checkpoint()
            start = turns
            heads = [(await queue.pop_wait()).head for _ in range(size)]
            done = True
    assert heads == list(range(size))
    assert turns - start >= size // POP_BUDGET - 1
    memory.close()
