"""The test kit's vhost-user frontend: its own refusals (its happy paths drive every vhost-user test
in tests/virtio/test_vhost_user.py and the vsock plugin's)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import anyio
import pytest

from devicehost.fds import require_unshrinkable_memory
from devicehost.memory import GuestMemory
from devicehost.testing.vhost_user import USER_BASE, VhostUserFrontend, sealed_memfd
from devicehost.virtio.vhost_message import F_REPLY, F_VERSION, HEADER, Request

pytestmark = pytest.mark.anyio


async def _features_refusal(tmp_path: Path, answer: bytes, memory: GuestMemory) -> str:
    """What the frontend's GET_FEATURES raises when a backend answers with ``answer``."""
    path = str(tmp_path / "vu.sock")
    listener = await anyio.create_unix_listener(path)
    got = bytearray()

    async def backend() -> None:
        async with listener:
            stream = await listener.accept()
            async with stream:
                while len(got) < HEADER.size:
                    got.extend(await stream.receive(HEADER.size - len(got)))
                await stream.send(answer)
                # Until the frontend hangs up (a reset if it left some of the answer unread).
                with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                    await stream.receive()

    async with anyio.create_task_group() as tg:
        tg.start_soon(backend)
        frontend = await VhostUserFrontend.connect(path, memory)
        with pytest.raises(AssertionError) as caught:
            await frontend.get_u64(Request.GET_FEATURES)
        await frontend.aclose()
    assert HEADER.unpack(got)[0] == Request.GET_FEATURES
    return str(caught.value)


async def test_a_reply_to_another_request_is_an_assertion_error(tmp_path: Path) -> None:
    memory = GuestMemory.memfd(1 << 20)
    try:
        with anyio.fail_after(5):
            wrong = HEADER.pack(Request.GET_QUEUE_NUM, F_VERSION | F_REPLY, 8) + bytes(8)
            message = await _features_refusal(tmp_path, wrong, memory)
        assert message == (f"expected the reply to request {int(Request.GET_FEATURES)}, got"
                           f" request {int(Request.GET_QUEUE_NUM)} flags 0x5")
    finally:
        memory.close()


async def test_a_short_u64_is_an_assertion_error(tmp_path: Path) -> None:
    memory = GuestMemory.memfd(1 << 20)
    try:
        with anyio.fail_after(5):
            short = HEADER.pack(Request.GET_FEATURES, F_VERSION | F_REPLY, 4) + bytes(4)
            message = await _features_refusal(tmp_path, short, memory)
        assert message == f"request {int(Request.GET_FEATURES)} answered 4 bytes, not a u64"
    finally:
        memory.close()


async def test_start_needs_realize_and_addresses_must_be_guest_memory(tmp_path: Path) -> None:
    memory = GuestMemory.memfd(1 << 20, gpa=0x10000)
    path = str(tmp_path / "vu.sock")
    try:
        with anyio.fail_after(5):
            async with await anyio.create_unix_listener(path):
                frontend = await VhostUserFrontend.connect(path, memory)
                with pytest.raises(RuntimeError, match="realize"):
                    await frontend.start(0)
                assert frontend.user_addr(0x10000 + 0x2345) == USER_BASE + 0x2345
                with pytest.raises(ValueError, match="0xffff is not guest memory"):
                    frontend.user_addr(0xFFFF)
                await frontend.aclose()
    finally:
        memory.close()


def test_sealed_memfd_is_what_the_backend_accepts_as_guest_memory() -> None:
    fd = sealed_memfd(1 << 20)
    try:
        assert os.fstat(fd).st_size == 1 << 20
        require_unshrinkable_memory(fd, "test kit memory")
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 0)
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 2 << 20)
    finally:
        os.close(fd)
