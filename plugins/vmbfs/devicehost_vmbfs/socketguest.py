"""Read a file from a running host's vmbfs device as a guest process, over the VMBus socket.

``python -m devicehost_vmbfs.socketguest SOCKET PATH [--window N] [--ring-pages N]`` connects to
the host's ``[host] vmbus_socket``, opens the vmbfs offer, reads ``PATH`` with
:class:`~devicehost_vmbfs.client.VmbfsClient` through the shared rings and prints one JSON line:
``{"path", "size", "sha256", "seconds", "mb_s"}``. With ``--progress`` it also prints
``{"progress": bytes}`` lines while reading (tests use them to kill the guest mid-read).
Exit status 0 on success, 1 with the error on stderr otherwise.

``--until FILE`` reads ``PATH`` again and again on the same connection and channel, printing
``{"pass": N, "size", "sha256"}`` after each pass, until a pass ends with ``FILE`` present; the
last line is then ``{"passes": N, "rescinded": bool, "closed": reason or null}``, what the guest
saw of its offer and connection (a live handover of the host must leave both untouched).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Sequence

import anyio

from devicehost.vmbus.socketclient import SocketClientError, SocketVmbusClient
from devicehost_vmbfs.client import VmbfsClient, VmbfsClientError
from devicehost_vmbfs.protocol import INTERFACE_ID, MAX_READ_SIZE

__all__ = ["main", "read_over_socket"]


async def read_over_socket(socket_path: str, path: str, *, window: int = 1,
                           ring_pages: int = 4, progress: bool = False,
                           until: str | None = None) -> dict[str, object]:
    """Read ``path`` from the host's vmbfs device over its VMBus socket; the JSON-able result."""
    async with SocketVmbusClient.connect(socket_path, memory_size=8 << 20) as bus:
        offer = await bus.wait_offer(lambda o: o.offer.interface_id == INTERFACE_ID)
        async with bus.opened(offer, ring_pages=ring_pages) as channel:
            client = VmbfsClient(channel.message_pipe())
            await client.negotiate()
            if until is not None:
                passes = 0
                while True:
                    stop = os.path.exists(until)
                    data = await client.read_file_bytearray(path, window=window)
                    passes += 1
                    print(json.dumps({"pass": passes, "size": len(data),
                                      "sha256": hashlib.sha256(data).hexdigest()}), flush=True)
                    if stop:
                        break
                rescinded = offer.revoked is not None and offer.revoked.is_set()
                return {"passes": passes, "rescinded": rescinded, "closed": bus.closed_reason}
            started = time.perf_counter()
            if progress:
                info = await client.file_info(path)
                digest = hashlib.sha256()
                offset = 0
                while offset < info.file_size:
                    count = min(MAX_READ_SIZE, info.file_size - offset)
                    digest.update(await client.read(path, offset, count))
                    offset += count
                    if offset % (MAX_READ_SIZE * 64) < count:
                        print(json.dumps({"progress": offset}), flush=True)
                size = offset
            else:
                data = await client.read_file_bytearray(path, window=window)
                digest = hashlib.sha256(data)
                size = len(data)
            seconds = time.perf_counter() - started
    return {"path": path, "size": size, "sha256": digest.hexdigest(), "seconds": seconds,
            "mb_s": size / seconds / 1e6 if seconds else 0.0}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devicehost_vmbfs.socketguest")
    parser.add_argument("socket")
    parser.add_argument("path")
    parser.add_argument("--window", type=int, default=1)
    parser.add_argument("--ring-pages", type=int, default=4)
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--until", metavar="FILE")
    args = parser.parse_args(argv)
    try:
        result = anyio.run(lambda: read_over_socket(args.socket, args.path, window=args.window,
                                                    ring_pages=args.ring_pages,
                                                    progress=args.progress,
                                                    until=args.until))
    except (OSError, SocketClientError, VmbfsClientError) as exc:
        print(f"socketguest: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
