"""Hypothesis drives random message sequences (with fds of every kind) at a real VMBus socket.

Whatever a guest sends, the host stays up: afterwards nothing of the guest remains (no GPADL, no
open channel) and the next guest connects, negotiates and is offered every channel.
"""

from __future__ import annotations

import os
import struct
import tempfile
from pathlib import Path

import anyio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devicehost.memory import PAGE_SIZE
from devicehost.vmbus.messages import (
    CloseChannel,
    GpadlBody,
    GpadlCreated,
    GpadlHeader,
    GpadlTeardown,
    InitiateContact,
    MemoryRegionEntry,
    MemoryTable,
    Message,
    MessageType,
    ModifyChannel,
    OpenChannel,
    OpenResult,
    RelIdReleased,
    RequestOffers,
    Unload,
    Version,
    encode_message,
)
from tests.vmbus.socketharness import GUEST_GPA, GUEST_PAGES, eventfd, memfd, raw_guest, socket_bus
from tests.vmbus.test_socketserver import connected

FIRST_PFN = GUEST_GPA // PAGE_SIZE
channel_ids = st.sampled_from([1, 2, 3, 0xFFFFFFFF])
gpadl_ids = st.integers(0, 3)
# Page numbers inside the guest's memory, in the host's memory, or nowhere.
pfns = st.one_of(st.integers(FIRST_PFN, FIRST_PFN + GUEST_PAGES - 1), st.integers(0, 20),
                 st.integers(0, 2**40))


@st.composite
def gpadl_header(draw: st.DrawFn) -> Message:
    pages = draw(st.lists(pfns, min_size=1, max_size=26))
    byte_count = draw(st.sampled_from([len(pages) * PAGE_SIZE, 1, 0, 2**32 - 1]))
    data = struct.pack(f"<{len(pages) + 1}Q", byte_count, *pages)
    buflen = draw(st.sampled_from([len(data), len(data) + 8 * 28, len(data) - 8, 7]))
    return GpadlHeader(draw(channel_ids), draw(gpadl_ids), max(buflen, 0) & 0xFFFF,
                       draw(st.integers(0, 3)), data)


messages: st.SearchStrategy[Message | bytes] = st.one_of(
    st.builds(RequestOffers),
    st.builds(InitiateContact, st.sampled_from([*map(int, Version), 0, 0x00070000])),
    gpadl_header(),
    st.builds(GpadlBody, gpadl_ids, st.binary(max_size=40).map(lambda b: b[: len(b) // 8 * 8])),
    st.builds(GpadlTeardown, channel_ids, gpadl_ids),
    st.builds(OpenChannel, channel_ids, st.integers(0, 9), gpadl_ids,
              st.sampled_from([0, 0xFFFFFFFF]), st.integers(0, 30)),
    st.builds(CloseChannel, channel_ids),
    st.builds(RelIdReleased, channel_ids),
    st.builds(ModifyChannel, channel_ids, st.integers(0, 4)),
    st.builds(Unload),
    st.builds(MemoryTable, st.lists(st.builds(MemoryRegionEntry, st.sampled_from([0, GUEST_GPA]),
                                              st.sampled_from([PAGE_SIZE, 1, 2**40]),
                                              st.sampled_from([0, PAGE_SIZE])),
                                    max_size=2).map(tuple)),
    # Raw bytes: any type number, any body length (also past 240 bytes).
    st.builds(lambda kind, body: struct.pack("<II", kind, 0) + body,
              st.sampled_from([int(k) for k in MessageType] + [0, 18, 99]),
              st.binary(max_size=260)),
)
fd_kinds = st.lists(st.sampled_from(["eventfd", "memfd", "unsealed", "pipe", "file"]),
                    max_size=3)


def make_fd(kind: str, tmp: Path) -> int:
    if kind == "eventfd":
        return eventfd()
    if kind == "memfd":
        return memfd()
    if kind == "unsealed":
        return memfd(seal=False)
    if kind == "pipe":
        r, w = os.pipe()
        os.close(w)
        return r
    return os.open(tmp / "file", os.O_RDWR | os.O_CREAT, 0o600)


async def _example(contact: bool, opened: bool,
                   steps: list[tuple[Message | bytes, list[str]]]) -> None:
    with tempfile.TemporaryDirectory(prefix="fuzz-vmbus-") as tmp:
        path = Path(tmp) / "vmbus.sock"
        async with socket_bus(path) as bus:
            with anyio.fail_after(30):
                async with raw_guest(path) as guest:
                    if opened:
                        # A channel really open over the guest's memory before the random part.
                        (offer, *_) = await connected(guest)
                        words = struct.pack("<9Q", 8 * PAGE_SIZE, *range(FIRST_PFN,
                                                                           FIRST_PFN + 8))
                        await guest.send(GpadlHeader(offer.channel_id, 0, len(words), 1, words))
                        assert await guest.recv() == GpadlCreated(offer.channel_id, 0, 0)
                        to_host = eventfd()
                        await guest.send(OpenChannel(offer.channel_id, 1, 0, 0, 4), [to_host])
                        os.close(to_host)
                        assert await guest.recv() == OpenResult(offer.channel_id, 1, 0)
                        assert bus.remote_state()[1] != []
                    elif contact:
                        await guest.contact(Version.IRON)
                        await guest.send(RequestOffers())
                    for message, kinds in steps:
                        data = message if isinstance(message, bytes) else encode_message(message)
                        fds = [make_fd(kind, Path(tmp)) for kind in kinds]
                        try:
                            await guest.send(data, fds)
                        except OSError:
                            break  # the host closed the connection (a fault): fine
                        finally:
                            for fd in fds:
                                os.close(fd)
                await bus.socket.wait_idle()
                assert bus.remote_state() == ({}, [])
                for device in bus.devices:
                    assert device.log.count("open " + device.name) == device.log.count(
                        "close " + device.name)
                async with raw_guest(path) as guest:
                    assert len(await connected(guest)) == len(bus.handles)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.booleans(), st.booleans(), st.lists(st.tuples(
    st.one_of(messages, st.binary(max_size=250)),
    fd_kinds), max_size=12))
def test_random_guests_never_hurt_the_host(contact: bool, opened: bool,
                                           steps: list[tuple[Message | bytes, list[str]]]) -> None:
    anyio.run(_example, contact, opened, steps)
