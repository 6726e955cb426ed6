"""The sidecar client: drives VPs that run in the sidecar kernel through per-CPU command pages.

Shape (facts §11.6):

- :class:`SidecarClient` holds the open nodes and their CPU ranges.
  :meth:`SidecarClient.run_wait_loops` runs one wait loop per node (an anyio task): it waits for
  the node's completion fd, reads one 4-byte record (the absolute number of a CPU whose
  asynchronous command finished) and wakes that CPU's waiter. Would-block means "wait again". A
  record of the wrong size, a CPU outside the node, or a CPU that was never started is a
  :class:`SidecarProtocolError`: the loop ends with it, the waiters of that node are woken with it,
  and (through the device's ``run`` hook) only this device fails; the host carries on.
- :meth:`SidecarClient.vp` hands out a :class:`SidecarVp` accessor for one CPU and refuses a CPU
  that is already in use until the accessor is released.
- Synchronous commands (``test``, register get/set, ``translate_gva``) issue the synchronous run
  ioctl; register lists are chunked by 31 (``MAX_GET_SET_VP_REGISTERS``) and the first failing
  chunk ends the call.
- :meth:`SidecarVp.run` starts RUN_VP asynchronously and returns a :class:`RunHandle`.

Decision (a run handle dropped without ``wait``): upstream panics. Here a :class:`RunHandle` is an
async context manager; leaving the ``async with`` block without having waited cancels the run,
waits for it (bounded, shielded) so the CPU is usable again, and raises
:class:`RunNotWaitedError`. A handle used without ``async with`` and garbage-collected unwaited
emits a :class:`RunNotWaitedWarning`, is recorded, and makes :meth:`SidecarClient.check_abandoned`
raise; its CPU cannot run again until the client is closed.
"""

from __future__ import annotations

import contextlib
import enum
import os
import struct
import warnings
from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Final

import anyio
import attrs

from devicehost_sidecar.driver import SidecarDriver, SidecarNode
from devicehost_sidecar.errors import (
    HypervisorError,
    RunNotWaitedError,
    SidecarClientError,
    SidecarDriverError,
    SidecarError,
    SidecarProtocolError,
    SidecarUsageError,
)
from devicehost_sidecar.hvdef import (
    HvMessage,
    decode_hv_message_untrusted,
)
from devicehost_sidecar.protocol import (
    MAX_GET_SET_VP_REGISTERS,
    PAGE_SIZE,
    CommandPage,
    CpuContext,
    GetSetVpRegisterRequest,
    NodeInfo,
    RegisterAssoc,
    SidecarCommand,
    TranslateGvaRequest,
    TranslateGvaResponse,
    decode_command_error_untrusted,
    decode_cpu_context_untrusted,
    decode_get_set_response_untrusted,
    decode_run_vp_response_untrusted,
    decode_translate_gva_response_untrusted,
    encode_cpu_context,
    encode_get_set_request,
    encode_translate_gva_request,
)

__all__ = [
    "ClientStats",
    "RunHandle",
    "RunNotWaitedWarning",
    "SidecarClient",
    "SidecarVp",
    "VpState",
]

COMPLETION_RECORD: Final = struct.Struct("<I")
#: How long leaving an unwaited run's ``async with`` block waits for the cancelled run to end.
CANCEL_GRACE_SECONDS: Final = 5.0


class RunNotWaitedWarning(ResourceWarning):
    """Emitted when a :class:`RunHandle` is garbage-collected without ``wait`` being called."""


class VpState(enum.Enum):
    """Where a CPU's asynchronous command is, as the client sees it."""

    STOPPED = "stopped"
    RUNNING = "running"
    FINISHED = "finished"


@attrs.define
class ClientStats:
    """Counters for ``inspect`` and the demo."""

    commands: int = 0
    runs: int = 0
    intercepts: int = 0
    bytes_moved: int = 0


class _Cpu:
    """Client-side state of one CPU. Invariant: ``finished`` is set iff ``state`` is FINISHED, or
    the node failed (``error`` set) while the CPU was RUNNING."""

    def __init__(self, cpu: int, node: _Node, page: CommandPage) -> None:
        self.cpu = cpu
        self.node = node
        self.page = page
        self.state = VpState.STOPPED
        self.in_use = False
        self.abandoned = False
        #: Set when the current run finished; made by ``SidecarVp.run`` (needs a running loop).
        self.finished: anyio.Event | None = None
        self.error: SidecarClientError | None = None


