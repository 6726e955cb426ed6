"""devicehost.vmbus.handover: the handed-over VMBus socket state is checked as hostile input, and
the socket server's connection parks between messages (end to end with vmbfs and two hosts:
plugins/vmbfs/tests/test_handover.py; with processes: test_handover_process.py)."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import anyio
import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devicehost.savedstate import decode_state_untrusted, encode_state, entry_for
from devicehost.vmbus.handover import (
    HandedGpadl,
    HandedGuest,
    HandedOffer,
    HandedOpen,
    HandedOverSignal,
    HandedPendingGpadl,
    HandedRegion,
    SocketHandoverState,
    VmbusHandoverError,
    _check_descriptors,
    check_state_untrusted,
)
from devicehost.vmbus.messages import (
    GpadlTorndown,
    RequestOffers,
    RescindChannelOffer,
    Version,
    encode_message,
)
from tests.vmbus.socketharness import raw_guest, socket_bus

PAGE = 4096
GOOD_KINDS = {0: "socket", 1: "socket", 2: "memfd", 3: "eventfd", 4: "fifo"}


def good_state(**changes: Any) -> SocketHandoverState:
    guest = HandedGuest(
        name="socket-guest-1", version=int(Version.COPPER), offers_requested=True, messages=9,
        regions=(HandedRegion(0x100000, 64 * PAGE, 0, 2),),
        sent=(HandedOffer(1, "11111111-2222-3333-4444-555555555555",
                          "66666666-7777-8888-9999-000000000001", 0),),
        rescinded=(), pending=(HandedPendingGpadl(1, 7, 24, 1, b"\0" * 16),),
        gpadl_words=((1, 5),),
        gpadls=(HandedGpadl(1, 1, 1, (4 * PAGE, 1, 2, 3, 4)),),
        opens=(HandedOpen(1, 1, 2, 0, 0, 0, bytes(120), 3, 4),),
        outbox=(encode_message(GpadlTorndown(5)),))
    return SocketHandoverState(1, 0, attrs.evolve(guest, **changes))


def test_a_good_state_passes_and_survives_the_envelope() -> None:
    state = good_state()
    check_state_untrusted(state, GOOD_KINDS)
    decoded = decode_state_untrusted(entry_for("@vmbus-socket", "host", state),
                                     SocketHandoverState)
    assert decoded == state
    assert encode_state(decoded) == encode_state(state)


@pytest.mark.parametrize(("changes", "kinds", "blame"), [
    ({}, {**GOOD_KINDS, 0: "memfd"}, "listener is missing or not a socket"),
    ({}, {k: v for k, v in GOOD_KINDS.items() if k != 1}, "connection is missing"),
    ({}, {**GOOD_KINDS, 3: "fifo"}, "guest-to-host signal: descriptor 3"),
    ({}, {**GOOD_KINDS, 4: "eventfd"}, "host-to-guest signal: descriptor 4"),
    ({}, {**GOOD_KINDS, 9: "eventfd"}, "descriptors [9] belong to nothing"),
    ({}, {**GOOD_KINDS, 2: "socket"}, "memory region 0: descriptor 2"),
    ({"regions": (HandedRegion(0x100001, 64 * PAGE, 0, 2),)}, GOOD_KINDS, "whole pages"),
    ({"regions": (HandedRegion(1 << 64, PAGE, 0, 2),)}, GOOD_KINDS, "whole pages"),
    ({"regions": ()}, GOOD_KINDS, "0 memory regions"),
    ({"version": 7}, GOOD_KINDS, "is not a VMBus version"),
    ({"name": "x\n"}, GOOD_KINDS, "not printable"),
    ({"opens": (HandedOpen(1, 2, 2, 0, 0, 0, bytes(120), 3, 4),)}, GOOD_KINDS,
     "ring GPADL is not handed over"),
    ({"opens": (HandedOpen(1, 1, 2, 0, 0, 0, bytes(119), 3, 4),)}, GOOD_KINDS,
     "open data out of range"),
    ({"opens": (HandedOpen(1, 1, 2, 0, 0, 0, bytes(120), 3, 3),)}, GOOD_KINDS,
     "repeated or not a fifo"),
    ({"gpadls": (HandedGpadl(1, 1, 0, (PAGE, 1)),)}, GOOD_KINDS, "repeated or malformed"),
    ({"pending": (HandedPendingGpadl(1, 7, 20, 1, b""),)}, GOOD_KINDS, "is malformed"),
    ({"pending": (HandedPendingGpadl(1, 7, 16, 1, b"\0" * 16),)}, GOOD_KINDS, "is malformed"),
    ({"gpadl_words": ((1, 5), (1, 5))}, GOOD_KINDS, "repeated or too large"),
    ({"gpadl_words": tuple((i, 8191) for i in range(40))}, GOOD_KINDS, "exceed"),
    ({"gpadls": tuple(HandedGpadl(1, i, 1, (0,) * 8191) for i in range(40))}, GOOD_KINDS,
     "exceed"),
    ({"sent": (HandedOffer(1, "a", "b", 0), HandedOffer(1, "a", "b", 0))}, GOOD_KINDS,
     "listed twice"),
    ({"outbox": (encode_message(RequestOffers()),)}, GOOD_KINDS, "is not the host's"),
    ({"outbox": (b"\xff" * 8,)}, GOOD_KINDS, "does not decode"),
    ({"outbox": (b"\0" * 241,)}, GOOD_KINDS, "longer than a VMBus message"),
    ({"version": None}, GOOD_KINDS, "not connected has offers"),
])
def test_a_malformed_state_is_refused_with_what_is_wrong(
        changes: dict[str, Any], kinds: dict[int, str], blame: str) -> None:
    with pytest.raises(VmbusHandoverError) as refused:
        check_state_untrusted(good_state(**changes), kinds)
    assert blame in str(refused.value)


def test_no_guest_takes_only_the_listener() -> None:
    check_state_untrusted(SocketHandoverState(3, 1, None), {0: "socket"})
    with pytest.raises(VmbusHandoverError, match="a guest that is not there"):
        check_state_untrusted(SocketHandoverState(3, 1, None), {0: "socket", 1: "socket"})


_INTS = st.one_of(st.integers(-2, 70), st.integers(-(1 << 63), (1 << 64) - 1),
                  st.sampled_from([0, 1, PAGE, 0xFFFF, 0xFFFFFFFF, 1 << 63]))
_KINDS = st.dictionaries(st.integers(-1, 8), st.sampled_from(
    ["socket", "memfd", "eventfd", "fifo", "regular", "chardev"]), max_size=8)


def _guests() -> st.SearchStrategy[HandedGuest]:
    return st.builds(
        HandedGuest, name=st.text(max_size=70), version=st.one_of(st.none(), _INTS, st.sampled_from(
            [int(v) for v in Version])), offers_requested=st.booleans(), messages=_INTS,
        regions=st.lists(st.builds(HandedRegion, _INTS, _INTS, _INTS, _INTS), max_size=10),
        sent=st.lists(st.builds(HandedOffer, _INTS, st.text(max_size=40),
                                st.text(max_size=40), _INTS), max_size=3),
        rescinded=st.lists(_INTS, max_size=3),
        pending=st.lists(st.builds(HandedPendingGpadl, _INTS, _INTS, _INTS, _INTS,
                                   st.binary(max_size=40)), max_size=3),
        gpadl_words=st.lists(st.tuples(_INTS, _INTS), max_size=3),
        gpadls=st.lists(st.builds(HandedGpadl, _INTS, _INTS, _INTS,
                                  st.lists(_INTS, max_size=6), st.booleans()), max_size=3),
        opens=st.lists(st.builds(HandedOpen, _INTS, _INTS, _INTS, st.one_of(st.none(), _INTS),
                                 _INTS, _INTS, st.binary(max_size=130), _INTS, _INTS),
                       max_size=3),
        outbox=st.lists(st.binary(max_size=260), max_size=3))


@settings(max_examples=400, deadline=None)
@given(st.builds(SocketHandoverState, _INTS, _INTS, st.one_of(st.none(), _guests())), _KINDS)
def test_any_state_is_accepted_or_refused_cleanly(state: SocketHandoverState,
                                                  kinds: dict[int, str]) -> None:
    try:
        check_state_untrusted(state, kinds)
    except VmbusHandoverError:
        return
    # Accepted: every descriptor is accounted for, of the kind its use needs.
    assert kinds.get(0) == "socket"


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_a_good_state_with_one_field_mutated_is_accepted_or_refused_cleanly(
        data: st.DataObject) -> None:
    field = data.draw(st.sampled_from(["regions", "opens", "gpadls", "pending", "gpadl_words"]))
    value = getattr(good_state().guest, field)
    index = data.draw(st.integers(0, len(value) - 1))
    item = value[index]
    if isinstance(item, tuple):
        mutated: Any = (data.draw(_INTS), data.draw(_INTS))
    else:
        name = data.draw(st.sampled_from([a.name for a in attrs.fields(type(item))]))
        old = getattr(item, name)
        new = (data.draw(st.binary(max_size=130)) if isinstance(old, bytes)
               else data.draw(st.lists(_INTS, max_size=4)) if isinstance(old, tuple)
               else data.draw(_INTS))
        mutated = attrs.evolve(item, **{name: new})
    state = good_state(**{field: (*value[:index], mutated, *value[index + 1:])})
    with contextlib.suppress(VmbusHandoverError):
        check_state_untrusted(state, GOOD_KINDS)


def test_the_descriptors_are_checked_by_what_the_kernel_says() -> None:
    import socket

    read_end, write_end = os.pipe()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with pytest.raises(VmbusHandoverError, match="read end"):
            _check_descriptors({4: (read_end, "fifo")})
        _check_descriptors({4: (write_end, "fifo")})
        with pytest.raises(VmbusHandoverError, match="not the VMBus socket's listener"):
            _check_descriptors({0: (listener.fileno(), "socket")})  # not listening
        with pytest.raises(VmbusHandoverError, match="not the VMBus socket's connection"):
            _check_descriptors({1: (stream.fileno(), "socket")})
    finally:
        for fd in (read_end, write_end):
            os.close(fd)
        listener.close()
        stream.close()


@pytest.mark.anyio
async def test_a_parked_connection_reads_nothing_and_queues_background_sends(
        tmp_path: Any) -> None:
    """Parked: a guest message waits unread in the socket and a rescind made meanwhile waits in
    the outbox; unparked: the rescind goes out first, then the message is answered."""
    async with socket_bus(tmp_path / "vmbus.sock", devices=2) as bus, raw_guest(bus.path) as guest:
        with anyio.fail_after(30):
            await guest.contact()
            await guest.send(RequestOffers())
            for _ in range(3):  # two offers, ALL_OFFERS_DELIVERED
                await guest.recv()
            connection = bus.socket.connected
            assert connection is not None
            await connection.park()
            handled = connection.messages
            await bus.handles[1].revoke()
            await guest.send(RequestOffers())  # a fault if read: a second REQUEST_OFFERS
            for _ in range(20):
                await anyio.lowlevel.checkpoint()
            assert connection.messages == handled
            assert connection.outbox == [encode_message(RescindChannelOffer(
                bus.handles[1].channel_id))]
            connection.unpark()
            rescind = await guest.recv()
            assert rescind == RescindChannelOffer(bus.handles[1].channel_id)
            assert await guest.recv() is None  # then the second REQUEST_OFFERS: a fault
            assert connection.outbox == []


@pytest.mark.anyio
async def test_a_handed_over_signal_looks_once_then_waits_for_the_guest() -> None:
    to_host = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal = HandedOverSignal(to_host, write_end, owns_fds=True)
    try:
        with anyio.fail_after(30):
            await signal.wait()  # at once, although the guest signalled nothing
        with anyio.move_on_after(0.05) as waited:
            await signal.wait()
        assert waited.cancelled_caught, "the second wait must wait for the guest"
        os.eventfd_write(to_host, 1)
        with anyio.fail_after(30):
            await signal.wait()
    finally:
        signal.close()
        os.close(read_end)
