"""The worker's scheduling rule: rx work only while the guest has rx buffers posted."""

from __future__ import annotations

import anyio
import pytest

from devicehost_vsock.protocol import Op

from .hosted import HostedGuest

pytestmark = pytest.mark.anyio


def base(guest: HostedGuest) -> str:
    return str(guest.host.devices["vsock"].runner.base_path)


async def test_nothing_is_read_or_sent_without_rx_buffers(guest: HostedGuest) -> None:
    stream = await anyio.connect_unix(base(guest))
    await stream.send(b"CONNECT 77\n")
    guest.send(Op.RW, 1, 2, b"x")  # unknown key: an RST is owed
    await anyio.sleep(0.2)
    assert guest.try_recv() is None
    guest.post_rx(2)
    first, second = await guest.recv(), await guest.recv()
    assert {first.header.op, second.header.op} == {Op.RST, Op.REQUEST}
    await stream.aclose()


async def test_small_rx_buffers_do_not_block_big_ones(guest: HostedGuest) -> None:
    listener = await anyio.create_unix_listener(f"{base(guest)}_5000")
    guest.post_rx(1)
    guest.send(Op.REQUEST, 1024, 5000)
    assert (await guest.recv()).header.op == Op.RESPONSE
    host = await listener.accept()
    await host.send(b"payload")
    guest.rxq.add(writable=[44])
    guest.rxq.add(writable=[44 + 100])
    guest.rxq.kick()
    empty, data = await guest.recv(), await guest.recv()
    assert empty.written == 0
    assert (data.header.op, data.data) == (Op.RW, b"payload")


async def test_garbage_tx_chains_leave_the_device_working(guest: HostedGuest) -> None:
    import random
    import struct

    from devicehost import DeviceState

    rng = random.Random(1234)
    guest.post_rx(200)
    for _ in range(300):
        header = bytearray(rng.randbytes(44))
        if rng.random() < 0.7:  # mostly plausible headers, to reach deeper paths
            struct.pack_into("<QQII", header, 0, 3, 2, rng.choice([1, 2, 1024]),
                             rng.choice([5000, 9999, 0x4000_0000]))
            struct.pack_into("<IHH", header, 24, rng.choice([0, 3, 100, 70000]), 1,
                             rng.randrange(0, 9))
        parts = [bytes(header)[: rng.choice([44, 44, 10, 0])], rng.randbytes(rng.randrange(200))]
        parts = [p for p in parts if p] or [b"\0"]
        while True:
            try:
                guest.txq.add(parts, fragment=rng.choice([None, 7, 50]))
                break
            except Exception:
                await guest.txq.wait_used()
        guest.txq.kick()
        guest.reap_tx()
    with anyio.fail_after(5):
        while guest.txq.in_flight:
            await guest.txq.wait_used()
    # Drain whatever the garbage earned (mostly RSTs), posting buffers until the device is quiet.
    with anyio.fail_after(10):
        quiet = False
        while not quiet:
            guest.post_rx(16)
            for _ in range(16):
                try:
                    await guest.recv(timeout=0.3)
                except TimeoutError:
                    quiet = True
                    break
    assert guest.host.devices["vsock"].state is DeviceState.RUNNING
    listener = await anyio.create_unix_listener(f"{base(guest)}_6000")
    guest.post_rx(8)
    guest.send(Op.REQUEST, 4242, 6000)
    assert (await guest.recv_op(Op.RESPONSE)).header.dst_port == 4242
    peer = await listener.accept()
    guest.send(Op.RW, 4242, 6000, b"still fine")
    got = b""
    with anyio.fail_after(5):
        while len(got) < 10:
            got += await peer.receive()
    assert got == b"still fine"


async def test_host_connections_that_say_nothing_time_out_without_rx_buffers(
    sock_dir: str,
) -> None:
    from devicehost.testing import host_with
    from devicehost.testing.registry import DeviceSpec
    from devicehost.virtio import VirtioTransport
    from devicehost_vsock import VsockConfig, VsockDevice

    config = VsockConfig(base_path=f"{sock_dir}/vsock", connect_timeout=0.3)
    async with host_with({"vsock": VsockDevice}, [DeviceSpec("vsock", "vsock", config)]) as host:
        driver = await host.transport(VirtioTransport).connect_driver("vsock", queue_size=256)
        guest = HostedGuest(driver, host, cid=3, buf_alloc=65536)
        manager = host.devices["vsock"].runner.worker.manager
        with anyio.fail_after(30):
            silent = await anyio.connect_unix(config.base_path)
            partial = await anyio.connect_unix(config.base_path)
            await partial.send(b"CONNECT 12")  # no newline: still no CONNECT line
            # The guest posts no rx buffer: the lines could not even be read, yet both are closed.
            for stream in (silent, partial):
                with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                    await stream.receive()
                await stream.aclose()
            assert len(manager) == 0
            # A host connection that sends its line while the guest posts buffers is served.
            talker = await anyio.connect_unix(config.base_path)
            await talker.send(b"CONNECT 77\n")
            guest.post_rx(1)
            assert (await guest.recv()).header.op == Op.REQUEST
            await talker.aclose()
        await driver.reset()
