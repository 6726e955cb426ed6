"""The control socket: framing and decoding (hostile input, fuzzed), the socket file's mode, peer
checks, limits, and a host answering ``inspect``."""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devicehost import ConfigError, DeviceContext, LocalOffer, control, hookimpl
from devicehost.control import (
    MAX_REQUEST,
    ControlError,
    ControlRequest,
    ControlServer,
    bind_owner_only,
    decode_reply_untrusted,
    decode_request_untrusted,
    encode_frame,
)
from devicehost.host import Host
from devicehost.testing import host_with


class Local:
    def __init__(self, config: Any) -> None:
        pass

    @hookimpl
    def offer(self, ctx: DeviceContext) -> LocalOffer:
        return LocalOffer({"where": "here"})

    @hookimpl
    def open(self, ctx: DeviceContext, resources: Any) -> dict[str, int]:
        return {"count": 7}

    @hookimpl
    def run(self, ctx: DeviceContext, runner: dict[str, int]) -> Any:
        return anyio.sleep_forever()

    @hookimpl
    def inspect(self, ctx: DeviceContext, runner: dict[str, int] | None) -> dict[str, Any]:
        return {"count": runner["count"] if runner else None}


# -- the wire (pure) -------------------------------------------------------------------------------


def _payload(value: Any) -> bytes:
    return json.dumps(value).encode()


def test_request_round_trip() -> None:
    frame = encode_frame({"version": 1, "command": "inspect", "args": {"x": 1}})
    (length,) = struct.unpack(">I", frame[:4])
    assert length == len(frame) - 4
    assert decode_request_untrusted(frame[4:]) == ControlRequest("inspect", {"x": 1})


@pytest.mark.parametrize(
    ("payload", "blame"),
    [
        (b"\xff", "the peer sent invalid JSON"),
        (b"[" * 100_000, "the peer sent invalid JSON"),
        (_payload([1]), "the peer sent list, not an object"),
        (_payload({"command": "inspect"}), "protocol version None"),
        (_payload({"version": True, "command": "inspect"}), "protocol version True"),
        (_payload({"version": 2, "command": "inspect"}), "protocol version 2"),
        (_payload({"version": 1}), "no command name"),
        (_payload({"version": 1, "command": "x" * 65}), "no command name"),
        (_payload({"version": 1, "command": "reboot"}), "unknown command 'reboot'"),
        (_payload({"version": 1, "command": "inspect", "args": []}), "'args' that is not"),
        (_payload({"version": 1, "command": "inspect", "extra": 1}), "unknown keys ['extra']"),
    ],
)
def test_hostile_requests_are_control_errors_blaming_the_peer(payload: bytes, blame: str) -> None:
    with pytest.raises(ControlError, match=blame.replace("[", r"\[").replace("]", r"\]")):
        decode_request_untrusted(payload)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=200),
                 st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=10),
                              lambda inner: st.lists(inner, max_size=4)
                              | st.dictionaries(st.text(max_size=8), inner, max_size=4)
                              ).map(lambda v: json.dumps(v).encode())))
def test_decoding_any_bytes_raises_only_control_error(payload: bytes) -> None:
    for decode in (decode_request_untrusted, decode_reply_untrusted):
        with suppress(ControlError):
            decode(payload)


def test_replies() -> None:
    assert decode_reply_untrusted(_payload({"version": 1, "ok": True, "result": [1]})) == [1]
    with pytest.raises(ControlError, match="the host refused: no"):
        decode_reply_untrusted(_payload({"version": 1, "ok": False, "error": "no"}))
    with pytest.raises(ControlError, match="without a result"):
        decode_reply_untrusted(_payload({"version": 1, "ok": True}))
    with pytest.raises(ControlError, match="without a boolean 'ok'"):
        decode_reply_untrusted(_payload({"version": 1, "ok": 1}))


def test_a_frame_over_the_limit_is_refused() -> None:
    with pytest.raises(ControlError, match="exceeds the limit of 10"):
        encode_frame({"version": 1, "command": "inspect"}, limit=10)


# -- the socket file ------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o000, 0o022])
def test_the_socket_is_owner_only_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        sock = bind_owner_only(tmp_path / "c.sock")
    finally:
        os.umask(old)
    try:
        mode = os.stat(tmp_path / "c.sock").st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
        assert sorted(p.name for p in tmp_path.iterdir()) == ["c.sock"]  # no staging left
    finally:
        sock.close()


def test_a_long_path_is_bound_in_place_and_still_owner_only(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * max(1, 100 - len(str(tmp_path)) - 4))
    deep.mkdir()
    path = deep / "c"
    assert len(str(path)) <= 107 < len(str(path.parent / ".dhcXXXXXXXX/s"))
    sock = bind_owner_only(path)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    finally:
        sock.close()


