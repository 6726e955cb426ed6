"""The vmbfs client device: intercepts the vmbfs IMC offer and reads files from it.

A VMBus *client* device (plugin ``vmbfs-client``; needs ``devicehost-intercept``): its ``offer``
claims the IMC instance (facts §8.1) and opens offers of the vmbfs interface; over the opened
channel it negotiates the version, asks each configured path's size and reads it in ``chunk``
byte reads, keeping each file's bytes and SHA-256 on the runner (:attr:`VmbfsReadRunner.files`).
When every path is read, ``run`` idles until it is stopped (the channel stays open).

Configuration (``[devices.<name>]``, plugin ``vmbfs-client``):

- ``paths`` (default ``["/imc.hiv"]``): the files to read, in order;
- ``chunk`` (default 12276 = MAX_READ_SIZE): bytes per READ_FILE, 1..12276;
- ``max_bytes`` (default 2 MiB = 2097152, at most 8 MiB): the most bytes kept (and saved) over
  all files; a file that does not fit fails the device with one error line naming the file, its
  size and ``max_bytes`` (``devicehost run`` then exits non-zero at the stop).

Save/restore (the wrapper closes the channel on every stop; facts §10.4): ``save_open`` saves
the progress — the files read so far, the index of the file being read, the bytes of it read so
far — bounded by ``max_bytes``. ``restore_open`` runs over a *new* channel whose server side was
closed and reopened fresh, so it negotiates the version again, asks the current file's size
again and continues reading from the saved offset.

The protocol driver is a pure core (:class:`VmbfsReader`: ``next_request``/``sent``/
``handle_reply``); the runner's loop only sends and receives, and is cancel-safe: a request is
marked sent only once it is in the ring (no await between), and a reply that was waited for when
a stop came is awaited again by the next ``run`` (never sent twice, never lost).
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Awaitable, Iterable
from typing import Any, ClassVar, Final

import anyio
import attrs

from devicehost import ConfigError, DeviceContext, hookimpl
from devicehost.savedstate import saved_state
from devicehost_vmbfs.client import (
    VmbfsClientError,
    check_version_reply,
    data_from_reply,
    file_info_from_reply,
)
from devicehost_vmbfs.protocol import (
    IMC_INSTANCE_ID,
    INTERFACE_ID,
    MAX_MESSAGE_SIZE,
    MAX_READ_SIZE,
    VERSION_WIN10,
    encode_get_file_info_request,
    encode_read_file_request,
    encode_version_request,
)
from devicehost_vmbfs.receive import receive_message, send_message

__all__ = [
    "ReadFile",
    "ReadPhase",
    "VmbfsClientConfig",
    "VmbfsClientDevice",
    "VmbfsClientSavedState",
    "VmbfsReadRunner",
    "VmbfsReader",
]

#: Data pages per ring the device asks the intercept wrapper for: the vmbfs server needs a
#: host-to-guest ring of at least 16 KiB to send its largest reply (facts §8.6 (a)).
RING_PAGES: Final = 4
_DEFAULT_MAX_BYTES: Final = 2 << 20
#: The largest ``max_bytes`` a config may set (everything read is kept in memory and saved).
MAX_KEPT_BYTES: Final = 8 << 20


def _check_chunk(_inst: object, _attr: attrs.Attribute[int], value: int) -> None:
    if not 1 <= value <= MAX_READ_SIZE:
        raise ConfigError(f"vmbfs-client: 'chunk' must be 1..{MAX_READ_SIZE}, not {value}")


def _to_paths(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(value)


def _check_paths(_inst: object, _attr: attrs.Attribute[tuple[str, ...]],
                 value: tuple[str, ...]) -> None:
    if not value:
        raise ConfigError("vmbfs-client: 'paths' names no file to read")
    for path in value:
        if not path or "\x00" in path:
            raise ConfigError(f"vmbfs-client: 'paths' holds an invalid path {path!r}")


def _check_max_bytes(_inst: object, _attr: attrs.Attribute[int], value: int) -> None:
    if not 0 <= value <= MAX_KEPT_BYTES:
        raise ConfigError(f"vmbfs-client: 'max_bytes' must be 0..{MAX_KEPT_BYTES}, not {value}")


@attrs.frozen
class VmbfsClientConfig:
    """Which files to read, in what chunk size, keeping at most ``max_bytes``."""

    paths: tuple[str, ...] = attrs.field(default=("/imc.hiv",), converter=_to_paths,
                                         validator=_check_paths)
    chunk: int = attrs.field(default=MAX_READ_SIZE, validator=_check_chunk)
    max_bytes: int = attrs.field(default=_DEFAULT_MAX_BYTES, validator=_check_max_bytes)


@attrs.frozen
class ReadFile:
    """A file read completely: its path and bytes."""

    path: str
    data: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


@saved_state("vmbfs.ClientSavedState", 1)
@attrs.frozen
class VmbfsClientSavedState:
    """The progress of a vmbfs client device (``vmbfs.ClientSavedState`` version 1): the files
    read, the index of the file being read and its bytes read so far."""

    done: tuple[ReadFile, ...]
    path_index: int
    received: bytes


class ReadPhase(enum.Enum):
    """What the reader asks next."""

    NEGOTIATE = "negotiate"
    INFO = "info"
    READ = "read"
    DONE = "done"


class VmbfsReader:
    """The pure request/reply driver of a vmbfs client device.

    ``next_request`` is the next request to send (None when every file is read); ``sent`` marks
    it in flight; ``handle_reply`` consumes its reply (raising :class:`VmbfsClientError` if the
    server refused or broke the protocol). Replies come in request order, one in flight.
    """

    def __init__(self, config: VmbfsClientConfig,
                 state: VmbfsClientSavedState | None = None) -> None:
        self.config = config
        self.done: list[ReadFile] = [] if state is None else list(state.done)
        self.path_index = 0 if state is None else state.path_index
        self.received = bytearray() if state is None else bytearray(state.received)
        if not 0 <= self.path_index <= len(config.paths) or len(self.done) != self.path_index:
            raise VmbfsClientError(
                f"saved progress (file {self.path_index}, {len(self.done)} done) does not fit "
                f"the configured {len(config.paths)} paths")
        self.phase = ReadPhase.NEGOTIATE
        self.size = 0
        self.in_flight = 0  # bytes asked by the READ_FILE in flight
        self.awaiting = False
        self.messages = 0

    @property
    def path(self) -> str:
        return self.config.paths[self.path_index]

    @property
    def kept(self) -> int:
        return sum(len(f.data) for f in self.done) + len(self.received)

    def next_request(self) -> bytes | None:
        if self.awaiting:
            raise RuntimeError("a request is already in flight")
        if self.phase is ReadPhase.NEGOTIATE:
            return encode_version_request(VERSION_WIN10)
        if self.phase is ReadPhase.INFO:
            return encode_get_file_info_request(self.path)
        if self.phase is ReadPhase.READ:
            offset = len(self.received)
            self.in_flight = min(self.config.chunk, self.size - offset)
            return encode_read_file_request(self.in_flight, offset, self.path)
        return None

    def sent(self) -> None:
        self.awaiting = True

    def handle_reply(self, reply: bytes) -> None:
        if not self.awaiting:
            raise VmbfsClientError("server sent a reply to no request")
        self.awaiting = False
        self.messages += 1
        if self.phase is ReadPhase.NEGOTIATE:
            check_version_reply(reply)
            self._next_file()
        elif self.phase is ReadPhase.INFO:
            info = file_info_from_reply(reply, self.path)
            if info.directory:
                raise VmbfsClientError(f"{self.path!r} is a directory")
            if info.file_size < len(self.received):
                raise VmbfsClientError(
                    f"{self.path!r} shrank to {info.file_size} bytes below the "
                    f"{len(self.received)} already read")
            budget = self.config.max_bytes - sum(len(f.data) for f in self.done)
            if info.file_size > budget:
                raise VmbfsClientError(
                    f"{self.path!r} has {info.file_size} bytes, more than the {budget} left of"
                    f" max_bytes = {self.config.max_bytes}; raise max_bytes in the device's"
                    f" config (at most {MAX_KEPT_BYTES})")
            self.size = info.file_size
            self.phase = ReadPhase.READ
            self._file_complete()
        elif self.phase is ReadPhase.READ:
            self.received += data_from_reply(reply, self.path, self.in_flight)
            self._file_complete()

    def _next_file(self) -> None:
        self.phase = ReadPhase.INFO if self.path_index < len(self.config.paths) else (
            ReadPhase.DONE)

    def _file_complete(self) -> None:
        if len(self.received) < self.size:
            return
        self.done.append(ReadFile(self.path, bytes(self.received)))
        self.received = bytearray()
        self.path_index += 1
        self._next_file()

    def save(self) -> VmbfsClientSavedState:
        return VmbfsClientSavedState(tuple(self.done), self.path_index, bytes(self.received))


class VmbfsReadRunner:
    """One open channel: its message pipe and the reader; ``finished`` is set once all is read."""

    def __init__(self, pipe: Any, reader: VmbfsReader) -> None:
        self.pipe = pipe
        self.reader = reader
        self.finished = anyio.Event()

    @property
    def files(self) -> list[ReadFile]:
        return self.reader.done

    async def run(self) -> None:
        reader = self.reader
        while True:
            if not reader.awaiting:
                request = reader.next_request()
                if request is None:
                    break
                await send_message(self.pipe, request)
                reader.sent()  # no await since the send: a stop cannot fall in between
            reply = await receive_message(self.pipe, MAX_MESSAGE_SIZE)
            reader.handle_reply(reply)
        self.finished.set()
        await anyio.sleep_forever()

    def inspect(self) -> dict[str, Any]:
        reader = self.reader
        return {
            "phase": reader.phase.value,
            "awaiting_reply": reader.awaiting,
            "files": [{"path": f.path, "size": len(f.data), "sha256": f.sha256}
                      for f in reader.done],
            "current": None if reader.phase is ReadPhase.DONE else {
                "path": reader.path, "read": len(reader.received), "size": reader.size},
        }


class VmbfsClientDevice:
    """Intercepts the vmbfs IMC channel and reads the configured files over it."""

    config_class = VmbfsClientConfig
    #: What the intercept wrapper reads: ring size, and the type a saved blob must have.
    intercept_ring_pages: ClassVar[int] = RING_PAGES
    saved_state_class: ClassVar[type] = VmbfsClientSavedState
    #: Not part of ``devicehost run``'s default config: which files to read is the operator's
    #: choice, and the default vmbfs device serves an empty directory.
    default_device: ClassVar[bool] = False

    def __init__(self, config: VmbfsClientConfig | None = None) -> None:
        self.config = config if config is not None else VmbfsClientConfig()

    def _runner(self, resources: Any, state: VmbfsClientSavedState | None) -> VmbfsReadRunner:
        from devicehost.vmbus import MessagePipe

        return VmbfsReadRunner(MessagePipe(resources.channel), VmbfsReader(self.config, state))

    @hookimpl
    def offer(self, ctx: DeviceContext, incoming: Any) -> Any:
        from devicehost.vmbus import InterceptClaim, OfferAction

        if incoming is None:
            return InterceptClaim(IMC_INSTANCE_ID)
        if incoming.offer.interface_id != INTERFACE_ID:
            ctx.logger.warning("vmbfs-client: instance %s offers interface %s, not vmbfs; "
                               "ignored", incoming.offer.instance_id, incoming.offer.interface_id)
            return OfferAction.IGNORE
        return OfferAction.OPEN

    @hookimpl
    def open(self, ctx: DeviceContext, resources: Any) -> VmbfsReadRunner:
        return self._runner(resources, None)

    @hookimpl
    def run(self, ctx: DeviceContext, runner: VmbfsReadRunner) -> Awaitable[None]:
        return runner.run()

    @hookimpl
    def close(self, ctx: DeviceContext, runner: VmbfsReadRunner, subchannel_index: int) -> None:
        return None  # the wrapper owns the channel and its memory

    @hookimpl
    def save_open(self, ctx: DeviceContext, runner: VmbfsReadRunner) -> VmbfsClientSavedState:
        return runner.reader.save()

    @hookimpl
    def restore_open(self, ctx: DeviceContext, state: VmbfsClientSavedState,
                     resources: Any) -> VmbfsReadRunner:
        runner = self._runner(resources, state)
        if runner.reader.kept > self.config.max_bytes:
            raise VmbfsClientError(
                f"saved progress holds {runner.reader.kept} bytes, more than max_bytes "
                f"({self.config.max_bytes})")
        return runner

    @hookimpl
    def inspect(self, ctx: DeviceContext, runner: VmbfsReadRunner | None) -> dict[str, Any]:
        tree: dict[str, Any] = {"paths": list(self.config.paths), "chunk": self.config.chunk}
        if runner is not None:
            tree.update(runner.inspect())
        return tree

