"""Durable writes: a file or folder is written under a temporary name, fsynced and renamed; the
rename itself is made durable by syncing its directory (``fsync_dir``)."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (the directory entry itself is data)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
