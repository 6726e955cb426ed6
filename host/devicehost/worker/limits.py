"""What a worker process does to itself before any plugin code runs: ``no_new_privs``, no core
dumps, an optional address-space limit, and ending with its supervisor.

- ``prctl(PR_SET_NO_NEW_PRIVS, 1)``: nothing the worker executes can gain privileges (setuid
  binaries, file capabilities); always on, irreversible, inherited by its children.
- A worker whose supervisor dies (even by SIGKILL) ends at once: a thread of the worker waits
  for the hang-up of its socketpair (:func:`exit_with_supervisor`) and calls ``os._exit``, also
  while a plugin blocks the worker's event loop. (Not ``PR_SET_PDEATHSIG``: it fires when the
  *thread* that started the worker ends, and trio starts processes from a cached thread that
  ends after ten idle seconds.) A supervisor that died before the worker started is noticed too.
- ``RLIMIT_CORE`` 0: a crash dumps no core (slow, and large).
- ``RLIMIT_AS`` (soft and hard, so the worker cannot raise it back): ``memory_limit`` bytes of
  address space. A worker past it gets ``MemoryError`` from Python (or is killed by a signal in C
  code): either way only its device fails. Address space is more than resident memory (thread
  stacks, malloc arenas are reserved up front), so the worker limits glibc to one malloc arena
  (``MALLOC_ARENA_MAX=1``, set by the supervisor) and the limit must leave room for the runtime.
"""

from __future__ import annotations

import ctypes
import os
import resource
import select
import threading
from typing import Final

__all__ = ["apply_limits", "exit_with_supervisor", "no_new_privs"]

_PR_SET_NO_NEW_PRIVS: Final = 38


def _prctl(option: int, arg: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    result = libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg), ctypes.c_ulong(0),
                        ctypes.c_ulong(0), ctypes.c_ulong(0))
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl({option}): {os.strerror(errno)}")


def apply_limits(*, memory_limit: int | None, parent: int | None) -> None:
    """Apply the module docstring's limits to this process (the worker, at its start).
    ``parent``: the supervisor's pid (the worker exits at once if it has died already)."""
    _prctl(_PR_SET_NO_NEW_PRIVS, 1)
    if parent is not None and os.getppid() != parent:
        os._exit(70)  # the supervisor died before the worker started: nobody to serve
    # A crashing worker dumps no core: it would be slow (its device waits for the restart) and
    # could be large.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if memory_limit is not None:
        resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))


def no_new_privs(pid: int | str = "self") -> bool:
    """True if process ``pid`` runs with ``no_new_privs`` (from ``/proc/PID/status``)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("NoNewPrivs:"):
                return line.split()[1] == "1"
    return False


def exit_with_supervisor(fd: int) -> threading.Thread:
    """Start a daemon thread that ends this process (``os._exit(70)``) once the peer of socket
    ``fd`` (the supervisor's end of the socketpair) has hung up."""

    def watch() -> None:
        poller = select.poll()
        poller.register(fd, select.POLLRDHUP)
        while True:
            for _fd, events in poller.poll():
                if events & (select.POLLRDHUP | select.POLLHUP | select.POLLERR | select.POLLNVAL):
                    os._exit(70)

    thread = threading.Thread(target=watch, name="devicehost worker: supervisor watch",
                              daemon=True)
    thread.start()
    return thread
