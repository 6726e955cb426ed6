# SPDX-License-Identifier: MIT
"""A real Linux guest drives the vsock device through QEMU, served by ``devicehost run``.

The client here is nobody's code but the Linux kernel's virtio-vsock driver (Debian's cloud kernel,
booted under QEMU with ``-accel tcg``); the device is the vsock plugin served over vhost-user by the
project's own CLI. Host-side traffic uses Unix sockets only; AF_VSOCK is used inside the guest only.

One ``devicehost run`` serves the whole module. The first boot runs four guest steps in order and
the host acts on the guest's serial markers; each check below asserts on data (byte counts,
checksums, exact bytes) of that boot. The last test needs the guest to have powered off, then
boots a second guest against the same, still running, ``devicehost run``.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .devicehostrun import DevicehostRun, VsockLayout
from .guestimage import GuestImage
from .guestvm import GuestFailure, GuestVm
from .hostpeer import (
    EchoResult,
    PortListener,
    ReceivedData,
    connect_to_guest,
    connect_without_guest_listener,
    echo_through,
    pattern,
)

pytestmark = pytest.mark.qemu

GUEST_CID = 3
SEND_PORT = 5000  # the guest connects here; the host listens at <base_path>_5000
MISSING_PORT = 5001  # nothing listens at <base_path>_5001: the device must RST the connect
LISTEN_PORT = 6000  # the guest listens here; the host connects through <base_path>
UNLISTENED_PORT = 6001  # nothing listens here in the guest: the host CONNECT gets no OK
SEND_LEN = 8 << 20
SEND_SEED = 0x0101_0000_0000
REPLY_LEN = 1 << 20
REPLY_SEED = 0x0202_0000_0000
ECHO_LEN = 8 << 20
ECHO_SEED = 0x0303_0000_0000
FIRST_PORT = 0x4000_0000  # the device's first local port for a host-initiated connection
# The kernel's vsock connect timeout is 2 s; an RST must end the connect well before it.
PROMPT_FAILURE_MS = 1000.0
BOOT_TIMEOUT_S = 120.0  # the timeout wrapper around QEMU; a healthy first boot takes 5-15 s


class BootRecord:
    """What the first boot showed, step by step; a failed step keeps its error."""

    def __init__(self, served: DevicehostRun) -> None:
        self.served = served
        self.vm: GuestVm | None = None
        self.values: dict[str, Any] = {}
        self.errors: dict[str, str] = {}
        self.aborted: str | None = None
        self.console = ""
        self.exit_status: int | None = None

    def run(self, name: str, action: Callable[[], Any]) -> None:
        if self.aborted is not None:
            self.errors[name] = f"not reached: {self.aborted}"
            return
        try:
            self.values[name] = action()
        except GuestFailure as exc:
            # QEMU exited or the guest went silent: later steps cannot happen either.
            self.errors[name] = str(exc).split("\n--- QEMU command", 1)[0]
            self.aborted = f"step {name!r} failed first"
        except (AssertionError, OSError) as exc:  # a wrong answer, or a host socket that failed
            self.errors[name] = f"{type(exc).__name__}: {exc}"

    def get(self, name: str) -> Any:
        if name in self.values:
            return self.values[name]
        self.fail(f"{name}: {self.errors.get(name, 'no result')}")

    def fail(self, what: str) -> Any:
        pytest.fail(self.report(what), pytrace=False)

    def report(self, what: str) -> str:
        vm_report = self.vm.report(what) if self.vm is not None else what
        return f"{vm_report}\n--- QEMU exit status: {self.exit_status}\n{self.served.report('')}"


def expect_step(vm: GuestVm, result: str, timeout: float) -> re.Match[str]:
    """Wait for a step's result line; a ``DH STEPFAIL`` line instead fails this step only."""
    match = vm.expect(rf"DH (?:{result}|(?P<stepfail>STEPFAIL \S+))", timeout, stop_on_error=False)
    if match.group("stepfail"):
        raise AssertionError(f"guest step failed ({match.group('stepfail')}); see the console")
    return match