def test_stale_live_and_foreign_files(tmp_path: Path) -> None:
    stale = tmp_path / "stale.sock"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(stale))
    dead.close()
    bind_owner_only(stale).close()  # a leftover socket is replaced
    live = bind_owner_only(tmp_path / "live.sock")
    try:
        with pytest.raises(ConfigError) as info:
            bind_owner_only(tmp_path / "live.sock")
        assert info.value.key == "control_socket"
        assert "another process serves this control socket" in str(info.value)
    finally:
        live.close()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="exists and is not a socket"):
        bind_owner_only(tmp_path / "file")
    with pytest.raises(ConfigError, match="does not exist"):
        bind_owner_only(tmp_path / "nodir" / "c.sock")


# -- a host answering -----------------------------------------------------------------------------


@asynccontextmanager
async def serving(tmp_path: Path) -> AsyncIterator[tuple[Host, ControlServer]]:
    async with host_with({"local": Local}) as host, anyio.create_task_group() as tg:
        server = ControlServer(tmp_path / "c.sock")
        await tg.start(server.serve, host)
        try:
            yield host, server
        finally:
            tg.cancel_scope.cancel()


async def ask(path: Path, command: str = "inspect") -> Any:
    return await anyio.to_thread.run_sync(control.request, path, command)


@pytest.mark.anyio
async def test_inspect_answers_the_device_tree(tmp_path: Path) -> None:
    async with serving(tmp_path) as (_host, server):
        with anyio.fail_after(30):
            tree = await ask(server.path)
    (device,) = tree["devices"]
    assert (device["name"], device["plugin"], device["state"]) == ("local", "local", "running")
    assert device["offer"] == {"where": "here"}
    assert device["device"] == {"count": 7}
    assert device["transport"] == {"transport": "LocalTransport"}
    assert not server.path.exists(), "the socket file is removed when the server stops"


async def _raw(path: Path, data: bytes) -> bytes:
    def exchange() -> bytes:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(30)
            sock.connect(str(path))
            received = b""
            try:
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)  # the peer says no more: a cut frame ends at once
                while chunk := sock.recv(65536):
                    received += chunk
            except (ConnectionResetError, BrokenPipeError):
                pass  # closed before or with our request unread: a refusal too
            return received

    return await anyio.to_thread.run_sync(exchange)


@pytest.mark.anyio
async def test_hostile_peers_end_only_their_connection(tmp_path: Path) -> None:
    async with serving(tmp_path) as (_host, server):
        with anyio.fail_after(30):
            # Announcing more than the limit: closed at once, nothing read, no reply.
            assert await _raw(server.path, struct.pack(">I", MAX_REQUEST + 1)) == b""
            # Garbage: one error reply, then closed.
            reply = await _raw(server.path, struct.pack(">I", 3) + b"{{{")
            (length,) = struct.unpack(">I", reply[:4])
            assert len(reply) == 4 + length
            with pytest.raises(ControlError, match="the host refused: the peer sent invalid"):
                decode_reply_untrusted(reply[4:])
            # A frame cut short by the peer closing: no reply.
            assert await _raw(server.path, struct.pack(">I", 10) + b"{") == b""
            # Each of them ended its own connection only (the host closed it: no count left) ...
            assert server.connections == 0
            # ... and the host still answers.
            assert (await ask(server.path))["failures"] == {}


@pytest.mark.anyio
async def test_a_peer_of_another_user_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(control, "_peer_uid", lambda conn: 4242 if os.geteuid() != 4242 else 4243)
    async with serving(tmp_path) as (_host, server):
        with anyio.fail_after(30):
            frame = encode_frame({"version": 1, "command": "inspect"})
            assert await _raw(server.path, frame) == b""
        assert server.refused == 1


@pytest.mark.anyio
async def test_the_accept_loop_survives_running_out_of_descriptors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = control.bind_owner_only
    failures = iter([errno.EMFILE, errno.ENFILE])

    class Exhausted(socket.socket):
        def accept(self) -> tuple[socket.socket, Any]:
            code = next(failures, None)
            if code is not None:
                raise OSError(code, os.strerror(code))
            return super().accept()

    def flaky(path: Any) -> socket.socket:
        sock = real(path)
        return Exhausted(fileno=sock.detach())

    monkeypatch.setattr(control, "bind_owner_only", flaky)
    async with serving(tmp_path) as (_host, server):
        with anyio.fail_after(30):
            assert (await ask(server.path))["failures"] == {}


@pytest.mark.anyio
async def test_a_silent_peer_is_closed_after_the_idle_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(control, "IDLE_TIMEOUT", 0.2)

    def silent(path: Path) -> bytes:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(30)
            sock.connect(str(path))
            return sock.recv(1)  # b"" once the host gives up on it

    async with serving(tmp_path) as (_host, server):
        with anyio.fail_after(30):
            assert await anyio.to_thread.run_sync(silent, server.path) == b""
            assert (await ask(server.path))["failures"] == {}
