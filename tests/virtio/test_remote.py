"""devicehost.virtio.remote: the virtio values that cross the process seam to a worker."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devicehost.fds import fd_kind
from devicehost.handoff import Handoff, HandoffFd, send_handoff
from devicehost.memory import DmaAllocator, GuestMemory, MemoryRegion
from devicehost.virtio import (
    RING_EVENT_IDX,
    VERSION_1,
    DeviceTraits,
    DriverQueue,
    EventDoorbell,
    EventfdDoorbell,
    QueueResources,
    QueueState,
)
from devicehost.virtio.remote import (
    WHICH_CALL,
    WHICH_ERROR,
    DoorbellState,
    RemoteVirtioError,
    decode_doorbell_state_untrusted,
    decode_queue_resources_untrusted,
    decode_traits_untrusted,
    encode_doorbell_state,
    encode_queue_resources,
    encode_traits,
    release_queue_resources,
)
from devicehost.virtio.transport import build_queues

FEATURES = 1 << VERSION_1 | 1 << RING_EVENT_IDX


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def _open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


class Guest:
    """Guest memory, two driver queues with eventfd doorbells, and the supervisor's
    QueueResources over them (as a transport builds them)."""

    def __init__(self, *, with_error: bool = True) -> None:
        self.memory = GuestMemory.memfd(1 << 20)
        self.allocator = DmaAllocator(self.memory)
        self.queues = [DriverQueue(i, self.memory, self.allocator, 16, event_idx=True)
                       for i in range(2)]
        for q in self.queues:
            q.kick_doorbell = EventfdDoorbell(_eventfd())
            q.call_doorbell = EventfdDoorbell(_eventfd())
        self.errors = [EventfdDoorbell(_eventfd()) if with_error else None for _ in self.queues]
        self.resources = QueueResources(
            build_queues(self.memory, FEATURES, [q.setup() for q in self.queues]), FEATURES,
            self.memory)
        for vq, err in zip(self.resources.queues, self.errors, strict=True):
            vq.error = err

    def close(self) -> None:
        for q in self.queues:
            q.release()
            for bell in (q.kick_doorbell, q.call_doorbell):
                assert isinstance(bell, EventfdDoorbell)
                bell.close()
        for err in self.errors:
            if err is not None:
                err.close()
        self.memory.close()


@pytest.fixture
def guest() -> Iterator[Guest]:
    g = Guest()
    yield g
    g.close()


# -- the offer -------------------------------------------------------------------------------------


def test_traits_round_trip() -> None:
    offer = DeviceTraits(19, 0b111, queue_count=3, max_queue_size=1024,
                         config=struct.pack("<Q", 77))
    assert decode_traits_untrusted(encode_traits(offer)) == offer


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda b: b"XXXX" + b[4:], "bad magic"),
    (lambda b: b[:4] + b"\x09\x00" + b[6:], "version 9"),
    (lambda b: b[:-1], "announces 8 config bytes"),
    (lambda b: b[:6] + b"\x01\x00" + b[8:], "unknown flags"),
    (lambda b: b[:8] + b"\x00\x00\x00\x00" + b[12:], "invalid"),  # device id 0
    (lambda b: b[:14] + b"\x03\x00" + b[16:], "invalid"),  # max queue size 3
    (lambda b: b[:16] + struct.pack("<Q", 1 << 32) + b[24:], "invalid"),  # a transport bit
    (lambda b: b[:10], "shorter than"),
])
def test_traits_refused(mutate: object, message: str) -> None:
    raw = encode_traits(DeviceTraits(19, 1, config=b"12345678"))
    with pytest.raises(RemoteVirtioError, match=message):
        decode_traits_untrusted(mutate(raw))  # type: ignore[operator]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_traits_decoder_fuzz(data: bytes) -> None:
    try:
        offer = decode_traits_untrusted(data)
    except RemoteVirtioError:
        return
    assert encode_traits(offer) == data


# -- queue resources -------------------------------------------------------------------------------


def test_resources_round_trip_in_process(guest: Guest) -> None:
    before = _open_fds()
    for q, state in zip(guest.resources.queues, [QueueState(5, 4), QueueState(0xFFFF, 0xFFFE)],
                        strict=True):
        q.queue.last_avail_idx, q.queue.used_idx = state.last_avail_idx, state.used_idx
    data, fds = encode_queue_resources(guest.resources)
    got = decode_queue_resources_untrusted(data, [os.dup(fd) for fd in fds])
    try:
        assert got.features == FEATURES
        assert [q.state() for q in got.queues] == [QueueState(5, 4), QueueState(0xFFFF, 0xFFFE)]
        assert [q.queue.layout for q in got.queues] == [q.layout for q in guest.queues]
        assert all(q.queue.event_idx for q in got.queues)
        assert all(isinstance(q.error, EventfdDoorbell) for q in got.queues)
        # The same bytes: a write through one mapping is read through the other.
        guest.memory.write(0x8000, b"shared")
        assert got.memory.read(0x8000, 6) == b"shared"
    finally:
        release_queue_resources(got)
    # Left: the supervisor's end of the update link (socket pair and page), until its doorbells
    # close (test_a_closed_supervisor_doorbell_ends_the_link).
    assert len(_open_fds() - before) == 3


def test_resources_without_call_or_error_fd() -> None:
    g = Guest(with_error=False)
    try:
        call = g.resources.queues[1].call
        assert isinstance(call, EventfdDoorbell)
        call.set_fd(None)
        data, fds = encode_queue_resources(g.resources)
        # memory, queue 0 kick + call, queue 1 kick, the update link's socket and page
        assert len(fds) == 1 + 2 + 1 + 2
        got = decode_queue_resources_untrusted(data, [os.dup(fd) for fd in fds])
        q0_error = got.queues[0].error
        assert isinstance(q0_error, EventfdDoorbell) and q0_error.fd is None
        q1_call = got.queues[1].call
        assert isinstance(q1_call, EventfdDoorbell) and q1_call.fd is None
        release_queue_resources(got)
    finally:
        g.close()


def test_in_process_doorbells_and_anonymous_memory_cannot_be_shared(guest: Guest) -> None:
    vq = guest.resources.queues[0]
    saved = vq.kick
    vq.kick = EventDoorbell()
    with pytest.raises(RemoteVirtioError, match="not an eventfd"):
        encode_queue_resources(guest.resources)
    vq.kick = saved
    anon = QueueResources(guest.resources.queues, FEATURES, GuestMemory.anonymous(1 << 20))
    with pytest.raises(RemoteVirtioError, match="anonymous"):
        encode_queue_resources(anon)
    anon.memory.close()


#: Where queue 0 and queue 1 start in the value of a one-region, two-queue device: a 20-byte
#: header, a 24-byte region, 40 bytes per queue.
_Q0 = 20 + 24
_Q1 = _Q0 + 40


def _corrupt(data: bytes, offset: int, value: bytes) -> bytes:
    return data[:offset] + value + data[offset + len(value):]


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d, f: (d[:-1], f), "bytes, expected"),
    (lambda d, f: (_corrupt(d, 0, b"NOPE"), f), "bad magic"),
    (lambda d, f: (_corrupt(d, 10, b"\x01\x00"), f), "reserved"),
    (lambda d, f: (_corrupt(d, 8, b"\x00\x00"), f), "0 queues"),
    (lambda d, f: (d, f[:-1]), "descriptors, the value needs"),
    # queue 1 claims to be queue 0
    (lambda d, f: (_corrupt(d, _Q1, b"\x00\x00"), f), "says it is queue 0"),
    # queue 0 size 3
    (lambda d, f: (_corrupt(d, _Q0 + 2, b"\x03\x00"), f), "not a power of two"),
    # the first doorbell is the memfd
    (lambda d, f: (d, [f[0], f[0], *f[2:]]), "eventfd"),
    # memory given as an eventfd
    (lambda d, f: (d, [f[1], *f[1:]]), "memfd"),
    # an eventfd as the update link, the memory as its page
    (lambda d, f: (d, [*f[:-2], f[1], f[-1]]), "not a socket"),
    (lambda d, f: (d, [*f[:-1], f[1]]), "update page"),
    # a descriptor table outside guest memory
    (lambda d, f: (_corrupt(d, _Q0 + 8, struct.pack("<Q", 1 << 40)), f), "unusable queue"),
])
def test_resources_refused_and_every_fd_closed(guest: Guest, edit: object, message: str) -> None:
    data, fds = encode_queue_resources(guest.resources)
    before = _open_fds()
    bad_data, bad_fds = edit(data, fds)  # type: ignore[operator]
    dups = [os.dup(fd) for fd in bad_fds]
    with pytest.raises(RemoteVirtioError, match=message):
        decode_queue_resources_untrusted(bad_data, dups)
    assert _open_fds() == before


def test_unsealed_memory_is_refused_unless_allowed() -> None:
    fd = os.memfd_create("unsealed", os.MFD_CLOEXEC)
    os.ftruncate(fd, 1 << 20)
    memory = GuestMemory([MemoryRegion(0, 1 << 20, fd=fd, owns_fd=True)])
    g = Guest()
    try:
        res = QueueResources(g.resources.queues, FEATURES, memory)
        data, fds = encode_queue_resources(res)
        with pytest.raises(RemoteVirtioError, match="seal"):
            decode_queue_resources_untrusted(data, [os.dup(f) for f in fds])
        got = decode_queue_resources_untrusted(data, [os.dup(f) for f in fds],
                                               allow_unsealed=True)
        release_queue_resources(got)
    finally:
        g.close()
        memory.close()


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_resources_decoder_fuzz(data: bytes) -> None:
    before = _open_fds()
    fd = _eventfd()
    try:
        got = decode_queue_resources_untrusted(data, [fd])
    except RemoteVirtioError:
        pass
    else:  # pragma: no cover - one eventfd can never back guest memory
        release_queue_resources(got)
        raise AssertionError("decoded resources from one eventfd")
    assert _open_fds() == before


_CHILD = """
import socket, sys
import anyio
from devicehost.handoff import receive_handoff
from devicehost.virtio.remote import decode_queue_resources_untrusted, release_queue_resources

