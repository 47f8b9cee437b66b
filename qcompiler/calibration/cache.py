"""The build cache (``--calibration-cache DIR``): expensive results stored under a key of
everything that determines them.

Calibration statistics: key = sha256 over (the serialized model the engine runs, the data's
content hash, the method options as canonical JSON). The data hash covers every sample's input
names, dtypes, shapes and bytes in order, so any change of the samples, their order or the
sample limit misses. A hit skips every model run.

Arrays (GPTQ-rounded weights): key = sha256 over the input arrays' dtypes, shapes and bytes
and the options (:func:`array_key`); the entry holds the raw bytes behind a sha256 of them, and
the caller states the dtype and shape it expects, so nothing is deserialized but numbers.

Writes are atomic (temp file + rename), so a crashed or concurrent build never leaves a
half-written entry; an unreadable, truncated or altered entry is a miss and is rewritten.
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

from ..errors import UserError
from .data import Feed
from .stats import Statistics

__all__ = ["data_digest", "cache_key", "load_cached", "store_cached", "array_key", "load_array", "store_array",
           "write_entry", "frame", "unframe"]


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
    return write_entry(directory, f"{key}.qcstats", stats.to_bytes())


def write_entry(directory: str | os.PathLike[str], name: str, data: bytes) -> Path:
    """Write ``data`` to ``directory/name`` atomically (temp file in the same folder, rename)."""
    root = Path(directory)
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=Path(name).suffix, dir=root)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, root / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise UserError(f"--calibration-cache {directory}: cannot write ({exc.strerror})") from None
    return root / name


_ARRAY_MAGIC = b"QCARRAY1"


def array_key(kind: str, arrays: Iterable[np.ndarray], options: Mapping[str, Any]) -> str:
    """Content key of a result computed from ``arrays`` with ``options`` (``kind`` names the
    computation and its version: a changed algorithm must not serve old entries)."""
    h = hashlib.sha256()
    h.update(f"qcompiler-{kind}\n".encode())
    for arr in arrays:
        arr = np.ascontiguousarray(arr)
        h.update(f"{arr.dtype.str}|{list(arr.shape)}\n".encode())
        h.update(memoryview(arr).cast("B"))
    h.update(json.dumps(options, sort_keys=True, default=str).encode())
    return h.hexdigest()


def load_array(directory: str | os.PathLike[str], key: str, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray | None:
    """The array stored under ``key``, or None if absent, damaged or not of ``dtype``/``shape``."""
    try:
        data = (Path(directory) / f"{key}.qcarray").read_bytes()
    except OSError:
        return None
    body = unframe(_ARRAY_MAGIC, data)
    dtype = np.dtype(dtype)
    if body is None or len(body) != dtype.itemsize * int(np.prod(shape)):
        return None
    return np.frombuffer(body, dtype=dtype).reshape(shape).copy()


def store_array(directory: str | os.PathLike[str], key: str, array: np.ndarray) -> Path:
    return write_entry(directory, f"{key}.qcarray", frame(_ARRAY_MAGIC, np.ascontiguousarray(array).tobytes()))


def frame(magic: bytes, body: bytes) -> bytes:
    """An entry: ``magic``, the sha256 of ``body``, ``body`` (see :func:`unframe`)."""
    return magic + hashlib.sha256(body).digest() + body


def unframe(magic: bytes, data: bytes) -> memoryview | None:
    """The body of a :func:`frame` entry, or None when the magic or the digest does not match
    (a truncated, altered or foreign file)."""
    head = len(magic) + 32
    body = memoryview(data)[head:]
    if not data.startswith(magic) or hashlib.sha256(body).digest() != data[len(magic):head]:
        return None
    return body
