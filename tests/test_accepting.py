"""Accept loops that outlive a shortage of file descriptors (devicehost.accepting).

The exhaustion here is real: the test lowers its own soft RLIMIT_NOFILE and fills the descriptor
table, so ``accept()`` fails with EMFILE in the kernel, through anyio's listener on both backends
and through a raw non-blocking socket; the limit is restored before each test ends.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import logging
import os
import resource
import socket
import tempfile
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import pytest

from devicehost.accepting import (
    AcceptBackoff,
    accept_socket,
    accept_stream,
    resource_errno,
)

pytestmark = pytest.mark.anyio

LOGGER = logging.getLogger("test.accepting")


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def sock_path() -> Iterator[str]:
    directory = tempfile.mkdtemp(prefix="acc")
    yield f"{directory}/listener"
    with contextlib.suppress(OSError):
        os.unlink(f"{directory}/listener")
    os.rmdir(directory)


class FdHog:
    """Fills this process's descriptor table under a lowered soft limit; ``free(n)`` gives n
    descriptors back, ``close()`` all of them and the old limit."""

    def __init__(self) -> None:
        self.limits = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.held: list[int] = []

    def fill(self) -> None:
        # Garbage of earlier tests may hold descriptors: a collection in the middle of the test
        # would free one. Collect it now, and none while the table is full.
        gc.collect()
        gc.disable()
        highest = max(int(n) for n in os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 16, self.limits[1]))
        while True:
            try:
                self.held.append(os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC))
            except OSError as exc:
                assert exc.errno == errno.EMFILE
                return

    def free(self, n: int) -> None:
        for _ in range(n):
            os.close(self.held.pop())

    def close(self) -> None:
        self.free(len(self.held))
        resource.setrlimit(resource.RLIMIT_NOFILE, self.limits)
        gc.enable()


@pytest.fixture
def hog() -> Iterator[FdHog]:
    hog = FdHog()
    try:
        yield hog
    finally:
        hog.close()


class WatchedBackoff(AcceptBackoff):
    """An AcceptBackoff that lets the test wait for its n-th failure."""

    def __init__(self) -> None:
        super().__init__("test listener", LOGGER)
        self._changed = anyio.Event()

    def failed(self, err: int) -> float:
        self.last_errno = err
        self._changed.set()
        self._changed = anyio.Event()
        return super().failed(err)

    async def wait_failures(self, n: int) -> None:
        while self.failures < n:
            await self._changed.wait()


def episode_open(backoff: AcceptBackoff) -> bool:
    return backoff.in_episode  # (a call: mypy does not narrow it across the backoff's calls)


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER.name]


def test_backoff_doubles_to_its_bound_and_logs_each_episode_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, LOGGER.name)
    backoff = AcceptBackoff("listener X", LOGGER, first_delay=0.1, max_delay=0.5)
    backoff.accepted(more_queued=False)  # no episode: nothing to say
    delays = [backoff.failed(errno.EMFILE) for _ in range(6)]
    assert delays == [0.1, 0.2, 0.4, 0.5, 0.5, 0.5]
    backoff.accepted(more_queued=True)  # still behind: the episode goes on ...
    assert episode_open(backoff) and backoff.failed(errno.ENFILE) == 0.1  # ... retrying soon
    backoff.accepted(more_queued=False)
    assert not episode_open(backoff)
    assert backoff.failed(errno.ENOBUFS) == 0.1
    backoff.accepted(more_queued=False)
    assert (backoff.episodes, backoff.failures) == (2, 8)
    lines = messages(caplog)
    assert len(lines) == 4
    assert lines[0].startswith("listener X: cannot accept connections: Too many open files"
                               " (EMFILE); retrying, waiting connections stay queued")
    assert lines[1].startswith("listener X: accepting connections again (7 attempts failed over")
    assert "(ENOBUFS)" in lines[2]
    assert lines[3].startswith("listener X: accepting connections again (1 attempts failed")


def test_resource_errno_looks_through_anyio_broken_resource() -> None:
    wrapped = anyio.BrokenResourceError()
    wrapped.__cause__ = OSError(errno.ENFILE, "table full")
    assert resource_errno(wrapped) == errno.ENFILE
    assert resource_errno(OSError(errno.ENOMEM, "no memory")) == errno.ENOMEM
    assert resource_errno(OSError(errno.EBADF, "bad")) is None
    assert resource_errno(anyio.BrokenResourceError()) is None
    assert resource_errno(ValueError()) is None


class Accepted:
    """What an accept loop under test took: readers of each connection's first bytes."""

    def __init__(self) -> None:
        self.readers: list[Callable[[], Awaitable[bytes]]] = []
        self._changed = anyio.Event()

    def add(self, reader: Callable[[], Awaitable[bytes]]) -> None:
        self.readers.append(reader)
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_for(self, n: int) -> None:
        while len(self.readers) < n:
            await self._changed.wait()


