"""The running host's control socket: ``[host] control_socket = PATH`` and ``devicehost inspect``.

Protocol (version 1), over an ``AF_UNIX`` stream socket; see ``docs/service.md``::

    frame    = length:u32 big-endian, then `length` bytes of UTF-8 JSON holding one object
    request  = {"version": 1, "command": NAME, "args": {...}}      ("args" optional)
    reply    = {"version": 1, "ok": true, "result": ANY}
             | {"version": 1, "ok": false, "error": "one line"}

A connection carries any number of request/reply pairs, one at a time; the host closes it after a
reply with ``"ok": false`` caused by a malformed request, and after :data:`IDLE_TIMEOUT` seconds
without a complete request. Commands: ``inspect`` (the device tree,
:func:`devicehost.endpoints.host_tree`). A command is an entry of :data:`COMMANDS`: an async
handler given the host, the decoded request and the connected socket, so that a later command
such as ``takeover`` (live servicing) can send file descriptors with ``SCM_RIGHTS`` on the same
connection after its reply.

Security: everything that arrives is hostile. The socket is created owner-only (mode 0600) without
depending on the umask: bound inside a fresh mode-0700 directory beside the target, then renamed
into place (when that temporary path would be too long for a socket address, it is bound in place
and chmod'ed before it listens). Every peer is checked with ``SO_PEERCRED``: only the host's own
uid and root are served. Requests are limited to :data:`MAX_REQUEST` bytes, replies to
:data:`MAX_REPLY`, connections to :data:`MAX_CONNECTIONS` at once; a peer's failure ends only its
connection; running out of file descriptors while accepting pauses the accept loop, never the host.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import struct
import tempfile
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import anyio
import anyio.abc
import attrs

from devicehost.accepting import AcceptBackoff, accept_socket
from devicehost.errors import ConfigError, DeviceHostError

if TYPE_CHECKING:
    from devicehost.host import Host

__all__ = [
    "COMMANDS",
    "IDLE_TIMEOUT",
    "MAX_CONNECTIONS",
    "MAX_REPLY",
    "MAX_REQUEST",
    "PROTOCOL_VERSION",
    "REPLIED",
    "ControlError",
    "ControlRequest",
    "ControlServer",
    "bind_owner_only",
    "decode_reply_untrusted",
    "decode_request_untrusted",
    "encode_frame",
    "request",
]

log = logging.getLogger("devicehost.control")

PROTOCOL_VERSION: Final = 1
#: The largest request frame (payload bytes) the host reads.
MAX_REQUEST: Final = 64 * 1024
#: The largest reply frame the host sends and the client reads.
MAX_REPLY: Final = 16 * 1024 * 1024
#: Seconds a connection may take to send one complete request.
IDLE_TIMEOUT: Final = 10.0
#: Connections served at once; more are closed at accept.
MAX_CONNECTIONS: Final = 8
_MAX_COMMAND: Final = 64
_MAX_SUN_PATH: Final = 107
# Byte layout of a frame header: payload length, u32 big-endian.
_HEADER: Final = struct.Struct(">I")
# struct ucred (SO_PEERCRED): pid, uid, gid as C ints.
_UCRED: Final = struct.Struct("3i")


class ControlError(DeviceHostError):
    """Raised when a control-socket message is malformed or too large, or no host answers; the
    message says which side is to blame."""


@attrs.frozen
class ControlRequest:
    """A decoded request: its command name and arguments."""

    command: str
    args: Mapping[str, Any] = attrs.field(factory=dict)


def encode_frame(value: Mapping[str, Any], limit: int = MAX_REPLY) -> bytes:
    """One frame holding ``value`` as JSON; ControlError if it exceeds ``limit`` bytes."""
    payload = json.dumps(value, separators=(",", ":"), default=str).encode()
    if len(payload) > limit:
        raise ControlError(f"a message of {len(payload)} bytes exceeds the limit of {limit}")
    return _HEADER.pack(len(payload)) + payload


def _decode_object_untrusted(payload: bytes, who: str) -> dict[str, Any]:
    try:
        value = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ControlError(f"{who} sent invalid JSON: {type(exc).__name__}") from exc
    if not isinstance(value, dict):
        raise ControlError(f"{who} sent {type(value).__name__}, not an object")
    version = value.get("version")
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise ControlError(f"{who} speaks protocol version {version!r}, not {PROTOCOL_VERSION}")
    return value


def decode_request_untrusted(payload: bytes) -> ControlRequest:
    """A request frame's payload as a :class:`ControlRequest`; ControlError blaming the peer."""
    value = _decode_object_untrusted(payload, "the peer")
    unknown = set(value) - {"version", "command", "args"}
    if unknown:
        raise ControlError(f"the peer sent unknown keys {sorted(unknown)[:5]!r}")
    command = value.get("command")
    if not isinstance(command, str) or not 0 < len(command) <= _MAX_COMMAND:
        raise ControlError("the peer sent no command name (a string of 1..64 characters)")
    if command not in COMMANDS:
        raise ControlError(f"unknown command {command[:_MAX_COMMAND]!r}; known: "
                           f"{', '.join(sorted(COMMANDS))}")
    args = value.get("args", {})
    if not isinstance(args, dict):
        raise ControlError("the peer sent 'args' that is not an object")
    return ControlRequest(command, args)