class _Node:
    def __init__(self, node: SidecarNode) -> None:
        self.node = node
        self.info = node.info
        per_cpu = self.info.per_cpu_shmem
        shmem = node.shmem
        if len(shmem) < self.info.cpu_count * per_cpu:
            raise SidecarProtocolError(
                f"node {node.index} mapped {len(shmem)} bytes for {self.info.cpu_count} CPUs "
                f"of {per_cpu} bytes"
            )
        self.cpus = [
            _Cpu(self.info.base_cpu + i, self, CommandPage(shmem[at : at + PAGE_SIZE]))
            for i, at in enumerate(range(0, self.info.cpu_count * per_cpu, per_cpu))
        ]
        self.failure: SidecarClientError | None = None

    def cpu(self, cpu: int) -> _Cpu | None:
        index = cpu - self.info.base_cpu
        return self.cpus[index] if 0 <= index < len(self.cpus) else None

    def complete(self, data: bytes) -> int:
        """Handle one record read from the completion fd; returns the finished CPU."""
        if len(data) != COMPLETION_RECORD.size:
            raise SidecarProtocolError(
                f"completion fd of sidecar node {self.node.index} yielded {len(data)} bytes; "
                f"a completion record is {COMPLETION_RECORD.size} bytes"
            )
        number: int = COMPLETION_RECORD.unpack(data)[0]
        cpu = self.cpu(number)
        if cpu is None:
            raise SidecarProtocolError(
                f"sidecar node {self.node.index} reported completion for CPU {number}, which is "
                f"not one of its CPUs {list(self.info.cpus)}"
            )
        if cpu.state is not VpState.RUNNING:
            raise SidecarProtocolError(
                f"sidecar node {self.node.index} reported CPU {number} stopped without start "
                f"(its state was {cpu.state.value})"
            )
        cpu.state = VpState.FINISHED
        assert cpu.finished is not None  # made by run() before the state became RUNNING
        cpu.finished.set()
        return number

    def fail(self, error: SidecarClientError) -> None:
        """Record a wait-loop failure and wake every waiter of this node with it."""
        self.failure = error
        for cpu in self.cpus:
            if cpu.state is VpState.RUNNING and cpu.finished is not None:
                cpu.error = error
                cpu.finished.set()

    async def wait_loop(self) -> None:
        self.failure = None
        fd = self.node.completion_fd
        while True:
            try:
                await anyio.wait_readable(fd)
                data = os.read(fd, COMPLETION_RECORD.size)
            except BlockingIOError:
                continue  # readiness was stale; wait again
            except (OSError, ValueError) as exc:
                # Waiting fails too (e.g. EPERM: the fd is a regular file, which epoll cannot
                # watch; EBADF; a negative fd): the node is unusable, whatever the step.
                error = SidecarDriverError(
                    f"the completion fd {fd} of sidecar node {self.node.index} cannot be"
                    f" waited on or read: {exc}"
                )
                self.fail(error)
                raise error from exc
            try:
                self.complete(data)
            except SidecarProtocolError as exc:
                self.fail(exc)
                raise


