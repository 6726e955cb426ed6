"""The Unix socket side: the device listener, readiness reports, connects to host listeners."""

from __future__ import annotations

import errno
import os
import select
import socket

import anyio
import pytest

from devicehost_vsock.manager import ConnectionManager
from devicehost_vsock.relay import Relay, UnixStream, bind_listener

pytestmark = pytest.mark.anyio


def test_bind_listener_replaces_stale_socket_but_not_files(sock_dir: str) -> None:
    path = f"{sock_dir}/vsock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # the file stays behind
    listener = bind_listener(path)
    client = socket.socket(socket.AF_UNIX)
    client.connect(path)
    client.close()
    listener.close()
    os.unlink(path)
    open(path, "w").close()
    with pytest.raises(FileExistsError, match="not a socket"):
        bind_listener(path)
    assert os.path.isfile(path)


def test_stream_reports(sock_dir: str) -> None:
    relay = Relay(f"{sock_dir}/vsock", bind_listener(f"{sock_dir}/vsock"), lambda: None)
    with pytest.raises(FileNotFoundError):
        relay.connect(80)
    host_listener = bind_listener(f"{sock_dir}/vsock_80")
    stream = relay.connect(80)
    peer, _ = host_listener.accept()
    assert stream.recv_into(memoryview(bytearray(4))) is None
    assert stream.peek(4) is None
    peer.sendall(b"abc")
    assert stream.peek(10) == b"abc"
    buf = bytearray(10)
    assert stream.recv_into(memoryview(buf)) == 3 and buf[:3] == b"abc"
    assert stream.send([b"x", b"yz"]) == 3 and peer.recv(3) == b"xyz"
    assert not stream.is_closed()
    parts = [bytearray(2), bytearray(3), bytearray(4)]
    assert stream.recv_into_many([memoryview(p) for p in parts]) is None
    peer.sendall(b"scatter")
    assert stream.recv_into_many([memoryview(p) for p in parts]) == 7
    assert parts == [b"sc", b"att", b"er\0\0"]
    peer.shutdown(socket.SHUT_WR)
    assert stream.recv_into_many([memoryview(p) for p in parts]) == 0
    assert stream.recv_into(memoryview(buf)) == 0 and not stream.is_closed()
    peer.close()
    assert stream.is_closed()
    stream.close()
    relay.close()
    host_listener.close()


async def test_relay_loops_feed_the_table(sock_dir: str) -> None:
    woken: list[int] = []
    base = f"{sock_dir}/vsock"
    relay = Relay(base, bind_listener(base), lambda: woken.append(1))
    manager = ConnectionManager(3, relay.connect)
    relay.manager = manager
    async with anyio.create_task_group() as tg:
        tg.start_soon(relay.serve_listener)
        tg.start_soon(relay.serve_epoll)
        client = await anyio.connect_unix(base)
        with anyio.fail_after(5):
            while len(manager) == 0:
                await anyio.sleep(0.01)
        (stream,) = relay.streams.values()
        assert isinstance(stream, UnixStream)
        # Nothing sent yet: reading would block and asks for a readiness report.
        packet = memoryview(bytearray(100))
        assert manager.produce_rx(packet, anyio.current_time()) is None
        await client.send(b"CONNECT 5\n")
        with anyio.fail_after(5):
            while manager.produce_rx(packet, anyio.current_time()) is None:
                await anyio.sleep(0.01)
        assert int.from_bytes(packet[30:32], "little") == 1  # REQUEST
        await client.aclose()
        tg.cancel_scope.cancel()
    assert woken
    manager.close_all()
    relay.close()


class NoWatchesEpoll:
    """An epoll instance out of watches (``fs.epoll.max_user_watches``): register fails."""

    def __init__(self, real: select.epoll) -> None:
        self.real = real

    def register(self, fd: int, mask: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name: str) -> object:
        return getattr(self.real, name)


async def test_a_connection_that_cannot_be_watched_is_closed_and_the_listener_goes_on(
    sock_dir: str, caplog: pytest.LogCaptureFixture
) -> None:
    relay = Relay(f"{sock_dir}/vsock", bind_listener(f"{sock_dir}/vsock"))
    manager = relay.manager = ConnectionManager(3, relay.connect)
    real = relay.epoll
    relay.epoll = NoWatchesEpoll(real)  # type: ignore[assignment]
    try:
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(relay.serve_listener)
                refused = await anyio.connect_unix(f"{sock_dir}/vsock")
                with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                    await refused.receive()  # closed by the host, nothing else lost
                await refused.aclose()
                assert len(manager) == 0
                relay.epoll = real
                kept = await anyio.connect_unix(f"{sock_dir}/vsock")
                while len(manager) == 0:
                    await anyio.wait_all_tasks_blocked()
                tg.cancel_scope.cancel()
            await kept.aclose()
    finally:
        manager.close_all()
        relay.epoll = real
        relay.close()
    assert any("cannot watch a host connection" in r.getMessage() for r in caplog.records)
