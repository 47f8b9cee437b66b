"""The calibration cache: statistics stored under a key of everything that determines them.

Key = sha256 over (the serialized model the engine runs, the data's content hash, the
method options as canonical JSON). The data hash covers every sample's input names, dtypes,
shapes and bytes in order, so any change of the samples, their order or the sample limit
misses. A hit skips every model run; writes are atomic (temp file + rename), so a crashed or
concurrent build never leaves a half-written entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .calibration import Feed, Statistics
from .errors import UserError

__all__ = ["data_digest", "cache_key", "load_cached", "store_cached"]


def data_digest(data: Iterable[Feed], limit: int = 0) -> tuple[str, int]:
    """sha256 of the samples (names, dtypes, shapes, bytes, in order) and their count."""
    h = hashlib.sha256()
    count = 0
    for i, feed in enumerate(data):
        if limit and i >= limit:
            break
        h.update(f"sample {i}\n".encode())
        for name in sorted(feed):
            arr = np.ascontiguousarray(feed[name])
            h.update(f"{name}|{arr.dtype.str}|{list(arr.shape)}\n".encode())
            h.update(memoryview(arr).cast("B"))
        count += 1
    return h.hexdigest(), count


def cache_key(model: bytes, digest: str, options: Mapping[str, Any],
              initializers: Mapping[str, np.ndarray] | None = None) -> str:
    """``initializers``: the weights a model serialized with shared initializers refers to
    by name (their names, dtypes, shapes and bytes enter the key)."""
    h = hashlib.sha256()
    h.update(b"qcompiler-calibration-v1\n")
    h.update(hashlib.sha256(model).digest())
    for name in sorted(initializers or {}):
        arr = np.ascontiguousarray(initializers[name])
        h.update(f"{name}|{arr.dtype.str}|{list(arr.shape)}\n".encode())
        h.update(memoryview(arr).cast("B"))
    h.update(digest.encode())
    h.update(json.dumps(options, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _path(directory: str | os.PathLike[str], key: str) -> Path:
    return Path(directory) / f"{key}.qcstats"


def load_cached(directory: str | os.PathLike[str], key: str) -> Statistics | None:
    path = _path(directory, key)
    if not path.is_file():
        return None
    try:
        return Statistics.from_bytes(path.read_bytes())
    except (OSError, ValueError, KeyError):
        return None  # unreadable or foreign entry: recompute (and overwrite it)


def store_cached(directory: str | os.PathLike[str], key: str, stats: Statistics) -> Path:
    root = Path(directory)
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".qcstats", dir=root)
        with os.fdopen(fd, "wb") as fh:
            fh.write(stats.to_bytes())
        os.replace(tmp, _path(root, key))
    except OSError as exc:
        raise UserError(f"--calibration-cache {directory}: cannot write ({exc.strerror})") from None
    return _path(root, key)
