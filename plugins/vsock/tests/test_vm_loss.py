"""When the VM goes away: what a host program sees (docs/plugins/vsock.md, "When the VM goes
away"). Unix stream sockets have no reset of their own (SO_LINGER is ignored by AF_UNIX); Linux
reports ECONNRESET to the host program when the device closes its socket with the host's bytes
still unread, which is the case for bytes the lost guest never received."""

from __future__ import annotations

import anyio
import pytest

from devicehost_vsock.protocol import Op

from .hosted import HostedGuest
from .hostside import listen, read_exactly

pytestmark = pytest.mark.anyio


async def _connected(guest: HostedGuest, port: int) -> tuple[anyio.abc.SocketListener,
                                                              anyio.abc.SocketStream]:
    runner = guest.host.devices["vsock"].runner
    listener = await listen(str(runner.base_path), port)
    guest.post_rx(1)
    guest.send(Op.REQUEST, 1024, port)
    assert (await guest.recv()).header.op == Op.RESPONSE
    with anyio.fail_after(10):
        host = await listener.accept()
    return listener, host


async def test_a_lost_vm_resets_a_connection_whose_host_bytes_were_not_delivered(
    guest: HostedGuest,
) -> None:
    listener, host = await _connected(guest, 5100)
    guest.send(Op.RW, 1024, 5100, b"from the guest")
    assert await read_exactly(host, 14) == b"from the guest"
    # The guest posts no rx buffer: the device leaves the host's bytes in the socket.
    await host.send(b"never delivered")
    await guest.driver.reset()  # the VM (its driver) goes away: the device closes
    with anyio.fail_after(10), pytest.raises(anyio.BrokenResourceError) as info:
        await host.receive()
    assert isinstance(info.value.__cause__, ConnectionResetError)
    await host.aclose()
    await listener.aclose()


async def test_an_orderly_guest_close_is_a_clean_eof(guest: HostedGuest) -> None:
    listener, host = await _connected(guest, 5101)
    guest.send(Op.RW, 1024, 5101, b"complete")
    guest.send(Op.SHUTDOWN, 1024, 5101, flags=3)
    assert await read_exactly(host, 8) == b"complete"
    with anyio.fail_after(10), pytest.raises(anyio.EndOfStream):
        await host.receive()
    await host.aclose()
    await listener.aclose()
