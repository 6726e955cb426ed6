"""The kernel driver, as far as it runs without a sidecar: ioctl numbers, the info struct,
enumeration over a directory of stand-in node files, and precise errors."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from devicehost_sidecar import kernel
from devicehost_sidecar.client import SidecarClient
from devicehost_sidecar.errors import SidecarDriverError, SidecarProtocolError
from devicehost_sidecar.kernel import KernelDriver
from devicehost_sidecar.protocol import (
    PAGE_SIZE,
    NodeInfo,
    encode_node_info,
)

PER_CPU = 2 * PAGE_SIZE


def test_ioctl_numbers_match_the_facts() -> None:
    assert kernel.SIDECAR_START == 0xB8F0
    assert kernel.SIDECAR_STOP == 0xB8F1
    assert kernel.SIDECAR_RUN == 0xB8F2
    assert kernel.SIDECAR_INFO == 0x800CB8F3
    # _IOR: direction "read" in bits 30-31, the 12-byte struct size in bits 16-29.
    assert kernel.SIDECAR_INFO >> 30 == 2 and (kernel.SIDECAR_INFO >> 16) & 0x3FFF == 12
    assert kernel.ioc(1, 0xAB, 0x01, 8) == 0x4008AB01  # a known _IOW value


def test_info_struct_encoding_matches_the_facts() -> None:
    # {base_cpu u32, cpu_count u32, per_cpu_shmem u32}, little-endian.
    assert encode_node_info(NodeInfo(8, 4, 0x3000)) == bytes.fromhex("08000000 04000000 00300000")


class FakeKernel:
    """Stands in for the sidecar driver's ioctls on regular files named like node devices."""

    def __init__(self, infos: dict[int, NodeInfo]) -> None:
        self.infos = infos
        self.calls: list[tuple[int, int, int]] = []  # (node, request, cpu)

    def node_of(self, fd: int) -> int:
        match = re.search(r"(\d+)$", os.readlink(f"/proc/self/fd/{fd}"))
        assert match is not None
        return int(match.group(1))

    def ioctl(self, fd: int, request: int, arg: object, mutate: bool = False) -> int:
        node = self.node_of(fd)
        if request == kernel.SIDECAR_INFO:
            assert isinstance(arg, bytearray) and len(arg) == 12 and mutate
            arg[:] = encode_node_info(self.infos[node])
            return 0
        assert isinstance(arg, int)
        self.calls.append((node, request, arg))
        return 0


def make_nodes(tmp_path: Path, infos: dict[int, NodeInfo]) -> str:
    for index, info in infos.items():
        (tmp_path / f"sidecar{index}").write_bytes(bytes(info.cpu_count * info.per_cpu_shmem))
    return str(tmp_path / "sidecar")


def test_no_node_zero_means_no_sidecar(tmp_path: Path) -> None:
    driver = KernelDriver(str(tmp_path / "mshv_vtl_sidecar"))
    assert driver.open_nodes() is None
    assert driver.probe() is None


def test_real_ioctl_on_a_non_sidecar_file_is_a_precise_error(tmp_path: Path) -> None:
    (tmp_path / "sidecar0").write_bytes(b"")
    with pytest.raises(SidecarDriverError, match=r"info ioctl on .*sidecar0 failed"):
        KernelDriver(str(tmp_path / "sidecar")).open_nodes()


def test_unopenable_node_is_a_precise_error(tmp_path: Path) -> None:
    (tmp_path / "sidecar0").mkdir()  # exists, cannot be opened read-write
    with pytest.raises(SidecarDriverError, match=r"cannot open sidecar node .*sidecar0"):
        KernelDriver(str(tmp_path / "sidecar")).open_nodes()


