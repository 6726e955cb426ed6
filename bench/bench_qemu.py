# SPDX-License-Identifier: MIT
"""The vsock device driven by a real Linux guest under QEMU (TCG), served by ``devicehost run``.

Rows:

- ``qemu_tcg_guest_to_host``: MB/s of 8 MiB written by the guest (vsockctl send) into a host Unix
  listener at ``<base_path>_<port>``, timed on the host from the first to the last byte;
- ``qemu_tcg_host_to_guest``: MB/s of 8 MiB written by the host through ``CONNECT <port>`` into a
  guest listener (vsockctl sink), timed until the guest's 4-byte end mark arrives;
- ``qemu_start_to_first_byte``: seconds from starting QEMU to the first guest byte arriving on the
  host; its baseline is the same boot's time to the guest's ``DH READY`` marker (userspace up,
  vsock modules loaded), so the ratio is the device's share of the wait.

The throughput baseline is the same bytes through a host ``socketpair`` in the same run. The guest
runs under TCG (software emulation: KVM is not usable on this machine), so the guest's own copies
and checksums are several times slower than native; these figures bound the device from below.

Needs root on Debian (QEMU, the cloud kernel and busybox come from apt, cached in
``~/.cache/devicehost-qemu``). When that is not possible the benchmark says why on stderr and
returns no rows.
"""

from __future__ import annotations

import shutil
import socket
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "qemu"))

from devicehostrun import DevicehostRun, VsockLayout
from guestimage import GuestSetupError, GuestSetupUnavailable, prepare_guest_image
from guestvm import GuestVm
from hostpeer import PortListener, connect_to_guest, pattern, send_to_sink

__all__ = ["run"]

LENGTH = 8 << 20
SEND_PORT = 5000
SINK_PORT = 6000
MB = 1e6
NOTE = "guest under QEMU TCG (software emulation, no KVM): slow guest CPU bounds these figures"


def _socketpair_mb_s(data: bytes) -> float:
    """MB/s of ``data`` through a host Unix socketpair between two threads (the baseline)."""
    left, right = socket.socketpair()
    with left, right:
        sender = threading.Thread(target=left.sendall, args=(data,), daemon=True)
        started = time.monotonic()
        sender.start()
        buf = bytearray(len(data))
        view = memoryview(buf)
        got = 0
        while got < len(data):
            got += right.recv_into(view[got:], len(data) - got)
        elapsed = time.monotonic() - started
        sender.join()
    return len(data) / elapsed / MB


def _row(name: str, value: float, unit: str, base_name: str, base: float) -> dict[str, Any]:
    return {
        "name": name,
        "value": round(value, 3),
        "unit": unit,
        "baseline_name": base_name,
        "baseline_value": round(base, 3),
        "ratio": round(value / base, 4) if base else 0.0,
    }


def _measure(work: Path) -> list[dict[str, Any]]:
    image = prepare_guest_image(work)
    layout = VsockLayout(work_dir=work)
    up = pattern(0x0A0A_0000_0000, LENGTH)
    down = pattern(0x0B0B_0000_0000, LENGTH)
    with DevicehostRun(layout) as served:
        listener = PortListener(layout.port_path(SEND_PORT), expect=up, reply=b"", timeout=120)
        vm = GuestVm(
            image,
            work,
            vhost_user_socket=layout.vhost_user_socket,
            steps=[f"send:{SEND_PORT}:{LENGTH}:{0x0A0A_0000_0000}:0", f"sink:{SINK_PORT}:{LENGTH}"],
            timeout_s=150,
        )
        try:
            with vm:
                vm.expect(r"DH READY", 90)
                ready_s = vm.elapsed_of_last_match()
                received = listener.join(120)
                if not received.intact:
                    raise AssertionError(vm.report("guest -> host bytes corrupted"))
                vm.expect(rf"DH LISTENING port={SINK_PORT}\b", 60)
                sock, _ = connect_to_guest(layout.base_path, SINK_PORT, timeout=60)
                with sock:
                    down_s, crc = send_to_sink(sock, down)
                if crc != zlib.crc32(down):
                    raise AssertionError(vm.report(f"host -> guest CRC {crc:08x} is wrong"))
                vm.expect(r"DH DONE", 30)
                vm.wait_exit(30)
        finally:
            listener.close()
        if not served.alive():
            raise AssertionError(served.report("devicehost run died during the benchmark"))
    first_byte_s = received.first_byte_at - vm.started_at
    up_mb_s = received.length / (received.done_at - received.first_byte_at) / MB
    down_mb_s = LENGTH / down_s / MB
    pair_up = _socketpair_mb_s(up)
    pair_down = _socketpair_mb_s(down)
    print(f"bench_qemu: {NOTE}", file=sys.stderr)
    return [
        _row("qemu_tcg_guest_to_host_8MiB", up_mb_s, "MB/s", "host_socketpair_8MiB", pair_up),
        _row("qemu_tcg_host_to_guest_8MiB", down_mb_s, "MB/s", "host_socketpair_8MiB", pair_down),
        _row("qemu_start_to_first_byte", first_byte_s, "s", "qemu_start_to_guest_ready", ready_s),
    ]


def run() -> list[dict[str, Any]]:
    work = Path(tempfile.mkdtemp(prefix="dhqb-"))  # short: Unix socket paths are limited
    try:
        return _measure(work)
    except GuestSetupUnavailable as exc:
        print(f"bench_qemu: skipped, QEMU guest unavailable: {exc}", file=sys.stderr)
        return []
    except GuestSetupError as exc:
        print(f"bench_qemu: skipped, building the guest failed: {exc}", file=sys.stderr)
        return []
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    for row in run():
        print(row)
