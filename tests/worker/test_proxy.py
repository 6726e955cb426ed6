"""Devices in workers, supervised: a worker that exits, is killed by a signal, touches truncated
memory, stops answering, will not stop or runs out of memory fails only its device (FAILED with
the cause, shown by inspect); an inline device beside it keeps answering; the restart policy
restarts it (backoff, burst limit); every worker is reaped.

The failing device is tests/thirdparty/src/dh_crash.py (a third-party-style plugin).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import attrs
import pytest
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from devicehost import DeviceContext, LocalOffer, hookimpl
from devicehost.config import HostSettings
from devicehost.host import Host
from devicehost.lifecycle import Device, DeviceState
from devicehost.testing import host_with
from devicehost.testing.registry import DeviceSpec
from devicehost.worker import WorkerSettings
from devicehost.worker.limits import no_new_privs


def _load_crash() -> ModuleType:
    # Loaded by path, under a name no import could find: the worker loads it by path too.
    name = "devicehost_tests_crash"
    if name not in sys.modules:
        path = Path(__file__).parents[1] / "thirdparty" / "src" / "dh_crash.py"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


dh_crash = _load_crash()

pytestmark = pytest.mark.anyio
BOUND = 60.0


@attrs.frozen
class EchoConfig:
    requests: MemoryObjectReceiveStream[int]
    replies: MemoryObjectSendStream[int]


class Echo:
    """An inline device whose ``run`` answers each request with the request plus one."""

    def __init__(self, config: EchoConfig) -> None:
        self.config = config

    @hookimpl
    def offer(self, ctx: DeviceContext) -> LocalOffer:
        return LocalOffer()

    @hookimpl
    def open(self, ctx: DeviceContext, resources: LocalOffer) -> str:
        return "echo"

    @hookimpl
    def run(self, ctx: DeviceContext, runner: str) -> Any:
        return self._run()

    async def _run(self) -> None:
        async for request in self.config.requests:
            await self.config.replies.send(request + 1)


class Pair:
    def __init__(self) -> None:
        self.send, requests = anyio.create_memory_object_stream[int](1)
        replies, self.receive = anyio.create_memory_object_stream[int](1)
        self.config = EchoConfig(requests, replies)

    async def round_trip(self, value: int) -> None:
        with anyio.fail_after(BOUND):
            await self.send.send(value)
            assert await self.receive.receive() == value + 1


async def wait_until(predicate: Callable[[], bool]) -> None:
    with anyio.fail_after(BOUND):
        while not predicate():
            await anyio.sleep(0.01)


def failed(device: Device) -> bool:
    return device.state is DeviceState.FAILED


def assert_reaped(pids: list[int]) -> None:
    """Every worker was waited for: none is a child of this process any more (no zombie)."""
    assert pids
    for pid in pids:
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


@asynccontextmanager
async def crash_host(pair: Pair, crash: Any, worker: WorkerSettings,
                     settings: HostSettings | None = None) -> AsyncIterator[Host]:
    specs = [DeviceSpec("echo", "echo", pair.config),
             DeviceSpec("crash", "crash", crash, attrs.evolve(worker, isolation="process"))]
    async with host_with({"echo": Echo, "crash": dh_crash.CrashDevice}, specs,
                         settings=settings) as host:
        yield host


def pids_of(host: Host) -> list[int]:
    return list(host.workers.proxies["crash"].pids)


@pytest.mark.parametrize("how,cause", [
    ("exit", "exited with code 3"),
    ("sigkill", "was killed by SIGKILL"),
    ("sigsegv", "was killed by SIGSEGV"),
    ("sigbus", "was killed by SIGBUS"),
    ("raise", "RuntimeError: dh_crash fails in run"),
])
async def test_a_worker_that_dies_fails_only_its_device(how: str, cause: str) -> None:
    pair = Pair()
    with anyio.fail_after(BOUND):
        async with crash_host(pair, dh_crash.CrashConfig(how=how), WorkerSettings()) as host:
            device = host.devices["crash"]
            await wait_until(lambda: failed(device))
            assert device.failure is not None and cause in device.failure, device.failure
            if how != "raise":
                # The worker's last words are part of the cause.
                assert f"crash: run fails ({how}) in pid" in device.failure
            await pair.round_trip(1)
            tree = await host.inspect()
            (entry,) = [d for d in tree["devices"] if d["name"] == "crash"]
            assert entry["state"] == "failed" and cause in entry["failure"]
            assert host.devices["echo"].state is DeviceState.RUNNING
            pids = pids_of(host)
            assert pids[0] != os.getpid()
    assert_reaped(pids)


@pytest.mark.parametrize("how", ["busy", "sleep"])
async def test_a_worker_that_stops_answering_is_killed(how: str) -> None:
    pair = Pair()
    settings = HostSettings(hook_deadline=1, stop_deadline=1)
    with anyio.fail_after(BOUND):
        async with crash_host(pair, dh_crash.CrashConfig(how=how), WorkerSettings(),
                              settings) as host:
            device = host.devices["crash"]
            await wait_until(lambda: failed(device))
            assert "it stopped answering (its event loop did not turn for" in (
                device.failure or ""), device.failure
            assert "was killed" in (device.failure or "")
            await pair.round_trip(1)
            pids = pids_of(host)
    assert_reaped(pids)


async def test_a_run_that_will_not_stop_is_killed_at_the_stop(
        caplog: pytest.LogCaptureFixture) -> None:
    pair = Pair()
    settings = HostSettings(hook_deadline=1, stop_deadline=1)
    with anyio.fail_after(BOUND):
        async with crash_host(pair, dh_crash.CrashConfig(how="ignore-term"), WorkerSettings(),
                              settings) as host:
            device = host.devices["crash"]
            await wait_until(lambda: "crash: run fails (ignore-term)" in caplog.text)
            assert await device.stop() is False
            assert failed(device)
            assert (device.failure or "").startswith(
                "run: WorkerFailed: run did not stop within 1 s of its cancel; the worker (pid")
            assert not device.abandoned
            await pair.round_trip(1)
            pids = pids_of(host)
    assert_reaped(pids)


async def test_a_hook_past_its_deadline_kills_the_worker() -> None:
    pair = Pair()
    settings = HostSettings(hook_deadline=1, stop_deadline=1)
    with anyio.fail_after(BOUND):
        async with crash_host(pair, dh_crash.CrashConfig(how="sleep", hook="open"),
                              WorkerSettings(), settings) as host:
            device = host.devices["crash"]
            assert failed(device)
            assert (device.failure or "").startswith(
                "open: WorkerDied: open: no answer within 1 s; the worker (pid"), device.failure
            proxy = host.workers.proxies["crash"]
            assert proxy.worker is not None
            with anyio.fail_after(BOUND):
                await proxy.worker.dead.wait()
            await pair.round_trip(1)
            pids = pids_of(host)
    assert_reaped(pids)


async def test_a_worker_past_its_memory_limit_fails_its_device() -> None:
    pair = Pair()
    with anyio.fail_after(BOUND):
        async with crash_host(pair, dh_crash.CrashConfig(how="leak"),
                              WorkerSettings(memory_limit="256M")) as host:
            device = host.devices["crash"]
            await wait_until(lambda: failed(device))
            assert "MemoryError" in (device.failure or ""), device.failure
            await pair.round_trip(1)
            pids = pids_of(host)
    assert_reaped(pids)


async def test_restarted_up_to_the_burst_limit_then_failed(
        caplog: pytest.LogCaptureFixture) -> None:
    pair = Pair()
    worker = WorkerSettings(restart="on-failure", restart_burst=3, restart_delay=0.05)
    with anyio.fail_after(BOUND):
        async with crash_host(pair, dh_crash.CrashConfig(how="sigkill"), worker) as host:
            device = host.devices["crash"]
            await wait_until(lambda: failed(device))
            failure = device.failure or ""
            assert "was killed by SIGKILL" in failure
            assert "restarted 3 time(s); the limit is 3 within 60 s (restart_burst)" in failure
            pids = pids_of(host)
            assert len(set(pids)) == 4
            await pair.round_trip(1)
    assert_reaped(pids)
    delays = [float(r.getMessage().split("restarting it in ")[1].split(" s")[0])
              for r in caplog.records if "restarting it in" in r.getMessage()]
    assert delays == [0.05, 0.1, 0.2]  # the backoff doubles


async def test_a_restarted_worker_learns_why_and_what_the_dead_one_reported() -> None:
    pair = Pair()
    worker = WorkerSettings(restart="on-failure", restart_delay=0.01)
    with anyio.fail_after(BOUND):
        async with crash_host(pair, dh_crash.CrashConfig(how="sigkill", once=True),
                              worker) as host:
            device = host.devices["crash"]
            proxy = host.workers.proxies["crash"]
            await wait_until(lambda: len(proxy.pids) == 2
                             and proxy.reports.get("started", {}).get("pid") == proxy.pids[1])
            assert device.state is DeviceState.RUNNING and device.failure is None
            tree = (await device.inspect())["device"]
            assert tree["pid"] == proxy.pids[1]
            restart = tree["restart"]
            assert restart["count"] == 1
            assert f"the worker (pid {proxy.pids[0]}) was killed by SIGKILL" in restart["cause"]
            assert restart["reports"] == {"started": {"pid": proxy.pids[0], "runs": 1}}
            assert tree["worker"]["restarts"] == 1 and tree["worker"]["alive"]
            assert "SIGKILL" in tree["worker"]["last_failure"]
            # The stop, start and close of the restarted device reach the new worker.
            assert await device.stop()
            assert await device.start()
            await pair.round_trip(1)
            pids = pids_of(host)
    assert_reaped(pids)


async def test_a_worker_has_no_new_privs_and_only_its_own_descriptors(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))  # the host's, not the worker's
    pair = Pair()
    marker = tmp_path / "marker"
    fd = os.open(marker, os.O_CREAT | os.O_RDWR)
    os.set_inheritable(fd, True)  # even an inheritable descriptor is not passed on
    try:
        with anyio.fail_after(BOUND):
            async with crash_host(pair, dh_crash.CrashConfig(), WorkerSettings()) as host:
                proxy = host.workers.proxies["crash"]
                await wait_until(lambda: "started" in proxy.reports)
                (pid,) = proxy.pids
                assert no_new_privs(pid)
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                assert not [v for v in environ if v.startswith(b"NOTIFY_SOCKET=")]
                links = {os.readlink(f"/proc/{pid}/fd/{n}") for n in os.listdir(f"/proc/{pid}/fd")}
                assert str(marker) not in links
                assert not any(link.startswith("/dev/pts") or link.startswith("/dev/tty")
                               for link in links)
                with open(f"/proc/{pid}/limits") as limits:
                    assert any(line.startswith("Max core file size") and line.split()[4] == "0"
                               for line in limits)
    finally:
        os.close(fd)
    assert_reaped([pid])


def test_a_worker_does_not_log_for_the_host_or_another_device() -> None:
    from devicehost.worker.process import relay_logger

    assert relay_logger("a", "dh_crash") == "dh_crash"
    assert relay_logger("a", "devicehost.device.a") == "devicehost.device.a"
    assert relay_logger("a", "devicehost.device.b") == "devicehost.worker.a.devicehost.device.b"
    assert relay_logger("a", "devicehost.host") == "devicehost.worker.a.devicehost.host"


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_a_supervisor_on_trio_restarts_a_killed_worker(anyio_backend: str) -> None:
    pair = Pair()
    worker = WorkerSettings(restart="on-failure", restart_delay=0.01)
    with anyio.fail_after(BOUND):
        async with crash_host(pair, dh_crash.CrashConfig(how="sigkill", once=True),
                              worker) as host:
            device = host.devices["crash"]
            proxy = host.workers.proxies["crash"]
            await wait_until(lambda: len(proxy.pids) == 2
                             and proxy.reports.get("started", {}).get("pid") == proxy.pids[1])
            assert device.state is DeviceState.RUNNING
            await pair.round_trip(1)
            pids = pids_of(host)
    assert_reaped(pids)


async def test_a_device_that_cannot_be_built_in_its_worker_is_named_with_why() -> None:
    pair = Pair()
    with anyio.fail_after(BOUND):
        async with crash_host(pair, dh_crash.CrashConfig(how="construct"),
                              WorkerSettings()) as host:
            assert "crash" not in host.devices or failed(host.devices["crash"])
            why = host.failures["crash"]
            assert "could not build the device: ValueError: dh_crash refuses to be built" in why
            await pair.round_trip(1)
            pids = pids_of(host)
    assert_reaped(pids)


class Blocker:
    """An inline device whose run blocks the host's event loop once, for 3 s, when told to."""

    def __init__(self, config: None) -> None:
        self.go = anyio.Event()
        self.blocked = anyio.Event()

    @hookimpl
    def offer(self, ctx: DeviceContext) -> LocalOffer:
        return LocalOffer()

    @hookimpl
    def open(self, ctx: DeviceContext, resources: LocalOffer) -> str:
        return "blocker"

    @hookimpl
    def run(self, ctx: DeviceContext, runner: str) -> Any:
        return self._run()

    async def _run(self) -> None:
        await self.go.wait()
        time.sleep(3)  # the host's loop, and so its reading of the worker's pongs, stalls
        self.blocked.set()
        await anyio.sleep_forever()


