# SPDX-License-Identifier: MIT
"""Split virtqueue: descriptor chains moved through a queue pair in one process.

Rows (chains/s):

- ``virtqueue_64b_chains``: the guest-side driver (``DriverQueue``) posts chains of one 64-byte
  device-readable buffer (copied into guest memory), 32 at a time; the device side
  (``SplitQueue``) pops each chain (every guest-memory check on), reads its bytes out, and pushes
  it to the used ring; the driver collects the used elements and frees the buffers.
- ``virtqueue_64k_chains``: the same with 64 KiB buffers, 8 at a time.
- ``virtqueue_64k_indirect_chains``: 64 KiB split into 16 fragments of 4 KiB through an indirect
  table (the chain shape of a scatter-gather guest).

- ``virtqueue_64b_chains_pop_many``: the 64-byte case with the device taking each batch of 32
  with one ``pop_many`` and returning it with one ``add_used_many`` and one interrupt decision.

- ``virtqueue_64b_async_chains``: the 64-byte case with notifications: a device task waits for
  kicks on a :class:`VirtQueue` (``pop_wait``) and pushes every chain back (interrupting the
  driver), while the driver task posts 32 chains, kicks and waits for the used ones (anyio,
  asyncio backend, in-process doorbells).

- ``virtqueue_driver_1k_tx_chains``: the guest driver alone on the vsock transmit path: 64
  ``add_readable(header, payload)`` chains (44 + 1024 bytes) at a time, a bare device that returns
  every head (not timed), one ``reap``; only the driver's calls are timed.
- ``virtqueue_driver_1k_rx_chains``: the receive path: ``add_writable_many(128, 1068)``, the bare
  device returns each buffer full (not timed), one ``take_used_views``.
- ``virtqueue_driver_1k_tx_segments_chains``: the transmit path with one
  ``add_segments(header, 64 KiB, 1024, 24)`` per batch instead of 64 ``add_readable`` calls.
- ``..._pure``: the same three with the C driver accelerator switched off (pure Python).
- ``virtqueue_device_1k_tx_chains``: the device side alone on the vsock transmit path: a bare
  driver (not timed) makes 64 chains of a 44-byte header + 1 KiB payload available, the device
  takes them with one ``pop_many``, one ``add_used_many`` and one ``needs_interrupt``.
- ``virtqueue_device_1k_rx_chains``: the receive path: 128 writable 1068-byte buffers, popped one
  ``pop`` at a time, returned with one ``add_used_many`` (a length each), one ``needs_interrupt``.
- ``virtqueue_device_..._pure``: the same two with the C virtqueue accelerator switched off.

Baseline, measured in the same run and interleaved (best round of each kept): one memoryview
slice-assignment copy of the same number of bytes per chain, in copies/s. A chain costs two
copies (into guest memory, out again) plus the ring work, so a ratio near 0.5 at 64 KiB means the
ring work is negligible beside the copies.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import anyio

import devicehost.virtio.driverqueue as driverqueue_module
import devicehost.virtio.queue as queue_module
from devicehost.memory import DmaAllocator, GuestMemory
from devicehost.virtio.driver import DriverQueue
from devicehost.virtio.queue import DESC_F_NEXT, DESC_F_WRITE, DESCRIPTOR, SplitQueue
from devicehost.virtio.transport import VirtQueue

__all__ = ["run"]

ROUNDS = 5
QUEUE_SIZE = 256


def _pair(alloc: DmaAllocator) -> tuple[DriverQueue, SplitQueue]:
    dq = DriverQueue(0, alloc.memory, alloc, QUEUE_SIZE, event_idx=True)
    return dq, SplitQueue(alloc.memory, dq.layout, event_idx=True)


def _chains(alloc: DmaAllocator, size: int, count: int, batch: int,
            fragment: int | None = None) -> Callable[[], float]:
    dq, q = _pair(alloc)
    payload = b"v" * size
    indirect = fragment is not None

    def once() -> float:
        add, get_used, pop, push = dq.add, dq.get_used, q.pop, q.push
        started = time.perf_counter()
        for _ in range(count // batch):
            for _ in range(batch):
                add((payload,), fragment=fragment, indirect=indirect)
            n = 0
            while (chain := pop()) is not None:
                if len(chain.read()) != size:
                    raise AssertionError("the queue lost bytes")
                push(chain.head, 0)
                n += 1
            while get_used() is not None:
                n -= 1
            if n:
                raise AssertionError("the queue lost chains")
        return time.perf_counter() - started

    return once


def _chains_batched(alloc: DmaAllocator, size: int, count: int, batch: int
                    ) -> Callable[[], float]:
    dq, q = _pair(alloc)
    payload = b"v" * size

    def once() -> float:
        add, get_used, pop_many, add_used_many = dq.add, dq.get_used, q.pop_many, q.add_used_many
        started = time.perf_counter()
        for _ in range(count // batch):
            for _ in range(batch):
                add((payload,))
            chains = pop_many()
            for chain in chains:
                if len(chain.read()) != size:
                    raise AssertionError("the queue lost bytes")
            add_used_many([chain.head for chain in chains], 0)
            q.needs_interrupt()
            n = len(chains)
            while get_used() is not None:
                n -= 1
            if n:
                raise AssertionError("the queue lost chains")
        return time.perf_counter() - started

    return once


def _async_chains(alloc: DmaAllocator, size: int, count: int, batch: int
                  ) -> Callable[[], float]:
    dq, q = _pair(alloc)
    vq = VirtQueue(0, q, dq.kick_doorbell, dq.call_doorbell)
    payload = b"v" * size

    async def device() -> None:
        while True:
            chain = await vq.pop_wait()
            chain.read()
            vq.push(chain, 0)

    async def main() -> float:
        async with anyio.create_task_group() as tg:
            tg.start_soon(device)
            started = time.perf_counter()
            for _ in range(count // batch):
                for _ in range(batch):
                    dq.add((payload,))
                dq.kick()
                for _ in range(batch):
                    await dq.wait_used()
            elapsed = time.perf_counter() - started
            tg.cancel_scope.cancel()
        return elapsed

    def once() -> float:
        return anyio.run(main)

    return once


def _bare_device(dq: DriverQueue, written: int) -> None:
    # Return every head the driver made available since the used index, in order.
    avail, used = dq._avail.cast("H"), dq._used
    used_words, elems = used[:4].cast("H"), used[4 : 4 + 8 * dq.size].cast("I")
    idx, end = used_words[1], avail[1]
    while idx != end:
        slot = idx % dq.size
        elems[2 * slot] = avail[2 + slot]
        elems[2 * slot + 1] = written
        idx = (idx + 1) & 0xFFFF
    used_words[1] = idx


def _driver_only(alloc: DmaAllocator, count: int, *, rx: bool, pure: bool,
                 segments: bool = False) -> Callable[[], float]:
    saved = driverqueue_module._driverc
    if pure:
        driverqueue_module._driverc = None
    try:
        dq = DriverQueue(0, alloc.memory, alloc, QUEUE_SIZE, event_idx=True)
    finally:
        driverqueue_module._driverc = saved
    header, payload = b"h" * 44, memoryview(b"p" * 1024 * 64)

    def once() -> float:
        elapsed = 0.0
        for _ in range(count // (128 if rx else 64)):
            if rx:
                started = time.perf_counter()
                posted = dq.add_writable_many(128, 1068)
                elapsed += time.perf_counter() - started
                _bare_device(dq, 1068)
                started = time.perf_counter()
                taken = len(dq.take_used_views())
            elif segments:
                started = time.perf_counter()
                posted = dq.add_segments(header, payload, 1024, 24) // 1024
                elapsed += time.perf_counter() - started
                _bare_device(dq, 0)
                started = time.perf_counter()
                taken = dq.reap()
            else:
                started = time.perf_counter()
                add = dq.add_readable
                for i in range(0, 64 * 1024, 1024):
                    add(header, payload[i : i + 1024])
                posted = 64
                elapsed += time.perf_counter() - started
                _bare_device(dq, 0)
                started = time.perf_counter()
                taken = dq.reap()
            elapsed += time.perf_counter() - started
            if taken != posted:
                raise AssertionError("the queue lost chains")
        return elapsed

    return once


def _device_only(alloc: DmaAllocator, count: int, *, rx: bool, pure: bool
                 ) -> Callable[[], float]:
    # The rings of a DriverQueue, but a bare driver that writes the avail ring by hand (not
    # timed): tx posts 64 chains of a 44-byte header + a 1 KiB payload, rx 128 writable buffers
    # of 1068 bytes, on fixed descriptors; only the device's calls are timed.
    layout = DriverQueue(0, alloc.memory, alloc, QUEUE_SIZE, event_idx=True).layout
    saved = queue_module._queuec
    if pure:
        queue_module._queuec = None
    try:
        q = SplitQueue(alloc.memory, layout, event_idx=True)
    finally:
        queue_module._queuec = saved
    data = alloc.alloc(128 * 2048 // 4096).gpa
    table = alloc.memory.view(layout.desc_gpa, 16 * QUEUE_SIZE)
    for i in range(128):
        if rx:
            DESCRIPTOR.pack_into(table, 16 * i, data + 2048 * i, 1068, DESC_F_WRITE, 0)
        else:
            DESCRIPTOR.pack_into(table, 32 * i, data + 2048 * i, 44, DESC_F_NEXT, 2 * i + 1)
            DESCRIPTOR.pack_into(table, 32 * i + 16, data + 2048 * i + 64, 1024, 0, 0)
    avail = alloc.memory.view(layout.avail_gpa, 4 + 2 * QUEUE_SIZE).cast("H")
    heads = list(range(128)) if rx else list(range(0, 128, 2))

    def once() -> float:
        elapsed = 0.0
        for _ in range(count // len(heads)):
            idx = avail[1]
            for head in heads:
                avail[2 + idx % QUEUE_SIZE] = head
                idx = (idx + 1) & 0xFFFF
            avail[1] = idx
            started = time.perf_counter()
            if rx:
                pop = q.pop
                chains = []
                while (chain := pop()) is not None:
                    chains.append(chain)
                q.add_used_many([c.head for c in chains], [c.writable_len for c in chains])
            else:
                chains = q.pop_many()
                q.add_used_many([c.head for c in chains], 0)
            q.needs_interrupt()
            elapsed += time.perf_counter() - started
            if len(chains) != len(heads):
                raise AssertionError("the queue lost chains")
        return elapsed

    return once


def _copy(size: int, count: int) -> Callable[[], float]:
    src = memoryview(bytearray(b"v" * size))
    dst = memoryview(bytearray(size))

    def once() -> float:
        started = time.perf_counter()
        for _ in range(count):
            dst[:] = src
        return time.perf_counter() - started

    return once


def _best(fn: Callable[[], float], base: Callable[[], float]) -> tuple[float, float]:
    best_fn = best_base = float("inf")
    for _ in range(ROUNDS):
        best_fn = min(best_fn, fn())
        best_base = min(best_base, base())
    return best_fn, best_base


def run() -> list[dict[str, Any]]:
    memory = GuestMemory.anonymous(64 * 1024 * 1024)
    rows: list[dict[str, Any]] = []
    try:
        cases = [
            ("virtqueue_64b_chains", 64, 32 * 300, 32, None),
            ("virtqueue_64k_chains", 65536, 8 * 100, 8, None),
            ("virtqueue_64k_indirect_chains", 65536, 8 * 60, 8, 4096),
        ]
        alloc = DmaAllocator(memory)
        runs = [(name, size, count, _chains(alloc, size, count, batch, fragment))
                for name, size, count, batch, fragment in cases]
        runs.append(("virtqueue_64b_chains_pop_many", 64, 32 * 300,
                     _chains_batched(alloc, 64, 32 * 300, 32)))
        runs.append(("virtqueue_64b_async_chains", 64, 32 * 200,
                     _async_chains(alloc, 64, 32 * 200, 32)))
        for kind in ("tx", "rx"):
            for pure in (False, True):
                runs.append((f"virtqueue_device_1k_{kind}_chains{'_pure' if pure else ''}", 1024,
                             128 * 100, _device_only(alloc, 128 * 100, rx=kind == "rx",
                                                     pure=pure)))
        for kind in ("tx", "rx", "tx_segments"):
            for pure in (False, True):
                runs.append((f"virtqueue_driver_1k_{kind}_chains{'_pure' if pure else ''}", 1024,
                             128 * 100, _driver_only(alloc, 128 * 100, rx=kind == "rx",
                                                     pure=pure, segments=kind == "tx_segments")))
        for name, size, count, fn in runs:
            elapsed, base = _best(fn, _copy(size, count))
            value, baseline = count / elapsed, count / base
            rows.append({
                "name": name,
                "value": round(value, 1),
                "unit": "chains/s",
                "baseline_name": f"memoryview_copy_{size}b",
                "baseline_value": round(baseline, 1),
                "ratio": round(value / baseline, 4),
            })
    finally:
        memory.close()
    return rows


if __name__ == "__main__":
    import json

    for row in run():
        print(json.dumps(row))