class SidecarClient:
    """The open nodes of one sidecar and the state of their CPUs."""

    def __init__(self, nodes: Iterable[SidecarNode]) -> None:
        self._nodes: list[_Node] = []
        self._cpus: dict[int, _Cpu] = {}
        try:
            for node in nodes:
                self._nodes.append(_Node(node))
                for cpu in self._nodes[-1].cpus:
                    if cpu.cpu in self._cpus:
                        raise SidecarProtocolError(f"CPU {cpu.cpu} is claimed by two sidecar nodes")
                    self._cpus[cpu.cpu] = cpu
        except BaseException:
            # Let the caller close the nodes: no view of their memory may outlive this.
            for built in self._nodes:
                for cpu in built.cpus:
                    cpu.page.release()
            raise
        self.stats = ClientStats()
        self.abandoned: list[int] = []
        self._closed = False

    @classmethod
    def open(cls, driver: SidecarDriver) -> SidecarClient | None:
        """Open every node of ``driver``; ``None`` if there is no sidecar."""
        nodes = driver.open_nodes()
        if nodes is None:
            return None
        try:
            return cls(nodes)
        except BaseException:
            for node in nodes:
                node.close()
            raise

    @property
    def nodes(self) -> list[NodeInfo]:
        return [node.info for node in self._nodes]

    @property
    def cpus(self) -> list[int]:
        """Every CPU the sidecar runs, in node order (ranges may have gaps)."""
        return list(self._cpus)

    def node_of(self, cpu: int) -> int:
        return self._cpu(cpu).node.node.index

    def _cpu(self, cpu: int) -> _Cpu:
        if self._closed:
            raise SidecarUsageError("the sidecar client is closed")
        state = self._cpus.get(cpu)
        if state is None:
            raise SidecarUsageError(f"CPU {cpu} is not run by the sidecar (CPUs: {self.cpus})")
        return state

    def vp(self, cpu: int) -> SidecarVp:
        """The accessor for ``cpu``; refuses a CPU whose accessor has not been released."""
        state = self._cpu(cpu)
        if state.in_use:
            raise SidecarUsageError(f"CPU {cpu} is already in use")
        state.in_use = True
        return SidecarVp(self, state)

    async def run_wait_loops(self) -> None:
        """Run one wait loop per node until cancelled. A loop that fails ends them all and its
        error (not an exception group) is raised; every node's waiters were woken with it."""
        try:
            async with anyio.create_task_group() as tg:
                for node in self._nodes:
                    tg.start_soon(node.wait_loop, name=f"sidecar node {node.node.index} wait loop")
        except BaseExceptionGroup as group:
            first = _first_client_error(group)
            if first is None:
                raise
            # Every loop is down now: no waiter on any node can be woken by a completion.
            for node in self._nodes:
                if node.failure is None:
                    node.fail(first)
            raise first from None

    def check_abandoned(self) -> None:
        """Raise :class:`RunNotWaitedError` if a run handle was dropped without ``wait``."""
        if self.abandoned:
            raise RunNotWaitedError(
                f"run handles for CPUs {self.abandoned} were dropped without wait"
            )

    def close(self) -> None:
        """Stop running CPUs, wake their waiters and unmap the nodes."""
        if self._closed:
            return
        self._closed = True
        closed = SidecarUsageError("the sidecar client was closed")
        for node in self._nodes:
            for cpu in node.cpus:
                if cpu.state is VpState.RUNNING:
                    # The node goes away below either way.
                    with contextlib.suppress(SidecarDriverError):
                        node.node.stop(cpu.cpu)
            node.fail(closed)
            for cpu in node.cpus:
                cpu.page.release()
            node.node.close()

    def inspect(self) -> dict[str, Any]:
        return {
            "nodes": [
                {
                    "index": node.node.index,
                    "base_cpu": node.info.base_cpu,
                    "cpu_count": node.info.cpu_count,
                    "failure": str(node.failure) if node.failure else None,
                }
                for node in self._nodes
            ],
            "cpus": {
                str(cpu.cpu): {"state": cpu.state.value, "in_use": cpu.in_use}
                for cpu in self._cpus.values()
            },
            "stats": attrs.asdict(self.stats),
            "abandoned_runs": list(self.abandoned),
        }


