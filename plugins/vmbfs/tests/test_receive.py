"""The delegating receive_message/send_message (the pipe's own cancel-safety is tested in
tests/vmbus/test_pipe.py)."""

from __future__ import annotations

import anyio
import pytest

from devicehost.vmbus import MessagePipe, connected_channel_pair
from devicehost_vmbfs.receive import receive_message, send_message


@pytest.mark.anyio
async def test_a_cancelled_receive_loses_no_message() -> None:
    host, guest = connected_channel_pair(16384)
    sender, receiver = MessagePipe(guest), MessagePipe(host)
    taken: list[bytes] = []

    async def take() -> None:
        taken.append(await receive_message(receiver, 64))

    sent = [b"m%d" % i for i in range(60)]
    for i, message in enumerate(sent):
        async with anyio.create_task_group() as tg:
            tg.start_soon(take)
            for _ in range(i % 2):
                await anyio.sleep(0)
            if i % 4 == 0:
                tg.cancel_scope.cancel()  # the receiver is waiting, with nothing to take
            else:
                await send_message(sender, message)
                for _ in range(i % 3):
                    await anyio.sleep(0)
                tg.cancel_scope.cancel()  # lands before, during or after the receive
        if i % 4 == 0:
            await send_message(sender, message)
    left = []
    while not host.incoming.is_empty():
        left.append(receiver.try_recv(64))
    # Every message was either returned to a receiver or is still in the ring, exactly once.
    assert sorted(taken + left) == sorted(sent)
    assert taken and left


@pytest.mark.anyio
async def test_receive_returns_messages_in_order_and_send_waits_for_room() -> None:
    host, guest = connected_channel_pair(4096)
    sender, receiver = MessagePipe(guest), MessagePipe(host)
    messages = [bytes([i]) * 1500 for i in range(10)]  # two fit in a one-page ring
    got: list[bytes] = []

    async def drain() -> None:
        for _ in messages:
            got.append(await receive_message(receiver, 4096))

    async with anyio.create_task_group() as tg:
        tg.start_soon(drain)
        with anyio.fail_after(5):
            for message in messages:
                await send_message(sender, message)
    assert got == messages


@pytest.mark.anyio
async def test_receive_on_a_closed_channel_raises() -> None:
    host, guest = connected_channel_pair(4096)
    guest.close()
    with anyio.fail_after(5), pytest.raises(Exception) as info:
        await receive_message(MessagePipe(host), 64)
    assert type(info.value).__name__ == "ConnectionReset"
