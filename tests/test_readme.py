"""The README's example config is valid for the shipped plugins, key by key."""

from __future__ import annotations

import re
from pathlib import Path

from devicehost.config import parse_config
from devicehost.plugins import load_plugins

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_example_config_is_accepted_by_the_installed_plugins() -> None:
    (block,) = re.findall(r"```toml\n# devicehost.toml\n(.*?)```", README.read_text(), re.DOTALL)
    registry = load_plugins(environ={})
    config = parse_config(block, registry, source="README.md")
    assert [(d.name, d.plugin) for d in config.devices] == [
        ("imc", "vmbfs"),
        ("vsock0", "vsock"),
        ("relay", "intercept"),
        ("imc-reader", "vmbfs-client"),
        ("sidecar", "sidecar"),
    ]
    by_name = {d.name: d.config for d in config.devices}
    assert str(by_name["imc"].file) == "/var/lib/vm/imc.hiv"
    assert by_name["vsock0"].guest_cid == 3
    assert by_name["vsock0"].vhost_user_socket == "/run/vm/vsock.vu"
    assert tuple(by_name["imc-reader"].paths) == ("/imc.hiv",)
    assert (by_name["sidecar"].nodes, by_name["sidecar"].cpus_per_node) == (2, 2)
