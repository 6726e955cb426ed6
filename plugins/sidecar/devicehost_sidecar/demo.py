"""The sidecar part of ``devicehost demo`` (entry point ``sidecar`` of group ``devicehost.demo``).

Starts a simulated sidecar with 2 nodes of 2 CPUs as a device driven through the host's lifecycle
(offer -> open -> run), then: runs a VP until its I/O port intercept and shows the message, sets 40
registers and reads them back, translates a guest virtual address, and cancels a run that would
never end by itself.
"""

from __future__ import annotations

import logging
import time

import anyio
import attrs

from devicehost import Device, DeviceContext
from devicehost.lifecycle import new_device_manager
from devicehost_sidecar.client import SidecarClient
from devicehost_sidecar.device import SidecarConfig, SidecarDevice
from devicehost_sidecar.hvdef import (
    HvX64RegisterName,
    decode_io_port_intercept_untrusted,
)
from devicehost_sidecar.protocol import (
    TRANSLATE_VALIDATE_READ,
    TranslateGvaResult,
)
from devicehost_sidecar.simulator import SimulatedSidecar, VpScript

__all__ = ["DemoResult", "run_demo"]

#: Seconds the demo waits for any one step before it declares failure.
STEP_TIMEOUT = 10.0


@attrs.frozen
class DemoResult:
    """What ``devicehost demo`` prints for the sidecar."""

    ok: bool
    lines: list[str]
    bytes_moved: int
    seconds: float


async def run_demo() -> DemoResult:
    """Run the sidecar demo; never raises for a failed step (``ok`` is False, the last line says
    what went wrong)."""
    started = time.perf_counter()
    lines: list[str] = []
    bytes_moved = 0
    ok = False
    try:
        async with anyio.create_task_group() as tg:
            device = SidecarDevice(SidecarConfig(nodes=2, cpus_per_node=2, intercept_after=50))
            # The demo prints its own report; the device's INFO lines would only interleave.
            logger = logging.getLogger("devicehost.sidecar.demo")
            logger.setLevel(logging.WARNING)
            ctx = DeviceContext("sidecar-demo", "sidecar", device.config, logger)
            lifecycle = Device(ctx, new_device_manager(device, ctx.name), tg)
            offer = await lifecycle.offer()
            lines.append(
                f"sidecar: {offer.description['driver']} with {len(offer.description['nodes'])} "
                f"nodes, {offer.description['cpus']} CPUs"
            )
            await lifecycle.open(offer)
            client: SidecarClient = lifecycle.runner
            assert isinstance(device.driver, SimulatedSidecar)
            try:
                with anyio.fail_after(STEP_TIMEOUT):
                    await _steps(client, device.driver, lines)
                ok = True
            finally:
                bytes_moved = client.stats.bytes_moved
                await lifecycle.close()
    except Exception as exc:
        lines.append(f"FAILED: {type(exc).__name__}: {exc}")
    return DemoResult(ok, lines, bytes_moved, time.perf_counter() - started)


async def _steps(client: SidecarClient, sim: SimulatedSidecar, lines: list[str]) -> None:
    cpu = client.cpus[-1]
    with client.vp(cpu) as vp:
        vp.test()
        lines.append(f"  CPU {cpu} (node {client.node_of(cpu)}): test command round trip ok")
        async with vp.run() as run:
            intercepted = await run.wait()
        assert intercepted and run.message is not None
        io = decode_io_port_intercept_untrusted(run.message.payload)
        lines.append(
            f"  run -> intercept: HvMessage type {run.message.message_type:#010x}, "
            f"{'OUT' if io.is_write else 'IN'} port {io.port:#x} size {io.access_size} "
            f"at rip {io.rip:#x} (vp {io.vp_index})"
        )

        names = [int(name) for name in list(HvX64RegisterName)[:40]]
        values = {name: (0x5EC0_0000 + n) << 64 | n for n, name in enumerate(names)}
        vp.set_vp_registers(values)
        back = vp.get_vp_registers(names)
        if back != [values[name] for name in names]:
            raise AssertionError("registers read back differ from those set")
        lines.append("  40 registers set and read back (2 commands each way: 31 + 9)")

        sim.vps[cpu].map_page(0x7F_FFF0, 0x1234)
        result = vp.translate_gva(0x7F_FFF0, TRANSLATE_VALIDATE_READ)
        if result.result_code != TranslateGvaResult.SUCCESS or result.gpa_page != 0x1234:
            raise AssertionError(f"unexpected translation {result}")
        lines.append(f"  translate gva {0x7F_FFF0 << 12:#x} -> gpa {result.gpa_page << 12:#x}")

    long_cpu = client.cpus[0]
    sim.vps[long_cpu].script = VpScript(intercept_after=None)
    with client.vp(long_cpu) as vp:
        async with vp.run() as run:
            await anyio.sleep(0.01)
            run.cancel()
            intercepted = await run.wait()
        if intercepted:
            raise AssertionError("a cancelled endless run reported an intercept")
        lines.append(f"  CPU {long_cpu} (node {client.node_of(long_cpu)}): endless run cancelled")
