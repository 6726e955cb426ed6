"""vsock served over vhost-user to the test kit's frontend (QEMU 7.2's message sequence): real
Unix socket, memfd guest memory, eventfd kicks and calls, two vrings (rx, tx), the CID from
GET_CONFIG, and data moving both ways through the device's Unix sockets."""

from __future__ import annotations

import os
import struct

import anyio
import pytest

from devicehost import DeviceState
from devicehost.memory import GuestMemory
from devicehost.testing import host_with
from devicehost.testing.registry import DeviceSpec
from devicehost.testing.vhost_user import VhostUserFrontend
from devicehost.virtio import VERSION_1, VirtioTransport
from devicehost.virtio.vhost_message import USER_F_PROTOCOL_FEATURES
from devicehost_vsock import VsockConfig, VsockDevice
from devicehost_vsock.guest_stack import GuestStack
from devicehost_vsock.protocol import Op

from .hostside import seq_connect, seq_recv, seq_send

pytestmark = pytest.mark.anyio


async def test_vsock_over_vhost_user(sock_dir: str) -> None:
    base = f"{sock_dir}/vsock"
    config = VsockConfig(guest_cid=7, base_path=base, vhost_user_socket=f"{sock_dir}/vu.sock")
    memory = GuestMemory.memfd(8 * 1024 * 1024)
    try:
        spec = DeviceSpec("vsock", "vsock", config)
        async with host_with({"vsock": VsockDevice}, [spec]) as host:
            # Served, no VMM yet: both listeners exist and refuse a CONNECT promptly (issue 17
            # item 4), as when no guest listens: the line is read, the socket closed, no OK (well
            # before the 2 s connect timeout would close it).
            with anyio.fail_after(1.5):
                early = await anyio.connect_unix(base)
                await early.send(b"CONNECT 5\n")
                with pytest.raises(anyio.EndOfStream):
                    await early.receive()
                await early.aclose()
                seq = await seq_connect(f"{base}_seqpacket")
                await seq_send(seq, b"CONNECT 5\n")
                assert await seq_recv(seq) is None
                seq.close()
            with anyio.fail_after(10):
                frontend = await VhostUserFrontend.connect(f"{sock_dir}/vu.sock", memory)
                features, cid = await frontend.realize()
                assert frontend.queue_count == 2 and struct.unpack("<Q", cid) == (7,)
                assert features & 0x7 == 0x7  # STREAM | SEQPACKET | NO_IMPLIED_STREAM
                await frontend.start(1 << VERSION_1 | 1 << USER_F_PROTOCOL_FEATURES | 0x1)
                guest = GuestStack(frontend, cid=7)
                listener = await anyio.create_unix_listener(f"{base}_5000")
                guest.post_rx(4)
                guest.send(Op.REQUEST, 1024, 5000)
                assert (await guest.recv()).header.op == Op.RESPONSE
                peer = await listener.accept()
                guest.send(Op.RW, 1024, 5000, b"over vhost-user")
                received = b""
                while len(received) < 15:
                    received += await peer.receive()
                assert received == b"over vhost-user"
                await peer.send(b"and back")
                packet = await guest.recv_op(Op.RW)
                assert (packet.header.dst_cid, packet.data) == (7, b"and back")
                await peer.aclose()
                await listener.aclose()
                await frontend.stream.aclose()  # the VMM goes away: the device is closed
                backend = host.transport(VirtioTransport).vhost_user_backend("vsock")
                await backend.wait_finished(1)
                assert host.devices["vsock"].state is DeviceState.CLOSED
                # The listener outlives the VMM: a CONNECT is refused (read, closed, no OK).
                with anyio.fail_after(1.5):
                    late = await anyio.connect_unix(base)
                    await late.send(b"CONNECT 5\n")
                    with pytest.raises(anyio.EndOfStream):
                        await late.receive()
                    await late.aclose()
                await frontend.aclose()
            before = os.path.exists(base)
        assert before and not os.path.exists(base)  # removed when the host stopped
    finally:
        memory.close()
