"""A simulated sidecar kernel: the same page layout and completion protocol as the real one, on any
Linux machine.

Each node owns a shared anonymous mapping holding its CPUs' command pages (and register pages), a
control page with one status byte per CPU, and a non-blocking pipe whose read end is the node's
completion fd. Each simulated CPU is a thread that parks while its status is IDLE and, when woken
by ``start`` (RUN) or ``run``, dispatches like the sidecar kernel (facts §11.7): clear
``has_error``, take the command and reset it to NONE, execute, report a failure as text in the
error field, set the status back to IDLE and raise ``needs_attention``. A command begun with
``start`` then writes the 4-byte CPU number to the completion pipe; ``run`` (the synchronous ioctl)
returns to its caller instead.

Simulated VPs have a register file (the names of :class:`HvX64RegisterName`), a GVA→GPA
translation table and a :class:`VpScript`: RUN_VP executes ``intercept_after`` guest steps (each
advances RIP by one) after an optional ``delay``, then stops with an I/O port intercept carrying a
real HvMessage. ``intercept_after=None`` runs until STOP, which ends a run without an intercept.
VP state belongs to the :class:`SimulatedSidecar` and survives closing and reopening its nodes.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import select
import struct
import threading
import time
from typing import Final

import attrs

from devicehost_sidecar.driver import SidecarNode
from devicehost_sidecar.errors import SidecarDriverError
from devicehost_sidecar.hvdef import (
    HV_MESSAGE_TYPE_X64_IO_PORT_INTERCEPT,
    HvMessage,
    HvStatus,
    HvX64RegisterName,
    IoPortIntercept,
    encode_hv_message,
    encode_io_port_intercept,
)
from devicehost_sidecar.protocol import (
    CONTROL_CPU_STATUS_OFFSET,
    CONTROL_PAGE_SIZE,
    GET_SET_HEADER,
    GPS_CR2_INDEX,
    MAX_CPUS_PER_NODE,
    MAX_GET_SET_VP_REGISTERS,
    MAX_NODES,
    MIN_PER_CPU_SHMEM,
    PAGE_SIZE,
    REGISTER_ASSOC,
    TRANSLATE_DEFINED_FLAGS,
    TRANSLATE_VALIDATE_WRITE,
    CommandPage,
    ControlPageHeader,
    CpuContext,
    CpuStatus,
    NodeInfo,
    SidecarCommand,
    TranslateGvaResponse,
    TranslateGvaResult,
    decode_cpu_context_untrusted,
    decode_get_set_request_untrusted,
    decode_translate_gva_request_untrusted,
    encode_command_error,
    encode_control_page_header,
    encode_cpu_context,
    encode_run_vp_response,
    encode_translate_gva_response,
)

__all__ = ["CommandRecord", "SimulatedNode", "SimulatedSidecar", "SimulatedVp", "VpScript"]

#: General-purpose registers in CpuContextX64 slot order; slot 4 holds CR2, not RSP.
_GPS_ORDER: Final = (
    HvX64RegisterName.RAX,
    HvX64RegisterName.RCX,
    HvX64RegisterName.RDX,
    HvX64RegisterName.RBX,
    HvX64RegisterName.CR2,
    HvX64RegisterName.RBP,
    HvX64RegisterName.RSI,
    HvX64RegisterName.RDI,
    *(HvX64RegisterName(HvX64RegisterName.R8 + i) for i in range(8)),
)
assert _GPS_ORDER[GPS_CR2_INDEX] is HvX64RegisterName.CR2 and len(_GPS_ORDER) == 16
_U64: Final = (1 << 64) - 1


@attrs.frozen
class VpScript:
    """How a simulated VP's RUN_VP ends.

    ``delay`` seconds pass first (a STOP during them ends the run), then ``intercept_after`` guest
    steps, then an I/O port access to ``port`` that stops the run with an intercept. With
    ``intercept_after=None`` only STOP ends a run. ``entry_fault`` makes RUN_VP fail like a sidecar
    kernel that saw an unexpected VTL entry reason (an error with text, no intercept).
    """

    intercept_after: int | None = 100
    delay: float = 0.0
    port: int = 0x3F8
    access_size: int = 1
    is_write: bool = True
    entry_fault: bool = False


@attrs.frozen
class CommandRecord:
    """One command as the simulated sidecar kernel dispatched it (for tests and the benchmark)."""

    cpu: int
    command: int
    register_count: int = 0


class SimulatedVp:
    """A VP's architectural state: register file, translation table, script."""

    def __init__(self, cpu: int, script: VpScript) -> None:
        self.cpu = cpu
        self.script = script
        self.registers: dict[int, int] = {int(name): 0 for name in HvX64RegisterName}
        self.registers[HvX64RegisterName.RFLAGS] = 0x2
        #: guest virtual page number -> (guest physical page number, writable)
        self.translations: dict[int, tuple[int, bool]] = {}
        self.steps = 0

    def map_page(self, gvn: int, gpa_page: int, *, writable: bool = True) -> None:
        self.translations[gvn] = (gpa_page, writable)

    def load_context(self, context: CpuContext) -> None:
        for name, value in zip(_GPS_ORDER, context.gps, strict=True):
            self.registers[name] = value

    def context(self, fx_state: bytes) -> CpuContext:
        return CpuContext(tuple(self.registers[name] & _U64 for name in _GPS_ORDER), fx_state)

    def step(self) -> None:
        self.steps += 1
        self.registers[HvX64RegisterName.RIP] = (self.registers[HvX64RegisterName.RIP] + 1) & _U64


