"""Calibration data: the sources samples come from, and their validation against the
model's inputs.

Samples are streamed: one feed dict at a time is loaded, checked and handed on, so memory
does not grow with the number of samples.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UserError

__all__ = ["InputSpec", "CalibrationData", "Feed", "load_calibration", "input_specs"]

Feed = dict[str, np.ndarray]


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]


def input_specs(model: Any) -> list[InputSpec]:
    """Run-time inputs of a :class:`qcompiler.ir.Model` (graph inputs that are not initializers)."""
    import onnx_graphsurgeon as gs

    specs = []
    for v in model.graph.inputs:
        if isinstance(v, gs.Constant):
            continue
        shape = tuple(v.shape) if v.shape is not None else ()
        specs.append(InputSpec(v.name, np.dtype(v.dtype) if v.dtype is not None else np.dtype(np.float32), shape))
    return specs


def _check_sample(feed: Mapping[str, Any], specs: list[InputSpec], where: str) -> Feed:
    names = {s.name for s in specs}
    for key in feed:
        if key not in names:
            raise UserError(f"{where}: unknown input '{key}' (model inputs: {', '.join(sorted(names))})")
    out: Feed = {}
    for spec in specs:
        if spec.name not in feed:
            raise UserError(f"{where}: missing input '{spec.name}'")
        arr = np.asarray(feed[spec.name])
        if spec.shape and arr.ndim != len(spec.shape):
            raise UserError(f"{where}: input '{spec.name}' has rank {arr.ndim}, model expects "
                            f"{len(spec.shape)} {list(spec.shape)}")
        if arr.dtype != spec.dtype:
            same_kind = arr.dtype.kind == spec.dtype.kind or (arr.dtype.kind in "iu" and spec.dtype.kind in "iu")
            if not same_kind:
                raise UserError(f"{where}: input '{spec.name}' is {arr.dtype}, model expects {spec.dtype}")
            arr = arr.astype(spec.dtype)
        for axis, (have, want) in enumerate(zip(arr.shape, spec.shape)):
            if isinstance(want, int) and want > 0 and have != want:
                raise UserError(f"{where}: input '{spec.name}' has shape {list(arr.shape)}, model expects "
                                f"{want} on axis {axis} ({list(spec.shape)})")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            bad = "NaN" if np.isnan(arr).any() else "Inf"
            raise UserError(f"{where}: input '{spec.name}' contains {bad}")
        out[spec.name] = arr
    return out


class CalibrationData:
    """A re-iterable, validated stream of feed dicts."""

    def __init__(self, source: Any, specs: list[InputSpec], *, limit: int | None = None) -> None:
        self.source = source
        self.specs = specs
        self.limit = limit
        self.description = str(source) if isinstance(source, (str, os.PathLike)) else type(source).__name__
        if isinstance(source, Iterator):
            self._cached: list[Feed] | None = [
                _check_sample(f, specs, f"calibration sample {i}") for i, f in enumerate(source)]
        else:
            self._cached = None
        if next(iter(self), None) is None:
            raise UserError(f"{self.description}: calibration set is empty")

    def __iter__(self) -> Iterator[Feed]:
        count = 0
        for feed in self._raw():
            if self.limit is not None and count >= self.limit:
                return
            count += 1
            yield feed

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def _raw(self) -> Iterator[Feed]:
        if self._cached is not None:
            yield from self._cached
            return
        src = self.source
        if isinstance(src, (str, os.PathLike)):
            yield from _from_path(Path(src), self.specs)
            return
        if isinstance(src, Mapping):
            yield from _from_stacked(src, self.specs, "calibration dict")
            return
        for i, feed in enumerate(src):
            if not isinstance(feed, Mapping):
                raise UserError(f"calibration sample {i}: expected a dict of input name -> array, got {type(feed).__name__}")
            yield _check_sample(feed, self.specs, f"calibration sample {i}")


def _from_stacked(arrays: Mapping[str, Any], specs: list[InputSpec], where: str) -> Iterator[Feed]:
    names = list(arrays.keys())
    if not names:
        raise UserError(f"{where}: no arrays")
    counts = {k: np.asarray(arrays[k]).shape[0] if np.asarray(arrays[k]).ndim else 0 for k in names}
    n = min(counts.values())
    if len(set(counts.values())) != 1:
        raise UserError(f"{where}: inputs have different sample counts on axis 0: {counts}")
    rank = {s.name: len(s.shape) for s in specs}
    for i in range(n):
        feed = {}
        for k in names:
            arr = np.asarray(arrays[k])
            # same rank as the model input: keep a batch of 1; one more axis: samples carry their own batch
            feed[k] = arr[i : i + 1] if arr.ndim == rank.get(k, arr.ndim) else arr[i]
        yield _check_sample(feed, specs, f"{where} sample {i}")


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as exc:
        raise UserError(f"{path}: not a readable .npz file ({type(exc).__name__}: {exc})") from exc


def _from_path(path: Path, specs: list[InputSpec]) -> Iterator[Feed]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".npz")
        if not files:
            raise UserError(f"{path}: directory holds no .npz samples")
        for f in files:
            yield _check_sample(_load_npz(f), specs, str(f))
    elif path.suffix == ".npz":
        yield from _from_stacked(_load_npz(path), specs, str(path))
    elif path.suffix == ".npy":
        if len(specs) != 1:
            raise UserError(f"{path}: a .npy file only works for single-input models (model has {len(specs)})")
        try:
            arr = np.load(path, allow_pickle=False)
        except Exception as exc:
            raise UserError(f"{path}: not a readable .npy file ({exc})") from exc
        yield from _from_stacked({specs[0].name: arr}, specs, str(path))
    elif not path.exists():
        raise UserError(f"{path}: no such calibration file or directory")
    else:
        raise UserError(f"{path}: calibration data must be a .npz file, a .npy file or a directory of .npz files")


def load_calibration(source: Any, specs: list[InputSpec], *, limit: int | None = None) -> CalibrationData:
    if isinstance(source, CalibrationData):
        return source
    return CalibrationData(source, specs, limit=limit)
