"""Files written atomically, and the cleanup of what a killed writer leaves behind.

A writer puts its data in a hidden temporary next to the final file, named after its own
process id (`.NAME.tmp-PID`), fsyncs it and renames it over the final file. A process
killed before the rename (kill -9, power loss) leaves its temporary; the next writer into
the same directory removes the temporaries whose process is gone, never those of a live one.
"""

from __future__ import annotations

import os
from pathlib import Path

TEMP_MARK = ".tmp-"


def temp_path(final: Path) -> Path:
    """This process' temporary for `final`."""
    return final.with_name(f".{final.name}{TEMP_MARK}{os.getpid()}")


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (one of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Delete the `.*.tmp-PID` files in `directory` whose process is gone; return them."""
    removed = []
    for path in Path(directory).glob(f".*{TEMP_MARK}*"):
        pid = path.name.rpartition(TEMP_MARK)[2]
        if not pid.isdigit() or int(pid) == os.getpid() or pid_alive(int(pid)):
            continue
        try:
            path.unlink()
        except FileNotFoundError:
            continue  # another cleaner was first
        removed.append(path)
    return removed


def fsync_dir(directory: Path) -> None:
    """Make renames in `directory` durable. Some filesystems cannot fsync a directory:
    the data itself is synced, so that is not an error."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def missing_dirs(path: Path) -> list[Path]:
    """`path` and those of its parents that do not exist yet, deepest first: what creating
    `path` will create (see `remove_empty_dirs`)."""
    path = Path(path)
    return [d for d in (path, *path.parents) if not d.exists()]


def remove_empty_dirs(directories: list[Path]) -> None:
    """Remove `directories` (deepest first, from `missing_dirs`) while they are empty: the
    first that is not (something was written into it) ends it, with its parents."""
    for directory in directories:
        try:
            directory.rmdir()
        except OSError:
            return


def human_bytes(n: float) -> str:
    """1536 -> '1.50 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