def decode_reply_untrusted(payload: bytes) -> Any:
    """A reply frame's result; ControlError if the host refused or sent something malformed."""
    value = _decode_object_untrusted(payload, "the host")
    ok = value.get("ok")
    if ok is True:
        if "result" not in value:
            raise ControlError("the host sent a successful reply without a result")
        return value["result"]
    if ok is False:
        error = value.get("error")
        raise ControlError(f"the host refused: {str(error)[:500]}")
    raise ControlError("the host sent a reply without a boolean 'ok'")


# -- commands -------------------------------------------------------------------------------------

Handler = Callable[["Host", ControlRequest, socket.socket], Awaitable[Any]]


async def _inspect(host: Host, request: ControlRequest, conn: socket.socket) -> Any:
    from devicehost.endpoints import host_tree

    return await host_tree(host)


async def _takeover(host: Host, request: ControlRequest, conn: socket.socket) -> Any:
    from devicehost.takeover import serve_takeover

    await serve_takeover(host, request.args, conn)
    return REPLIED


#: A handler's result that means "the handler replied itself; close the connection".
REPLIED: Final = object()

#: Command name -> handler. A handler's return value is the reply's ``result`` (JSON-able);
#: it may use the connection afterwards (e.g. to pass fds); exceptions become error replies.
#: ``takeover``: live servicing (:mod:`devicehost.takeover`, ``docs/servicing.md``).
COMMANDS: Final[dict[str, Handler]] = {"inspect": _inspect, "takeover": _takeover}


# -- the socket file ------------------------------------------------------------------------------