async def test_a_host_whose_own_loop_stalls_does_not_kill_a_healthy_worker() -> None:
    specs = [DeviceSpec("blocker", "blocker"),
             DeviceSpec("crash", "crash", dh_crash.CrashConfig(),
                        WorkerSettings(isolation="process"))]
    settings = HostSettings(hook_deadline=1, stop_deadline=1)
    with anyio.fail_after(BOUND):
        async with host_with({"blocker": Blocker, "crash": dh_crash.CrashDevice}, specs,
                             settings=settings) as host:
            blocker: Any = host.devices["blocker"].pm.get_plugin("blocker")
            proxy = host.workers.proxies["crash"]
            await wait_until(lambda: "started" in proxy.reports)
            blocker.go.set()
            await blocker.blocked.wait()
            await anyio.sleep(1.5)  # past the worker's deadline after the stall
            assert host.devices["crash"].state is DeviceState.RUNNING, host.devices[
                "crash"].failure
            assert len(proxy.pids) == 1 and proxy.worker is not None and not proxy.worker.gone
            pids = pids_of(host)
    assert_reaped(pids)


async def test_a_restart_handler_can_take_the_restart_over() -> None:
    from devicehost.worker import proxy as proxy_module

    taken: list[Any] = []

    async def handler(restart: Any) -> bool:
        taken.append(restart.info)
        return True

    pair = Pair()
    proxy_module.register_restart_handler(LocalOffer, handler)
    try:
        worker = WorkerSettings(restart="on-failure", restart_delay=0.01)
        with anyio.fail_after(BOUND):
            async with crash_host(pair, dh_crash.CrashConfig(how="sigkill", once=True),
                                  worker) as host:
                device = host.devices["crash"]
                await wait_until(lambda: device.state is DeviceState.DONE)
                proxy = host.workers.proxies["crash"]
                assert len(proxy.pids) == 2 and not proxy.worker.gone
                (info,) = taken
                assert info.count == 1 and "SIGKILL" in info.cause
                pids = pids_of(host)
    finally:
        proxy_module._RESTART_HANDLERS.pop(LocalOffer)
    assert_reaped(pids)


async def test_a_removed_device_has_its_worker_stopped_at_once() -> None:
    pair = Pair()
    with anyio.fail_after(BOUND):
        async with crash_host(pair, dh_crash.CrashConfig(), WorkerSettings()) as host:
            proxy = host.workers.proxies["crash"]
            await host.remove_device("crash")
            assert proxy.worker is not None and proxy.worker.dead.is_set()
            assert proxy.worker.returncode == 0  # it was asked to exit, and did
            assert "crash" not in host.workers.proxies
            assert_reaped(list(proxy.pids))
            await pair.round_trip(1)


async def test_a_worker_start_is_not_charged_to_the_first_hooks_deadline() -> None:
    pair = Pair()
    settings = HostSettings(hook_deadline=1, stop_deadline=1)
    with anyio.fail_after(BOUND):
        async with crash_host(pair, dh_crash.CrashConfig(how="slow-build"), WorkerSettings(),
                              settings) as host:
            device = host.devices["crash"]
            assert device.state is DeviceState.RUNNING, device.failure
            pids = pids_of(host)
    assert_reaped(pids)
