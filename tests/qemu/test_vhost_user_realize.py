# SPDX-License-Identifier: MIT
"""The vhost-user backend against a real QEMU: its device-realize handshake.

Lives beside the other QEMU tests so that it gets the ``qemu_binary`` fixture, which installs QEMU
on a fresh machine (a ``skipif`` on ``qemu-system-x86_64`` would be evaluated at collection, before
anything installs it, and skip the test on every fresh CI machine).
"""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest

from devicehost import DeviceContext, hookimpl
from devicehost.testing import host_with
from devicehost.testing.registry import DeviceSpec
from devicehost.virtio import DeviceTraits, VirtioTransport
from devicehost.virtio.vhost_message import Request


@attrs.frozen
class _VsockShapeConfig:
    vhost_user_socket: str = ""


class _VsockShape:
    """Just enough of a vsock device for QEMU's vhost-user-vsock-pci to realize against."""

    config_class = _VsockShapeConfig

    def __init__(self, config: _VsockShapeConfig) -> None:
        self.config = config

    @hookimpl
    def offer(self, ctx: DeviceContext) -> DeviceTraits:
        return DeviceTraits(device_id=19, device_features=1, queue_count=2,
                            config=struct.pack("<Q", 3))

    @hookimpl
    def open(self, ctx: DeviceContext, resources: Any) -> Any:
        return resources

    @hookimpl
    def run(self, ctx: DeviceContext, runner: Any) -> Any:
        return anyio.sleep_forever()


@pytest.mark.qemu
@pytest.mark.anyio
async def test_real_qemu_realizes_against_the_backend(qemu_binary: Path, tmp_path: Path) -> None:
    """QEMU 7.2's device-realize handshake (no guest runs: the CPU stays paused with -S)."""
    sock = str(tmp_path / "vu.sock")
    specs = [DeviceSpec("vsock", "vsock", _VsockShapeConfig(vhost_user_socket=sock))]
    async with host_with({"vsock": _VsockShape}, specs) as host:
        backend = host.transport(VirtioTransport).vhost_user_backend("vsock")
        qemu = subprocess.Popen(
            [str(qemu_binary), "-accel", "tcg", "-S", "-machine", "q35,memory-backend=mem",
             "-m", "64M", "-object", "memory-backend-memfd,id=mem,size=64M,share=on",
             "-nodefaults", "-no-reboot", "-display", "none", "-monitor", "none",
             "-serial", "none", "-chardev", f"socket,id=c0,path={sock}",
             "-device", "vhost-user-vsock-pci,chardev=c0"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        try:
            with anyio.fail_after(20):
                while backend.session is None or Request.GET_CONFIG not in backend.session.received:
                    assert qemu.poll() is None, qemu.stderr.read() if qemu.stderr else ""
                    await anyio.sleep(0.05)
                received = list(backend.session.received)
        finally:
            qemu.kill()  # by PID: the process started above
            qemu.wait(10)
            if qemu.stderr is not None:
                qemu.stderr.close()
        assert received == [
            Request.GET_FEATURES, Request.GET_PROTOCOL_FEATURES, Request.SET_PROTOCOL_FEATURES,
            Request.GET_QUEUE_NUM, Request.SET_OWNER, Request.GET_FEATURES,
            Request.SET_VRING_CALL, Request.SET_VRING_ERR, Request.SET_VRING_CALL,
            Request.SET_VRING_ERR, Request.GET_CONFIG,
        ]
        with anyio.fail_after(10):
            await backend.wait_finished(1)  # QEMU's death is a disconnect
        assert backend.errors == []
