"""The sidecar client against the simulated sidecar kernel (and, for hostile-kernel fuzzing, a
node whose "kernel" writes whatever the test says)."""

from __future__ import annotations

import gc
import mmap
import os
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devicehost_sidecar import (
    HvX64RegisterName,
    HypervisorError,
    RegisterAssoc,
    RunHandle,
    RunNotWaitedError,
    RunNotWaitedWarning,
    SidecarClient,
    SidecarDriverError,
    SidecarError,
    SidecarProtocolError,
    SidecarUsageError,
    SimulatedSidecar,
    VpScript,
)
from devicehost_sidecar.hvdef import (
    HV_MESSAGE_TYPE_X64_IO_PORT_INTERCEPT,
    HvStatus,
    decode_io_port_intercept_untrusted,
)
from devicehost_sidecar.protocol import (
    TRANSLATE_VALIDATE_WRITE,
    CpuContext,
    NodeInfo,
    SidecarCommand,
    TranslateGvaResult,
)
from devicehost_sidecar.simulator import CommandRecord

pytestmark = pytest.mark.anyio
TIMEOUT = 5.0
NAMES = [int(name) for name in list(HvX64RegisterName)[:40]]
FUZZ = settings(max_examples=200, deadline=None)


@asynccontextmanager
async def running(
    sim: SimulatedSidecar | None = None,
) -> AsyncIterator[tuple[SimulatedSidecar, SidecarClient]]:
    """A simulated sidecar (2 nodes x 2 CPUs unless given), its client, and the wait loops."""
    sim = sim or SimulatedSidecar(2, 2, script=VpScript(intercept_after=5))
    client = SidecarClient.open(sim)
    assert client is not None
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.run_wait_loops)
            with anyio.fail_after(TIMEOUT):
                yield sim, client
            tg.cancel_scope.cancel()
    finally:
        client.close()


def commands(sim: SimulatedSidecar, cpu: int) -> list[tuple[int, int]]:
    return [(r.command, r.register_count) for r in sim.command_log if r.cpu == cpu]


# -- accessors ------------------------------------------------------------------------------------


async def test_nodes_and_cpus_are_reported() -> None:
    async with running(SimulatedSidecar(2, 3, base_cpu=10)) as (_sim, client):
        assert client.cpus == [10, 11, 12, 13, 14, 15]
        assert [(n.base_cpu, n.cpu_count) for n in client.nodes] == [(10, 3), (13, 3)]
        assert client.node_of(12) == 0 and client.node_of(13) == 1


async def test_a_cpu_in_use_is_refused_until_released() -> None:
    async with running() as (_sim, client):
        vp = client.vp(1)
        with pytest.raises(SidecarUsageError, match="CPU 1 is already in use"):
            client.vp(1)
        client.vp(2).release()  # other CPUs are free
        vp.release()
        with pytest.raises(SidecarUsageError, match="accessor for CPU 1 was released"):
            vp.test()
        with client.vp(1) as again:
            again.test()
        with pytest.raises(SidecarUsageError, match="CPU 9 is not run by the sidecar"):
            client.vp(9)


async def test_test_command_is_a_round_trip_through_the_cpu() -> None:
    async with running() as (sim, client):
        with client.vp(3) as vp:
            vp.test()
            vp.test()
        assert commands(sim, 3) == [(SidecarCommand.NONE, 0)] * 2
        assert client.stats.commands == 2


# -- registers ------------------------------------------------------------------------------------


async def test_forty_registers_go_as_31_then_9() -> None:
    async with running() as (sim, client):
        values = {name: (n + 1) << 70 | n for n, name in enumerate(NAMES)}
        with client.vp(2) as vp:
            vp.set_vp_registers(values)
            assert vp.get_vp_registers(NAMES) == [values[name] for name in NAMES]
        set_, get = SidecarCommand.SET_VP_REGISTERS, SidecarCommand.GET_VP_REGISTERS
        assert commands(sim, 2) == [(set_, 31), (set_, 9), (get, 31), (get, 9)]
        assert all(sim.vps[2].registers[name] == value for name, value in values.items())