@pytest.fixture(scope="module")
def layout() -> Iterator[VsockLayout]:
    work = Path(tempfile.mkdtemp(prefix="dhq-"))  # short: Unix socket paths are limited
    try:
        yield VsockLayout(work_dir=work, guest_cid=GUEST_CID)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def served(guest_image: GuestImage, layout: VsockLayout) -> Iterator[DevicehostRun]:
    """``devicehost run --config`` serving the vsock device on the vhost-user socket."""
    with DevicehostRun(layout) as run:
        yield run


@pytest.fixture(scope="module")
def first_boot(
    guest_image: GuestImage, layout: VsockLayout, served: DevicehostRun
) -> Iterator[BootRecord]:
    record = BootRecord(served)
    listener = PortListener(
        layout.port_path(SEND_PORT),
        expect=pattern(SEND_SEED, SEND_LEN),
        reply=pattern(REPLY_SEED, REPLY_LEN),
        timeout=BOOT_TIMEOUT_S,
    )
    steps = [
        "cid",
        f"send:{SEND_PORT}:{SEND_LEN}:{SEND_SEED}:{REPLY_LEN}",
        f"refuse:{MISSING_PORT}",
        f"echo:{LISTEN_PORT}:{ECHO_LEN}",
    ]
    vm = GuestVm(
        guest_image,
        layout.work_dir,
        vhost_user_socket=layout.vhost_user_socket,
        steps=steps,
        timeout_s=BOOT_TIMEOUT_S,
    )
    record.vm = vm

    def host_to_guest() -> tuple[int, EchoResult]:
        sock, ok_port = connect_to_guest(layout.base_path, LISTEN_PORT, timeout=60)
        with sock:
            return ok_port, echo_through(sock, pattern(ECHO_SEED, ECHO_LEN))

    try:
        with vm:
            record.run("cid", lambda: expect_step(vm, r"CID (?P<cid>\d+)", 90))
            record.run(
                "send",
                lambda: expect_step(
                    vm,
                    r"SEND port=(?P<port>\d+) sent=(?P<sent>\d+) sent_crc=(?P<sent_crc>[0-9a-f]+) "
                    r"recv=(?P<recv>\d+) recv_crc=(?P<recv_crc>[0-9a-f]+) ms=(?P<ms>[0-9.]+)",
                    120,
                ),
            )
            record.run("send_host", lambda: listener.join(10))
            record.run(
                "refuse",
                lambda: expect_step(
                    vm,
                    r"(?P<line>CONN\S+) port=\d+ (?:errno=(?P<errno>\S+) )?ms=(?P<ms>[0-9.]+)",
                    30,
                ),
            )
            record.run("listening", lambda: vm.expect(rf"DH LISTENING port={LISTEN_PORT}\b", 60))
            record.run(
                "host_refused",
                lambda: connect_without_guest_listener(layout.base_path, UNLISTENED_PORT, 30),
            )
            record.run("host_to_guest", host_to_guest)
            record.run(
                "echo",
                lambda: expect_step(
                    vm,
                    r"ECHO port=(?P<port>\d+) peer_cid=(?P<peer_cid>\d+) "
                    r"peer_port=(?P<peer_port>\d+) "
                    r"bytes=(?P<bytes>\d+) crc=(?P<crc>[0-9a-f]+) ms=(?P<ms>[0-9.]+)",
                    60,
                ),
            )
            record.run("done", lambda: vm.expect(r"DH DONE", 30))
            record.run("exit", lambda: vm.wait_exit(30))
            record.exit_status = record.values.get("exit")
    finally:
        listener.close()
        record.console = vm.console
    yield record


def test_guest_reads_cid_from_device_config(first_boot: BootRecord) -> None:
    match = first_boot.get("cid")
    assert int(match.group("cid")) == GUEST_CID, first_boot.report("wrong CID in the guest")


