"""A serviceable virtio test device served over vhost-user: two streams with checksums.

Queue 0 (guest -> device): every chain's readable bytes are added to a running CRC-32 and a
byte count. Queue 1 (device -> guest): every writable chain is filled with the next bytes of a
fixed pattern (:func:`pattern`), so the guest can check that nothing was lost, repeated or
reordered. Config space (little endian): ``u64 tx bytes, u32 tx crc32, u64 rx bytes, u32 pid``
(the pid of the process serving it). Both loops hold each chain across an await before they
apply it, keep it in the runner meanwhile, and push it in the same step as they apply it (the
device contract of ``docs/writing-a-device.md``): a stop in between leaves it in flight: the
same runner finds it again after a stop/start, a new process's queue replays it.

Environment knobs for the handover tests (read when the hook runs):

- ``DH_VSTREAM_FAIL_RESTORE=1``: ``restore_open`` raises.
- ``DH_VSTREAM_RESTORE_GATE=PATH``: ``restore_open`` logs ``vstream restoring`` and waits until
  PATH exists (at most 60 s).
"""

from __future__ import annotations

import os
import random
import struct
import time
import zlib
from typing import Any, Final

import anyio
import attrs

from devicehost import DeviceContext, hookimpl, saved_state
from devicehost.virtio import DescriptorChain, DeviceTraits, QueueResources

PERIOD: Final = 65521
_BLOCK: Final = random.Random(7).randbytes(PERIOD + 65536)


def pattern(offset: int, size: int) -> bytes:
    """The ``size`` bytes of the device->guest stream at ``offset`` (``size`` <= 65536)."""
    start = offset % PERIOD
    return _BLOCK[start : start + size]


@attrs.frozen
class VstreamConfig:
    vhost_user_socket: str = ""


@saved_state("dh_vstream.State", 1)
@attrs.frozen
class VstreamState:
    tx_bytes: int
    tx_crc: int
    rx_bytes: int


@attrs.define
class Runner:
    resources: QueueResources
    tx_bytes: int = 0
    tx_crc: int = 0
    rx_bytes: int = 0
    #: The chain each loop holds, kept across a stop/start of this runner (a rolled-back
    #: takeover); a new process's runner starts without them: its queues replay them.
    tx_held: DescriptorChain | None = None
    rx_held: DescriptorChain | None = None


class VstreamDevice:
    config_class = VstreamConfig

    def __init__(self, config: VstreamConfig) -> None:
        self.config = config
        self.runner: Runner | None = None

    @hookimpl
    def offer(self, ctx: DeviceContext) -> DeviceTraits:
        return DeviceTraits(device_id=0x7F, queue_count=2, max_queue_size=256,
                            config=bytes(24))

    @hookimpl
    def open(self, ctx: DeviceContext, resources: QueueResources) -> Runner:
        self.runner = Runner(resources)
        return self.runner

    @hookimpl
    def run(self, ctx: DeviceContext, runner: Runner) -> Any:
        return self._run(runner)

    async def _run(self, runner: Runner) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._tx, runner)
            tg.start_soon(self._rx, runner)

    async def _tx(self, runner: Runner) -> None:
        tx = runner.resources.queues[0]
        while True:
            chain = runner.tx_held = runner.tx_held or await tx.pop_wait()
            await anyio.lowlevel.checkpoint()  # held: a stop here leaves it in flight
            data = chain.read()
            runner.tx_crc = zlib.crc32(data, runner.tx_crc)
            runner.tx_bytes += len(data)
            tx.push(chain, 0)  # in the same step as its effect
            runner.tx_held = None

    async def _rx(self, runner: Runner) -> None:
        rx = runner.resources.queues[1]
        while True:
            chain = runner.rx_held = runner.rx_held or await rx.pop_wait()
            await anyio.lowlevel.checkpoint()  # held: a stop here leaves it in flight
            size = min(chain.writable_len, 65536)
            chain.write_at(0, pattern(runner.rx_bytes, size))
            runner.rx_bytes += size
            rx.push(chain, size)
            runner.rx_held = None

    @hookimpl
    def save_open(self, ctx: DeviceContext, runner: Runner) -> VstreamState:
        return VstreamState(runner.tx_bytes, runner.tx_crc, runner.rx_bytes)

    @hookimpl
    def restore_open(self, ctx: DeviceContext, state: VstreamState,
                     resources: QueueResources) -> Runner:
        if os.environ.get("DH_VSTREAM_FAIL_RESTORE"):
            raise RuntimeError("DH_VSTREAM_FAIL_RESTORE is set")
        gate = os.environ.get("DH_VSTREAM_RESTORE_GATE")
        if gate:
            ctx.logger.warning("vstream restoring")
            deadline = time.monotonic() + 60
            while not os.path.exists(gate) and time.monotonic() < deadline:
                time.sleep(0.005)
        self.runner = Runner(resources, state.tx_bytes, state.tx_crc, state.rx_bytes)
        return self.runner

    @hookimpl
    def close(self, ctx: DeviceContext, runner: Runner) -> None:
        self.runner = None

    def virtio_config_read(self, offset: int, size: int) -> bytes:
        r = self.runner
        values = (0, 0, 0) if r is None else (r.tx_bytes, r.tx_crc, r.rx_bytes)
        return struct.pack("<QIQI", *values, os.getpid())[offset : offset + size]
