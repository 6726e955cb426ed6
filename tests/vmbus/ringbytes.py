"""Byte-level helpers shared by the ring tests: rings over a bytearray, control words,
descriptors and whole in-band packet images."""

from __future__ import annotations

import struct

from devicehost.vmbus.ring import (
    IncomingRing,
    OutgoingRing,
    RingMemory,
)

__all__ = ["DESC", "packet_bytes", "put_descriptor", "ring_pair", "set_word", "words"]

DESC = struct.Struct("<HHHHQ")


def ring_pair(data_len: int = 4096) -> tuple[bytearray, OutgoingRing, IncomingRing]:
    buf = bytearray(4096 + data_len)
    mem = RingMemory.from_view(buf)
    return buf, OutgoingRing(mem), IncomingRing(mem)


def words(buf: bytearray) -> tuple[int, ...]:
    return struct.unpack_from("<4I", buf)


def set_word(buf: bytearray, index: int, value: int) -> None:
    struct.pack_into("<I", buf, 4 * index, value)


def put_descriptor(buf: bytearray, offset: int, kind: int, doff8: int, len8: int,
                   flags: int = 0, tid: int = 0) -> None:
    DESC.pack_into(buf, 4096 + offset, kind, doff8, len8, flags, tid)


def packet_bytes(start: int, payload: bytes, tid: int = 0) -> bytes:
    msg_len = 16 + ((len(payload) + 7) & ~7)
    padded = payload + bytes(msg_len - 16 - len(payload))
    return DESC.pack(6, 2, msg_len >> 3, 0, tid) + padded + struct.pack("<Q", start << 32)
