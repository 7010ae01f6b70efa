"""Atomic file writes and content hashes: the only way the stages put bytes on disk."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_atomic(path: str | Path, write: Callable[[Path], Any]) -> None:
    """Call write(tmp) on a temporary file beside `path`, then move it into place.

    A reader (or DVC) sees either the old file or the complete new one, never a truncated one: the rename
    is atomic because the temporary file lives in the same folder, hence on the same file system.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A hidden, unique name in the same folder; created by write() itself so it gets the usual permissions.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    write_atomic(path, lambda tmp: tmp.write_bytes(data))


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def md5_file(path: str | Path) -> str:
    """MD5 of a file's bytes: the same digest DVC records for it in dvc.lock."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def md5_dir(path: str | Path) -> str:
    """DVC 3's hash of a folder, as dvc.lock records it: the md5 of the JSON listing of its files' md5 and path,
    sorted by path, followed by `.dir` (tests/test_verify.py holds it to the dvc.lock that DVC writes)."""
    root = Path(path)
    files = sorted((f for f in root.rglob("*") if f.is_file()), key=lambda f: f.relative_to(root).parts)
    listing = [{"md5": md5_file(f), "relpath": f.relative_to(root).as_posix()} for f in files]
    return hashlib.md5(json.dumps(listing, sort_keys=True).encode()).hexdigest() + ".dir"
