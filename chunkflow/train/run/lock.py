"""One run per run directory: a lock held for the run's lifetime.

``RUN/.chunkflow.lock`` holds ``host pid`` of the run using the directory, under an exclusive
``fcntl.flock`` that the operating system releases when the process ends, however it ends. A
second run on the directory (a requeued job while the old one still runs, a typo'd command)
fails with the holder's host and pid instead of cleaning up the first one's partial
checkpoints or setting its checkpoints aside.

A lock file whose holder did not release it (the process was killed) is taken over with a
warning naming it. Where the file system has no ``flock`` (some network file systems), the
file's contents decide: a live process on this host, or any process on another host (which
cannot be checked from here), holds the directory; a dead process on this host does not.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from pathlib import Path

LOCK_NAME = ".chunkflow.lock"


class RunDirLocked(ValueError):
    """Another run holds the run directory."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's process
        return True
    return True


def _holder(text: str) -> tuple[str, int] | None:
    parts = text.split()
    if len(parts) == 2 and parts[1].isdigit():
        return parts[0], int(parts[1])
    return None


class RunLock:
    """The lock on one run directory (see the module docstring); :meth:`release` it when the
    run ends (the process's end releases it too, and leaves a stale-lock warning behind)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.warning: str | None = None
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        me = f"{socket.gethostname()} {os.getpid()}"
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ValueError(f"--train.output_dir={str(self.path.parent)!r}: cannot create "
                             f"{self.path.name} there ({e.strerror}); valid: a writable "
                             f"directory") from None
        try:
            flocked = True
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise self._locked(os.pread(fd, 256, 0).decode(errors="replace")) from None
                flocked = False  # no flock on this file system: the contents decide
            previous = os.pread(fd, 256, 0).decode(errors="replace").strip()
            holder = _holder(previous)
            if holder is not None and holder != (socket.gethostname(), os.getpid()):
                host, pid = holder
                if not flocked and (host != socket.gethostname() or _alive(pid)):
                    raise self._locked(previous)
                self.warning = (f"taking over the lock {self.path} of process {pid} on {host}, "
                                f"which ended without releasing it")
            os.ftruncate(fd, 0)
            os.pwrite(fd, me.encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def __getstate__(self):  # other ranks get the path, never rank 0's descriptor
        return {**self.__dict__, "_fd": None}

    def _locked(self, text: str) -> RunDirLocked:
        holder = _holder(text.strip())
        who = (f"process {holder[1]} on {holder[0]}" if holder is not None
               else "another process")
        return RunDirLocked(f"--train.output_dir={str(self.path.parent)!r} is in use by a run "
                            f"({who}, {self.path.name}); valid: wait for it to end, or choose "
                            f"another --train.output_dir")

    def __del__(self):  # a run object dropped without release() (an embedding program)
        self.release()

    def release(self) -> None:
        """Clear the file (a later run finds no stale holder) and unlock."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        os.close(fd)