async def test_exactly_31_registers_is_one_command_and_62_is_two() -> None:
    async with running() as (sim, client):
        names = NAMES[:31]
        with client.vp(0) as vp:
            vp.get_vp_registers(names)
            vp.set_vp_registers([RegisterAssoc(n, 1) for n in names + names])
            assert vp.get_vp_registers([]) == []
        assert [count for _, count in commands(sim, 0)] == [31, 31, 31]


async def test_failing_second_chunk_raises_hypervisor_error_after_two_commands() -> None:
    async with running() as (sim, client):
        names = [*NAMES[:35], 0xBAD, *NAMES[35:]]
        with client.vp(1) as vp, pytest.raises(HypervisorError) as info:
            vp.get_vp_registers(names)
        assert info.value.status == HvStatus.INVALID_PARAMETER
        assert info.value.command == "GET_VP_REGISTERS" and info.value.cpu == 1
        assert "HV_STATUS_INVALID_PARAMETER" in str(info.value)
        assert len(commands(sim, 1)) == 2


async def test_failing_first_chunk_stops_before_the_second() -> None:
    async with running() as (sim, client):
        assocs = [RegisterAssoc(name, 7) for name in NAMES]
        assocs.insert(3, RegisterAssoc(0xBAD, 1))
        with client.vp(1) as vp, pytest.raises(HypervisorError, match="SET_VP_REGISTERS"):
            vp.set_vp_registers(assocs)
        assert commands(sim, 1) == [(SidecarCommand.SET_VP_REGISTERS, 31)]
        registers = sim.vps[1].registers
        assert [registers[name] for name in NAMES[:4]] == [7, 7, 7, 0]


async def test_bad_register_arguments_are_the_callers_fault() -> None:
    async with running() as (sim, client):
        with client.vp(0) as vp:
            with pytest.raises(SidecarUsageError, match="not a u32"):
                vp.get_vp_registers([1 << 32])
            with pytest.raises(SidecarUsageError, match="128 bits"):
                vp.set_vp_registers({NAMES[0]: 1 << 128})
        assert commands(sim, 0) == []


async def test_reserved_target_vtl_bits_are_a_hypervisor_error() -> None:
    async with running() as (_sim, client):
        with client.vp(0) as vp, pytest.raises(HypervisorError):
            vp.get_vp_registers(NAMES[:2], target_vtl=0x20)


# -- translate ------------------------------------------------------------------------------------


async def test_translate_gva() -> None:
    async with running() as (sim, client):
        sim.vps[2].map_page(0x400, 0x9000)
        sim.vps[2].map_page(0x401, 0x9001, writable=False)
        with client.vp(2) as vp:
            ok = vp.translate_gva(0x400)
            assert (ok.result_code, ok.gpa_page) == (TranslateGvaResult.SUCCESS, 0x9000)
            missing = vp.translate_gva(0x402)
            assert missing.result_code == TranslateGvaResult.PAGE_NOT_PRESENT
            assert missing.gpa_page == 0
            denied = vp.translate_gva(0x401, TRANSLATE_VALIDATE_WRITE)
            assert denied.result_code == TranslateGvaResult.PRIVILEGE_VIOLATION
            with pytest.raises(HypervisorError, match="TRANSLATE_GVA on CPU 2"):
                vp.translate_gva(0x400, 1 << 20)
        assert commands(sim, 2) == [(SidecarCommand.TRANSLATE_GVA, 0)] * 4


# -- runs -----------------------------------------------------------------------------------------


async def test_run_stops_with_an_io_port_intercept() -> None:
    async with running() as (sim, client):
        with client.vp(3) as vp:
            vp.set_cpu_context(CpuContext((0x41, *range(1, 16))))
            async with vp.run() as run:
                assert await run.wait() is True
            assert run.message is not None
            assert run.message.message_type == HV_MESSAGE_TYPE_X64_IO_PORT_INTERCEPT
            io = decode_io_port_intercept_untrusted(run.message.payload)
            assert (io.vp_index, io.port, io.is_write, io.rax, io.rip) == (3, 0x3F8, True, 0x41, 5)
            assert vp.intercept_message() == run.message
            assert vp.cpu_context().gps[0] == 0x41
        assert sim.vps[3].registers[HvX64RegisterName.CR2] == 4  # context slot 4 is CR2
        assert client.stats.runs == 1 and client.stats.intercepts == 1


