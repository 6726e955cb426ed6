"""The sidecar as a devicehost device: config -> driver -> client (the runner).

- construction: a kernel driver on a machine without a sidecar (no ``<device_prefix>0``) is a
  :class:`devicehost.ConfigError` naming key ``driver``: the operator asked for a sidecar that is
  not there, and the host says so before serving anything.
- ``offer``: probes the driver and returns a :class:`devicehost.LocalOffer` describing the nodes
  and CPUs found. A sidecar that is gone by then fails the device with
  :class:`SidecarUnavailableError`.
- ``open``: opens and maps every node; the runner is the :class:`SidecarClient`. Other code reaches
  it through the host: ``host.devices[name].runner``.
- ``run``: the wait loops, one per node. Cancel-safe: stopping cancels them, starting runs new ones.
- ``close``: stops running CPUs and unmaps the nodes.
- ``save_open``: ``None`` (not supported). A run in flight on another kernel's CPU cannot be carried
  across a save; the host revokes the device and offers it anew on restore, which reopens the
  nodes with every CPU stopped.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable
from typing import Any, Literal

import attrs

from devicehost import ConfigError, DeviceContext, LocalOffer, hookimpl
from devicehost_sidecar.client import SidecarClient
from devicehost_sidecar.driver import SidecarDriver
from devicehost_sidecar.errors import SidecarUnavailableError
from devicehost_sidecar.kernel import DEFAULT_DEVICE_PREFIX, KernelDriver
from devicehost_sidecar.protocol import (
    MAX_NODES,
)
from devicehost_sidecar.simulator import SimulatedSidecar, VpScript

__all__ = ["SidecarConfig", "SidecarDevice"]

_v = attrs.validators
#: The simulator runs one thread per CPU; keep a configured simulator small.
MAX_SIMULATED_CPUS_PER_NODE = 64


@attrs.frozen
class SidecarConfig:
    """The ``[devices.<name>]`` table of a sidecar device; every key has a default.

    ``driver``: ``"simulator"`` (a simulated sidecar kernel, runs anywhere) or ``"kernel"`` (the
    ``/dev/mshv_vtl_sidecarN`` devices of an OpenHCL sidecar). ``device_prefix`` is where the
    kernel driver looks for nodes. ``nodes``, ``cpus_per_node``, ``intercept_after`` (guest steps
    before a simulated VP's I/O port intercept, 0 = at once) and ``intercept_port`` configure the
    simulator only.
    """

    driver: Literal["simulator", "kernel"] = attrs.field(
        default="simulator", validator=_v.in_(("simulator", "kernel"))
    )
    nodes: int = attrs.field(default=2, validator=[_v.instance_of(int), _v.ge(1), _v.le(MAX_NODES)])
    cpus_per_node: int = attrs.field(
        default=2, validator=[_v.instance_of(int), _v.ge(1), _v.le(MAX_SIMULATED_CPUS_PER_NODE)]
    )
    device_prefix: str = attrs.field(
        default=DEFAULT_DEVICE_PREFIX, validator=[_v.instance_of(str), _v.min_len(1)]
    )
    intercept_after: int = attrs.field(default=100, validator=[_v.instance_of(int), _v.ge(0)])
    intercept_port: int = attrs.field(
        default=0x3F8, validator=[_v.instance_of(int), _v.ge(0), _v.le(0xFFFF)]
    )


class SidecarDevice:
    """The sidecar device type (entry point ``sidecar`` of group ``devicehost``)."""

    config_class = SidecarConfig

    def __init__(self, config: SidecarConfig | None = None) -> None:
        self.config = config if config is not None else SidecarConfig()
        self.driver: SidecarDriver
        if self.config.driver == "kernel":
            if not os.path.exists(f"{self.config.device_prefix}0"):
                # Found when the device is built, before anything is served.
                raise ConfigError(
                    f"no sidecar on this machine: {self.config.device_prefix}0 does not exist"
                    ' (configure driver = "simulator" to use the simulated sidecar)',
                    key="driver", value="kernel")
            self.driver = KernelDriver(self.config.device_prefix)
        else:
            self.driver = SimulatedSidecar(
                self.config.nodes,
                self.config.cpus_per_node,
                script=VpScript(
                    intercept_after=self.config.intercept_after, port=self.config.intercept_port
                ),
            )

    def _unavailable(self) -> SidecarUnavailableError:
        return SidecarUnavailableError(
            f"no sidecar on this machine: {self.config.device_prefix}0 does not exist "
            '(configure driver = "simulator" to use the simulated sidecar)'
        )

    @hookimpl
    def offer(self, ctx: DeviceContext) -> LocalOffer:
        infos = self.driver.probe()
        if infos is None:
            raise self._unavailable()
        return LocalOffer(
            {
                "driver": self.driver.name,
                "nodes": [
                    {"index": n, "base_cpu": info.base_cpu, "cpu_count": info.cpu_count}
                    for n, info in enumerate(infos)
                ],
                "cpus": sum(info.cpu_count for info in infos),
            }
        )

    @hookimpl
    def open(self, ctx: DeviceContext, resources: LocalOffer) -> SidecarClient:
        client = SidecarClient.open(self.driver)
        if client is None:
            raise self._unavailable()
        ctx.logger.info("sidecar %r: %d nodes, CPUs %s", ctx.name, len(client.nodes), client.cpus)
        cpus = client.cpus
        if cpus != list(range(cpus[0], cpus[0] + len(cpus))):
            ctx.logger.info("sidecar %r: the nodes' CPU ranges have gaps (allowed)", ctx.name)
        return client

    @hookimpl
    def run(self, ctx: DeviceContext, runner: SidecarClient) -> Awaitable[None]:
        return runner.run_wait_loops()

    @hookimpl
    def close(self, ctx: DeviceContext, runner: SidecarClient) -> None:
        runner.close()

    @hookimpl
    def save_open(self, ctx: DeviceContext, runner: SidecarClient) -> None:
        return None

    @hookimpl
    def inspect(self, ctx: DeviceContext, runner: SidecarClient | None) -> dict[str, Any]:
        tree: dict[str, Any] = {"driver": self.driver.name}
        if runner is not None:
            tree.update(runner.inspect())
        return tree