async def main() -> None:
    sock = socket.socket(fileno=int(sys.argv[1]))
    sock.setblocking(False)
    handoff = await receive_handoff(sock)
    res = decode_queue_resources_untrusted(handoff.envelope, [f.fd for f in handoff.fds])
    q = res.queues[0]
    with anyio.fail_after(30):
        for _ in range(2):
            chain = await q.pop_wait()
            data = chain.read()
            chain.write_at(0, data[::-1])
            q.push(chain, len(data))
        held = await q.pop_wait()  # popped, never completed: the worker "dies" with it
    print(held.read().decode(), flush=True)
    release_queue_resources(res)

anyio.run(main)
"""


@pytest.mark.anyio
async def test_a_child_process_serves_the_queue_over_the_same_memory(guest: Guest) -> None:
    """Encode here, send with the handoff framing, decode in a child: the child pops the chains
    the driver posted here, writes into guest memory, and its call reaches the driver here.
    The supervisor's queue then reports where a successor resumes: at the used index, so the
    chain the child popped last but never completed is seen again."""
    parent, child = socket.socketpair()
    parent.setblocking(False)
    data, fds = encode_queue_resources(guest.resources)
    handoff = Handoff(data, tuple(HandoffFd("vsock", i, fd_kind(fd), fd)
                                  for i, fd in enumerate(fds)))
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(child.fileno())],
                            pass_fds=[child.fileno()], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    child.close()
    try:
        with anyio.fail_after(60):
            await send_handoff(parent, handoff)
            dq = guest.queues[0]
            for word in (b"first chain", b"second"):
                dq.add([word], [len(word)])
                dq.kick()
                used = await dq.wait_used()
                assert used.data == word[::-1]
            dq.add([b"third"], [5])
            dq.kick()
            out, err = await anyio.to_thread.run_sync(proc.communicate)
            assert proc.returncode == 0, err.decode()
            assert out == b"third\n"
        vq = guest.resources.queues[0]
        assert vq.state() == QueueState(2, 2)  # not 3: the third chain was never completed
        assert guest.resources.queues[1].state() == QueueState(0, 0)
        # A successor gets that position, and pops the third chain again.
        data, fds = encode_queue_resources(guest.resources)
        again = decode_queue_resources_untrusted(data, [os.dup(fd) for fd in fds])
        try:
            assert again.queues[0].state() == QueueState(2, 2)
            chain = again.queues[0].pop()
            assert chain is not None and chain.read() == b"third"
        finally:
            release_queue_resources(again)
    finally:
        parent.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait()


# -- doorbell updates ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_call_fd_changed_in_the_supervisor_is_followed_by_the_worker(
    guest: Guest,
) -> None:
    data, fds = encode_queue_resources(guest.resources)
    worker = decode_queue_resources_untrusted(data, [os.dup(fd) for fd in fds])
    try:
        old_call = guest.queues[1].call_doorbell
        assert isinstance(old_call, EventfdDoorbell) and old_call.fd is not None
        new_call = _eventfd()
        supervisor_call = guest.resources.queues[1].call
        assert isinstance(supervisor_call, EventfdDoorbell)
        # What SET_VRING_CALL does in the session (owns_fd=False: the test closes new_call).
        supervisor_call.set_fd(new_call, owns_fd=False)
        # The worker's next ring, on any queue, takes the update first; the new call is rung
        # once for an interrupt that may have gone to the old fd.
        worker.queues[0].notify()
        assert os.eventfd_read(new_call) == 1
        worker.queues[1].notify()
        assert os.eventfd_read(new_call) == 1
        with pytest.raises(BlockingIOError):
            os.read(old_call.fd, 8)  # the old fd is no longer rung
        # An error fd arriving later (SET_VRING_ERR) is followed too.
        err = guest.resources.queues[0].error
        assert isinstance(err, EventfdDoorbell)
        new_err = _eventfd()
        err.set_fd(new_err, owns_fd=False)
        worker.queues[0].notify()
        worker_err = worker.queues[0].error
        assert worker_err is not None
        worker_err.ring()
        assert os.eventfd_read(new_err) == 1
        os.close(new_call)
        os.close(new_err)
    finally:
        release_queue_resources(worker)


def test_a_closed_supervisor_doorbell_ends_the_link(guest: Guest) -> None:
    data, fds = encode_queue_resources(guest.resources)
    worker = decode_queue_resources_untrusted(data, [os.dup(fd) for fd in fds])
    before = _open_fds()
    err = guest.resources.queues[0].error
    assert isinstance(err, EventfdDoorbell)
    err.close()
    guest.errors[0] = None
    after = _open_fds()
    # The eventfd and the link's socket pair and page are closed.
    assert len(before - after) == 4
    release_queue_resources(worker)


def test_doorbell_state_round_trip_and_refusals() -> None:
    before = _open_fds()
    call, err = _eventfd(), _eventfd()
    state = DoorbellState(((0, WHICH_CALL, call), (0, WHICH_ERROR, None), (1, WHICH_ERROR, err)))
    raw, fds = encode_doorbell_state(state)
    assert fds == [call, err]
    assert decode_doorbell_state_untrusted(raw, fds) == state
    _close_all_fds([call, err])
    mem = os.memfd_create("x", os.MFD_CLOEXEC)
    with pytest.raises(RemoteVirtioError, match="eventfd"):
        decode_doorbell_state_untrusted(raw, [mem, _eventfd()])
    with pytest.raises(RemoteVirtioError, match="fewer descriptors"):
        decode_doorbell_state_untrusted(raw, [_eventfd()])
    with pytest.raises(RemoteVirtioError, match="more than entries"):
        decode_doorbell_state_untrusted(raw, [_eventfd(), _eventfd(), _eventfd()])
    with pytest.raises(RemoteVirtioError, match="doorbell 7"):
        decode_doorbell_state_untrusted(_corrupt(raw, 8 + 2, b"\x07\x00"), [])
    assert _open_fds() == before


def test_a_worker_that_does_not_read_its_updates_still_gets_the_latest(
    guest: Guest, caplog: pytest.LogCaptureFixture
) -> None:
    """The link's socket buffer is bounded; when it is full the supervisor discards the
    snapshots the worker has not read and sends the latest, so the latest is never lost."""
    data, fds = encode_queue_resources(guest.resources)
    worker = decode_queue_resources_untrusted(data, [os.dup(fd) for fd in fds])
    try:
        supervisor_call = guest.resources.queues[1].call
        assert isinstance(supervisor_call, EventfdDoorbell)
        latest = -1
        for _ in range(2000):  # a VMM changing its call fd again and again, the worker idle
            latest = _eventfd()
            supervisor_call.set_fd(latest)  # owned: the previous one is closed
        worker.queues[1].notify()  # the worker's first ring after all that
        assert os.eventfd_read(latest) == 2  # the update's ring and the notify
        assert "not sent" not in caplog.text
    finally:
        release_queue_resources(worker)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=60), st.integers(0, 3))
def test_doorbell_state_decoder_fuzz(data: bytes, nfds: int) -> None:
    before = _open_fds()
    fds = [_eventfd() for _ in range(nfds)]
    try:
        state = decode_doorbell_state_untrusted(data, fds)
    except RemoteVirtioError:
        assert _open_fds() == before
        return
    _close_all_fds([fd for _, _, fd in state.entries if fd is not None])
    assert _open_fds() == before


def _close_all_fds(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


# -- the worker codec registry ---------------------------------------------------------------------


def test_the_worker_codecs_carry_traits_and_resources(guest: Guest) -> None:
    from devicehost.worker.codec import decode_value, encode_value

    traits = DeviceTraits(19, 0b101, queue_count=2, config=b"\x05" + bytes(7))
    data, fds = encode_value(traits)
    assert fds == [] and decode_value(data) == traits
    data, fds = encode_value(guest.resources)
    got = decode_value(data, [os.dup(fd) for fd in fds])
    try:
        assert isinstance(got, QueueResources) and got.features == FEATURES
        guest.memory.write(0x9000, b"via the registry")
        assert got.memory.read(0x9000, 16) == b"via the registry"
    finally:
        release_queue_resources(got)


@pytest.mark.parametrize("edit", [
    lambda v: {**v, "unsealed": 1},
    lambda v: {**v, "fds": [[0, "directory"]]},
    lambda v: {**v, "fds": v["fds"][:-1]},
    lambda v: {**v, "wire": "not bytes"},
    lambda v: {k: x for k, x in v.items() if k != "unsealed"},
])
def test_the_resources_codec_refuses_malformed_values_and_closes_fds(
    guest: Guest, edit: object
) -> None:
    from devicehost.worker.codec import CodecError, decode_value, encode_value

    data, fds = encode_value(guest.resources)
    before = _open_fds()
    bad = dict(data)
    bad["v"] = edit(data["v"])  # type: ignore[operator]
    with pytest.raises(CodecError):
        decode_value(bad, [os.dup(fd) for fd in fds])
    assert _open_fds() == before


def test_opening_the_same_queues_again_ends_the_previous_link(guest: Guest) -> None:
    data, fds = encode_queue_resources(guest.resources)
    first = decode_queue_resources_untrusted(data, [os.dup(fd) for fd in fds])
    release_queue_resources(first)
    old_link = fds[-2:]  # the worker's end of the update socket, and the page
    assert [fd_kind(fd) for fd in old_link] == ["socket", "memfd"]
    # The device is closed and opened again over the same doorbells (a vhost-user session
    # builds new queues over its vrings, and keeps their eventfds).
    again = QueueResources(
        build_queues(guest.memory, FEATURES, [q.setup() for q in guest.queues]), FEATURES,
        guest.memory)
    for q, err in zip(again.queues, guest.errors, strict=True):
        q.error = err
    data, fds = encode_queue_resources(again)
    assert [fd_kind(fd) for fd in old_link] == ["closed", "closed"]
    assert [fd_kind(fd) for fd in fds[-2:]] == ["socket", "memfd"]
    second = decode_queue_resources_untrusted(data, [os.dup(fd) for fd in fds])
    release_queue_resources(second)


def test_chains_in_flight_cross_and_are_replayed_first(guest: Guest) -> None:
    """A supervisor-side queue with chains popped and not returned (e.g. restored from a
    handover) gives the worker those chains first, in pop order, then the rest."""
    dq, vq = guest.queues[0], guest.resources.queues[0]
    for word in (b"first", b"second", b"third"):
        dq.add([word], [8])
    held = [vq.pop(), vq.pop()]
    assert all(c is not None for c in held)
    assert vq.state().inflight == tuple(c.head for c in held if c is not None)
    data, fds = encode_queue_resources(guest.resources)
    worker = decode_queue_resources_untrusted(data, [os.dup(fd) for fd in fds])
    try:
        got = [worker.queues[0].pop() for _ in range(4)]
        assert [c.read() if c is not None else None for c in got] == [
            b"first", b"second", b"third", None]
    finally:
        release_queue_resources(worker)


@pytest.mark.parametrize(("heads", "message"), [
    ((3, 3), "unusable queue"),  # one head twice
    ((40,), "unusable queue"),  # not a head of a 16-entry queue
])
def test_bad_chains_in_flight_are_refused(guest: Guest, heads: tuple[int, ...],
                                          message: str) -> None:
    data, fds = encode_queue_resources(guest.resources)
    before = _open_fds()
    q0 = data[_Q0:_Q0 + 40]
    patched = q0[:36] + struct.pack("<H", len(heads)) + q0[38:]
    bad = data[:_Q0] + patched + data[_Q0 + 40:] + struct.pack(f"<{len(heads)}H", *heads)
    with pytest.raises(RemoteVirtioError, match=message):
        decode_queue_resources_untrusted(bad, [os.dup(fd) for fd in fds])
    too_many = data[:_Q0] + q0[:36] + struct.pack("<H", 17) + q0[38:] + data[_Q0 + 40:]
    with pytest.raises(RemoteVirtioError, match="chains in flight"):
        decode_queue_resources_untrusted(too_many + bytes(34), [os.dup(fd) for fd in fds])
    assert _open_fds() == before
