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
- ``qemu_tcg_guest_cpu_pattern_crc``: MB/s at which the guest generates and checksums the pattern
  (vsockctl ``cpu``, no sockets), against the same static binary run natively on the host: the
  ratio is how much slower the emulated guest CPU is, the yardstick for the two rates above.

The throughput baseline is the same bytes through a host ``socketpair`` in the same run. The guest
runs under TCG (software emulation: KVM is not usable on this machine): every guest instruction,
including the kernel's virtio-vsock driver and its copies, is translated, so these rates are far
below what the device reaches with a KVM guest and bound it from below only. The CPU row says how
slow the emulated CPU is on a plain loop (measured: ~2.7x slower than native); on this machine the
transfers run well below that loop's rate, so the guest kernel's emulated I/O path and the
Python backend, not the guest's pattern generation, set them.

Needs root on Debian (QEMU, the cloud kernel and busybox come from apt, cached in
``~/.cache/devicehost-qemu``). When that is not possible the benchmark says why on stderr and
returns no rows.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path
from typing import Any

# The guest support modules live in tests/qemu (shared with the QEMU tests), imported as the
# package ``tests.qemu`` from the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.qemu.devicehostrun import DevicehostRun, VsockLayout
from tests.qemu.guestimage import GuestSetupError, GuestSetupUnavailable, prepare_guest_image
from tests.qemu.guestvm import GuestVm
from tests.qemu.hostpeer import PortListener, connect_to_guest, pattern, send_to_sink

__all__ = ["run"]

LENGTH = 8 << 20
SEND_PORT = 5000
SINK_PORT = 6000
MB = 1e6
NOTE = "guest under QEMU TCG (software emulation, no KVM): rates bound the device from below"


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


def _native_cpu_ms(vsockctl: Path) -> float:
    """Milliseconds for the guest helper's ``cpu`` command natively (it opens no socket)."""
    out = subprocess.run(
        [str(vsockctl), "cpu", str(LENGTH)], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    match = re.search(r"ms=([0-9.]+)", out)
    if match is None:
        raise AssertionError(f"vsockctl cpu printed {out!r}")
    return max(float(match.group(1)), 0.1)


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
            steps=[
                f"send:{SEND_PORT}:{LENGTH}:{0x0A0A_0000_0000}:0",
                f"sink:{SINK_PORT}:{LENGTH}",
                f"cpu:{LENGTH}",
            ],
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
                guest_cpu = vm.expect(r"DH CPU bytes=\d+ crc=\S+ ms=(?P<ms>[0-9.]+)", 60)
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
    guest_cpu_mb_s = LENGTH / (float(guest_cpu.group("ms")) / 1000) / MB
    host_cpu_mb_s = LENGTH / (_native_cpu_ms(image.vsockctl) / 1000) / MB
    print(f"bench_qemu: {NOTE}", file=sys.stderr)
    return [
        _row("qemu_tcg_guest_to_host_8MiB", up_mb_s, "MB/s", "host_socketpair_8MiB", pair_up),
        _row("qemu_tcg_host_to_guest_8MiB", down_mb_s, "MB/s", "host_socketpair_8MiB", pair_down),
        _row("qemu_start_to_first_byte", first_byte_s, "s", "qemu_start_to_guest_ready", ready_s),
        _row(
            "qemu_tcg_guest_cpu_pattern_crc",
            guest_cpu_mb_s,
            "MB/s",
            "native_cpu_pattern_crc",
            host_cpu_mb_s,
        ),
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
