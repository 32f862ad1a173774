"""The value each full-disk test writes under a name: derived from the name, so that a
writer process and the test agree on it without passing data around."""

from __future__ import annotations

import hashlib


def value_of(name: str, size: int) -> bytes:
    seed = hashlib.sha256(f"{name}/{size}".encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]
