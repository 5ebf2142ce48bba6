"""Stable hashes: a row id to a number in [0, 1) (split buckets, the disclaimer's share), and file digests."""

from __future__ import annotations

import hashlib
from pathlib import Path


def unit_hash(*parts: str) -> float:
    """A number in [0, 1) fixed by `parts` alone: the same on every machine and run, and independent of the
    other rows, so adding data never moves the rows already there."""
    digest = hashlib.sha256("\x00".join(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in blocks (model weights can be larger than memory)."""
    h = hashlib.new(algorithm)
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
