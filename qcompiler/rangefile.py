"""Activation range files: export calibrated ranges, import (pin) edited ones, and write a
TensorRT calibration table.

Calibration is the slow part of a build and its result is small: one (min, max) per
tensor. Writing it down lets a user inspect it, edit or pin a few ranges, reuse it in a
build without calibration data, or hand it to TensorRT. The JSON format (documented in
``docs/calibration.md``)::

    {
      "format": "qcompiler-ranges",
      "version": 1,
      "method": "mse",                 # informational: how the ranges were found
      "samples": 64,                   # informational
      "real_data": true,               # false when calibrated on random:N
      "ranges": {"conv1_out": {"min": -1.5, "max": 6.0}, ...}
    }

Only ``format``, ``version`` and ``ranges`` are read back; other top-level keys are kept for
people. Ranges are the calibrated real-valued ranges of the float tensors, before the
target turns them into scales and zero points (symmetry, narrow range, power-of-two
scales are applied afterwards, exactly as for calibrated ranges).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UserError
from .quant import range_fits_float32

__all__ = ["RANGES_FORMAT", "RANGES_VERSION", "TENSORRT_VERSION", "ranges_to_json", "write_ranges", "read_ranges",
           "check_pinned", "tensorrt_table", "write_tensorrt_table", "read_tensorrt_table"]

RANGES_FORMAT = "qcompiler-ranges"
RANGES_VERSION = 1
#: version tag of the table's first line (``TRT-8601-EntropyCalibration2``: TensorRT 8.6.1)
TENSORRT_VERSION = "8601"

Ranges = Mapping[str, tuple[float, float]]


def ranges_to_json(ranges: Ranges, **meta: Any) -> str:
    """The range file text: keys sorted, floats written so they read back bit-exactly."""
    body: dict[str, Any] = {"format": RANGES_FORMAT, "version": RANGES_VERSION}
    body.update({k: v for k, v in meta.items() if v is not None})
    body["ranges"] = {name: {"min": float(lo), "max": float(hi)} for name, (lo, hi) in sorted(ranges.items())}
    return json.dumps(body, indent=1, allow_nan=False) + "\n"


def write_ranges(path: str | Path, ranges: Ranges, **meta: Any) -> None:
    """Write the range file atomically (temp file + rename)."""
    from .ir import atomic_write_text

    atomic_write_text(Path(path), ranges_to_json(ranges, **meta))


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_ranges(path: str | Path) -> dict[str, tuple[float, float]]:
    """Read and validate a range file; every error names the file (and the tensor)."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except OSError as exc:
        raise UserError(f"{p}: cannot read range file ({exc.strerror or exc})") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{p}: not a JSON range file ({exc})") from exc
    except RecursionError:
        raise UserError(f"{p}: not a range file (JSON nested too deeply)") from None
    if not isinstance(data, dict) or data.get("format") != RANGES_FORMAT:
        raise UserError(f"{p}: not a qcompiler range file (expected \"format\": \"{RANGES_FORMAT}\")")
    if data.get("version") != RANGES_VERSION:
        raise UserError(f"{p}: range file version {data.get('version')!r} is not supported "
                        f"(this qcompiler reads version {RANGES_VERSION})")
    entries = data.get("ranges")
    if not isinstance(entries, dict):
        raise UserError(f"{p}: key 'ranges' must be an object of tensor name -> {{\"min\": .., \"max\": ..}}")
    out: dict[str, tuple[float, float]] = {}
    for name, entry in entries.items():
        if not isinstance(entry, dict) or set(entry) - {"min", "max"} or not {"min", "max"} <= set(entry):
            raise UserError(f"{p}: tensor '{name}': expected {{\"min\": number, \"max\": number}}")
        lo, hi = entry["min"], entry["max"]
        if not (_finite(lo) and _finite(hi)) or not range_fits_float32(lo, hi):
            raise UserError(f"{p}: tensor '{name}': min and max must be finite numbers whose range fits float32 "
                            f"(|max - min| <= {float(np.finfo(np.float32).max):.4g})")
        if lo > hi:
            raise UserError(f"{p}: tensor '{name}': min {lo} is greater than max {hi}")
        out[name] = (float(lo), float(hi))
    return out


def check_pinned(pinned: Ranges, known: Iterable[str], path: str | Path) -> None:
    """Unknown tensor names are errors: a typo would otherwise silently pin nothing."""
    names = set(known)
    for name in sorted(pinned):
        if name not in names:
            raise UserError(f"{path}: tensor '{name}' is not a calibrated float tensor of this model "
                            "(names are those of the graph after the passes before calibrate; export a "
                            "range file with --export-ranges to see them)")


def _scale_hex(lo: float, hi: float) -> str:
    """TensorRT's per-tensor scale amax/127 as the big-endian IEEE-754 float32 bit pattern."""
    amax = max(abs(lo), abs(hi))
    return struct.pack(">f", amax / 127.0).hex()


def tensorrt_table(ranges: Ranges, version: str = TENSORRT_VERSION) -> str:
    """A TensorRT calibration table (the text ``writeCalibrationCache`` produces): the line
    ``TRT-<version>-EntropyCalibration2``, then ``<tensor>: <hex>`` per tensor, sorted by name.
    TensorRT's int8 is symmetric, so only ``max(|min|, |max|)`` survives."""
    lines = [f"TRT-{version}-EntropyCalibration2"]
    lines += [f"{name}: {_scale_hex(lo, hi)}" for name, (lo, hi) in sorted(ranges.items())]
    return "\n".join(lines) + "\n"


def write_tensorrt_table(path: str | Path, ranges: Ranges, version: str = TENSORRT_VERSION) -> None:
    """Write the TensorRT calibration table atomically."""
    from .ir import atomic_write_text

    atomic_write_text(Path(path), tensorrt_table(ranges, version))


def read_tensorrt_table(path: str | Path) -> dict[str, float]:
    """Tensor -> scale from a TensorRT calibration table (for checks; not an import format)."""
    p = Path(path)
    lines = p.read_text().splitlines()
    if not lines or not lines[0].startswith("TRT-"):
        raise UserError(f"{p}: not a TensorRT calibration table (first line must start with 'TRT-')")
    scales: dict[str, float] = {}
    for line in lines[1:]:
        if not line.strip():
            continue
        name, _, hexval = line.rpartition(": ")
        try:
            scales[name] = struct.unpack(">f", bytes.fromhex(hexval.strip()))[0]
        except (ValueError, struct.error):
            raise UserError(f"{p}: tensor '{name}': bad scale '{hexval}'") from None
    return scales