def _check_target(path: Path) -> None:
    """Remove a stale socket at ``path``; ConfigError if it is in use or not a socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"control_socket {os.fspath(path)!r} exists and is not a socket",
                          key="control_socket", value=os.fspath(path))
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.connect(os.fspath(path))
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)  # stale: nobody listens
        return
    except OSError:
        return
    finally:
        probe.close()
    raise ConfigError("another process serves this control socket", key="control_socket",
                      value=os.fspath(path))


def bind_owner_only(path: str | os.PathLike[str]) -> socket.socket:
    """A listening ``AF_UNIX`` stream socket at ``path``, mode 0600 whatever the umask.

    ConfigError (key ``control_socket``) if the directory is missing, the path too long, or
    another process serves it; a stale socket file is replaced.
    """
    target = Path(path)
    if len(os.fsencode(target)) > _MAX_SUN_PATH:
        raise ConfigError(f"longer than the {_MAX_SUN_PATH} bytes a socket path may have",
                          key="control_socket", value=os.fspath(target))
    if not target.parent.is_dir():
        raise ConfigError(f"its directory {os.fspath(target.parent)!r} does not exist",
                          key="control_socket", value=os.fspath(target))
    _check_target(target)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        private = tempfile.mkdtemp(prefix=".dhc", dir=target.parent)  # mode 0700
        try:
            staged = os.path.join(private, "s")
            if len(os.fsencode(staged)) <= _MAX_SUN_PATH:
                sock.bind(staged)
                os.chmod(staged, 0o600)
                os.rename(staged, target)
            else:
                sock.bind(os.fspath(target))
                os.chmod(target, 0o600)
        finally:
            os.rmdir(private)
        sock.listen(MAX_CONNECTIONS)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen: {exc.strerror or exc}", key="control_socket",
                          value=os.fspath(target)) from exc
    except BaseException:
        sock.close()
        raise
    return sock


def _peer_uid(conn: socket.socket) -> int:
    _pid, uid, _gid = _UCRED.unpack(
        conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return int(uid)


# -- the server -----------------------------------------------------------------------------------


class ControlServer:
    """Serves :data:`COMMANDS` for a host on the control socket at ``path``.

    :meth:`bind` creates the socket (ConfigError if it cannot: call it before serving anything);
    :meth:`serve` accepts until cancelled and removes the socket file on the way out.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.connections = 0
        self.refused = 0
        self._listener: socket.socket | None = None
        self._inode: int | None = None

    def bind(self) -> None:
        """Create the listening socket (see :func:`bind_owner_only`)."""
        if self._listener is None:
            self._listener = bind_owner_only(self.path)
            self._inode = os.stat(self.path).st_ino

    @property
    def listener(self) -> socket.socket | None:
        """The listening socket (None before :meth:`bind`), e.g. to hand it to a new process."""
        return self._listener

    def adopt(self, listener: socket.socket) -> None:
        """Serve on ``listener``, a listening socket at :attr:`path` that a predecessor handed
        over (live servicing), instead of binding one."""
        listener.setblocking(False)
        self._listener = listener
        self._inode = os.stat(self.path).st_ino

    def release(self) -> None:
        """Keep the socket file when the socket closes: a successor serves on it now."""
        self._inode = None

    def close(self) -> None:
        """Close the socket and remove its file (if it is still ours)."""
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            self._unlink()

    async def serve(self, host: Host, *,
                    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve ``host`` until cancelled (binding first if :meth:`bind` was not called)."""
        self.bind()
        assert self._listener is not None
        try:
            task_status.started()
            async with anyio.create_task_group() as tg:
                await self._accept_loop(host, self._listener, tg)
        finally:
            self.close()

    def _unlink(self) -> None:
        try:
            if self._inode is not None and os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except OSError:
            pass

    async def _accept_loop(self, host: Host, listener: socket.socket,
                           tg: anyio.abc.TaskGroup) -> None:
        # Running out of descriptors pauses accepting (devicehost.accepting), never the host.
        backoff = AcceptBackoff("control socket", log)
        while True:
            conn = await accept_socket(listener, backoff)
            conn.setblocking(False)
            if not self._admit(conn):
                conn.close()
                continue
            self.connections += 1
            tg.start_soon(self._serve_connection, host, conn)

    def _admit(self, conn: socket.socket) -> bool:
        if self.connections >= MAX_CONNECTIONS:
            self.refused += 1
            return False
        try:
            uid = _peer_uid(conn)
        except OSError:
            return False
        if uid not in (os.geteuid(), 0):
            self.refused += 1
            log.warning("control socket: refused a peer with uid %d", uid)
            return False
        return True

    async def _serve_connection(self, host: Host, conn: socket.socket) -> None:
        try:
            while True:
                with anyio.move_on_after(IDLE_TIMEOUT) as scope:
                    payload = await _read_frame(conn, MAX_REQUEST, "the peer")
                if scope.cancelled_caught or payload is None:
                    return
                try:
                    req = decode_request_untrusted(payload)
                except ControlError as exc:
                    await _send_all(conn, _error_frame(str(exc)))
                    return
                try:
                    result = await COMMANDS[req.command](host, req, conn)
                    if result is REPLIED:
                        return
                    frame = encode_frame({"version": PROTOCOL_VERSION, "ok": True,
                                          "result": result})
                except Exception as exc:  # the host's own failure: reported, never raised
                    log.warning("control socket: %s failed: %s", req.command, exc)
                    frame = _error_frame(f"{req.command} failed: {type(exc).__name__}: {exc}")
                await _send_all(conn, frame)
        except (ControlError, OSError) as exc:
            log.debug("control socket: connection ended: %s", exc)
        finally:
            self.connections -= 1
            conn.close()


def _error_frame(message: str) -> bytes:
    return encode_frame({"version": PROTOCOL_VERSION, "ok": False, "error": message[:1000]})


async def _recv_exactly(conn: socket.socket, count: int) -> bytes | None:
    """``count`` bytes, or None on EOF before the first byte; ControlError on a cut frame."""
    data = bytearray()
    while len(data) < count:
        try:
            chunk = conn.recv(min(count - len(data), 65536))
        except (BlockingIOError, InterruptedError):
            await anyio.wait_readable(conn)
            continue
        if not chunk:
            if data:
                raise ControlError("the peer closed the connection inside a frame")
            return None
        data += chunk
    return bytes(data)


async def _read_frame(conn: socket.socket, limit: int, who: str) -> bytes | None:
    header = await _recv_exactly(conn, _HEADER.size)
    if header is None:
        return None
    (length,) = _HEADER.unpack(header)
    if length > limit:
        raise ControlError(f"{who} announced a frame of {length} bytes, over the limit of {limit}")
    payload = await _recv_exactly(conn, length)
    if payload is None:
        raise ControlError(f"{who} closed the connection inside a frame")
    return payload


async def _send_all(conn: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            sent = conn.send(view)
        except (BlockingIOError, InterruptedError):
            await anyio.wait_writable(conn)
            continue
        view = view[sent:]


# -- the client (``devicehost inspect``) ----------------------------------------------------------


def _recv_blocking(sock: socket.socket, count: int) -> bytes:
    data = bytearray()
    while len(data) < count:
        chunk = sock.recv(min(count - len(data), 1 << 20))
        if not chunk:
            raise ControlError("the host closed the connection before its reply was complete")
        data += chunk
    return bytes(data)


def request(path: str | os.PathLike[str], command: str, args: Mapping[str, Any] | None = None,
            *, timeout: float = 30.0) -> Any:
    """Send one request to the host at ``path`` and return its result (blocking).

    ControlError if no host answers there, it refuses, or its reply is malformed.
    """
    message: dict[str, Any] = {"version": PROTOCOL_VERSION, "command": command}
    if args:
        message["args"] = dict(args)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(os.fspath(path))
            sock.sendall(encode_frame(message, MAX_REQUEST))
            (length,) = _HEADER.unpack(_recv_blocking(sock, _HEADER.size))
            if length > MAX_REPLY:
                raise ControlError(f"the host announced a reply of {length} bytes, over the limit"
                                   f" of {MAX_REPLY}")
            payload = _recv_blocking(sock, length)
        except TimeoutError as exc:
            raise ControlError(f"{os.fspath(path)}: the host did not answer within {timeout} s"
                               ) from exc
        except OSError as exc:
            raise ControlError(f"{os.fspath(path)}: no host answers: {exc.strerror or exc}"
                               ) from exc
    return decode_reply_untrusted(payload)
