"""A real small filesystem for disk-full tests: a tmpfs of a given size mounted on a test folder.

`mount -t tmpfs -o size=N` needs root (or CAP_SYS_ADMIN); every write past the size fails with
ENOSPC, exactly as on a full disk, so SQLite, the publisher and the server meet the real error.
Where mounting is not permitted the tests that need it are skipped with the mount error.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def small_filesystem(path: Path, size_bytes: int) -> Iterator[Path]:
    """Mount a tmpfs of `size_bytes` on `path` for the duration; skip the test if mounting fails."""
    path.mkdir(parents=True, exist_ok=True)
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes},mode=0755", "tmpfs", str(path)],
                       check=False, capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs (needs root or CAP_SYS_ADMIN): {(p.stderr or p.stdout).strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], check=False, capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)  # never leave a mount behind


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(path: Path, *, leave: int = 0) -> Path:
    """Create `path` and write zeros until only `leave` bytes (rounded to pages) are free.

    Only on a mount point (the small filesystem above): never fill the disk the machine runs on.
    """
    if not os.path.ismount(path.parent):
        raise RuntimeError(f"fill() refuses {path.parent}: not a mount point (mount a small_filesystem first)")
    page = os.statvfs(path.parent).f_frsize
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        while True:
            room = free_bytes(path.parent) - leave
            if room <= 0:
                break
            try:
                os.write(fd, b"\0" * min(room, 1 << 20))
            except OSError:
                break
        if leave == 0:  # the last partial page too
            try:
                while os.write(fd, b"\0" * page):
                    pass
            except OSError:
                pass
    finally:
        os.close(fd)
    return path
