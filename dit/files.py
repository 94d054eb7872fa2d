"""Files: the SHA-256 that identifies weights, caches, reference statistics and checkpoints; JSON written
atomically; a full disk told apart from other write errors."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import uuid
from pathlib import Path


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_json_atomic(path: str | Path, content) -> None:
    """Writes `content` as JSON to `path` atomically and durably (a temporary file, fsync, rename): a reader
    sees the old file or the new one, never half of one, and a failed write (a full disk) leaves nothing."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(json.dumps(content, indent=2))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)  # the rename itself made durable
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_disk_full(error: BaseException | None) -> bool:
    """True for a full disk or quota, also when a library wraps the OSError (orbax's async saves do)."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False