class SidecarVp:
    """Access to one CPU's VP. Release it (``with`` block or :meth:`release`) to free the CPU."""

    def __init__(self, client: SidecarClient, cpu: _Cpu) -> None:
        self._client = client
        self._cpu = cpu
        self._released = False

    @property
    def cpu(self) -> int:
        return self._cpu.cpu

    def __enter__(self) -> SidecarVp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        if self._released:
            return
        if self._cpu.state is VpState.RUNNING and not self._cpu.abandoned:
            raise SidecarUsageError(f"CPU {self.cpu} is running; wait for the run first")
        self._released = True
        self._cpu.in_use = False

    # -- synchronous commands ---------------------------------------------------------------------

    def _ready(self) -> _Cpu:
        if self._released:
            raise SidecarUsageError(f"the accessor for CPU {self.cpu} was released")
        if self._client._closed:
            raise SidecarUsageError("the sidecar client is closed")
        cpu = self._cpu
        if cpu.state is not VpState.STOPPED:
            raise SidecarUsageError(f"CPU {self.cpu} is {cpu.state.value}, not stopped")
        return cpu

    def _command(self, command: SidecarCommand, request: bytes) -> memoryview:
        cpu = self._ready()
        page = cpu.page
        page.command = command
        page.request_data[: len(request)] = request
        cpu.node.node.run(cpu.cpu)
        stats = self._client.stats
        stats.commands += 1
        stats.bytes_moved += len(request)
        if page.has_error:
            raise SidecarError(
                decode_command_error_untrusted(page.error), cpu=cpu.cpu, command=command.name
            )
        return page.request_data

    def test(self) -> None:
        """Round-trip a no-op command through the sidecar kernel."""
        self._command(SidecarCommand.NONE, b"")

    def get_vp_registers(self, names: Sequence[int], *, target_vtl: int = 0) -> list[int]:
        """The values of ``names``, fetched 31 at a time. A failing chunk raises
        :class:`HypervisorError` and no later chunk is sent."""
        _check_names(names)
        values: list[int] = []
        for start in range(0, len(names), MAX_GET_SET_VP_REGISTERS):
            chunk = names[start : start + MAX_GET_SET_VP_REGISTERS]
            request = encode_get_set_request(
                GetSetVpRegisterRequest(len(chunk), target_vtl),
                [RegisterAssoc(name) for name in chunk],
            )
            data = self._command(SidecarCommand.GET_VP_REGISTERS, request)
            status, chunk_values = decode_get_set_response_untrusted(data, len(chunk))
            del data
            self._client.stats.bytes_moved += 16 * len(chunk)
            if status:
                raise HypervisorError(status, cpu=self.cpu, command="GET_VP_REGISTERS")
            values.extend(chunk_values)
        return values

    def set_vp_registers(
        self,
        registers: Mapping[int, int] | Sequence[RegisterAssoc],
        *,
        target_vtl: int = 0,
    ) -> None:
        """Set registers, 31 at a time, in order. A failing chunk raises :class:`HypervisorError`;
        the chunks before it (and, inside it, the registers before the failing one) stay set."""
        if isinstance(registers, Mapping):
            assocs = [RegisterAssoc(name, value) for name, value in registers.items()]
        else:
            assocs = list(registers)
        _check_names([assoc.name for assoc in assocs])
        for assoc in assocs:
            if not 0 <= assoc.value < 1 << 128:
                raise SidecarUsageError(f"register value {assoc.value:#x} does not fit 128 bits")
        for start in range(0, len(assocs), MAX_GET_SET_VP_REGISTERS):
            chunk = assocs[start : start + MAX_GET_SET_VP_REGISTERS]
            request = encode_get_set_request(GetSetVpRegisterRequest(len(chunk), target_vtl), chunk)
            data = self._command(SidecarCommand.SET_VP_REGISTERS, request)
            status, _ = decode_get_set_response_untrusted(data, 0)
            del data
            if status:
                raise HypervisorError(status, cpu=self.cpu, command="SET_VP_REGISTERS")

    def translate_gva(self, gvn: int, control_flags: int = 0) -> TranslateGvaResponse:
        """Translate guest virtual page ``gvn``; the result code says whether it is mapped."""
        if not 0 <= gvn < 1 << 64 or not 0 <= control_flags < 1 << 64:
            raise SidecarUsageError("gvn and control flags are u64")
        request = encode_translate_gva_request(TranslateGvaRequest(gvn, control_flags))
        data = self._command(SidecarCommand.TRANSLATE_GVA, request)
        response = decode_translate_gva_response_untrusted(data)
        del data
        self._client.stats.bytes_moved += 80
        if response.status:
            raise HypervisorError(response.status, cpu=self.cpu, command="TRANSLATE_GVA")
        return response

    def cpu_context(self) -> CpuContext:
        """The general-purpose registers and FXSAVE image in the command page."""
        return decode_cpu_context_untrusted(bytes(self._ready().page.cpu_context))

    def set_cpu_context(self, context: CpuContext) -> None:
        self._ready().page.cpu_context[:] = encode_cpu_context(context)

    def intercept_message(self) -> HvMessage:
        """The HvMessage of the last intercept (valid after a run that returned True)."""
        return decode_hv_message_untrusted(bytes(self._ready().page.intercept_message))

    # -- asynchronous run ------------------------------------------------------------------------

    def run(self) -> RunHandle:
        """Start RUN_VP on this CPU; the returned handle must be waited. Completion is reported
        by the wait loops (:meth:`SidecarClient.run_wait_loops`, the device's ``run`` hook), which
        must be running for ``wait`` to return."""
        cpu = self._ready()
        if cpu.abandoned:
            raise RunNotWaitedError(f"CPU {self.cpu} has an abandoned run")
        if cpu.node.failure is not None:
            # No wait loop would report this run's completion until the device runs again.
            raise cpu.node.failure
        cpu.page.command = SidecarCommand.RUN_VP
        cpu.error = None
        cpu.finished = anyio.Event()
        cpu.state = VpState.RUNNING
        try:
            cpu.node.node.start(cpu.cpu)
        except BaseException:
            cpu.state = VpState.STOPPED
            raise
        self._client.stats.runs += 1
        return RunHandle(self._client, cpu)