class _CommandFailed(Exception):
    """A command failed; the text goes into the command page's error field."""


class SimulatedNode:
    """One simulated node. Implements :class:`SidecarNode`."""

    def __init__(self, sidecar: SimulatedSidecar, index: int, info: NodeInfo) -> None:
        self._sidecar = sidecar
        self._index = index
        self._info = info
        self._map = mmap.mmap(-1, info.cpu_count * info.per_cpu_shmem)
        self._view = memoryview(self._map)
        self._pages = [
            CommandPage(self._view[i * info.per_cpu_shmem : i * info.per_cpu_shmem + PAGE_SIZE])
            for i in range(info.cpu_count)
        ]
        self._control = bytearray(CONTROL_PAGE_SIZE)
        self._control[:CONTROL_CPU_STATUS_OFFSET] = encode_control_page_header(
            ControlPageHeader(index, info.base_cpu, info.cpu_count)
        )
        # Status transitions happen under the lock; a CPU notices them through its doorbell.
        self._lock = threading.Lock()
        self._asynchronous = [False] * info.cpu_count
        self._sync_pending = [False] * info.cpu_count
        #: Per CPU: the doorbell (the IPI on request_vector) and the synchronous-done pipe.
        self._doorbells = [os.pipe2(os.O_CLOEXEC) for _ in range(info.cpu_count)]
        self._done = [os.pipe2(os.O_CLOEXEC) for _ in range(info.cpu_count)]
        self._read_fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        os.set_blocking(self._write_fd, True)
        self._closed = False
        for i in range(info.cpu_count):
            self._set_status(i, CpuStatus.IDLE)
        self._threads = [
            threading.Thread(
                target=self._cpu_main,
                args=(i,),
                name=f"sidecar-sim cpu{info.base_cpu + i}",
                daemon=True,
            )
            for i in range(info.cpu_count)
        ]
        for thread in self._threads:
            thread.start()

    # -- SidecarNode --------------------------------------------------------------------------

    @property
    def index(self) -> int:
        return self._index

    @property
    def info(self) -> NodeInfo:
        return self._info

    @property
    def shmem(self) -> memoryview:
        return self._view

    @property
    def completion_fd(self) -> int:
        return self._read_fd

    def _begin(self, cpu: int, *, asynchronous: bool) -> int:
        i = self._local(cpu)
        with self._lock:
            if self._status(i) is not CpuStatus.IDLE:
                raise SidecarDriverError(f"simulated sidecar: CPU {cpu} is busy")
            self._asynchronous[i] = asynchronous
            self._sync_pending[i] = not asynchronous
            self._set_status(i, CpuStatus.RUN)
        self._ring(i)
        return i

    def _ring(self, i: int) -> None:
        os.write(self._doorbells[i][1], b"\1")

    def start(self, cpu: int) -> None:
        self._begin(cpu, asynchronous=True)

    def stop(self, cpu: int) -> None:
        i = self._local(cpu)
        with self._lock:
            if self._status(i) is not CpuStatus.RUN:
                return
            self._set_status(i, CpuStatus.STOP)
        self._ring(i)

    def run(self, cpu: int) -> None:
        i = self._begin(cpu, asynchronous=False)
        os.read(self._done[i][0], 1)

    def close(self) -> None:
        """Remove every CPU (ending any run), join the threads, unmap, close the pipes."""
        if self._closed:
            return
        self._closed = True
        with self._lock:
            for i in range(self._info.cpu_count):
                self._set_status(i, CpuStatus.REMOVE)
        for i in range(self._info.cpu_count):
            self._ring(i)
        for thread in self._threads:
            thread.join()
        for pair in (*self._doorbells, *self._done):
            os.close(pair[0])
            os.close(pair[1])
        for page in self._pages:
            page.release()
        self._view.release()
        # A view someone else still holds keeps the mapping alive until it is dropped.
        with contextlib.suppress(BufferError):
            self._map.close()
        os.close(self._read_fd)
        os.close(self._write_fd)

    # -- misbehaviour and inspection, for tests ---------------------------------------------------

    def post_completion(self, data: bytes) -> None:
        """Write raw bytes to the completion fd, as a misbehaving sidecar kernel might."""
        os.write(self._write_fd, data)

    def cpu_status(self, cpu: int) -> CpuStatus:
        """The CPU's status byte in the node's control page."""
        with self._lock:
            return self._status(self._local(cpu))

    @property
    def needs_attention(self) -> int:
        value: int = struct.unpack_from("<I", self._control, 24)[0]
        return value

    # -- the simulated CPUs -----------------------------------------------------------------------

    def _local(self, cpu: int) -> int:
        if cpu not in self._info.cpus:
            raise SidecarDriverError(f"simulated sidecar node {self._index} has no CPU {cpu}")
        return cpu - self._info.base_cpu

    def _status(self, i: int) -> CpuStatus:
        return CpuStatus(self._control[CONTROL_CPU_STATUS_OFFSET + i])

    def _set_status(self, i: int, status: CpuStatus) -> None:
        self._control[CONTROL_CPU_STATUS_OFFSET + i] = status

    def _cpu_main(self, i: int) -> None:
        cpu = self._info.base_cpu + i
        doorbell = self._doorbells[i][0]
        while True:
            with self._lock:
                parked = self._status(i) is CpuStatus.IDLE
            if parked:
                # Until the next IPI. A ring is never lost (it stays in the pipe), and a ring for
                # a change already handled (e.g. consumed inside RUN_VP) only costs a loop.
                os.read(doorbell, 64)
                continue
            with self._lock:
                status = self._status(i)
                asynchronous = self._asynchronous[i]
                if status is CpuStatus.REMOVE:
                    self._set_status(i, CpuStatus.REMOVED)
                    sync_pending, self._sync_pending[i] = self._sync_pending[i], False
            if status is CpuStatus.REMOVE:
                if sync_pending:
                    os.write(self._done[i][1], b"\1")
                return
            # RUN, or a STOP that arrived before this CPU woke: the command runs either way.
            self._dispatch(i, cpu)
            with self._lock:
                if self._status(i) is not CpuStatus.REMOVE:
                    self._set_status(i, CpuStatus.IDLE)
                struct.pack_into("<I", self._control, 24, 1)  # needs_attention
                self._sync_pending[i] = False
            # The response IPI: the completion fd for started commands, the caller otherwise.
            if asynchronous:
                os.write(self._write_fd, struct.pack("<I", cpu))
            else:
                os.write(self._done[i][1], b"\1")

    def _dispatch(self, i: int, cpu: int) -> None:
        page = self._pages[i]
        page.has_error = False
        command = page.command
        page.command = SidecarCommand.NONE
        vp = self._sidecar.vps[cpu]
        count = 0
        if command in (SidecarCommand.GET_VP_REGISTERS, SidecarCommand.SET_VP_REGISTERS):
            count = GET_SET_HEADER.unpack_from(page.request_data)[0]
        self._sidecar.command_log.append(CommandRecord(cpu, command, count))
        try:
            if command == SidecarCommand.NONE:
                pass
            elif command == SidecarCommand.RUN_VP:
                self._run_vp(i, page, vp)
            elif command == SidecarCommand.GET_VP_REGISTERS:
                self._get_set(page, vp, count, set_values=False)
            elif command == SidecarCommand.SET_VP_REGISTERS:
                self._get_set(page, vp, count, set_values=True)
            elif command == SidecarCommand.TRANSLATE_GVA:
                self._translate(page, vp)
            else:
                raise _CommandFailed(f"unknown command {command}")
        except _CommandFailed as exc:
            page.error[:] = encode_command_error(str(exc))
            page.has_error = True

    def _stopping(self, i: int) -> bool:
        return self._status(i) in (CpuStatus.STOP, CpuStatus.REMOVE)

    def _wait_for_stop(self, i: int, timeout: float | None) -> None:
        """Let the VP run (idle guest) until STOP/REMOVE or ``timeout`` seconds pass."""
        doorbell = self._doorbells[i][0]
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._stopping(i):
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return
            ready, _, _ = select.select([doorbell], [], [], remaining)
            if ready:
                os.read(doorbell, 64)

    def _run_vp(self, i: int, page: CommandPage, vp: SimulatedVp) -> None:
        script = vp.script
        context = decode_cpu_context_untrusted(page.cpu_context)
        vp.load_context(context)
        intercept = False
        if script.entry_fault:
            raise _CommandFailed("unexpected VTL entry reason 7 while running the VP")
        if script.intercept_after is None:
            self._wait_for_stop(i, None)
        elif script.delay > 0:
            self._wait_for_stop(i, script.delay)
        if script.intercept_after is not None and not self._stopping(i):
            for _ in range(script.intercept_after):
                if self._stopping(i):
                    break
                vp.step()
            else:
                intercept = True
        page.cpu_context[:] = encode_cpu_context(vp.context(context.fx_state))
        if intercept:
            payload = encode_io_port_intercept(
                IoPortIntercept(
                    vp_index=vp.cpu,
                    rip=vp.registers[HvX64RegisterName.RIP] & _U64,
                    rflags=vp.registers[HvX64RegisterName.RFLAGS] & _U64,
                    port=script.port,
                    access_size=script.access_size,
                    is_write=script.is_write,
                    rax=vp.registers[HvX64RegisterName.RAX] & _U64,
                )
            )
            page.intercept_message[:] = encode_hv_message(
                HvMessage(HV_MESSAGE_TYPE_X64_IO_PORT_INTERCEPT, payload)
            )
        page.request_data[:1] = encode_run_vp_response(intercept)

    def _get_set(self, page: CommandPage, vp: SimulatedVp, count: int, *, set_values: bool) -> None:
        data = page.request_data
        if count > MAX_GET_SET_VP_REGISTERS:
            noun = "register count" if set_values else "register name count"
            raise _CommandFailed(f"invalid {noun}: {count}")
        request, assocs = decode_get_set_request_untrusted(data)
        status = HvStatus.SUCCESS
        if request.target_vtl & 0xE0:
            status = HvStatus.INVALID_PARAMETER  # reserved HvInputVtl bits
        else:
            for n, assoc in enumerate(assocs):
                if assoc.name not in vp.registers:
                    status = HvStatus.INVALID_PARAMETER
                    break
                if set_values:
                    vp.registers[assoc.name] = assoc.value
                else:
                    offset = GET_SET_HEADER.size + n * REGISTER_ASSOC.size
                    REGISTER_ASSOC.pack_into(
                        data, offset, assoc.name, vp.registers[assoc.name].to_bytes(16, "little")
                    )
        struct.pack_into("<H", data, 4, status)

    def _translate(self, page: CommandPage, vp: SimulatedVp) -> None:
        request = decode_translate_gva_request_untrusted(page.request_data)
        if request.control_flags & ~TRANSLATE_DEFINED_FLAGS:
            response = TranslateGvaResponse(HvStatus.INVALID_PARAMETER)
        else:
            entry = vp.translations.get(request.gvn)
            if entry is None:
                response = TranslateGvaResponse(
                    HvStatus.SUCCESS, TranslateGvaResult.PAGE_NOT_PRESENT
                )
            elif request.control_flags & TRANSLATE_VALIDATE_WRITE and not entry[1]:
                response = TranslateGvaResponse(
                    HvStatus.SUCCESS, TranslateGvaResult.PRIVILEGE_VIOLATION
                )
            else:
                response = TranslateGvaResponse(
                    HvStatus.SUCCESS, TranslateGvaResult.SUCCESS, gpa_page=entry[0]
                )
        page.request_data[:80] = encode_translate_gva_response(response)


