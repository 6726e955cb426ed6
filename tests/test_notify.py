"""sd_notify: addresses, messages on a datagram socket the test binds, and best effort."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from devicehost.notify import Notifier, notify_address


def test_addresses() -> None:
    assert notify_address("/run/systemd/notify") == "/run/systemd/notify"
    assert notify_address("@sd-notify") == b"\0sd-notify"
    for bad in ("relative/path", "@", "/" + "x" * 200, "@" + "x" * 200):
        with pytest.raises(ValueError):
            notify_address(bad)


def test_messages_arrive_as_one_datagram_each(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(str(path))
        receiver.settimeout(30)
        notifier = Notifier({"NOTIFY_SOCKET": str(path)})
        assert notifier.enabled
        assert notifier.ready("serving 2 of 2\ndevices")
        assert receiver.recv(4096) == b"READY=1\nSTATUS=serving 2 of 2 devices"
        assert notifier.status("x" * 500)
        status = receiver.recv(4096).decode()
        assert status.startswith("STATUS=xxx") and status.endswith("...") and len(status) == 207
        assert notifier.stopping("stopping")
        assert receiver.recv(4096) == b"STOPPING=1\nSTATUS=stopping"


def test_abstract_socket() -> None:
    name = f"devicehost-notify-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(b"\0" + name.encode())
        receiver.settimeout(30)
        assert Notifier({"NOTIFY_SOCKET": f"@{name}"}).ready("ok")
        assert receiver.recv(4096) == b"READY=1\nSTATUS=ok"


def test_without_a_socket_nothing_is_sent_and_nothing_fails(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert not Notifier({}).enabled and not Notifier({}).ready("x")
    with caplog.at_level("WARNING"):
        assert not Notifier({"NOTIFY_SOCKET": "relative"}).enabled
        gone = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody")})
        assert not gone.ready("x") and not gone.stopping("x")
    warnings = [r.getMessage() for r in caplog.records]
    assert any("neither an absolute path nor an @abstract name" in w for w in warnings)
    assert sum("cannot notify the service manager" in w for w in warnings) == 1  # said once