async def _exhausted_accept(
    hog: FdHog, caplog: pytest.LogCaptureFixture, path: str,
    accept_two: Callable[[WatchedBackoff, Accepted], Coroutine[Any, Any, None]],
) -> list[bytes]:
    """Two clients connect while the table is full; the accept loop waits, logs one episode,
    takes one client per freed descriptor and says it recovered once both are in."""
    caplog.set_level(logging.INFO, LOGGER.name)
    backoff = WatchedBackoff()
    accepted = Accepted()
    clients = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(2)]
    try:
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                hog.fill()
                for i, client in enumerate(clients):
                    client.connect(path)  # queued in the backlog: no descriptor needed here
                    client.sendall(b"client %d" % i)
                tg.start_soon(accept_two, backoff, accepted)
                await backoff.wait_failures(3)
                assert backoff.last_errno == errno.EMFILE and accepted.readers == []
                hog.free(1)  # room for one: the first client is taken, the second still waits
                await accepted.wait_for(1)
                assert backoff.in_episode
                await backoff.wait_failures(backoff.failures + 2)  # hovering at the limit ...
                hog.free(1)
                await accepted.wait_for(2)
                assert not backoff.in_episode
            hog.close()
            received = [await read() for read in accepted.readers]
    finally:
        for client in clients:
            client.close()
    lines = messages(caplog)
    assert backoff.episodes == 1  # ... is one episode: one warning, one recovery line
    assert len(lines) == 2, lines
    assert lines[0].startswith("test listener: cannot accept connections: Too many open files")
    assert lines[1].startswith("test listener: accepting connections again (")
    return received


async def test_anyio_listener_waits_out_emfile(
    hog: FdHog, caplog: pytest.LogCaptureFixture, sock_path: str
) -> None:
    listener = await anyio.create_unix_listener(sock_path)

    async def accept_two(backoff: WatchedBackoff, accepted: Accepted) -> None:
        for _ in range(2):
            stream = await accept_stream(listener, backoff)

            async def read(stream: anyio.abc.SocketStream = stream) -> bytes:
                async with stream:
                    return await stream.receive()

            accepted.add(read)

    async with listener:
        received = await _exhausted_accept(hog, caplog, sock_path, accept_two)
    assert sorted(received) == [b"client 0", b"client 1"]


async def test_raw_listener_waits_out_emfile(
    hog: FdHog, caplog: pytest.LogCaptureFixture, sock_path: str
) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sock_path)
    listener.listen(8)
    listener.setblocking(False)

    async def accept_two(backoff: WatchedBackoff, accepted: Accepted) -> None:
        for _ in range(2):
            sock = await accept_socket(listener, backoff)

            async def read(sock: socket.socket = sock) -> bytes:
                with sock:
                    await anyio.wait_readable(sock)
                    return sock.recv(100)

            accepted.add(read)

    with listener:
        received = await _exhausted_accept(hog, caplog, sock_path, accept_two)
    assert sorted(received) == [b"client 0", b"client 1"]


class ScriptedListener(anyio.abc.Listener[str]):
    """A listener whose accept() raises the scripted errors, then returns "conn"."""

    def __init__(self, errors: list[BaseException]) -> None:
        self.errors = errors

    async def accept(self) -> str:
        await anyio.lowlevel.checkpoint()
        if self.errors:
            raise self.errors.pop(0)
        return "conn"

    async def serve(self, handler: Callable[[str], Any], task_group: Any = None) -> None:
        # Required by anyio's Listener; the loops under test call accept() themselves.
        raise NotImplementedError

    async def aclose(self) -> None:
        pass


def _broken(err: int) -> anyio.BrokenResourceError:
    exc = anyio.BrokenResourceError()
    exc.__cause__ = OSError(err, os.strerror(err))
    return exc


async def test_a_connection_aborted_before_accept_is_skipped_without_backoff() -> None:
    backoff = AcceptBackoff("scripted", LOGGER)
    listener = ScriptedListener([_broken(errno.ECONNABORTED), OSError(errno.EPROTO, "proto")])
    assert await accept_stream(listener, backoff) == "conn"
    assert backoff.failures == 0 and listener.errors == []


async def test_other_accept_errors_still_end_the_loop() -> None:
    backoff = AcceptBackoff("scripted", LOGGER)
    with pytest.raises(anyio.ClosedResourceError):
        await accept_stream(ScriptedListener([anyio.ClosedResourceError()]), backoff)
    with pytest.raises(anyio.BrokenResourceError):
        await accept_stream(ScriptedListener([_broken(errno.EBADF)]), backoff)
    closed = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    closed.close()
    with pytest.raises(OSError):
        await accept_socket(closed, backoff)
    assert backoff.failures == 0