def test_guest_to_host_data_and_reply_arrive_intact(first_boot: BootRecord) -> None:
    guest = first_boot.get("send")
    host: ReceivedData = first_boot.get("send_host")
    expected_crc = zlib.crc32(pattern(SEND_SEED, SEND_LEN))
    if not (host.length == SEND_LEN and host.intact and host.crc == expected_crc):
        first_boot.fail(
            f"host listener got {host.length} bytes, crc {host.crc:08x}, intact={host.intact}"
        )
    # The guest's own checksum of what it sent, and of the host's reply as it arrived.
    assert int(guest.group("sent")) == SEND_LEN
    assert int(guest.group("sent_crc"), 16) == expected_crc
    assert int(guest.group("recv")) == REPLY_LEN, first_boot.report("short reply in the guest")
    assert int(guest.group("recv_crc"), 16) == zlib.crc32(pattern(REPLY_SEED, REPLY_LEN))


def test_connect_without_host_listener_is_reset_promptly(first_boot: BootRecord) -> None:
    match = first_boot.get("refuse")
    if match.group("line") != "CONNFAIL":
        first_boot.fail("the guest connected to a port with no host listener")
    errno_name = match.group("errno").split("/")[0]
    ms = float(match.group("ms"))
    # RST from the device gives ECONNRESET in Linux's virtio transport; ETIMEDOUT means no RST came.
    if errno_name not in {"ECONNRESET", "ECONNREFUSED"} or ms >= PROMPT_FAILURE_MS:
        first_boot.fail(f"connect to port {MISSING_PORT} failed with {errno_name} after {ms} ms")


def test_host_connect_reaches_guest_listener(first_boot: BootRecord) -> None:
    ok_port, echo = first_boot.get("host_to_guest")
    guest = first_boot.get("echo")
    data_crc = zlib.crc32(pattern(ECHO_SEED, ECHO_LEN))
    # The refused CONNECT before this one took the allocator's first port; ports advance by one.
    assert ok_port == FIRST_PORT + 1, first_boot.report(f"OK carried port {ok_port}")
    # The guest saw the connection come from the host (CID 2) at the port the OK line named.
    assert int(guest.group("peer_cid")) == 2
    assert int(guest.group("peer_port")) == ok_port
    assert int(guest.group("bytes")) == ECHO_LEN
    assert int(guest.group("crc"), 16) == data_crc
    if not (echo.received.length == ECHO_LEN and echo.received.intact):
        first_boot.fail(
            f"host got {echo.received.length} echoed bytes, crc {echo.received.crc:08x} "
            f"(expected {ECHO_LEN}, {data_crc:08x})"
        )


def test_host_connect_to_guest_port_without_listener_gets_no_ok(first_boot: BootRecord) -> None:
    first_boot.get("listening")
    got, seconds = first_boot.get("host_refused")
    # The guest kernel answers the device's REQUEST with RST; the device closes without "OK".
    if got != b"" or seconds >= PROMPT_FAILURE_MS / 1000:
        first_boot.fail(f"CONNECT {UNLISTENED_PORT}: read {got!r}, closed after {seconds:.3f} s")


