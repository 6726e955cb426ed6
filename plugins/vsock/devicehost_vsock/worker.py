"""The vsock worker: moves packets between the virtqueues and the connection table.

Four concurrent loops share one synchronous :class:`~devicehost_vsock.manager.ConnectionManager`
(they never interleave inside it: the table is only touched between awaits):

- tx: pops every guest tx chain (a batch per call), hands header and payload (views straight
  into guest memory, never copied unless the host socket back-pressures) to the table, lets it
  write consecutive RW payloads of one connection with one ``sendmsg``, then completes the
  chains with length 0; waits for the next kick.
- relay: reports socket readiness (:mod:`devicehost_vsock.relay`); host connections are accepted
  by the device's listeners, which live as long as the device is served and hand them over
  (:mod:`devicehost_vsock.listeners`), or, for a device driven without a host, by the relay.
- rx: only while the table has rx work *and* the guest has an rx buffer posted, fills that buffer
  (reading host data straight into guest memory when the buffer is one range, else through a
  bounce buffer) and completes it. A popped buffer that got no packet is kept for the next one.
  When one connection alone has rx work, the table may fill a run of further posted buffers
  with one scatter read (see ``ConnectionManager.produce_rx``); all of a pass's buffers are
  completed with at most one interrupt.
- silent: closes host connections that sent no CONNECT line by the connect deadline, whatever
  the rx queue holds (``ConnectionManager.drop_silent``: nothing goes to the guest).

Every other timeout is served by the rx loop only, so with no rx buffers posted nothing else
times out and no CONNECT line is read (facts section 9.8).
"""

from __future__ import annotations

import asyncio
import math
import struct
from collections import deque
from collections.abc import Callable

import anyio

from devicehost.virtio import DescriptorChain, QueueError, VirtQueue
from devicehost_vsock.manager import ConnectionManager
from devicehost_vsock.protocol import EVENT_TRANSPORT_RESET, HEADER_SIZE, TYPE_SEQPACKET
from devicehost_vsock.relay import Relay

__all__ = ["VsockWorker"]

#: Largest rx packet assembled in the bounce buffer (a header plus 256 KiB of data). Host -> guest
#: packets are bounded by the guest's rx buffers and credit, not by the device's
#: ``tx_buffer_size`` (which bounds guest -> host data), so this does not follow that setting.
_BOUNCE_SIZE = HEADER_SIZE + 256 * 1024
# byte layout: struct virtio_vsock_event = le32 id
_EVENT = struct.Struct("<I")


