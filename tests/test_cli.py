"""The ``devicehost`` command: in-process over fake distributions, and as a real process."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import devicehost.demo
import devicehost.host
import devicehost.serving
from devicehost.cli import main
from devicehost.config import DeviceConfig

BROKEN = ("broken", "badhook", "clash_a", "clash_b", "future")


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_list_json_is_one_array_with_an_object_per_plugin_and_imports_nothing(
    fake_site: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_site.install_catalog("good", *BROKEN)
    code, out, _ = run_cli(capsys, "list", "--json")
    assert code == 0
    rows = json.loads(out)
    assert all(set(r) == {"name", "distribution", "version", "status", "error"} for r in rows)
    assert [(r["name"], r["distribution"], r["status"]) for r in rows] == [
        ("badhook", "dh-badhook", "available"),
        ("broken", "dh-broken", "available"),
        ("clash", "dh-clash-a", "error"),
        ("clash", "dh-clash-b", "error"),
        ("future", "dh-future", "error"),
        ("good", "dh-good", "available"),
    ]
    assert not [m for m in sys.modules if m.startswith("dh_")]


def test_list_load_shows_import_and_hook_errors(
    fake_site: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_site.install_catalog("good", *BROKEN)
    code, out, _ = run_cli(capsys, "list", "--json", "--load")
    assert code == 0
    status = {(r["name"], r["distribution"]): (r["status"], r["error"]) for r in json.loads(out)}
    assert status[("good", "dh-good")] == ("loaded", None)
    assert status[("broken", "dh-broken")] == (
        "error", "import failed: RuntimeError: dh_broken refuses to import"
    )
    assert status[("badhook", "dh-badhook")][0] == "error"


def test_list_table(fake_site: Any, capsys: pytest.CaptureFixture[str]) -> None:
    fake_site.install_catalog("good", "future")
    code, out, _ = run_cli(capsys, "-p", "no:good", "list")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "DISTRIBUTION", "VERSION", "STATUS", "ERROR"]
    assert lines[1].startswith("future  dh-future     1.0      error    needs host API 2")
    assert lines[2].split() == ["good", "dh-good", "1.2.0", "blocked", "blocked", "by", "-p",
                                "no:good"]


def test_list_without_plugins(fake_site: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(capsys, "list") == (0, "no devicehost plugins are installed\n", "")
    assert run_cli(capsys, "list", "--json") == (0, "[]\n", "")


def test_strict_list_fails_on_metadata_errors(
    fake_site: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_site.install_catalog("good", "future")
    code, _, err = run_cli(capsys, "list", "--strict")
    assert code == 2
    assert "plugin errors (strict mode)" in err
    assert run_cli(capsys, "list", "--strict", "-p", "no:future")[0] == 0


def test_doctor_names_each_broken_plugin(
    fake_site: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_site.install_catalog("good", *BROKEN)
    code, out, _ = run_cli(capsys, "doctor")
    assert code == 1
    broken_section = out.split("5 broken:\n")[1]
    for name in ("broken (dh-broken 1.0)", "badhook (dh-badhook 1.0)",
                 "clash (dh-clash-a 1.0)", "clash (dh-clash-b 2.0)", "future (dh-future 1.0)"):
        assert f"  {name}: " in broken_section
    assert "loaded   good (dh-good 1.2.0)" in out


def test_doctor_healthy_after_blocking_the_broken_ones(
    fake_site: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_site.install_catalog("good", *BROKEN)
    names = ("broken", "badhook", "clash", "dh-future")
    blocks = [arg for name in names for arg in ("-p", f"no:{name}")]
    code, out, _ = run_cli(capsys, "doctor", *blocks)
    assert code == 0
    assert "1 loaded plugin: all healthy" in out.splitlines()


def test_doctor_reports_each_accelerator(
    fake_site: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from devicehost import accel

    fake_site.install_catalog("good")
    monkeypatch.setenv(accel.PURE_PYTHON_ENV, "1")
    code, out, _ = run_cli(capsys, "doctor")
    assert code == 0
    assert out.splitlines()[-len(accel.ACCELERATORS):] == [
        f"accelerator {name} ({what}): turned off" for name, what in accel.ACCELERATORS.items()
    ]


def test_doctor_fails_on_a_requested_plugin_that_is_missing(
    fake_site: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_site.install_catalog("good")
    code, out, _ = run_cli(capsys, "-p", "ghost", "doctor")
    assert code == 1
    assert "  ghost: requested with -p, but no installed plugin has this name" in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == "devicehost 0.1.0\n"


def test_usage_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2


def test_run_structures_the_config_and_serves_it(
    fake_site: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    fake_site.install_catalog("good", "counter")
    seen: dict[str, Any] = {}

    async def fake_run_host(registry: Any, config: Any, *, cross_cutting: Any = (),
                            watchdog: Any = None) -> int:
        seen.update(registry=registry, config=config, cross_cutting=list(cross_cutting))
        return 7

    monkeypatch.setattr(devicehost.serving, "run_host", fake_run_host)
    monkeypatch.setenv("DEVICEHOST_TRACE", "1")
    config = tmp_path / "host.toml"
    config.write_text('[[device]]\nplugin = "good"\nname = "g1"\ngreeting = "hi"\n')
    assert run_cli(capsys, "run", "--config", str(config))[0] == 7
    (device,) = seen["config"].devices
    assert isinstance(device, DeviceConfig)
    assert (device.name, device.plugin, device.config.greeting) == ("g1", "good", "hi")
    assert [type(p).__name__ for p in seen["cross_cutting"]] == ["TracePlugin"]
    assert [type(p).__name__ for p in seen["registry"].cross_cutting] == ["module"]

    monkeypatch.delenv("DEVICEHOST_TRACE")
    assert run_cli(capsys, "run")[0] == 7
    assert [d.name for d in seen["config"].devices] == ["good"]
    assert seen["cross_cutting"] == []


def test_run_reports_config_and_strict_plugin_errors(
    fake_site: Any, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    fake_site.install_catalog("good", "broken")
    config = tmp_path / "host.toml"
    config.write_text('[[device]]\nplugin = "good"\ngreting = "hi"\n')
    code, _, err = run_cli(capsys, "run", "--config", str(config))
    assert code == 2  # the exit-code table: bad input, nothing served
    assert f"devicehost: error: {config}: device 'good': key 'greting': unknown key" in err
    # Said once (not also logged by the plugin loader).
    assert err.count("broken (dh-broken 1.0)") == 1
    assert "devicehost: warning: plugin broken (dh-broken 1.0): import failed" in err
    code, _, err = run_cli(capsys, "--strict", "run", "--config", str(config))
    assert code == 2
    assert "devicehost: error: plugin errors (strict mode):" in err


def test_demo_gets_the_registry(
    fake_site: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_site.install_catalog("good")
    monkeypatch.setattr(devicehost.demo, "main", lambda registry: len(registry.device_classes))
    assert run_cli(capsys, "demo")[0] == 1


def devicehost_command() -> list[str]:
    script = Path(sys.executable).parent / "devicehost"
    return [str(script)] if script.exists() else [sys.executable, "-m", "devicehost.cli"]


def test_installed_command_lists_the_shipped_plugins_as_available() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEVICEHOST_")}
    proc = subprocess.run(
        [*devicehost_command(), "list", "--json"],
        capture_output=True, text=True, timeout=60, env=env, check=True,
    )
    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    for name in ("vmbfs", "vsock", "intercept", "sidecar"):
        assert rows[name]["status"] == "available"
        assert rows[name]["distribution"] == f"devicehost-{name}"
        assert rows[name]["error"] is None


def wait_for_output(proc: subprocess.Popen[bytes], text: str, timeout: float) -> str:
    """Read the process's stderr until ``text`` appears; fail after ``timeout`` seconds."""
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout
    seen = b""
    while text.encode() not in seen:
        left = deadline - time.monotonic()
        if left <= 0 or proc.poll() is not None:
            pytest.fail(f"{text!r} did not appear; stderr so far:\n{seen.decode()}")
        ready, _, _ = select.select([proc.stderr], [], [], left)
        if ready:
            chunk = os.read(proc.stderr.fileno(), 65536)
            if not chunk:
                pytest.fail(f"stderr closed before {text!r}:\n{seen.decode()}")
            seen += chunk
    return seen.decode()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_run_serves_until_signalled_then_stops_gracefully(
    thirdparty: Any, tmp_path: Path, signum: int
) -> None:
    site = tmp_path / "site"
    thirdparty.write_installed(site, thirdparty.CATALOG["good"])
    journal = tmp_path / "journal.txt"
    config = tmp_path / "host.toml"
    config.write_text(f'[[device]]\nplugin = "good"\njournal = "{journal.name}"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEVICEHOST_")}
    env.update(PYTHONPATH=str(site), DEVICEHOST_LOAD_PLUGINS="good", DEVICEHOST_TRACE="1")
    proc = subprocess.Popen(
        [*devicehost_command(), "run", "--config", str(config)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
    )
    try:
        output = wait_for_output(proc, "devicehost.host: ready\n", timeout=30)
        assert "device 'good': offer returned in" in output
        proc.send_signal(signum)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()
    assert journal.read_text().splitlines() == ["offer good", "open", "run hello", "close"]


STATE_CONFIG = """\
[[device]]
plugin = "vmbfs"
name = "fs"
file = "{hive}"

[[device]]
plugin = "intercept"
name = "relay"
"""


def run_until_sigterm(command: list[str], env: dict[str, str], wait_for: str, *,
                      expect: int = 0) -> str:
    """Start ``devicehost run``, wait for ``wait_for`` on stderr, SIGTERM it (it must exit with
    ``expect``); its stderr."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        output = wait_for_output(proc, wait_for, timeout=30)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == expect
        assert proc.stderr is not None
        return output + proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()


def test_run_state_saves_on_sigterm_and_restores_at_start(tmp_path: Path) -> None:
    from devicehost.savedstate import decode_envelope_untrusted

    hive = tmp_path / "hive"
    hive.write_bytes(b"hive")
    config = tmp_path / "host.toml"
    config.write_text(STATE_CONFIG.format(hive=hive))
    state = tmp_path / "state.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEVICEHOST_")}
    env["DEVICEHOST_LOAD_PLUGINS"] = "vmbfs,intercept"
    command = [*devicehost_command(), "run", "--config", str(config), "--state", str(state)]

    first = run_until_sigterm(command, env, "devicehost.host: ready\n")
    assert f"no saved state at {state}: starting fresh" in first
    assert f"saved state written to {state}" in first
    entries = [(e.device, e.plugin, e.type_name)
               for e in decode_envelope_untrusted(state.read_bytes())]
    assert entries == [("@vmbus", "host", "vmbus.ServerSavedState"),
                       ("fs", "vmbfs", "host.NotSaved"),
                       ("relay", "intercept", "intercept.RelaySavedState")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hive", "host.toml", "state.json"]

    second = run_until_sigterm(command, env, "devicehost.host: ready\n")
    assert "restore of relay: restored" in second
    assert "restore of fs: fresh: not saved ('channel closed')" in second
    assert f"saved state written to {state}" in second
    assert len(decode_envelope_untrusted(state.read_bytes())) == 3


def test_run_refuses_a_bad_state_file_and_serves_nothing(tmp_path: Path) -> None:
    config = tmp_path / "host.toml"
    config.write_text('[[device]]\nplugin = "intercept"\nname = "relay"\n')
    state = tmp_path / "state.json"
    state.write_bytes(b'{"format": "devicehost-saved-state", "version": 1, "devices": [1]}')
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEVICEHOST_")}
    env["DEVICEHOST_LOAD_PLUGINS"] = "intercept"
    proc = subprocess.run(
        [*devicehost_command(), "run", "--config", str(config), "--state", str(state)],
        capture_output=True, text=True, timeout=60, env=env,
    )
    assert proc.returncode == 2
    assert (f"devicehost: error: {state}: saved state: devices[0]: expected an object, got int;"
            " the host does not start") in proc.stderr
    assert "serving" not in proc.stderr and "ready" not in proc.stderr
    assert state.read_bytes().startswith(b'{"format"')  # left as it was


def _run_bounded(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    # A FIFO that were opened for reading would block the command for good: the timeout kills
    # (and reaps) it, and the test fails with TimeoutExpired.
    return subprocess.run([*devicehost_command(), *argv], capture_output=True, text=True,
                          timeout=60, env=env)


def test_run_refuses_a_fifo_config_or_state_file_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    config = tmp_path / "host.toml"
    config.write_text('[[device]]\nplugin = "intercept"\nname = "relay"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEVICEHOST_")}
    env["DEVICEHOST_LOAD_PLUGINS"] = "intercept"

    proc = _run_bounded(["run", "--config", str(fifo)], env)
    assert proc.returncode == 2  # bad input, nothing served
    assert f"devicehost: error: {fifo}: config file is not a regular file (a FIFO)" in proc.stderr

    proc = _run_bounded(["run", "--config", str(config), "--state", str(fifo)], env)
    assert proc.returncode == 2
    assert (f"devicehost: error: {fifo}: cannot read the saved state: not a regular file"
            " (a FIFO)") in proc.stderr
    assert "serving" not in proc.stderr


def test_run_serves_the_other_devices_beside_a_vmbfs_file_that_is_a_fifo(tmp_path: Path) -> None:
    fifo = tmp_path / "hive"
    os.mkfifo(fifo)
    config = tmp_path / "host.toml"
    config.write_text(STATE_CONFIG.format(hive=fifo))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEVICEHOST_")}
    env["DEVICEHOST_LOAD_PLUGINS"] = "vmbfs,intercept"
    output = run_until_sigterm([*devicehost_command(), "run", "--config", str(config)], env,
                               "devicehost.host: ready\n", expect=1)
    assert (f"{config}: device 'fs': key 'file' = '{fifo}': cannot be served: not a regular"
            " file (a FIFO)") in output
    assert "serving 1 of 2 devices; failed: fs (" in output


# -- conventions -----------------------------------------------------------------------------------


def test_bare_command_prints_the_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys)
    assert code == 0
    assert out.startswith("usage: devicehost")
    assert "COMMAND" in out and "inspect" in out


def test_top_level_help_lists_environment_variables_and_exit_codes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from devicehost import exitcodes
    from devicehost.cli import ENVIRONMENT

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for name, _ in ENVIRONMENT:
        assert name in out
    for code, what in exitcodes.EXIT_CODES:
        assert f"  {code}  {what}" in out.splitlines()
    assert "exit codes:" in out and "environment variables:" in out


@pytest.mark.parametrize("command", ["list", "doctor", "run", "inspect", "demo"])
def test_every_subcommand_help_has_a_description(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    usage, description = out.split("\n\n", 2)[:2]
    assert usage.startswith(f"usage: devicehost {command}")
    assert len(description.split()) >= 8, description
    assert "-v, --verbose" in out, "-v works after the subcommand too"


def test_the_readme_exit_code_table_is_the_code_table() -> None:
    from devicehost import exitcodes

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1:3] for line in section.splitlines() if line.startswith("| `")]
    assert [(int(code.strip().strip("`")), what.strip()) for code, what in rows] == [
        (code, what) for code, what in exitcodes.EXIT_CODES
    ]


def test_doctor_json(fake_site: Any, capsys: pytest.CaptureFixture[str]) -> None:
    fake_site.install_catalog("good", "broken")
    code, out, _ = run_cli(capsys, "doctor", "--json")
    assert code == 1
    report = json.loads(out)
    assert report["healthy"] is False
    assert {(p["name"], p["status"], p["kind"]) for p in report["plugins"]} == {
        ("good", "loaded", "device"), ("broken", "error", None)}
    assert report["problems"] == [
        "broken (dh-broken 1.0): import failed: RuntimeError: dh_broken refuses to import"]
    assert set(report["accelerators"]) >= {"devicehost.vmbus._ringc"}
    code, out, _ = run_cli(capsys, "doctor", "--json", "-p", "no:broken")
    assert code == 0 and json.loads(out)["healthy"] is True


@pytest.mark.parametrize(
    ("argv", "env", "warning"),
    [
        (["-p", "nosuch", "list"], {},
         "plugin nosuch: requested with -p, but no installed plugin has this name"),
        (["list", "-p", "no:goood"], {},
         "plugin no:goood: blocks nothing, no installed plugin has this name (did you mean"
         " 'good'?)"),
        (["list"], {"DEVICEHOST_LOAD_PLUGINS": "nosuch"},
         "plugin nosuch: named in DEVICEHOST_LOAD_PLUGINS, but no installed plugin has this"
         " name"),
    ],
)
def test_plugin_selection_typos_warn_and_fail_under_strict(
    fake_site: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    argv: list[str], env: dict[str, str], warning: str,
) -> None:
    fake_site.install_catalog("good")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    code, _, err = run_cli(capsys, *argv)
    assert code == 0
    assert err.splitlines() == [f"devicehost: warning: {warning}"]
    code, _, err = run_cli(capsys, *argv, "--strict")
    assert code == 2
    assert warning.removeprefix("plugin ") in err and "strict mode" in err


def test_run_and_demo_warn_when_no_plugin_is_loaded(
    fake_site: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_site.install_catalog("good")
    monkeypatch.setenv("DEVICEHOST_DISABLE_PLUGIN_AUTOLOAD", "1")
    code, _, err = run_cli(capsys, "demo")
    assert code == 1
    assert err.strip() == (
        "devicehost: error: no device plugin is loaded (every installed plugin is blocked:"
        " autoload disabled by DEVICEHOST_DISABLE_PLUGIN_AUTOLOAD (select it with -p NAME or"
        " DEVICEHOST_LOAD_PLUGINS)): nothing to demo")
    seen: list[Any] = []

    async def fake_run_host(registry: Any, config: Any, **options: Any) -> int:
        seen.append(config)
        return 0

    monkeypatch.setattr(devicehost.serving, "run_host", fake_run_host)
    code, _, err = run_cli(capsys, "run")
    assert code == 0 and seen[0].devices == ()
    assert "devicehost: warning: no device plugin is loaded (every installed plugin is blocked" in (
        err)


# -- devicehost run as a service -------------------------------------------------------------------

README_PATH = Path(__file__).resolve().parents[1] / "README.md"


def readme_config(missing: Path) -> str:
    """The README's example config, with its directories moved under ``missing`` (absent)."""
    import re

    blocks: list[str] = re.findall(r"```toml\n# devicehost.toml\n(.*?)```",
                                   README_PATH.read_text(), re.DOTALL)
    (block,) = blocks
    return block.replace('"/var/lib/vm', f'"{missing}/var/lib/vm').replace(
        '"/run/vm', f'"{missing}/run/vm')


def shipped_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("DEVICEHOST_") and k != "NOTIFY_SOCKET"}
    env.update(extra)
    return env


def test_the_readme_example_without_its_directories_serves_the_rest_then_exits_1(
    tmp_path: Path,
) -> None:
    missing = tmp_path / "missing"
    config = tmp_path / "devicehost.toml"
    config.write_text(readme_config(missing))
    proc = subprocess.Popen([*devicehost_command(), "run", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=shipped_env())
    try:
        output = wait_for_output(proc, "devicehost.host: ready\n", timeout=60)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 1
        assert proc.stderr is not None
        output += proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()
    hive = f"{missing}/var/lib/vm/imc.hiv"
    imc_error = f"key 'file' = '{hive}': cannot be served: No such file or directory"
    vsock_error = f"key 'base_path' = '{missing}/run/vm/vsock': cannot listen: No such file or" \
        " directory"
    assert f"ERROR devicehost.host: {config}: device 'imc': {imc_error}\n" in output
    assert f"ERROR devicehost.host: {config}: device 'vsock0': {vsock_error}\n" in output
    assert (f"WARNING devicehost.host: serving 3 of 5 devices; failed: imc ({imc_error}), vsock0"
            f" ({vsock_error})\n") in output
    assert "Traceback" not in output
    # Where each served device is reached, one line each; the reader warns it has nothing to read.
    assert "ready: relay (intercept, running): " in output
    assert "ready: sidecar (sidecar, running): driver=simulator, nodes=" in output
    assert "device 'imc-reader' intercepts VMBus instance c4e5e7d1-d748-4afc-979d-683167910a55," \
        " but no device of this host offers it" in output
    assert "ERROR devicehost.host: stopped; 2 of 5 device(s) failed: imc, vsock0" in output


@pytest.mark.parametrize("how", ["--strict", "[host] strict"])
def test_strict_run_fails_before_serving(tmp_path: Path, how: str) -> None:
    missing = tmp_path / "missing"
    config = tmp_path / "devicehost.toml"
    text = readme_config(missing)
    config.write_text(text + "\n[host]\nstrict = true\n" if how != "--strict" else text)
    argv = ["run", "--config", str(config), *(["--strict"] if how == "--strict" else [])]
    proc = subprocess.run([*devicehost_command(), *argv], capture_output=True, text=True,
                          timeout=60, env=shipped_env())
    assert proc.returncode == 3, proc.stderr
    assert f"{config}: device 'imc': key 'file' = " in proc.stderr
    assert ("ERROR devicehost.host: not started: 1 device(s) cannot be built (strict mode);"
            " nothing was served") in proc.stderr
    assert "ready" not in proc.stderr and "vsock0" not in proc.stderr  # nothing was offered


def test_tracebacks_only_with_verbose(tmp_path: Path) -> None:
    config = tmp_path / "host.toml"
    config.write_text('[[device]]\nplugin = "sidecar"\nname = "sc"\n'
                      'driver = "kernel"\ndevice_prefix = "/nonexistent/sidecar"\n'
                      '[[device]]\nplugin = "intercept"\nname = "relay"\n')
    for verbose in ([], ["-v"]):
        proc = subprocess.Popen([*devicehost_command(), "run", *verbose, "--config", str(config)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                env=shipped_env(DEVICEHOST_LOAD_PLUGINS="sidecar,intercept"))
        try:
            output = wait_for_output(proc, "devicehost.host: ready\n", timeout=60)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 1
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            assert proc.stderr is not None
            proc.stderr.close()
        assert (f"{config}: device 'sc': key 'driver' = 'kernel': no sidecar on this machine:"
                " /nonexistent/sidecar0 does not exist") in output
        assert ("DEBUG" in output) is bool(verbose)


def test_run_speaks_sd_notify_ready_and_stopping(tmp_path: Path) -> None:
    import socket

    config = tmp_path / "host.toml"
    config.write_text('[[device]]\nplugin = "intercept"\nname = "relay"\n')
    name = f"devicehost-test-notify-{os.getpid()}-{id(tmp_path)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(b"\0" + name.encode())  # abstract, as systemd may pass it: '@name'
        notify.settimeout(60)
        proc = subprocess.Popen(
            [*devicehost_command(), "run", "--config", str(config)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env=shipped_env(NOTIFY_SOCKET=f"@{name}", DEVICEHOST_LOAD_PLUGINS="intercept"))
        try:
            assert notify.recv(4096).decode().splitlines() == [
                "READY=1", "STATUS=serving 1 of 1 device"]
            proc.send_signal(signal.SIGTERM)
            assert notify.recv(4096).decode().splitlines() == ["STOPPING=1", "STATUS=stopping"]
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            assert proc.stderr is not None
            proc.stderr.close()


def test_inspect_json_of_a_running_host(tmp_path: Path) -> None:
    sock = tmp_path / "control.sock"
    config = tmp_path / "host.toml"
    config.write_text('[host]\ncontrol_socket = "control.sock"\n\n'
                      '[[device]]\nplugin = "sidecar"\nname = "sc"\nnodes = 1\n\n'
                      '[[device]]\nplugin = "vmbfs"\nname = "fs"\n')
    env = shipped_env(DEVICEHOST_LOAD_PLUGINS="sidecar,vmbfs")
    proc = subprocess.Popen([*devicehost_command(), "run", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        output = wait_for_output(proc, "devicehost.host: ready\n", timeout=60)
        assert f"control socket at {sock}" in output
        assert oct(sock.stat().st_mode & 0o777) == "0o600"
        inspected = subprocess.run([*devicehost_command(), "inspect", "--socket", str(sock),
                                    "--json"], capture_output=True, text=True, timeout=60,
                                   env=env)
        assert inspected.returncode == 0, inspected.stderr
        tree = json.loads(inspected.stdout)
        devices = {d["name"]: d for d in tree["devices"]}
        assert devices["sc"]["state"] == "running" and devices["sc"]["plugin"] == "sidecar"
        assert devices["sc"]["offer"]["driver"] == "simulator"
        assert devices["sc"]["device"]["driver"] == "simulator"
        assert devices["fs"]["offer"]["vmbus"] == "vmbfs"
        assert devices["fs"]["transport"]["transport"] == "VmbusTransport"
        assert tree["failures"] == {}
        assert tree["settings"]["control_socket"] == str(sock)
        plain = subprocess.run([*devicehost_command(), "inspect", "--socket", str(sock)],
                               capture_output=True, text=True, timeout=60, env=env)
        assert plain.returncode == 0
        assert plain.stdout.splitlines()[0] == "sc (sidecar): running, runs 1"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()
    assert not sock.exists(), "the control socket is removed at the stop"
    gone = subprocess.run([*devicehost_command(), "inspect", "--socket", str(sock)],
                          capture_output=True, text=True, timeout=60, env=env)
    assert gone.returncode == 1
    assert gone.stderr.startswith(f"devicehost: error: {sock}: no host answers: ")