def test_poweroff_then_second_boot_is_served(
    first_boot: BootRecord, guest_image: GuestImage, layout: VsockLayout, served: DevicehostRun
) -> None:
    first_boot.get("done")
    if first_boot.get("exit") != 0:
        first_boot.fail("QEMU did not exit cleanly after the guest's poweroff")
    if not served.alive():
        first_boot.fail("devicehost run exited after the VMM disconnected")
    length, seed, reply_len, reply_seed = 256 << 10, 0x0404_0000_0000, 64 << 10, 0x0505_0000_0000
    listener = PortListener(
        layout.port_path(SEND_PORT),
        expect=pattern(seed, length),
        reply=pattern(reply_seed, reply_len),
        timeout=90,
    )
    vm = GuestVm(
        guest_image,
        layout.work_dir,
        vhost_user_socket=layout.vhost_user_socket,
        steps=["cid", f"send:{SEND_PORT}:{length}:{seed}:{reply_len}"],
        timeout_s=60,
    )
    started = time.monotonic()
    try:
        with vm:
            cid = vm.expect(r"DH CID (\d+)", 80)
            sent = vm.expect(
                r"DH SEND port=\d+ sent=(\d+) sent_crc=\S+ recv=(\d+) recv_crc=(\S+)", 60
            )
            received = listener.join(10)
            vm.expect(r"DH DONE", 30)
            status = vm.wait_exit(30)
    except GuestFailure as exc:  # its message has the QEMU command line and the console
        pytest.fail(f"second boot: {exc}\n{served.report('')}", pytrace=False)
    except AssertionError as exc:
        pytest.fail(vm.report(f"second boot: {exc}") + served.report(""), pytrace=False)
    finally:
        listener.close()
    report = vm.report(f"second boot ({time.monotonic() - started:.1f} s)") + served.report("")
    assert int(cid.group(1)) == GUEST_CID, report
    assert received.length == length and received.intact, report
    assert int(sent.group(2)) == reply_len, report
    assert int(sent.group(3), 16) == zlib.crc32(pattern(reply_seed, reply_len)), report
    assert status == 0, report
    assert served.alive(), report
    # After serving two VMs, SIGTERM still stops devicehost run gracefully.
    assert served.stop() == 0, served.report("devicehost run did not exit 0 on SIGTERM")


def test_vmm_killed_mid_transfer_then_next_vmm_is_served(guest_image: GuestImage) -> None:
    """A VMM crash (SIGKILL) while the host streams into the guest: the host peer's stream ends,
    ``devicehost run`` survives, and the next QEMU on the same socket is served."""
    work = Path(tempfile.mkdtemp(prefix="dhq-"))
    layout = VsockLayout(work_dir=work, guest_cid=GUEST_CID)
    try:
        with DevicehostRun(layout) as served:
            vm = GuestVm(
                guest_image,
                work,
                vhost_user_socket=layout.vhost_user_socket,
                steps=[f"sink:{LISTEN_PORT}:{64 << 20}"],
                timeout_s=60,
            )
            try:
                with vm:
                    vm.expect(rf"DH LISTENING port={LISTEN_PORT}\b", 50)
                    sock, _ = connect_to_guest(layout.base_path, LISTEN_PORT, timeout=30)
                    with sock:
                        sock.sendall(pattern(ECHO_SEED, 4 << 20))  # the guest waits for 64 MiB
                        vm.kill()
                        try:
                            leftover = sock.recv(16)
                        except ConnectionResetError:
                            leftover = b""
            except (AssertionError, OSError) as exc:
                pytest.fail(vm.report(f"first VMM: {exc!r}") + served.report(""), pytrace=False)
            if leftover != b"" or not served.alive():
                pytest.fail(vm.report(f"after the kill: read {leftover!r}") + served.report(""))
            length = 512 << 10
            listener = PortListener(
                layout.port_path(SEND_PORT), expect=pattern(7, length), reply=b"", timeout=60
            )
            again = GuestVm(
                guest_image,
                work,
                vhost_user_socket=layout.vhost_user_socket,
                steps=[f"send:{SEND_PORT}:{length}:7:0"],
                timeout_s=60,
            )
            try:
                with again:
                    again.expect(r"DH SEND port=\d+ sent=\d+", 50)
                    received = listener.join(10)
            except AssertionError as exc:
                pytest.fail(again.report(f"next VMM: {exc}") + served.report(""), pytrace=False)
            finally:
                listener.close()
            assert received.length == length and received.intact, again.report("corrupt")
    finally:
        shutil.rmtree(work, ignore_errors=True)
