"""devicehost.handoff: the fd stash, the frames, and state + descriptors over a real socket."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import socket
import struct
import tempfile
from collections.abc import Iterator

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devicehost.fds import FdKindError, fd_kind
from devicehost.handoff import (
    FDS_PER_MESSAGE,
    HEADER_SIZE,
    FdStash,
    Handoff,
    HandoffError,
    HandoffFd,
    decode_header_untrusted,
    decode_state_untrusted,
    encode_fds_header,
    encode_state_frame,
    receive_handoff,
    send_handoff,
)

pytestmark = pytest.mark.anyio

HEADER = struct.Struct(">4sHHIHH")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.setblocking(False)
    b.setblocking(False)
    with a, b:
        yield a, b


def eventfd(value: int = 0) -> int:
    return os.eventfd(value, os.EFD_CLOEXEC)


# -- the stash ------------------------------------------------------------------------------------


def test_stash_carries_duplicates_and_gives_them_back_by_handle_and_kind() -> None:
    out, back = FdStash(), FdStash()
    efd = eventfd()
    left, right = socket.socketpair()
    with left, right:
        out.begin_save(carry=True)
        assert out.carries_fds
        h_event, h_sock = out.put(efd), out.put(left)
        assert (h_event, h_sock) == (0, 1)
        drained = out.drain()
        assert [(h, k) for h, k, _ in drained] == [(0, "eventfd"), (1, "socket")]
        assert all(fd not in (efd, left.fileno()) for _, _, fd in drained), "duplicates"
        back.load({h: (fd, k) for h, k, fd in drained})
        assert back.carries_fds
        sock = back.take_socket(h_sock)
        with sock:
            sock.sendall(b"same socket")
            assert right.recv(64) == b"same socket"
        fd = back.take(h_event, "eventfd")
        os.eventfd_write(fd, 7)
        assert os.eventfd_read(efd) == 7
        os.close(fd)
    os.close(efd)


def test_stash_refuses_the_wrong_kind_and_closes_it() -> None:
    stash = FdStash()
    read, write = os.pipe()
    os.close(write)
    stash.load({0: (read, "fifo")})
    with pytest.raises(FdKindError, match="descriptor 0: expected a eventfd, got a fifo"):
        stash.take(0, "eventfd")
    assert fd_kind(read) == "closed"


def test_a_state_file_restore_has_no_descriptors() -> None:
    stash = FdStash()
    efd = eventfd()
    stash.begin_save(carry=False)
    assert not stash.carries_fds
    assert stash.put(efd) == 0
    assert stash.drain() == []
    with pytest.raises(HandoffError, match=r"came without its descriptors \(a --state file\)"):
        stash.take(0, "eventfd")
    os.close(efd)


def test_stash_refuses_a_directory_and_discard_closes_what_was_not_taken() -> None:
    stash = FdStash()
    stash.begin_save(carry=True)
    directory = os.open(tempfile.gettempdir(), os.O_RDONLY | os.O_DIRECTORY)
    with pytest.raises(HandoffError, match="kind 'directory', which cannot be handed over"):
        stash.put(directory)
    os.close(directory)
    efd = eventfd()
    stash.load({3: (efd, "eventfd")})
    assert stash.discard() == [3]
    assert fd_kind(efd) == "closed"


# -- frames ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("header", "blame"), [
    (HEADER.pack(b"XXXX", 1, 1, 10, 0, 0), "does not start with b'DHHO'"),
    (HEADER.pack(b"DHHO", 2, 1, 10, 0, 0), "speaks handoff version 2"),
    (HEADER.pack(b"DHHO", 1, 9, 10, 0, 0), "unknown kind 9"),
    (HEADER.pack(b"DHHO", 1, 1, 10, 1, 0), "STATE frame announces 10 bytes and 1 descriptors"),
    (HEADER.pack(b"DHHO", 1, 1, 1 << 31, 0, 0), "STATE frame announces"),
    (HEADER.pack(b"DHHO", 1, 2, 0, 254, 0), "FDS frame announces 0 bytes and 254"),
    (HEADER.pack(b"DHHO", 1, 2, 1, 1, 0), "FDS frame announces 1 bytes"),
    (HEADER.pack(b"DHHO", 1, 2, 0, 1, 5), "non-zero reserved"),
    (b"DHHO", "has 4 bytes"),
])
def test_hostile_headers_blame_the_sender(header: bytes, blame: str) -> None:
    with pytest.raises(HandoffError, match=blame.replace("(", r"\(").replace(")", r"\)")):
        decode_header_untrusted(header)


def _state(table: object, envelope: bytes = b"{}") -> bytes:
    raw = json.dumps(table).encode()
    return struct.pack(">I", len(raw)) + raw + envelope


@pytest.mark.parametrize(("payload", "blame"), [
    (b"\0\0", "too short"),
    (struct.pack(">I", 100) + b"[]", "table of 100 bytes does not fit"),
    (struct.pack(">I", 2) + b"\xff\xff", "not JSON"),
    (_state({"a": 1}), "not a list"),
    (_state([["dev", -1, "eventfd"]]), "row 0 is not"),
    (_state([["dev", True, "eventfd"]]), "row 0 is not"),
    (_state([["dev", 0, "directory"]]), "row 0 is not"),
    (_state([["", 0, "eventfd"]]), "row 0 is not"),
    (_state([["dev", 0, "eventfd"], ["dev", 0, "socket"]]), "twice"),
])
def test_hostile_state_payloads_blame_the_sender(payload: bytes, blame: str) -> None:
    with pytest.raises(HandoffError, match=blame):
        decode_state_untrusted(payload)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=HEADER_SIZE + 4), st.binary(max_size=300))
def test_decoding_any_bytes_raises_only_handoff_error(header: bytes, payload: bytes) -> None:
    for decode, data in ((decode_header_untrusted, header), (decode_state_untrusted, payload)):
        with contextlib.suppress(HandoffError):
            decode(data)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.text(min_size=1, max_size=20), st.integers(0, 1000),
                          st.sampled_from(["eventfd", "memfd", "socket", "fifo"])),
                max_size=20, unique_by=lambda r: (r[0], r[1])),
       st.binary(max_size=100))
def test_state_frames_decode_to_what_was_encoded(
    rows: list[tuple[str, int, str]], envelope: bytes
) -> None:
    frame = encode_state_frame(envelope, [HandoffFd(d, h, k, -1) for d, h, k in rows])
    header = decode_header_untrusted(frame[:HEADER_SIZE])
    assert header.length == len(frame) - HEADER_SIZE
    assert decode_state_untrusted(frame[HEADER_SIZE:]) == (rows, envelope)


def test_an_fds_frame_carries_1_to_253() -> None:
    with pytest.raises(HandoffError):
        encode_fds_header(0)
    with pytest.raises(HandoffError):
        encode_fds_header(FDS_PER_MESSAGE + 1)


# -- over a socket --------------------------------------------------------------------------------


async def test_600_descriptors_of_every_kind_travel_in_chunks_and_work(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    sender, receiver = pair
    memfd = os.memfd_create("guest", os.MFD_CLOEXEC)
    os.write(memfd, b"guest memory")
    read, write = os.pipe()
    left, right = socket.socketpair()
    originals = [eventfd() for _ in range(597)] + [memfd, read, left.fileno()]
    kinds = ["eventfd"] * 597 + ["memfd", "fifo", "socket"]
    items = tuple(HandoffFd(f"dev{i % 7}", i, k, fd)
                  for i, (k, fd) in enumerate(zip(kinds, originals, strict=True)))
    handoff = Handoff(b'{"envelope": true}', items)
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(send_handoff, sender, handoff)
            got = await receive_handoff(receiver)
    try:
        assert got.envelope == handoff.envelope
        assert [(f.device, f.handle, f.kind) for f in got.fds] == [
            (f.device, f.handle, f.kind) for f in items]
        for original, arrived in zip(items, got.fds, strict=True):
            assert arrived.fd != original.fd and fd_kind(arrived.fd) == original.kind
        os.eventfd_write(got.fds[5].fd, 3)
        assert os.eventfd_read(originals[5]) == 3
        assert os.pread(got.fds[597].fd, 12, 0) == b"guest memory"
        os.write(write, b"p")
        assert os.read(got.fds[598].fd, 1) == b"p"
        right.sendall(b"s")
        assert os.read(got.fds[599].fd, 1) == b"s"
        assert got.by_device()["dev5"][5] == (got.fds[5].fd, "eventfd")
    finally:
        got.close()
        handoff.close()
        os.close(write)
        right.close()


async def _raw_send(sock: socket.socket, data: bytes, fds: list[int] | None = None) -> None:
    sock.setblocking(True)
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.sendall(data)
    sock.setblocking(False)


async def test_a_descriptor_of_another_kind_than_announced_is_refused_and_all_closed(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    sender, receiver = pair
    read, write = os.pipe()
    efd = eventfd()
    before = open_fds()
    frame = encode_state_frame(b"{}", [HandoffFd("d", 0, "eventfd", -1),
                                        HandoffFd("d", 1, "eventfd", -1)])
    await _raw_send(sender, frame)
    await _raw_send(sender, encode_fds_header(2), [efd, read])
    with anyio.fail_after(30), pytest.raises(HandoffError, match="is a fifo, not the eventfd"):
        await receive_handoff(receiver)
    assert open_fds() == before
    for fd in (read, write, efd):
        os.close(fd)


@pytest.mark.parametrize("case", ["fds-on-state", "count-mismatch", "truncated-stream"])
async def test_malformed_descriptor_frames_are_refused_and_nothing_leaks(
    pair: tuple[socket.socket, socket.socket], case: str,
) -> None:
    sender, receiver = pair
    efds = [eventfd() for _ in range(3)]
    before = open_fds()
    table = [HandoffFd("d", i, "eventfd", -1) for i in range(3)]
    frame = encode_state_frame(b"{}", table)
    if case == "fds-on-state":
        await _raw_send(sender, frame, efds)
        blame = "attached 3 descriptors where 0 were announced"
    elif case == "count-mismatch":
        await _raw_send(sender, frame)
        await _raw_send(sender, encode_fds_header(3), efds[:2])
        blame = "announced 3 descriptors and attached 2"
    else:
        await _raw_send(sender, frame[:-1])
        sender.shutdown(socket.SHUT_WR)
        blame = "closed the connection inside the handoff"
    with anyio.fail_after(30), pytest.raises(HandoffError, match=blame):
        await receive_handoff(receiver)
    assert open_fds() == before
    for fd in efds:
        os.close(fd)


async def test_descriptors_cut_by_the_kernel_are_refused(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """MSG_CTRUNC: a receiver out of descriptors gets a chunk cut short; it must refuse it."""
    sender, receiver = pair
    efds = [eventfd() for _ in range(10)]
    await _raw_send(sender, encode_state_frame(b"{}", [HandoffFd("d", i, "eventfd", -1)
                                                        for i in range(10)]))
    await _raw_send(sender, encode_fds_header(10), efds)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    used = {int(n) for n in os.listdir("/proc/self/fd")}
    limit, free = 0, 0
    while free < 3:  # a limit under which only 3 descriptor numbers are free
        free += limit not in used
        limit += 1
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        with anyio.fail_after(30), pytest.raises(HandoffError, match="MSG_CTRUNC"):
            await receive_handoff(receiver)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    for fd in efds:
        os.close(fd)
