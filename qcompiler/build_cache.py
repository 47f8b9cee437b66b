"""The whole-build cache: a rebuild with unchanged inputs returns the stored output bytes.

Why: the statistics and GPTQ caches (:mod:`.calibration.cache`) skip the model runs and the
rounding, but a rebuild still loads, rewrites, verifies, checks, measures fidelity and
serializes; that kept cached rebuilds at 1.7-2.7x (issue 13 asks 5x). With ``--calibration-cache
DIR`` a compile first computes a key over everything that determines its outputs and, on a
hit, returns the stored model bytes, report and range files without running any pass.

Key (sha256) = this format's version, qcompiler's version *and a digest of its own source*
(``qcompiler``, ``qcompiler.passes``, ``qcompiler.targets``: a changed pass or target file never
serves an old entry), the onnx/onnxruntime/numpy versions, the host facts that change what
onnxruntime computes or what the report says (:mod:`.host`), the input model's bytes and its
external data, the resolved target, the pass list with every option, the calibration and
evaluation samples (:func:`.calibration.cache.data_digest`), a range file's bytes and the remaining
compile options. Code the key cannot see disables the cache: ``plugins``, a custom
``registry``; so do options with side outputs (``print_ir_after``, ``time_passes``, ``analysis``).

Entry ``<key>.qcbuild``: a digest-framed body (:func:`.calibration.cache.frame`) holding a JSON
manifest (the report, the sizes of the blobs) and the blobs (model bytes, range files). No
pickle: bytes and JSON only. Written atomically; a damaged entry is a miss and is rewritten.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .calibration.cache import frame, unframe, write_entry

__all__ = ["BUILD_FORMAT", "code_digest", "build_key", "disabled_reason", "load_build", "store_build"]

BUILD_FORMAT = "qcompiler-build-v1"
_MAGIC = b"QCBUILD1"


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """sha256 over qcompiler's own Python and TOML files (package, passes, targets)."""
    import qcompiler
    import qcompiler.passes
    import qcompiler.targets

    h = hashlib.sha256()
    for pkg in (qcompiler, qcompiler.passes, qcompiler.targets):
        for root in pkg.__path__:
            base = Path(root)
            for f in sorted(p for p in base.rglob("*") if p.suffix in (".py", ".toml") and "__pycache__" not in p.parts):
                h.update(f"{pkg.__name__}/{f.relative_to(base).as_posix()}\n".encode())
                h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def _version(module: str) -> str:
    """A library's version without importing it (importing onnxruntime costs more than a hit)."""
    import sys
    from importlib import metadata

    loaded = sys.modules.get(module)
    if loaded is not None:
        return str(getattr(loaded, "__version__", ""))
    try:
        return metadata.version(module)
    except metadata.PackageNotFoundError:  # another distribution name (onnxruntime-gpu, ...)
        return str(__import__(module).__version__)


def _environment() -> dict[str, Any]:
    from .host import cpu_flags, host_description
    from .version import __version__

    return {"format": BUILD_FORMAT, "qcompiler": __version__, "code": code_digest(), "onnx": _version("onnx"),
            "onnxruntime": _version("onnxruntime"), "numpy": _version("numpy"), "machine": platform.machine(),
            "host": host_description(),
            "cpu_flags": hashlib.sha256(" ".join(sorted(cpu_flags())).encode()).hexdigest()}


def file_digest(paths: list[Path]) -> str:
    """sha256 over the files' bytes, in order (read in blocks: external data can be large)."""
    h = hashlib.sha256()
    for i, p in enumerate(paths):
        h.update(f"file {i}\n".encode())
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def disabled_reason(*, plugins: Any, registry: Any, print_ir_after: Any, time_passes: bool,
                    analysis: Any) -> str | None:
    """Why this build cannot use the whole-build cache, or None when it can."""
    if plugins:
        return "plugins (their code is not part of the key)"
    if registry is not None:
        return "a custom pass registry (its code is not part of the key)"
    if print_ir_after or time_passes:
        return "--print-ir-after / --time-passes (they print while the passes run)"
    if analysis is not None:
        return "--analysis (it writes an HTML page)"
    return None


def build_key(parts: Mapping[str, Any]) -> str:
    """The entry key: sha256 over the environment and ``parts`` as canonical JSON."""
    text = json.dumps({"environment": _environment(), **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def load_build(directory: str | os.PathLike[str], key: str) -> tuple[bytes, dict[str, Any], dict[str, bytes]] | None:
    """(model bytes, report, {name: extra file bytes}) stored under ``key``; None if absent or damaged."""
    try:
        data = (Path(directory) / f"{key}.qcbuild").read_bytes()
    except OSError:
        return None
    body = unframe(_MAGIC, data)
    if body is None or len(body) < 8:
        return None
    try:
        size = int.from_bytes(body[:8], "little")
        manifest = json.loads(bytes(body[8:8 + size]))
        blobs, pos = {}, 8 + size
        for name, n in manifest["blobs"]:
            blobs[str(name)] = bytes(body[pos:pos + int(n)])
            pos += int(n)
        if pos != len(body) or manifest.get("key") != key or not isinstance(manifest.get("report"), dict):
            return None
        model = blobs.pop("model")
    except (ValueError, KeyError, TypeError):
        return None
    return model, manifest["report"], blobs


def store_build(directory: str | os.PathLike[str], key: str, model: bytes, report: Mapping[str, Any],
                extras: Mapping[str, bytes]) -> Path:
    blobs = {"model": model, **extras}
    manifest = json.dumps({"key": key, "report": report, "blobs": [[k, len(v)] for k, v in blobs.items()]},
                          sort_keys=True).encode()
    body = b"".join([len(manifest).to_bytes(8, "little"), manifest, *blobs.values()])
    return write_entry(directory, f"{key}.qcbuild", frame(_MAGIC, body))
