# SPDX-License-Identifier: MIT
"""SOCK_SEQPACKET vsock with a real Linux guest: QEMU's ``vhost-user-vsock-pci,seqpacket=on``
served by ``devicehost run``, the guest's kernel driver and ``vsockctl seqtest``.

At once, in one boot: the guest sends 10,000 messages of random sizes from 1 B to 64 KiB to a
host SOCK_SEQPACKET listener at ``<base_path>_5100``; the host sends 10,000 such messages to the
guest's SEQPACKET port 7100 through ``<base_path>_seqpacket``; and a stream connection moves
32 MiB from the guest to ``<base_path>_5101``. Both ends check every message against the shared
generator (tests/qemu/seqpeer.py, vsockctl.c): it must arrive whole, as one message, in order.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from .devicehostrun import DevicehostRun, VsockLayout
from .guestimage import GuestImage
from .guestvm import GuestVm
from .hostpeer import PortListener, ReceivedData, pattern
from .seqpeer import SeqReceiver, SeqResult, SeqSender

pytestmark = pytest.mark.qemu

OUT_PORT = 5100  # guest -> host messages: the host listens at <base_path>_5100
IN_PORT = 7100  # host -> guest messages: the guest listens on SEQPACKET port 7100
STREAM_PORT = 5101  # the stream alongside: guest -> host at <base_path>_5101
MESSAGES = 10_000
SEED = 0x5E9_0000
STREAM_LEN = 32 << 20
STREAM_SEED = SEED  # vsockctl seqtest's stream carries pattern(SEED, STREAM_LEN)
BOOT_TIMEOUT_S = 420.0


@pytest.fixture(scope="module")
def seq_run(guest_image: GuestImage) -> Iterator[dict[str, object]]:
    """One boot of the seqtest; what each side saw, or the failure report."""
    work = Path(tempfile.mkdtemp(prefix="dhq-"))
    layout = VsockLayout(work_dir=work, guest_cid=3)
    out: dict[str, object] = {}
    try:
        with DevicehostRun(layout) as served:
            receiver = SeqReceiver(
                layout.port_path(OUT_PORT), n=MESSAGES, seed=SEED, timeout=BOOT_TIMEOUT_S
            )
            stream = PortListener(
                layout.port_path(STREAM_PORT),
                expect=pattern(STREAM_SEED, STREAM_LEN),
                reply=b"done",
                timeout=BOOT_TIMEOUT_S,
            )
            vm = GuestVm(
                guest_image,
                work,
                vhost_user_socket=layout.vhost_user_socket,
                steps=[
                    f"seqtest:{OUT_PORT}:{IN_PORT}:{MESSAGES}:{SEED}:{STREAM_PORT}:{STREAM_LEN}"
                ],
                timeout_s=BOOT_TIMEOUT_S,
                vsock_options=",seqpacket=on",
            )
            sender: SeqSender | None = None
            started = time.monotonic()
            try:
                with vm:
                    vm.expect(rf"DH LISTENING port={IN_PORT}\b", 120)
                    sender = SeqSender(
                        Path(f"{layout.base_path}_seqpacket"), IN_PORT, n=MESSAGES,
                        seed=SEED + 1, timeout=BOOT_TIMEOUT_S,
                    )  # fmt: skip
                    out["ok_line"] = sender.ok_line
                    out["host_sent"] = sender.join(BOOT_TIMEOUT_S)
                    out["host_received"] = receiver.join(BOOT_TIMEOUT_S)
                    out["stream"] = stream.join(BOOT_TIMEOUT_S)
                    vm.expect(r"DH DONE", 120)
                    out["exit"] = vm.wait_exit(30)
            except (AssertionError, OSError) as exc:
                out["failure"] = vm.report(f"{exc!r}") + served.report("")
            finally:
                for peer in (sender, receiver, stream):
                    if peer is not None:
                        peer.close()
            out["seconds"] = time.monotonic() - started
            out["console"] = vm.console
            out["served"] = served.report("")
        yield out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _line(run: dict[str, object], pattern_: str) -> dict[str, str]:
    console = str(run["console"])
    match = re.search(pattern_, console)
    if match is None:
        pytest.fail(f"no {pattern_!r} in the console:\n{console}\n{run['served']}", pytrace=False)
    return match.groupdict()


def _check(run: dict[str, object]) -> None:
    if "failure" in run:
        pytest.fail(str(run["failure"]), pytrace=False)


def test_guest_to_host_messages_arrive_whole_and_in_order(seq_run: dict[str, object]) -> None:
    _check(seq_run)
    host = seq_run["host_received"]
    assert isinstance(host, SeqResult)
    guest = _line(seq_run, r"DH SEQSEND port=\d+ n=(?P<n>\d+) bytes=(?P<bytes>\d+) "
                  r"crc=(?P<crc>[0-9a-f]+)")  # fmt: skip
    assert (host.count, host.good, host.first_bad) == (MESSAGES, MESSAGES, None), host
    assert int(guest["n"]) == MESSAGES and int(guest["bytes"]) == host.total_bytes
    assert int(guest["crc"], 16) == host.crc


def test_host_to_guest_messages_arrive_whole_and_in_order(seq_run: dict[str, object]) -> None:
    _check(seq_run)
    assert seq_run["ok_line"] == b"OK 1073741824\n"
    host = seq_run["host_sent"]
    assert isinstance(host, SeqResult)
    guest = _line(seq_run, r"DH SEQRECV port=\d+ n=(?P<n>\d+) good=(?P<good>\d+) "
                  r"bytes=(?P<bytes>\d+) crc=(?P<crc>[0-9a-f]+) first_bad=(?P<first_bad>-?\d+)")
    assert (int(guest["n"]), int(guest["good"]), int(guest["first_bad"])) == (
        MESSAGES, MESSAGES, -1), guest  # fmt: skip
    assert int(guest["bytes"]) == host.total_bytes and int(guest["crc"], 16) == host.crc


def test_stream_alongside_stays_intact(seq_run: dict[str, object]) -> None:
    _check(seq_run)
    stream = seq_run["stream"]
    assert isinstance(stream, ReceivedData)
    assert stream.length == STREAM_LEN and stream.intact
    assert stream.crc == zlib.crc32(pattern(STREAM_SEED, STREAM_LEN))
    guest = _line(seq_run, r"DH SEND port=\d+ sent=(?P<sent>\d+) sent_crc=\S+ recv=(?P<recv>\d+)")
    assert (int(guest["sent"]), int(guest["recv"])) == (STREAM_LEN, 4)
    # The stream ran while messages moved: the transfers overlap in time.
    for messages in (seq_run["host_received"], seq_run["host_sent"]):
        assert isinstance(messages, SeqResult)
        assert stream.first_byte_at < messages.done_at and stream.done_at > messages.first_at


def test_guest_powers_off_cleanly(seq_run: dict[str, object]) -> None:
    _check(seq_run)
    assert seq_run["exit"] == 0, seq_run["console"]


def test_guest_kernel_has_seqpacket_and_msg_eor(guest_image: GuestImage) -> None:
    """SOCK_SEQPACKET vsock needs Linux 5.14, MSG_EOR 5.16; Debian's cloud kernel is newer."""
    match = re.match(r"(\d+)\.(\d+)", guest_image.kernel_release)
    assert match is not None, guest_image.kernel_release
    assert (int(match.group(1)), int(match.group(2))) >= (5, 16), guest_image.kernel_release
