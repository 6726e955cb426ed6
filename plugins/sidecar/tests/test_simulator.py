"""The simulated sidecar kernel, driven directly through its node (no client): dispatch rules of
facts §11.7 and the completion protocol."""

from __future__ import annotations

import os
import select
import struct
from collections.abc import Iterator

import pytest

from devicehost_sidecar.errors import SidecarDriverError
from devicehost_sidecar.hvdef import (
    HvStatus,
    HvX64RegisterName,
    decode_hv_message_untrusted,
    decode_io_port_intercept_untrusted,
)
from devicehost_sidecar.protocol import (
    CommandPage,
    CpuStatus,
    SidecarCommand,
    decode_command_error_untrusted,
    decode_cpu_context_untrusted,
)
from devicehost_sidecar.simulator import CommandRecord, SimulatedNode, SimulatedSidecar, VpScript

TIMEOUT = 5.0


@pytest.fixture
def sim() -> Iterator[SimulatedSidecar]:
    sidecar = SimulatedSidecar(2, 2, base_cpu=4, script=VpScript(intercept_after=3))
    sidecar.open_nodes()
    yield sidecar
    for node in sidecar.nodes:
        node.close()


def page(node: SimulatedNode, cpu: int) -> CommandPage:
    i = cpu - node.info.base_cpu
    per = node.info.per_cpu_shmem
    return CommandPage(node.shmem[i * per : i * per + 4096])


def read_completion(node: SimulatedNode) -> bytes:
    ready, _, _ = select.select([node.completion_fd], [], [], TIMEOUT)
    assert ready, "no completion within the timeout"
    return os.read(node.completion_fd, 64)


def test_nodes_and_cpu_numbering(sim: SimulatedSidecar) -> None:
    assert [(n.index, list(n.info.cpus)) for n in sim.nodes] == [(0, [4, 5]), (1, [6, 7])]
    assert all(n.cpu_status(c) is CpuStatus.IDLE for n in sim.nodes for c in n.info.cpus)


def test_dispatch_clears_has_error_and_resets_the_command(sim: SimulatedSidecar) -> None:
    node = sim.nodes[0]
    pg = page(node, 5)
    pg.has_error = True
    pg.command = SidecarCommand.NONE
    node.run(5)
    assert not pg.has_error and pg.command == SidecarCommand.NONE
    assert node.needs_attention == 1 and node.cpu_status(5) is CpuStatus.IDLE
    assert sim.command_log == [CommandRecord(5, 0)]
    pg.release()


def test_unknown_command_reports_text(sim: SimulatedSidecar) -> None:
    node = sim.nodes[1]
    pg = page(node, 6)
    pg.command = 9
    node.run(6)
    assert pg.has_error and pg.command == 0
    assert decode_command_error_untrusted(pg.error) == "unknown command 9"
    pg.release()


@pytest.mark.parametrize(
    ("command", "text"),
    [
        (SidecarCommand.GET_VP_REGISTERS, "invalid register name count: 32"),
        (SidecarCommand.SET_VP_REGISTERS, "invalid register count: 32"),
    ],
)
def test_register_count_that_does_not_fit(
    sim: SimulatedSidecar, command: SidecarCommand, text: str
) -> None:
    node = sim.nodes[0]
    pg = page(node, 4)
    pg.command = command
    struct.pack_into("<H", pg.request_data, 0, 32)
    node.run(4)
    assert pg.has_error and decode_command_error_untrusted(pg.error) == text
    pg.release()


def test_register_failure_stops_processing_at_the_first_bad_name(sim: SimulatedSidecar) -> None:
    node = sim.nodes[0]
    pg = page(node, 4)
    pg.command = SidecarCommand.SET_VP_REGISTERS
    data = pg.request_data
    struct.pack_into("<HBBH", data, 0, 3, 0, 0, 0)
    struct.pack_into("<I12x16s", data, 16, HvX64RegisterName.RBX, (11).to_bytes(16, "little"))
    struct.pack_into("<I12x16s", data, 48, 0xDEAD, (12).to_bytes(16, "little"))
    struct.pack_into("<I12x16s", data, 80, HvX64RegisterName.RCX, (13).to_bytes(16, "little"))
    del data
    node.run(4)
    assert not pg.has_error
    assert struct.unpack_from("<H", pg.request_data, 4)[0] == HvStatus.INVALID_PARAMETER
    registers = sim.vps[4].registers
    assert registers[HvX64RegisterName.RBX] == 11 and registers[HvX64RegisterName.RCX] == 0
    pg.release()


