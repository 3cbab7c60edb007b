"""Which run owns a directory: a lock for a checkpoint directory a run writes to, and owner marks on the private
directories a run creates (NVMe state, a checkpoint being written), so that those a killed run left behind are found
and removed by the next run — only ours (named by our prefixes and marked), only when their process is gone.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import socket
from pathlib import Path

from megatrain_lightning.errors import UserError

log = logging.getLogger(__name__)

OWNER = ".owner"  # "<host> <pid>" of the process that created the directory
LOCK = ".megatrain.lock"


def mark(directory: Path) -> None:
    (directory / OWNER).write_text(f"{socket.gethostname()} {os.getpid()}")


def unmark(directory: Path) -> None:
    (directory / OWNER).unlink(missing_ok=True)


def _dead(directory: Path) -> bool:
    """Whether the directory's owner was a process of this host that no longer runs (unmarked: not ours to judge)."""
    try:
        host, pid = (directory / OWNER).read_text().split()
        pid = int(pid)
    except (OSError, ValueError):
        return False
    if host != socket.gethostname():
        return False  # a shared filesystem: another machine's process cannot be checked from here
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False


def remove_dead(root: Path, pattern: str, what: str) -> list[Path]:
    """Removes the directories under `root` matching `pattern` whose owner process has ended; returns them."""
    removed = []
    for d in sorted(root.glob(pattern)) if root.is_dir() else ():
        if d.is_dir() and _dead(d):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
            log.warning(f"removed {d}: {what} of a run that ended without cleaning up")
    return removed


class DirectoryLock:
    """An exclusive lock on a directory for the life of this object's process (released when it ends, however)."""

    def __init__(self, directory: Path, role: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / LOCK
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(self._fd)
            raise UserError(f"another run (host and pid: {holder}) is writing {role} to {directory}; give this "
                            "run its own directory") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{socket.gethostname()} {os.getpid()}".encode(), 0)

    def release(self) -> None:
        """Removes the lock file (still holding the lock: a run that opens it meanwhile fails to lock it, as it would
        have) and drops the lock."""
        if self._fd >= 0:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = -1