async def test_cancel_ends_an_endless_run_without_intercept() -> None:
    async with running() as (sim, client):
        sim.vps[0].script = VpScript(intercept_after=None)
        with client.vp(0) as vp:
            async with vp.run() as run:
                run.cancel()
                assert await run.wait() is False
                assert run.message is None
                run.cancel()  # after wait: nothing to stop
            sim.vps[0].script = VpScript(intercept_after=1)
            async with vp.run() as again:
                assert await again.wait() is True


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_concurrent_runs_on_every_cpu_of_both_nodes(anyio_backend: str) -> None:
    sim = SimulatedSidecar(2, 2)
    for cpu, sim_vp in sim.vps.items():
        sim_vp.script = VpScript(intercept_after=10 * (cpu + 1), port=0x60 + cpu)
    sim.vps[2].script = VpScript(intercept_after=None)  # one run is cancelled instead
    results: dict[int, tuple[bool, int | None]] = {}
    async with running(sim) as (_sim, client):
        vps = [client.vp(cpu) for cpu in client.cpus]
        handles = [vp.run() for vp in vps]
        assert all(client.inspect()["cpus"][str(c)]["state"] == "running" for c in client.cpus)

        async def wait(handle: RunHandle) -> None:
            intercepted = await handle.wait()
            port = None
            if handle.message is not None:
                port = decode_io_port_intercept_untrusted(handle.message.payload).port
            results[handle.cpu] = (intercepted, port)

        async with anyio.create_task_group() as tg:
            for handle in handles:
                tg.start_soon(wait, handle)
            handles[2].cancel()
        for vp in vps:
            vp.release()
    assert results == {0: (True, 0x60), 1: (True, 0x61), 2: (False, None), 3: (True, 0x63)}
    runs = [r for r in sim.command_log if r.command == SidecarCommand.RUN_VP]
    assert sorted(r.cpu for r in runs) == [0, 1, 2, 3]


async def test_a_running_cpu_refuses_other_work() -> None:
    async with running() as (sim, client):
        sim.vps[1].script = VpScript(intercept_after=None)
        with client.vp(1) as vp:
            async with vp.run() as run:
                with pytest.raises(SidecarUsageError, match="CPU 1 is running"):
                    vp.run()
                with pytest.raises(SidecarUsageError, match="CPU 1 is running"):
                    vp.test()
                with pytest.raises(SidecarUsageError, match="wait for the run first"):
                    vp.release()
                run.cancel()
                await run.wait()
                with pytest.raises(SidecarUsageError, match="already waited"):
                    await run.wait()


async def test_run_error_carries_the_kernels_text() -> None:
    async with running() as (sim, client):
        sim.vps[2].script = VpScript(entry_fault=True)
        with client.vp(2) as vp:
            async with vp.run() as run:
                with pytest.raises(SidecarError) as info:
                    await run.wait()
            assert info.value.text == "unexpected VTL entry reason 7 while running the VP"
            assert str(info.value).startswith("sidecar error: unexpected VTL entry")
            assert info.value.command == "RUN_VP" and info.value.cpu == 2
            vp.test()  # the CPU is stopped and usable again


async def test_leaving_the_block_without_wait_cancels_and_raises() -> None:
    async with running() as (sim, client):
        sim.vps[0].script = VpScript(intercept_after=None)
        with client.vp(0) as vp:
            with pytest.raises(RunNotWaitedError, match="CPU 0 left its async with block"):
                async with vp.run():
                    pass
            vp.test()  # cancelled and reaped: usable again
            with pytest.raises(KeyError):  # the body's own error is not masked
                async with vp.run():
                    raise KeyError("body")
            vp.test()


async def test_a_dropped_run_handle_warns_and_is_reported() -> None:
    async with running() as (sim, client):
        sim.vps[1].script = VpScript(intercept_after=None)
        vp = client.vp(1)
        handle = vp.run()
        with pytest.warns(RunNotWaitedWarning, match="CPU 1 dropped without wait"):
            del handle
            gc.collect()
        with pytest.raises(RunNotWaitedError, match=r"CPUs \[1\]"):
            client.check_abandoned()
        with pytest.raises(SidecarUsageError):
            vp.run()
        vp.release()  # an abandoned run does not pin the accessor
        assert client.inspect()["abandoned_runs"] == [1]
    assert sim.command_log == [CommandRecord(1, SidecarCommand.RUN_VP)]


