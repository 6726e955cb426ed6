"""A connection table with fake host sockets, driven packet by packet (shared by the manager
tests)."""

from __future__ import annotations

from devicehost_vsock.manager import ConnectionManager
from devicehost_vsock.protocol import (
    CONNECTION_TIMEOUT,
    GRACEFUL_SHUTDOWN_TIMEOUT,
    HEADER,
    HEADER_SIZE,
    MAX_ACTIVE_CONNECTIONS,
    TX_BUF_SIZE,
    Header,
    Op,
    decode_header_untrusted,
)

from .fakestream import FakeStream

__all__ = ["CID", "Harness", "ops"]

CID = 3


class Harness:
    """A connection table with fake host sockets: ports with a listener connect, others fail."""

    def __init__(
        self,
        *,
        connection_timeout: float = CONNECTION_TIMEOUT,
        graceful_timeout: float = GRACEFUL_SHUTDOWN_TIMEOUT,
        max_connections: int = MAX_ACTIVE_CONNECTIONS,
        tx_buffer_size: int = TX_BUF_SIZE,
        stream: bool = True,
        seqpacket: bool = False,
    ) -> None:
        self.listening: set[int] = set()
        #: The socket type of each listening port that is not a stream one (SEQPACKET = 2).
        self.listening_type: dict[int, int] = {}
        self.streams: dict[int, list[FakeStream]] = {}
        self.now = 0.0
        self.manager = ConnectionManager(
            CID, self._connect, connection_timeout=connection_timeout,
            graceful_timeout=graceful_timeout, max_connections=max_connections,
            tx_buffer_size=tx_buffer_size, stream=stream, seqpacket=seqpacket)

    def _connect(self, port: int, sock_type: int = 1) -> FakeStream:
        if port not in self.listening:
            raise FileNotFoundError(f"no listener for {port}")
        if self.listening_type.get(port, 1) != sock_type:
            raise OSError(91, "Protocol wrong type for socket")  # EPROTOTYPE
        stream = FakeStream()
        self.streams.setdefault(port, []).append(stream)
        return stream

    def tx(self, op: int, src: int, dst: int, data: bytes = b"", *, length: int | None = None,
           src_cid: int = CID, dst_cid: int = 2, type_: int = 1, flags: int = 0,
           buf_alloc: int = 65536, fwd_cnt: int = 0) -> None:
        header = HEADER.pack(src_cid, dst_cid, src, dst, len(data) if length is None else length,
                             type_, op, flags, buf_alloc, fwd_cnt)
        self.manager.handle_tx(header, [memoryview(data)] if data else [], self.now)

    def rx(self, size: int = HEADER_SIZE + 4096) -> tuple[Header, bytes] | None:
        buf = memoryview(bytearray(size))
        n = self.manager.produce_rx(buf, self.now)
        if n is None:
            return None
        assert n >= HEADER_SIZE
        h = decode_header_untrusted(buf)
        assert (h.src_cid, h.dst_cid) == (2, CID) and h.type in (1, 2)
        assert n == HEADER_SIZE + h.len
        return h, bytes(buf[HEADER_SIZE:n])

    def rx_all(self) -> list[tuple[Header, bytes]]:
        out = []
        while (p := self.rx()) is not None:
            out.append(p)
        return out

    def connect(self, local: int = 1024, port: int = 5000) -> FakeStream:
        self.listening.add(port)
        self.tx(Op.REQUEST, local, port)
        packet = self.rx()
        assert packet is not None
        h, _ = packet
        assert (h.op, h.src_port, h.dst_port) == (Op.RESPONSE, port, local)
        return self.streams[port][-1]


def ops(packets: list[tuple[Header, bytes]]) -> list[int]:
    return [h.op for h, _ in packets]
