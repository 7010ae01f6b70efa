"""Atomic writes: a reader sees the old file or the new one, never a part of one."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from pipeline.io import md5_file, write_atomic, write_text_atomic


def test_failed_write_keeps_the_previous_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "out.csv"
    write_text_atomic(target, "old\n")

    def half_then_crash(tmp: Path) -> None:
        tmp.write_text("partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, half_then_crash)
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.csv"]


def test_write_creates_folders_and_md5_matches_hashlib(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "f.txt"
    write_text_atomic(target, "hello\n")
    assert target.read_text() == "hello\n"
    assert md5_file(target) == hashlib.md5(b"hello\n").hexdigest()