async def test_close_wakes_waiters_and_refuses_further_use() -> None:
    sim = SimulatedSidecar(1, 2, script=VpScript(intercept_after=None))
    client = SidecarClient.open(sim)
    assert client is not None
    vp = client.vp(0)
    handle = vp.run()
    client.close()
    with anyio.fail_after(TIMEOUT), pytest.raises(SidecarUsageError, match="was closed"):
        await handle.wait()
    with pytest.raises(SidecarUsageError, match="closed"):
        client.vp(1)
    with pytest.raises(SidecarUsageError, match="closed"):
        vp.test()
    client.close()  # idempotent


async def test_a_run_finished_but_not_waited_before_close() -> None:
    sim = SimulatedSidecar(1, 1, script=VpScript(intercept_after=0))
    client = SidecarClient.open(sim)
    assert client is not None
    async with anyio.create_task_group() as tg:
        tg.start_soon(client.run_wait_loops)
        handle = client.vp(0).run()
        with anyio.fail_after(TIMEOUT):
            await anyio.wait_all_tasks_blocked()
            while client.inspect()["cpus"]["0"]["state"] != "finished":
                await anyio.wait_all_tasks_blocked()
        tg.cancel_scope.cancel()
    client.close()
    handle.cancel()  # nothing to stop any more
    with pytest.raises(SidecarUsageError, match="was closed"):
        await handle.wait()


# -- the wait loop against a misbehaving kernel ---------------------------------------------------


async def wait_loop_error(client: SidecarClient) -> SidecarProtocolError:
    with anyio.fail_after(TIMEOUT), pytest.raises(SidecarProtocolError) as info:
        await client.run_wait_loops()
    return info.value


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\x01\x00", "yielded 2 bytes; a completion record is 4 bytes"),
        (struct.pack("<I", 99), "completion for CPU 99, which is not one of its CPUs"),
        (struct.pack("<I", 0), "reported CPU 0 stopped without start"),
    ],
)
async def test_bad_completion_records_are_precise_errors(data: bytes, match: str) -> None:
    sim = SimulatedSidecar(2, 2, script=VpScript(intercept_after=None))
    client = SidecarClient.open(sim)
    assert client is not None
    try:
        other_node = client.vp(3)
        waiting = other_node.run()
        sim.nodes[0].post_completion(data)
        error = await wait_loop_error(client)
        assert error.args[0].find(match) >= 0, error
        with pytest.raises(SidecarProtocolError, match=match):
            await waiting.wait()  # woken with the error although its node was fine
        with pytest.raises(SidecarProtocolError, match=match):
            client.vp(0).run()  # no wait loop: runs are refused
        client.vp(1).test()  # synchronous commands still work
        assert client.inspect()["nodes"][0]["failure"] is not None
    finally:
        client.close()


class ScriptedNode:
    """A one-CPU node whose "sidecar kernel" writes the test's bytes over the response area
    (page bytes 4..2576) and, for started commands, reports completion as told."""

    def __init__(self, response: bytes = b"", *, complete_starts: bool = True) -> None:
        self.response = response
        self.complete_starts = complete_starts
        self.map = mmap.mmap(-1, 8192)
        self.view = memoryview(self.map)
        self.read_fd, self.write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.index = 0
        self.info = NodeInfo(0, 1, 8192)

    @property
    def shmem(self) -> memoryview:
        return self.view

    @property
    def completion_fd(self) -> int:
        return self.read_fd

    def run(self, cpu: int) -> None:
        self.view[4 : 4 + len(self.response)] = self.response

    def start(self, cpu: int) -> None:
        self.run(cpu)
        if self.complete_starts:
            os.write(self.write_fd, struct.pack("<I", cpu))

    def stop(self, cpu: int) -> None:
        pass

    def close(self) -> None:
        self.view.release()
        self.map.close()
        os.close(self.read_fd)
        if self.write_fd >= 0:
            os.close(self.write_fd)


