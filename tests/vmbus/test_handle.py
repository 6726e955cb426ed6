"""The server's records: a GPADL's map count and a handle's request dispatch."""

from __future__ import annotations

import anyio
import pytest

from devicehost.memory import GuestMemory
from devicehost.vmbus.gpadl import decode_gpa_ranges_untrusted
from devicehost.vmbus.handle import OpenState, RemoteGuest, ServerGpadl
from devicehost.vmbus.protocol import GpadlRequest
from devicehost.vmbus.server import VmbusServer
from tests.vmbus.test_server import FakeDevice, params

pytestmark = pytest.mark.anyio


async def test_a_gpadl_reports_unmapped_when_its_last_ring_goes() -> None:
    memory = GuestMemory.anonymous(4096 * 4)
    try:
        request = GpadlRequest(7, 1, (8192, 0, 1))
        guest = RemoteGuest(memory, "g")
        gpadl = ServerGpadl(request, decode_gpa_ranges_untrusted(request.buf, 1), 3, memory, guest)
        assert gpadl.key == (guest, 7) and gpadl.memory is memory
        gpadl.map_count = 2
        gpadl.unmapped = anyio.Event()
        gpadl.unmap()
        assert not gpadl.unmapped.is_set()
        gpadl.unmap()
        assert gpadl.unmapped.is_set()
    finally:
        memory.close()


async def test_a_handle_dispatches_only_server_requests() -> None:
    memory = GuestMemory.anonymous(4096 * 4)
    try:
        handle = VmbusServer(memory).add_child(params(), FakeDevice())
        assert handle.state is OpenState.CLOSED and not handle.is_open
        assert handle.open_resources is None
        with pytest.raises(TypeError, match="not a server request"):
            await handle.request("revoke")  # type: ignore[arg-type]
    finally:
        memory.close()
