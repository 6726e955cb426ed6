"""The guest stack's stream sockets against the real device: what send_all sends and when it stops.

``send_all`` hands what the credit does not cover to the pump, which posts it as the device's
CREDIT_UPDATEs arrive; these tests check the bytes the host gets and how a waiting sender ends.
"""

from __future__ import annotations

import os

import anyio
import pytest

from devicehost_vsock.guest_stack import GuestSockets
from devicehost_vsock.protocol import HEADER_SIZE

from .hosted import HostedGuest
from .hostside import listen, read_exactly

pytestmark = pytest.mark.anyio


def base(guest: HostedGuest) -> str:
    runner = guest.host.devices["vsock"].runner
    return str(runner.base_path)


@pytest.mark.parametrize("chunk", [65536, 1000, 4096])
async def test_send_all_delivers_many_windows_in_order(guest: HostedGuest, chunk: int) -> None:
    # 640 KiB through the device's 64 KiB window: ten credit stalls at least, each resumed by
    # the pump; 1000-byte packets leave a short last packet in most batches.
    listener = await listen(base(guest), 5030)
    sockets = GuestSockets(guest, rx_buffers=16, rx_size=HEADER_SIZE + 4096)
    payload = os.urandom(640 * 1024 + 17)
    async with anyio.create_task_group() as tg:
        tg.start_soon(sockets.pump)
        with anyio.fail_after(20):
            conn = await sockets.connect(5030, 1030)
            host = await listener.accept()
            done = anyio.Event()

            async def sender() -> None:
                await conn.send_all(payload, chunk)
                done.set()

            tg.start_soon(sender)
            assert await read_exactly(host, len(payload), timeout=20) == payload
            await done.wait()
        tg.cancel_scope.cancel()
    assert conn.tx_cnt == len(payload) and not conn.reset
    await host.aclose()
    await listener.aclose()


async def test_a_sender_waiting_for_credit_is_told_of_a_reset(guest: HostedGuest) -> None:
    # The host reads nothing, so the window closes and send_all waits; then the host closes:
    # the device's write fails, it resets the connection and the waiting send_all raises.
    listener = await listen(base(guest), 5031)
    sockets = GuestSockets(guest, rx_buffers=16, rx_size=HEADER_SIZE + 4096)
    async with anyio.create_task_group() as tg:
        tg.start_soon(sockets.pump)
        with anyio.fail_after(20):
            conn = await sockets.connect(5031, 1031)
            host = await listener.accept()
            outcome: list[BaseException] = []
            finished = anyio.Event()

            async def sender() -> None:
                try:
                    await conn.send_all(bytes(16 << 20), 65536)
                except ConnectionResetError as exc:
                    outcome.append(exc)
                finally:
                    finished.set()

            tg.start_soon(sender)
            while conn.credit or conn.tx_cnt == 0:  # until the window is used up
                await conn.wait_changed()
            await host.aclose()
            await finished.wait()
        tg.cancel_scope.cancel()
    assert len(outcome) == 1 and conn.reset
    await listener.aclose()