def response_area(has_error: int, message: bytes, error: bytes, request: bytes) -> bytes:
    # 4: has_error, 5..16 padding, 16..1040 context, 1040 message, 1296 error, 1552 request data
    return bytes([has_error]) + bytes(11 + 1024) + message + error + request


@FUZZ
@given(
    st.sampled_from([0, 0, 1, 255]),
    st.binary(min_size=256, max_size=256),
    st.binary(min_size=256, max_size=256),
    st.binary(min_size=1024, max_size=1024),
)
def test_fuzz_response_area_yields_a_value_or_a_precise_error(
    has_error: int, message: bytes, error: bytes, request: bytes
) -> None:
    node = ScriptedNode(response_area(has_error, message, error, request))
    client = SidecarClient([node])
    kernel_text = error[1 : 1 + error[0]].decode("utf-8", errors="replace")
    try:
        with client.vp(0) as vp:
            register_status = int.from_bytes(request[4:6], "little")
            translate_status = int.from_bytes(request[0:2], "little")
            calls = [
                (vp.test, 0),
                (lambda: vp.get_vp_registers(NAMES[:3]), register_status),
                (lambda: vp.set_vp_registers(dict.fromkeys(NAMES[:3], 1)), register_status),
                (lambda: vp.translate_gva(1), translate_status),
            ]
            for call, status in calls:
                if has_error:
                    with pytest.raises(SidecarError) as info:
                        call()
                    assert info.value.text == kernel_text
                elif status:
                    with pytest.raises(HypervisorError) as hv:
                        call()
                    assert hv.value.status == status
                else:
                    call()

            async def run_once() -> None:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(client.run_wait_loops)
                    async with vp.run() as run:
                        with anyio.fail_after(TIMEOUT):
                            if has_error:
                                with pytest.raises(SidecarError):
                                    await run.wait()
                            elif request[0] and message[4] > 240:
                                with pytest.raises(SidecarProtocolError, match="payload"):
                                    await run.wait()
                            else:
                                intercepted = await run.wait()
                                assert intercepted == bool(request[0])
                                if intercepted:
                                    assert run.message is not None
                                    assert run.message.payload == message[16 : 16 + message[4]]
                    tg.cancel_scope.cancel()

            anyio.run(run_once)
    finally:
        client.close()


@FUZZ
@given(st.binary(max_size=24))
def test_fuzz_completion_fd_data_never_crashes_the_host(data: bytes) -> None:
    node = ScriptedNode(complete_starts=False)
    client = SidecarClient([node])

    async def scenario() -> None:
        with client.vp(0) as vp:
            async with vp.run() as run:
                os.write(node.write_fd, data)
                os.close(node.write_fd)  # then EOF: a 0-byte read
                node.write_fd = -1
                with anyio.fail_after(TIMEOUT):
                    await wait_loop_error(client)
                    if data[:4] == struct.pack("<I", 0):
                        assert await run.wait() is False  # the one good record completed it
                    else:
                        with pytest.raises(SidecarProtocolError):
                            await run.wait()
            vp.test()  # the CPU is stopped and usable after the failure

    try:
        anyio.run(scenario)
    finally:
        client.close()


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_a_completion_fd_that_cannot_be_polled_is_a_driver_error_naming_the_node(
    anyio_backend: str, tmp_path: Path
) -> None:
    node = ScriptedNode(complete_starts=False)
    os.close(node.read_fd)
    # A regular file: epoll refuses to watch it (EPERM).
    node.read_fd = os.open(tmp_path / "not-a-completion-fd", os.O_RDWR | os.O_CREAT)
    client = SidecarClient([node])
    try:
        waiting = client.vp(0).run()
        with anyio.fail_after(TIMEOUT), pytest.raises(SidecarDriverError) as info:
            await client.run_wait_loops()  # one error, not an exception group
        assert str(info.value) == (
            f"the completion fd {node.read_fd} of sidecar node 0 cannot be waited on or read:"
            " [Errno 1] Operation not permitted"
        )
        with pytest.raises(SidecarDriverError, match="sidecar node 0"):
            await waiting.wait()  # its waiter was woken with the same error
    finally:
        client.close()
