"""The bundled-format corpus split into training and held-out documents, read once per process.

Its own module because three readers share it: bundled sources (sources.py), the passkey filler (passkey.py) and
evaluation's held-out filler; sources.py imports passkey.py, so the split cannot live in either of them."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from data_pipelines.packed import read_documents, split_every_nth


@lru_cache(maxsize=4)
def bundled_split(path: str, val_fraction: float) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(train, validation) documents of a <|doc|>-separated file: every Nth document held out (split_every_nth).
    Cached: a corpus is read whole, and every lane and the passkey filler ask for the same split."""
    train, val = split_every_nth(read_documents(Path(path)), val_fraction)
    return tuple(train), tuple(val)
