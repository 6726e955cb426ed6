"""ControlSocket: one SEQPACKET message with its fds; framing faults close every fd that came."""

from __future__ import annotations

import array
import os
import socket
from collections.abc import Iterator

import anyio
import pytest

from devicehost.fds import fd_kind
from devicehost.vmbus.controlsocket import MAX_FDS, ControlSocket, ControlSocketError

pytestmark = pytest.mark.anyio


@pytest.fixture
def pair() -> Iterator[tuple[ControlSocket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours = ControlSocket(a)
    yield ours, b
    ours.close()
    b.close()


def open_fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def send_raw(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([data], ancillary)


async def test_a_message_and_its_fds_arrive_together(
        pair: tuple[ControlSocket, socket.socket]) -> None:
    ours, peer = pair
    fd = os.eventfd(0)
    try:
        send_raw(peer, b"x" * 240, [fd])
        with anyio.fail_after(30):
            data, fds = await ours.receive()
        assert data == b"x" * 240 and len(fds) == 1 and fd_kind(fds[0]) == "eventfd"
        os.close(fds[0])
        await ours.send(b"back", ())
        assert peer.recv(300) == b"back"
    finally:
        os.close(fd)


async def test_an_oversized_message_is_refused_and_its_fds_closed(
        pair: tuple[ControlSocket, socket.socket]) -> None:
    ours, peer = pair
    fd = os.eventfd(0)
    before = open_fd_count()
    send_raw(peer, bytes(241), [fd])
    os.close(fd)
    with anyio.fail_after(30), pytest.raises(ControlSocketError, match="longer than 240"):
        await ours.receive()
    assert open_fd_count() == before - 1  # the one we closed; none leaked from the message


async def test_too_many_fds_are_refused_and_closed(
        pair: tuple[ControlSocket, socket.socket]) -> None:
    ours, peer = pair
    fds = [os.eventfd(0) for _ in range(MAX_FDS + 1)]
    before = open_fd_count()
    send_raw(peer, b"12345678", fds)
    for fd in fds:
        os.close(fd)
    with anyio.fail_after(30), pytest.raises(ControlSocketError):
        await ours.receive()
    assert open_fd_count() == before - len(fds)


async def test_the_peer_closing_is_end_of_stream(
        pair: tuple[ControlSocket, socket.socket]) -> None:
    ours, peer = pair
    peer.close()
    with anyio.fail_after(30):
        assert await ours.receive() == (b"", [])


async def test_closing_our_end_wakes_a_receive(pair: tuple[ControlSocket, socket.socket]) -> None:
    ours, _peer = pair
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            result: list[tuple[bytes, list[int]]] = []

            async def receive() -> None:
                result.append(await ours.receive())

            tg.start_soon(receive)
            await anyio.wait_all_tasks_blocked()
            ours.close()
    assert result == [(b"", [])]