class RunHandle:
    """One asynchronous RUN_VP. ``await wait()`` returns True if the VP stopped on an intercept
    (then :attr:`message` holds it) and False if it was stopped by :meth:`cancel`."""

    def __init__(self, client: SidecarClient, cpu: _Cpu) -> None:
        self._client = client
        self._cpu = cpu
        self._waited = False
        self.message: HvMessage | None = None

    @property
    def cpu(self) -> int:
        return self._cpu.cpu

    @property
    def waited(self) -> bool:
        return self._waited

    def cancel(self) -> None:
        """Ask the sidecar kernel to stop the run (no effect once waited)."""
        if not self._waited and not self._client._closed and self._cpu.state is VpState.RUNNING:
            self._cpu.node.node.stop(self._cpu.cpu)

    async def wait(self) -> bool:
        """Wait for the run to finish. Raises the sidecar's error, a node's wait-loop failure,
        or :class:`SidecarProtocolError` for an intercept message that does not decode."""
        if self._waited:
            raise SidecarUsageError(f"the run on CPU {self.cpu} was already waited")
        cpu = self._cpu
        assert cpu.finished is not None
        await cpu.finished.wait()
        self._waited = True
        cpu.state = VpState.STOPPED
        if cpu.error is not None:
            raise cpu.error
        if self._client._closed:
            raise SidecarUsageError("the sidecar client was closed")
        page = cpu.page
        if page.has_error:
            raise SidecarError(
                decode_command_error_untrusted(page.error), cpu=cpu.cpu, command="RUN_VP"
            )
        intercept = decode_run_vp_response_untrusted(bytes(page.request_data[:1]))
        if intercept:
            self.message = decode_hv_message_untrusted(bytes(page.intercept_message))
            self._client.stats.intercepts += 1
            self._client.stats.bytes_moved += 256
        return intercept

    async def __aenter__(self) -> RunHandle:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._waited:
            return
        self.cancel()
        finished = self._cpu.finished
        assert finished is not None
        with anyio.move_on_after(CANCEL_GRACE_SECONDS, shield=True):
            await finished.wait()
        if finished.is_set():
            self._waited = True
            self._cpu.state = VpState.STOPPED
        if exc_type is None:
            raise RunNotWaitedError(
                f"the run on CPU {self.cpu} left its async with block without wait; "
                "it was cancelled"
            )

    def __del__(self) -> None:
        if self._waited or self._cpu.abandoned:
            return
        self._cpu.abandoned = True
        self._client.abandoned.append(self._cpu.cpu)
        warnings.warn(
            f"run handle for CPU {self._cpu.cpu} dropped without wait",
            RunNotWaitedWarning,
            stacklevel=2,
        )


def _first_client_error(group: BaseExceptionGroup[BaseException]) -> SidecarClientError | None:
    for exc in group.exceptions:
        if isinstance(exc, SidecarClientError):
            return exc
        if isinstance(exc, BaseExceptionGroup):
            inner = _first_client_error(exc)
            if inner is not None:
                return inner
    return None


def _check_names(names: Sequence[int]) -> None:
    for name in names:
        if not 0 <= name < 1 << 32:
            raise SidecarUsageError(f"register name {name:#x} is not a u32")
