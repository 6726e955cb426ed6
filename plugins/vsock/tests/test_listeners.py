"""The device's host listeners on their own: bound at once, refusing while no driver is attached,
handing connections over while one is, and cleaning up after themselves."""

from __future__ import annotations

import logging
import os
import socket

import anyio
import pytest

from devicehost_vsock.listeners import MAX_REFUSING, HostListeners

from .hostside import read_to_eof, seq_connect, seq_recv, seq_send

pytestmark = pytest.mark.anyio

LOG = logging.getLogger("test")


async def test_refuse_then_hand_over_then_refuse_again(sock_dir: str) -> None:
    base = f"{sock_dir}/vsock"
    listeners = HostListeners.bind(base, seqpacket=True, logger=LOG)
    taken: list[tuple[socket.socket, bool]] = []
    got = anyio.Event()

    def take(sock: socket.socket, seq: bool) -> None:
        taken.append((sock, seq))
        got.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(listeners.serve)
        with anyio.fail_after(10):
            # No driver: the CONNECT line (message) is read and the socket closed, no OK.
            stream = await anyio.connect_unix(base)
            await stream.send(b"CONNECT 5\n")
            assert await read_to_eof(stream) == b""
            seq = await seq_connect(f"{base}_seqpacket")
            await seq_send(seq, b"CONNECT 5\n")
            assert await seq_recv(seq) is None
            seq.close()
            # A driver is attached: connections go to it, CONNECT unread.
            listeners.attach(take)
            second = await anyio.connect_unix(base)
            await second.send(b"CONNECT 6\n")
            await got.wait()
            sock, is_seq = taken[0]
            assert not is_seq and sock.recv(64) == b"CONNECT 6\n"
            sock.close()
            await second.aclose()
            listeners.detach()
            third = await anyio.connect_unix(base)
            await third.send(b"CONNECT 7\n")
            assert await read_to_eof(third) == b"" and len(taken) == 1
        tg.cancel_scope.cancel()
    # The host stopped: sockets closed, files removed.
    assert not os.path.exists(base) and not os.path.exists(f"{base}_seqpacket")


async def test_refusals_in_progress_are_bounded(sock_dir: str) -> None:
    base = f"{sock_dir}/vsock"
    listeners = HostListeners.bind(base, seqpacket=False, logger=LOG, connect_timeout=30)
    silent: list[socket.socket] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(listeners.serve)
        with anyio.fail_after(20):
            for _ in range(MAX_REFUSING):  # each waits for a CONNECT line that never comes
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.connect(base)
                silent.append(sock)
            # One more is closed at once, unread, while those still hold their descriptors.
            extra = await anyio.connect_unix(base)
            assert await read_to_eof(extra) == b""
        tg.cancel_scope.cancel()
    for sock in silent:
        sock.close()


def test_an_empty_base_path_gets_a_temporary_directory_removed_on_close() -> None:
    listeners = HostListeners.bind("", seqpacket=True, logger=LOG)
    directory = os.path.dirname(listeners.base_path)
    assert os.path.exists(listeners.base_path)
    assert os.path.exists(f"{listeners.base_path}_seqpacket")
    listeners.close()
    assert not os.path.exists(directory)


def test_a_file_in_the_way_is_refused_and_nothing_is_left_behind(sock_dir: str) -> None:
    base = f"{sock_dir}/vsock"
    with open(f"{base}_seqpacket", "w") as f:
        f.write("not a socket")
    with pytest.raises(FileExistsError):
        HostListeners.bind(base, seqpacket=True, logger=LOG)
    assert not os.path.exists(base)  # the stream listener bound first was removed again
