"""The vmbfs device: config, saved state, and the lifecycle hooks (facts §8.1, §8.8).

Configuration (``[devices.<name>]`` table, plugin ``vmbfs``):

- ``file = "/path/to/hive"``: serve that one file as ``/<name>`` (the IMC hive backing);
- ``root = "/path/to/dir"``: serve that directory tree read-only;
- neither: serve a fresh, empty temporary directory (so ``devicehost run`` with no config works;
  the guest sees an empty root). Both at once is a :class:`devicehost.ConfigError`.
- ``name`` (default ``imc.hiv``): the file name the single-file backing answers to.
- ``instance_id`` (default: the IMC instance, facts §8.1): the VMBus instance id offered, so that
  one VMBus can carry several vmbfs devices (e.g. ``c63c9bdf-5fa5-4208-b03f-6b458b365592``, the
  boot instance). A malformed GUID is a :class:`devicehost.ConfigError`.
"""

from __future__ import annotations

import tempfile
import weakref
from collections.abc import Awaitable
from typing import Any

import attrs

from devicehost import ConfigError, DeviceContext, hookimpl
from devicehost.savedstate import saved_state
from devicehost.vmbus import Guid
from devicehost_vmbfs.backing import Backing
from devicehost_vmbfs.core import ProtocolState, VmbfsCore
from devicehost_vmbfs.directory import DirectoryBacking
from devicehost_vmbfs.protocol import IMC_INSTANCE_ID, INTERFACE_ID, INTERFACE_NAME
from devicehost_vmbfs.runner import VmbfsRunner
from devicehost_vmbfs.single_file import InvalidFileName, SingleFileBacking

__all__ = ["VmbfsConfig", "VmbfsDevice", "VmbfsSavedState"]


@attrs.frozen
class VmbfsConfig:
    """What to serve: exactly one of ``file`` and ``root``, or neither (empty temp directory)."""

    file: str = ""
    root: str = ""
    name: str = "imc.hiv"
    instance_id: str = ""


@saved_state("vmbfs.SavedState", 1)
@attrs.frozen
class VmbfsSavedState:
    """The saved state of an open vmbfs channel (``vmbfs.SavedState`` version 1): only its
    protocol state, VERSION_REQUEST or READY (saved by value: ``"version_request"``/``"ready"``).

    The pipe is rebuilt over the restored channel's rings, whose contents live in guest memory.
    Whether processing had stopped after a fatal error is not saved (as upstream, where the
    task's done flag is not part of the state): a restored channel processes again.
    """

    state: ProtocolState = attrs.field(validator=attrs.validators.instance_of(ProtocolState))


def _backing_for(config: VmbfsConfig) -> tuple[Backing, tempfile.TemporaryDirectory[str] | None]:
    """The backing ``config`` asks for; a :class:`ConfigError` naming the key and value that
    cannot be served (the host adds the config file and the device)."""
    if config.file and config.root:
        raise ConfigError("set either 'file' or 'root', not both", key="root", value=config.root)
    if config.file:
        try:
            return SingleFileBacking.open(config.name, config.file), None
        except InvalidFileName as exc:
            raise ConfigError(str(exc), key="name", value=config.name) from exc
        except OSError as exc:
            raise ConfigError(f"cannot be served: {exc.strerror or exc}", key="file",
                              value=config.file) from exc
    if config.root:
        try:
            return DirectoryBacking.open(config.root), None
        except OSError as exc:
            raise ConfigError(f"cannot be served: {exc.strerror or exc}", key="root",
                              value=config.root) from exc
    scratch = tempfile.TemporaryDirectory(prefix="devicehost-vmbfs-")
    return DirectoryBacking.open(scratch.name), scratch


def _instance_id(text: str) -> Guid:
    if not text:
        return IMC_INSTANCE_ID
    try:
        return Guid.parse(text)
    except ValueError as exc:
        raise ConfigError(f"vmbfs: 'instance_id' {text!r} is not a GUID: {exc}") from None


class VmbfsDevice:
    """Offers the IMC instance of vmbfs and serves its backing over a message pipe."""

    config_class = VmbfsConfig

    def __init__(self, config: VmbfsConfig | None = None) -> None:
        self.config = config if config is not None else VmbfsConfig()
        self.instance_id = _instance_id(self.config.instance_id)
        self.backing, self._scratch = _backing_for(self.config)
        closer = getattr(self.backing, "close", None)
        if closer is not None:
            weakref.finalize(self, closer)

    def _runner(self, resources: Any, state: ProtocolState) -> VmbfsRunner:
        from devicehost.vmbus import MessagePipe

        return VmbfsRunner(MessagePipe(resources.channel), VmbfsCore(self.backing, state))

    @hookimpl
    def offer(self, ctx: DeviceContext) -> Any:
        from devicehost.vmbus import DeviceChannel, OfferParams

        return OfferParams(
            interface_name=INTERFACE_NAME,
            instance_id=self.instance_id,
            interface_id=INTERFACE_ID,
            channel_type=DeviceChannel(pipe_packets=True),
        )

    @hookimpl
    def open(self, ctx: DeviceContext, resources: Any) -> VmbfsRunner:
        return self._runner(resources, ProtocolState.VERSION_REQUEST)

    @hookimpl
    def run(self, ctx: DeviceContext, runner: VmbfsRunner) -> Awaitable[None]:
        return runner.run(ctx.logger)

    @hookimpl
    def close(self, ctx: DeviceContext, runner: VmbfsRunner, subchannel_index: int) -> None:
        # The pipe does not own the channel (the transport does); nothing else was acquired.
        return None

    @hookimpl
    def save_open(self, ctx: DeviceContext, runner: VmbfsRunner) -> VmbfsSavedState:
        return VmbfsSavedState(state=runner.state)

    @hookimpl
    def restore_open(
        self, ctx: DeviceContext, state: VmbfsSavedState, resources: Any
    ) -> VmbfsRunner:
        return self._runner(resources, state.state)

    @hookimpl
    def inspect(self, ctx: DeviceContext, runner: VmbfsRunner | None) -> dict[str, Any]:
        tree: dict[str, Any] = {"backing": self.backing.describe()}
        if runner is not None:
            tree.update(runner.inspect())
        return tree