class VsockWorker:
    """The per-open state of the device: queues, connection table and relay."""

    def __init__(
        self, rx: VirtQueue, tx: VirtQueue, manager: ConnectionManager, relay: Relay
    ) -> None:
        self.rx = rx
        self.tx = tx
        self.manager = manager
        self.relay = relay
        #: Popped rx buffers that got no packet yet, in the guest's order (used first).
        self._held: deque[DescriptorChain] = deque()
        #: Buffers lent to the table for one ``produce_rx`` (a run of RW packets).
        self._lent: list[DescriptorChain] = []
        self._wake_event = anyio.Event()
        #: Set to wake the silent-connection loop while it waits with no deadline.
        self._silent_event: anyio.Event | None = None
        #: False while the rx loop waits for the guest to post rx buffers (then only it serves).
        self._rx_ready = True
        #: The deadline the rx loop sleeps until while it waits for a wake-up (``math.inf``: no
        #: deadline), None while it runs or waits for rx buffers.
        self._rx_sleep_until: float | None = None
        self._bounce = memoryview(bytearray(_BOUNCE_SIZE))
        #: The clock of the timeouts: ``anyio.current_time``, or under asyncio the loop's own
        #: ``time`` (what ``anyio.current_time`` returns there, without looking up the backend on
        #: every pass); set when :meth:`run` starts.
        self._clock: Callable[[], float] = anyio.current_time
        self.packets_in = 0
        self.packets_out = 0
        #: Told the connections the guest knows of whenever that set changed, at most once per
        #: tx or rx pass (a device in a worker reports them to its supervisor; see
        #: ``ConnectionManager.known_connections``).
        self.on_connections: Callable[[list[tuple[int, int, int]]], None] | None = None
        self._told_generation = 0
        #: The event queue, while a VIRTIO_VSOCK_EVENT_TRANSPORT_RESET is owed to the guest
        #: (:meth:`run` sends it; see ``VsockDevice.open``).
        self.transport_reset: VirtQueue | None = None

    def now(self) -> float:
        """The time on the clock of the table's timeouts."""
        return self._clock()

    def wake(self) -> None:
        """Something changed in the table: serve rx work now, as far as rx buffers allow, and
        let the rx loop take over what is left (it waits for buffers or deadlines).

        The rx loop is only woken when it has something to do: rx buffers ran out (it must wait
        for the guest's kick instead), or a deadline earlier than the one it sleeps until."""
        if (
            (silent := self._silent_event) is not None
            and self.manager.next_silent_deadline() is not None
        ):
            # A host connection was accepted: it has a connect deadline now. (Only then: this
            # runs for every packet, and waking that loop each time costs a task switch.)
            silent.set()
        if (
            self._rx_ready
            and self.service_rx()
            and (sleep_until := self._rx_sleep_until) is not None
        ):
            deadline = self.manager.next_deadline()
            if deadline is None or deadline >= sleep_until:
                return
        self._wake_event.set()

    async def run(self) -> None:
        """Process until cancelled (cancel-safe: state lives on the worker)."""
        try:
            self._clock = asyncio.get_running_loop().time
        except RuntimeError:  # another anyio backend
            self._clock = anyio.current_time
        self.relay.clock = self._clock
        async with anyio.create_task_group() as tg:
            if self.relay.listener is not None:
                tg.start_soon(self.relay.serve_listener)
            if self.relay.seqpacket_listener is not None:
                tg.start_soon(
                    self.relay.serve_listener, self.relay.seqpacket_listener, TYPE_SEQPACKET
                )
            tg.start_soon(self.relay.serve_epoll)
            tg.start_soon(self._tx_loop)
            tg.start_soon(self._silent_loop)
            if self.transport_reset is not None:
                tg.start_soon(self._send_transport_reset, self.transport_reset)
            await self._rx_loop()

    async def _send_transport_reset(self, event: VirtQueue) -> None:
        """Write one VIRTIO_VSOCK_EVENT_TRANSPORT_RESET into the guest's next event buffer
        (``struct virtio_vsock_event { le32 id; }``, id 0): the guest resets every connection
        it has (its peers see ECONNRESET) and reads the guest CID again. A buffer too small for
        the event is completed with length 0 and the next one is tried."""
        while True:
            chain = await event.pop_wait()
            if chain.writable_len < _EVENT.size:
                event.push(chain, 0)
                continue
            chain.write_at(0, _EVENT.pack(EVENT_TRANSPORT_RESET))
            event.push(chain, _EVENT.size)
            self.transport_reset = None
            return

    async def _silent_loop(self) -> None:
        """Close host connections that sent no CONNECT line by their deadline, rx buffers or
        not. Connect deadlines only grow (accept time + one timeout), so this loop needs waking
        only while it has none."""
        manager = self.manager
        while True:
            deadline = manager.next_silent_deadline()
            if deadline is None:
                event = self._silent_event = anyio.Event()
                try:
                    await event.wait()
                finally:
                    self._silent_event = None
                continue
            await anyio.sleep(max(0.0, deadline - self._clock()))
            manager.drop_silent(self._clock())

    # ----------------------------------------------------------------- tx

    async def _tx_loop(self) -> None:
        while True:
            self.drain_tx()
            await self.tx.wait_kick()

    def drain_tx(self) -> int:
        """Handle the available tx chains, at most a ring's worth; returns how many."""
        now = self._clock()
        tx = self.tx
        pop_many = tx.pop_many
        handle_tx = self.manager.handle_tx
        heads: list[int] = []
        budget = tx.size  # one ring's worth per wake-up; the tx loop yields in wait_kick
        try:
            while budget > 0 and (chains := pop_many(budget)):
                budget -= len(chains)
                for chain in chains:
                    parts = chain.readable
                    if parts and len(first := parts[0]) >= HEADER_SIZE:
                        if len(first) == HEADER_SIZE:
                            handle_tx(first, parts[1:], now, True)
                        else:
                            handle_tx(first[:HEADER_SIZE], [first[HEADER_SIZE:], *parts[1:]], now,
                                      True)
                    else:
                        header = chain.peek(0, HEADER_SIZE)
                        handle_tx(header, _views_after(parts, HEADER_SIZE), now, True)
                    heads.append(chain.head)
        finally:
            # Gathered payloads are written before their chains go back to the guest; then one
            # barrier and at most one interrupt for the whole batch.
            self.manager.flush_tx()
            if heads:
                tx.queue.add_used_many(heads, 0)
            tx.signal_used()
        count = len(heads)
        if count:
            self.packets_in += count
            self.wake()
            if self.manager.table_generation != self._told_generation:
                self._tell_connections()
        return count

    def _tell_connections(self) -> None:
        self._told_generation = self.manager.table_generation
        if self.on_connections is not None:
            self.on_connections(self.manager.known_connections())

    # ----------------------------------------------------------------- rx

    def service_rx(self) -> bool:
        """Fill rx buffers while the table has work for them. Returns False when work is left
        but the guest has no rx buffer posted."""
        manager = self.manager
        has_work = manager.has_rx_work
        rx = self.rx
        pop = rx.pop
        now = self._clock()
        ready = True
        held = self._held
        lent = self._lent
        heads: list[int] = []
        sizes: list[int] = []
        try:
            while has_work(now):
                chain = held.popleft() if held else pop()
                if chain is None:
                    ready = False
                    break
                size = self._fill(chain, now)
                if lent:
                    # Lent buffers the table filled follow this one; the rest go back in front,
                    # in the guest's order.
                    filled = manager.extra_sizes if size is not None else []
                    held.extendleft(reversed(lent[len(filled) :]))
                    del lent[len(filled) :]
                if size is None:
                    held.appendleft(chain)
                    break
                heads.append(chain.head)
                sizes.append(size)
                if lent:
                    heads.extend([extra.head for extra in lent])
                    sizes.extend(manager.extra_sizes)
                    lent.clear()
        finally:
            # Every buffer filled in this pass is published at once and signalled with at most
            # one interrupt.
            if heads:
                rx.queue.add_used_many(heads, sizes)
                self.packets_out += len(heads)
            rx.signal_used()
        if manager.table_generation != self._told_generation:
            self._tell_connections()
        self._rx_ready = ready
        return ready

    async def _rx_loop(self) -> None:
        manager = self.manager
        while True:
            if not self.service_rx():
                await self.rx.wait_kick()
                continue
            event = self._wake_event = anyio.Event()
            deadline = manager.next_deadline()
            if deadline is None:
                self._rx_sleep_until = math.inf
                try:
                    await event.wait()
                finally:
                    self._rx_sleep_until = None
                continue
            self._rx_sleep_until = deadline
            try:
                with anyio.move_on_after(max(0.0, deadline - self._clock())):
                    await event.wait()
            finally:
                self._rx_sleep_until = None

    def _fill(self, chain: DescriptorChain, now: float) -> int | None:
        parts = chain.writable
        if len(parts) == 1:
            return self.manager.produce_rx(parts[0], now, self._lend)
        bounce = self._bounce[: min(chain.writable_len, _BOUNCE_SIZE)]
        size = self.manager.produce_rx(bounce, now)
        if size:
            chain.write_at(0, bounce[:size])
        return size

    def _lend(self) -> memoryview | None:
        """The next posted rx buffer for a run of RW packets: one writable range with room after
        the header; anything else stays held for the ordinary path."""
        held = self._held
        if held:
            chain: DescriptorChain | None = held.popleft()
        else:
            try:
                chain = self.rx.pop()
            except QueueError:
                return None  # raised again by the next ordinary pop
        if chain is None:
            return None
        parts = chain.writable
        if len(parts) != 1 or len(parts[0]) <= HEADER_SIZE:
            held.appendleft(chain)
            return None
        self._lent.append(chain)
        return parts[0]


def _views_after(parts: tuple[memoryview, ...], offset: int) -> list[memoryview]:
    out: list[memoryview] = []
    for part in parts:
        if offset >= len(part):
            offset -= len(part)
            continue
        out.append(part[offset:])
        offset = 0
    return out
