"""The worker's scheduling rule: rx work only while the guest has rx buffers posted."""

from __future__ import annotations

import anyio
import pytest

from devicehost_vsock.guest_stack import GuestStack
from devicehost_vsock.protocol import Op

pytestmark = pytest.mark.anyio


def base(guest: GuestStack) -> str:
    return str(guest.host.devices["vsock"].runner.base_path)  # type: ignore[attr-defined]


async def test_nothing_is_read_or_sent_without_rx_buffers(guest: GuestStack) -> None:
    stream = await anyio.connect_unix(base(guest))
    await stream.send(b"CONNECT 77\n")
    guest.send(Op.RW, 1, 2, b"x")  # unknown key: an RST is owed
    await anyio.sleep(0.2)
    assert guest.try_recv() is None
    guest.post_rx(2)
    first, second = await guest.recv(), await guest.recv()
    assert {first.header.op, second.header.op} == {Op.RST, Op.REQUEST}
    await stream.aclose()


async def test_small_rx_buffers_do_not_block_big_ones(guest: GuestStack) -> None:
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