class SimulatedSidecar:
    """A simulated sidecar: ``nodes`` nodes of ``cpus_per_node`` CPUs each, numbered from
    ``base_cpu`` without gaps. Implements :class:`SidecarDriver`."""

    name = "simulator"

    def __init__(
        self,
        nodes: int = 2,
        cpus_per_node: int = 2,
        *,
        base_cpu: int = 0,
        per_cpu_shmem: int = MIN_PER_CPU_SHMEM,
        script: VpScript | None = None,
    ) -> None:
        if not 1 <= nodes <= MAX_NODES:
            raise ValueError(f"a sidecar has 1 to {MAX_NODES} nodes, not {nodes}")
        if not 1 <= cpus_per_node <= MAX_CPUS_PER_NODE:
            raise ValueError(f"a node has 1 to {MAX_CPUS_PER_NODE} CPUs, not {cpus_per_node}")
        if per_cpu_shmem < MIN_PER_CPU_SHMEM or per_cpu_shmem % PAGE_SIZE:
            raise ValueError(f"per-CPU shared memory must be whole pages, ≥ {MIN_PER_CPU_SHMEM}")
        self.infos = [
            NodeInfo(base_cpu + n * cpus_per_node, cpus_per_node, per_cpu_shmem)
            for n in range(nodes)
        ]
        default = script or VpScript()
        self.vps = {cpu: SimulatedVp(cpu, default) for info in self.infos for cpu in info.cpus}
        #: Every command dispatched, in order (appends are atomic under the GIL).
        self.command_log: list[CommandRecord] = []
        self.nodes: list[SimulatedNode] = []

    def probe(self) -> list[NodeInfo] | None:
        return list(self.infos)

    def open_nodes(self) -> list[SidecarNode] | None:
        self.nodes = [SimulatedNode(self, n, info) for n, info in enumerate(self.infos)]
        return list(self.nodes)
