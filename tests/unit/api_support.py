"""Helpers of the tests of the public API (``test_api_*.py``): a store's files as plain
``open()``/``os`` calls see them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

BIG = bytes(range(256)) * 40  # 10 KiB: over inline_threshold=1024, so staged until commit
THRESHOLD = 1024


def snapshot(root: Path) -> dict[str, Any]:
    """Every entry under ``root`` (``.walstore/`` included): kind and content."""
    out: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            if os.path.islink(full):
                out[rel] = ("symlink", os.readlink(full))
            elif os.path.isdir(full):
                out[rel] = ("dir",)
            else:
                with open(full, "rb") as f:
                    out[rel] = ("file", f.read())
    return out


def user_files(root: Path) -> dict[str, Any]:
    """``snapshot`` without ``.walstore/``."""
    return {k: v for k, v in snapshot(root).items() if k.split(os.sep)[0] != ".walstore"}


def staging(root: Path) -> list[str]:
    return sorted(os.listdir(root / ".walstore" / "staging"))


def read_plain(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class Boom(Exception):
    pass