def test_enumeration_stops_at_the_first_missing_node(tmp_path: Path) -> None:
    infos = {0: NodeInfo(0, 2, PER_CPU), 1: NodeInfo(2, 3, PER_CPU), 3: NodeInfo(9, 1, PER_CPU)}
    prefix = make_nodes(tmp_path, infos)
    fake = FakeKernel(infos)
    driver = KernelDriver(prefix, ioctl=fake.ioctl)
    assert driver.probe() == [infos[0], infos[1]]
    nodes = driver.open_nodes()
    assert nodes is not None and [n.index for n in nodes] == [0, 1]
    try:
        assert [len(n.shmem) for n in nodes] == [2 * PER_CPU, 3 * PER_CPU]
        nodes[1].start(3)
        nodes[1].stop(3)
        nodes[0].run(1)
        assert fake.calls == [
            (1, kernel.SIDECAR_START, 3),
            (1, kernel.SIDECAR_STOP, 3),
            (0, kernel.SIDECAR_RUN, 1),
        ]
        # The mapping is shared: a command page write reaches the device file.
        nodes[1].shmem[PER_CPU : PER_CPU + 4] = b"\x04\0\0\0"
    finally:
        for node in nodes:
            node.close()
    assert (tmp_path / "sidecar1").read_bytes()[PER_CPU : PER_CPU + 4] == b"\x04\0\0\0"


def test_bad_info_struct_closes_what_was_opened(tmp_path: Path) -> None:
    infos = {0: NodeInfo(0, 1, PER_CPU), 1: NodeInfo(1, 1, 100)}
    prefix = make_nodes(tmp_path, {0: infos[0], 1: NodeInfo(1, 1, PER_CPU)})
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(SidecarProtocolError, match="100 bytes of shared memory"):
        KernelDriver(prefix, ioctl=FakeKernel(infos).ioctl).open_nodes()
    assert set(os.listdir("/proc/self/fd")) <= before


def test_mapping_larger_than_the_device_is_a_precise_error(tmp_path: Path) -> None:
    prefix = make_nodes(tmp_path, {0: NodeInfo(0, 1, PER_CPU)})
    fake = FakeKernel({0: NodeInfo(0, 4, PER_CPU)})  # claims more memory than the file has
    with pytest.raises(SidecarDriverError, match=r"cannot map 32768 bytes of .*sidecar0"):
        KernelDriver(prefix, ioctl=fake.ioctl).open_nodes()


def test_failing_cpu_ioctl_names_the_cpu_and_node(tmp_path: Path) -> None:
    infos = {0: NodeInfo(0, 1, PER_CPU)}
    prefix = make_nodes(tmp_path, infos)
    fake = FakeKernel(infos)

    def ioctl(fd: int, request: int, arg: object, mutate: bool = False) -> int:
        if request == kernel.SIDECAR_START:
            raise OSError(16, "Device or resource busy")
        return fake.ioctl(fd, request, arg, mutate)

    (node,) = KernelDriver(prefix, ioctl=ioctl).open_nodes() or []
    try:
        with pytest.raises(SidecarDriverError, match=r"start ioctl for CPU 0 on .*sidecar0"):
            node.start(0)
    finally:
        node.close()


def test_client_over_kernel_nodes_allows_gaps_and_refuses_overlaps(tmp_path: Path) -> None:
    gaps = {0: NodeInfo(0, 2, PER_CPU), 1: NodeInfo(8, 1, PER_CPU)}
    (tmp_path / "gaps").mkdir()
    driver = KernelDriver(make_nodes(tmp_path / "gaps", gaps), ioctl=FakeKernel(gaps).ioctl)
    client = SidecarClient.open(driver)
    assert client is not None
    try:
        assert client.cpus == [0, 1, 8] and client.node_of(8) == 1
    finally:
        client.close()
    overlap = {0: NodeInfo(0, 2, PER_CPU), 1: NodeInfo(1, 2, PER_CPU)}
    (tmp_path / "overlap").mkdir()
    prefix = make_nodes(tmp_path / "overlap", overlap)
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(SidecarProtocolError, match="CPU 1 is claimed by two sidecar nodes"):
        SidecarClient.open(KernelDriver(prefix, ioctl=FakeKernel(overlap).ioctl))
    assert set(os.listdir("/proc/self/fd")) <= before  # the nodes were closed again
