"""Safe file writes: one atomic-write helper for every file embtab writes, and a folder lock.

`atomic_write` writes into a uniquely named temporary file in the target's folder, fsyncs it,
renames it over the target and fsyncs the folder, so a reader sees the old file or the new one,
never a mix, and two writers never share a temporary file. `FolderLock` keeps a second process
out of a folder another one is writing (an experiment's ``--out``).
"""

from __future__ import annotations

import errno
import fcntl
import os
import tempfile
from pathlib import Path
from typing import IO, Callable

LOCK_FILE = ".lock"


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(file)`` on a fresh temporary file and rename it to `path` once it is durable.

    A crash or an exception in `write` leaves `path` as it was (and no temporary file behind).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically (see `atomic_write`)."""
    return atomic_write(path, lambda file: file.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically (see `atomic_write`)."""
    return atomic_write_bytes(path, text.encode())


def fsync_folder(folder: str | Path) -> None:
    """Make a rename or a new entry in `folder` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FolderLock:
    """An exclusive lock on `folder` (an advisory ``flock`` on ``folder/.lock``), held until
    `release` or the process ends (the kernel drops it even after SIGKILL: no stale locks).

    Raises `FolderBusyError` at once when another holder has it, including another `FolderLock`
    in the same process.
    """

    def __init__(self, folder: str | Path, purpose: str = "a run") -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] | None = open(self.folder / LOCK_FILE, "a+")
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = self._holder()
            self._file.close()
            self._file = None
            if err.errno in (errno.EAGAIN, errno.EACCES):
                raise FolderBusyError(
                    f"{self.folder} is in use by another process{holder}; wait for it to finish, "
                    f"or give this {purpose} another output folder"
                ) from None
            raise
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"{os.getpid()}\n")
        self._file.flush()

    def _holder(self) -> str:
        try:
            pid = (self.folder / LOCK_FILE).read_text().strip()
        except OSError:
            return ""
        return f" (pid {pid})" if pid else ""

    @property
    def held(self) -> bool:
        return self._file is not None

    def release(self) -> None:
        """Give the lock up (idempotent)."""
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> "FolderLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()


class FolderBusyError(RuntimeError):
    """Another process holds the folder's lock."""
