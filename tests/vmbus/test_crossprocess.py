"""Two processes share memfd-backed guest memory and talk through its rings with eventfds."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import anyio
import pytest

from devicehost.memory import GuestMemory
from devicehost.vmbus.channel import EventfdSignal, raw_channel_from_rings
from devicehost.vmbus.pipe import BytePipe, MessagePipe
from devicehost.vmbus.ring import RingMemory

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """These tests run on both backends (overrides the directory's asyncio-only fixture)."""
    return str(request.param)

# Guest -> host ring at pages 0-4, host -> guest ring at pages 8 (control) and 12, 9, 14, 10.
TO_HOST = [0, 1, 2, 3, 4]
TO_GUEST = [8, 12, 9, 14, 10]
MEMORY_SIZE = 16 * 4096

# The peer: maps the same memfd, builds the other ends of both rings, and answers every message
# with its reverse until "quit", then streams 30000 bytes through a byte pipe over the same
# channel and closes with end-of-file.
PEER = textwrap.dedent(
    """
    import sys
    import anyio
    from devicehost.memory import GuestMemory, MemoryRegion
    from devicehost.vmbus.channel import EventfdSignal, raw_channel_from_rings
    from devicehost.vmbus.pipe import BytePipe, MessagePipe
    from devicehost.vmbus.ring import RingMemory

    mem_fd, wait_fd, notify_fd, size = map(int, sys.argv[1:5])
    to_host = [int(p) for p in sys.argv[5].split(",")]
    to_guest = [int(p) for p in sys.argv[6].split(",")]

    async def main():
        memory = GuestMemory([MemoryRegion(0, size, fd=mem_fd)])
        signal = EventfdSignal(wait_fd, notify_fd)
        channel = raw_channel_from_rings(RingMemory.from_pages(memory, to_guest),
                                         RingMemory.from_pages(memory, to_host), signal)
        pipe = MessagePipe(channel)
        count = 0
        while (msg := await pipe.recv()) != b"quit":
            await pipe.send(msg[::-1])
            count += 1
        stream = BytePipe(channel)
        await stream.send(bytes(i % 253 for i in range(30000)))
        await stream.send_eof()
        print(count)

    anyio.run(main)
    """
)


async def test_two_processes_exchange_packets_through_shared_rings() -> None:
    memory = GuestMemory.memfd(MEMORY_SIZE)
    (mem_fd,) = [r.fd for r in memory.regions]
    assert mem_fd is not None
    host_wait, guest_wait = EventfdSignal.new_fds()
    signal = EventfdSignal(host_wait, guest_wait, owns_fds=True)
    channel = raw_channel_from_rings(RingMemory.from_pages(memory, TO_HOST),
                                     RingMemory.from_pages(memory, TO_GUEST), signal)
    pipe = MessagePipe(channel)
    args = [sys.executable, "-c", PEER, str(mem_fd), str(guest_wait), str(host_wait),
            str(MEMORY_SIZE), ",".join(map(str, TO_HOST)), ",".join(map(str, TO_GUEST))]
    process = subprocess.Popen(args, pass_fds=(mem_fd, host_wait, guest_wait),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        with anyio.fail_after(30):
            for i in range(200):
                msg = bytes([i % 256]) * (i * 37 % 5000)
                await pipe.send(msg)
                assert await pipe.recv() == msg[::-1]
            # Several messages in flight at once, more than the 16 KiB ring holds.
            msgs = [bytes([i]) * 3000 for i in range(12)]
            async with anyio.create_task_group() as tg:
                async def send_all() -> None:
                    for m in msgs:
                        await pipe.send(m)

                tg.start_soon(send_all)
                for m in msgs:
                    assert await pipe.recv() == m[::-1]
            await pipe.send(b"quit")
            stream = BytePipe(channel)
            got = bytearray()
            while chunk := await stream.recv(7000):
                got.extend(chunk)
            assert bytes(got) == bytes(i % 253 for i in range(30000))
            out, err = await anyio.to_thread.run_sync(process.communicate)
        assert process.returncode == 0, err.decode()
        assert out.decode().strip() == "212"
        # The peer really wrote into our memory: the host's incoming ring has advanced.
        in_index, out_index = RingMemory.from_pages(memory, TO_HOST).words[0:2]
        assert in_index == out_index != 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        channel.close()
        memory.close()