def test_started_run_writes_the_cpu_number_to_the_completion_fd(sim: SimulatedSidecar) -> None:
    node = sim.nodes[1]
    pg = page(node, 7)
    struct.pack_into("<Q", pg.cpu_context, 0, 0xAB)  # RAX in the CPU context
    pg.command = SidecarCommand.RUN_VP
    node.start(7)
    assert read_completion(node) == struct.pack("<I", 7)
    assert pg.request_data[0] == 1 and not pg.has_error
    message = decode_hv_message_untrusted(bytes(pg.intercept_message))
    io = decode_io_port_intercept_untrusted(message.payload)
    assert (io.vp_index, io.port, io.rax, io.rip) == (7, 0x3F8, 0xAB, 3)
    assert decode_cpu_context_untrusted(bytes(pg.cpu_context)).gps[0] == 0xAB
    pg.release()


def test_stop_ends_an_endless_run_without_intercept(sim: SimulatedSidecar) -> None:
    sim.vps[5].script = VpScript(intercept_after=None)
    node = sim.nodes[0]
    pg = page(node, 5)
    pg.command = SidecarCommand.RUN_VP
    node.start(5)
    with pytest.raises(SidecarDriverError, match="CPU 5 is busy"):
        node.run(5)
    node.stop(5)
    assert read_completion(node) == struct.pack("<I", 5)
    assert pg.request_data[0] == 0 and not pg.has_error
    pg.release()


def test_stop_before_the_cpu_wakes_still_runs_the_command(sim: SimulatedSidecar) -> None:
    node = sim.nodes[0]
    pg = page(node, 4)
    for _ in range(20):  # whichever side wins the race, the command runs exactly once
        pg.command = SidecarCommand.RUN_VP
        before = len(sim.command_log)
        node.start(4)
        node.stop(4)
        assert read_completion(node) == struct.pack("<I", 4)
        assert sim.command_log[before:] == [CommandRecord(4, SidecarCommand.RUN_VP)]
    pg.release()


def test_cpu_outside_the_node_is_refused(sim: SimulatedSidecar) -> None:
    with pytest.raises(SidecarDriverError, match="node 0 has no CPU 6"):
        sim.nodes[0].start(6)


def test_close_ends_a_running_cpu_and_can_reopen(sim: SimulatedSidecar) -> None:
    sim.vps[4].script = VpScript(intercept_after=None)
    node = sim.nodes[0]
    pg = page(node, 4)
    pg.command = SidecarCommand.RUN_VP
    node.start(4)
    pg.release()
    node.close()
    assert node.cpu_status(4) is CpuStatus.REMOVED
    node.close()  # idempotent
    reopened = sim.open_nodes()
    assert reopened is not None and len(reopened) == 2


def test_bad_simulator_geometry() -> None:
    with pytest.raises(ValueError):
        SimulatedSidecar(0, 1)
    with pytest.raises(ValueError):
        SimulatedSidecar(1, 0)
    with pytest.raises(ValueError):
        SimulatedSidecar(1, 1, per_cpu_shmem=4096)


def test_delay_then_intercept_or_stop_during_the_delay(sim: SimulatedSidecar) -> None:
    node = sim.nodes[1]
    pg = page(node, 6)
    sim.vps[6].script = VpScript(intercept_after=2, delay=0.01)
    pg.command = SidecarCommand.RUN_VP
    node.start(6)
    assert read_completion(node) == struct.pack("<I", 6)
    assert pg.request_data[0] == 1  # the delay passed, then the intercept
    sim.vps[6].script = VpScript(intercept_after=2, delay=60.0)
    pg.command = SidecarCommand.RUN_VP
    node.start(6)
    node.stop(6)  # well inside the delay
    assert read_completion(node) == struct.pack("<I", 6)
    assert pg.request_data[0] == 0
    pg.release()
