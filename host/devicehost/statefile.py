"""The saved-state file of ``devicehost run --state``: read bounded, written atomically.

:func:`write_state_file` writes a temporary file beside the target (``.<name>.<pid>.<hex>.tmp``),
syncs it and renames it over the target, so a crash leaves the old state or the new one, never a
mix; :func:`remove_stale_temporaries` removes what a save killed half-way (SIGKILL) left behind:
only regular files owned by this user, with that exact name pattern, whose writer is gone.
:func:`read_state_file` reads at most the envelope's size limit from a regular file (a FIFO is
refused without being opened for reading).
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from devicehost.errors import (
    SavedStateError,
)
from devicehost.files import FileRefusedError, read_regular_file
from devicehost.savedstate import (
    MAX_ENVELOPE_BYTES,
)

if TYPE_CHECKING:
    pass

__all__ = ["read_state_file", "remove_stale_temporaries", "write_state_file"]

log = logging.getLogger("devicehost.host")


def read_state_file(path: str | os.PathLike[str]) -> bytes | None:
    """The bytes of saved-state file ``path`` (None if there is none); SavedStateError naming
    the file if it cannot be read, is not a regular file (a FIFO is refused without being opened
    for reading) or is larger than :data:`~devicehost.savedstate.MAX_ENVELOPE_BYTES`."""
    try:
        return read_regular_file(path, MAX_ENVELOPE_BYTES)
    except FileNotFoundError:
        return None
    except OSError as exc:
        why = exc.strerror if isinstance(exc, FileRefusedError) else exc
        raise SavedStateError(f"{os.fspath(path)}: cannot read the saved state: {why}") from exc


def _temporary_pattern(target: Path) -> re.Pattern[str]:
    # ".<name>.<pid of the writer>.<16 hex digits>.tmp": write_state_file's names, nothing else.
    return re.compile(rf"\.{re.escape(target.name)}\.([1-9][0-9]{{0,9}})\.[0-9a-f]{{16}}\.tmp")


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process, or a number no process can have: leave its file
    return True


def remove_stale_temporaries(path: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary files that interrupted saves of state file ``path`` left (a save
    killed between creating its temporary and renaming it, e.g. by SIGKILL); returns them.

    Only what is certainly such a file is removed: a regular file (not a symlink) beside ``path``,
    owned by this user, whose name is exactly :func:`write_state_file`'s temporary name for
    ``path``, and whose writer (the process id in the name) no longer runs. So two hosts saving
    the same file never remove each other's temporaries, and no other file is touched.
    """
    target = Path(path)
    pattern = _temporary_pattern(target)
    try:
        names = os.listdir(target.parent)
    except OSError:
        return []
    removed: list[Path] = []
    for name in names:
        match = pattern.fullmatch(name)
        if match is None:
            continue
        pid = int(match.group(1))
        if pid == os.getpid() or _process_exists(pid):
            continue
        stale = target.parent / name
        try:
            st = os.lstat(stale)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                continue
            os.unlink(stale)
        except OSError:
            continue  # gone already, or not ours to remove
        log.warning("removed %s (%d bytes), left by an interrupted save", stale, st.st_size)
        removed.append(stale)
    return removed


def write_state_file(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: a temporary file beside it, synced, then renamed
    over it (a crash leaves the old file or the new one, never a mix). Temporaries that earlier,
    interrupted saves left are removed first (:func:`remove_stale_temporaries`). Raises OSError."""
    target = Path(path)
    remove_stale_temporaries(target)
    tmp = target.parent / f".{target.name}.{os.getpid()}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
