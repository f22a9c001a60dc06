"""The output directory of a run: checked before any work, locked for the run, and every
write into it that fails mid-run reported in one line.

Preflight (`open_out_dir`, rank 0 only): --out_dir is created if missing; a path that is a
file, or lies under one, or a directory this user cannot write, is refused at once
(OutDirError: exit code 2). The directory is then locked for the run: `<out_dir>/.lock` is
flock()ed and holds the run's pid, so a second run into the same directory fails at once,
naming that pid. The kernel drops the lock when the process ends, however it ends (kill -9
included), so a lock is never stale. A run removes the file when it ends, and the
directories it created if they stayed empty (a run refused before it wrote). Temporaries that
killed writers left (`.ckpt.pt.tmp-PID`, see tsfast.files) are removed, never those of a
live process.

Mid-run (`check_free_space`, OutputError: exit code 3): before each checkpoint the free disk
is compared with the checkpoint's size; a write that fails anyway (disk full, permissions
changed) stops the run with one line. Writes are atomic, so the previous checkpoint stays.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock; runs go unlocked (`RunLock.warning` says so)
    fcntl = None

from tsfast.files import human_bytes, missing_dirs, remove_empty_dirs, remove_stale_temporaries

LOCK_FILE = ".lock"
# torch.save adds headers and 64-byte alignment per tensor to the raw tensor bytes.
SAVE_SLACK = 1 << 20


class OutDirError(ValueError):
    """An --out_dir that cannot be used (a file, not writable, or in use by another run)."""


class OutputError(RuntimeError):
    """A write into --out_dir failed mid-run (disk full, permission); the run stops."""


def _first_file_on_the_way(path: Path) -> Path | None:
    for parent in [path, *path.parents]:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def _prepare(path: Path) -> list[Path]:
    """Create `path` if needed; return the directories that were created (deepest first)."""
    blocker = _first_file_on_the_way(path)
    if blocker is not None:
        where = "is a file" if blocker == path else f"lies under {blocker}, which is a file"
        raise OutDirError(f"--out_dir {path} {where}, not a directory; pick another --out_dir")
    created = missing_dirs(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutDirError(f"cannot create --out_dir {path} ({e.strerror}); pick another --out_dir") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise OutDirError(f"cannot write in --out_dir {path} (permission denied); pick another "
                          "--out_dir or make it writable")
    return created


class RunLock:
    """The flock on `<out_dir>/.lock` that keeps a second run out; `release()` ends it."""

    def __init__(self, path: Path, fd: int, warning: str | None = None):
        self.path = path
        self.fd: int | None = fd
        self.created: list[Path] = []  # removed on release while empty
        self.warning = warning  # why the directory could not be locked, if it could not

    @classmethod
    def acquire(cls, out_dir: Path) -> RunLock:
        path = out_dir / LOCK_FILE
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise OutDirError(f"cannot write in --out_dir {out_dir} ({e.strerror}); pick another "
                                  "--out_dir or make it writable") from None
            try:
                if fcntl is None:
                    raise OSError(errno.ENOSYS, "no flock on this system")
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):  # a filesystem without locks
                    return cls(path, fd, warning=f"warning: {out_dir} cannot be locked ({e.strerror}): "
                               "make sure no other run writes into it")
                holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise OutDirError(
                    f"--out_dir {out_dir} is in use by another training run (pid {holder}, see {path}); "
                    "wait for it to end, stop it, or pick another --out_dir"
                ) from None
            try:  # the holder may have removed the file between our open and flock: retry
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return cls(path, fd)

    def release(self) -> None:
        if self.fd is None:
            return
        try:  # remove it while still holding it (see acquire)
            self.path.unlink(missing_ok=True)
        except OSError:
            pass  # a read-only directory now: the unlocked file is harmless
        os.close(self.fd)
        self.fd = None
        remove_empty_dirs(self.created)


def open_out_dir(out_dir: str | os.PathLike) -> RunLock:
    """Create/check `out_dir`, lock it for this run, and remove dead writers' temporaries.
    Raises OutDirError naming the problem and the fix."""
    path = Path(out_dir)
    created = _prepare(path)
    try:
        lock = RunLock.acquire(path)
    except OutDirError:
        remove_empty_dirs(created)
        raise
    lock.created = created
    remove_stale_temporaries(path)
    return lock


def check_free_space(path: Path, needed: int) -> None:
    """Raise OutputError unless the disk holding `path` has room for `needed` more bytes."""
    needed += SAVE_SLACK
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        return  # the write itself will say what is wrong
    if free < needed:
        raise OutputError(
            f"not enough free disk to write {path}: it needs {human_bytes(needed)}, "
            f"{human_bytes(free)} is free; free some space, then continue with --resume"
        )
