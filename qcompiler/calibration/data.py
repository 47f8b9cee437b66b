"""Calibration data: the sources samples come from, and their validation against the
model's inputs.

Every source becomes the same thing, a :class:`CalibrationData`: a re-iterable stream of
validated feed dicts (input name -> array, batch of 1 or the sample's own batch). Sources:

* a stacked ``.npz`` (keys = input names, samples on axis 0), a directory of per-sample
  ``.npz`` files, a ``.npy`` for single-input models;
* a directory of images with a preprocessing spec (:mod:`qcompiler.calibration.images`, needs Pillow);
* ``"random:N"`` (or ``"random:N:SEED"``): N seeded random samples, for smoke tests only
  (``real_data`` is False and the report says so);
* a mapping of stacked arrays, an iterable of feed dicts, or a zero-argument callable that
  returns a fresh iterator of feed dicts each time it is called.

Samples are streamed: one feed dict at a time is loaded, checked and handed on, so memory
does not grow with the number of samples. The one exception is a one-shot iterator (for
example a generator): calibration reads the data more than once (a min/max pass, then a
histogram pass), so such an iterator is read once up front and its samples are kept in
memory. Pass a callable returning a new iterator to stream instead.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError

__all__ = ["InputSpec", "CalibrationData", "Feed", "load_calibration", "input_specs", "random_feeds",
           "RANDOM_SYMBOLIC_DIM", "RANDOM_DEFAULT_SEED", "check_sample"]

Feed = dict[str, np.ndarray]

#: size given to a symbolic (named or unknown) dimension by ``random:N``
RANDOM_SYMBOLIC_DIM = 1
#: seed of ``random:N`` when none is given
RANDOM_DEFAULT_SEED = 0

_RANDOM = re.compile(r"^random:(\d+)(?::(\d+))?$")
#: dimension names that mean "unknown" rather than "the same size wherever it appears":
#: empty, '?', 'None' and '-1' (spellings of "no name"), and 'unk__N', which tf2onnx and
#: onnxruntime's symbolic shape inference generate afresh for each unknown dimension
_ANONYMOUS_DIM = re.compile(r"^(\?|None|-1|unk__\d+)?$")
#: largest random:N sample input (bytes): a smoke test, not a reason to exhaust memory
RANDOM_MAX_BYTES = 1 << 31


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]


def input_specs(model: Any, source: str = "<ModelProto>") -> list[InputSpec]:
    """Run-time inputs of a :class:`qcompiler.ir.Model` (graph inputs that are not initializers).
    An ``onnx.ModelProto`` (``source`` names it in errors) is read with graphsurgeon's own type
    and shape rules, so it gives the specs its imported Model would, without importing the graph
    (the whole-build cache keys samples before the model is loaded)."""
    import onnx
    import onnx_graphsurgeon as gs

    if isinstance(model, onnx.ModelProto):
        from onnx_graphsurgeon.importers.onnx_importer import get_onnx_tensor_dtype, get_onnx_tensor_shape

        inits = {t.name for t in model.graph.initializer}
        values = [(v.name, get_onnx_tensor_dtype(v), get_onnx_tensor_shape(v))
                  for v in model.graph.input if v.name not in inits]
    else:
        source = model.source
        values = [(v.name, v.dtype, v.shape) for v in model.graph.inputs if not isinstance(v, gs.Constant)]
    specs = []
    for name, dtype, shape in values:
        shape = tuple(shape) if shape is not None else ()
        try:
            dtype = np.dtype(dtype) if dtype is not None else np.dtype(np.float32)
        except TypeError:  # an ONNX element type numpy has no dtype for here (undefined, ...)
            kind = onnx.TensorProto.DataType.Name(dtype) if isinstance(dtype, int) else dtype
            raise UserError(f"{source}: input '{name}' has ONNX element type {kind}, which calibration "
                            "data cannot hold") from None
        specs.append(InputSpec(name, dtype, shape))
    return specs


def check_sample(feed: Mapping[str, Any], specs: list[InputSpec], where: str) -> Feed:
    """One sample checked against the model's inputs: names, rank, dtype (same kind is cast,
    e.g. float64 -> float32), fixed dims, one size per symbolic dim name, finite values."""
    names = {s.name for s in specs}
    for key in feed:
        if key not in names:
            raise UserError(f"{where}: unknown input '{key}' (model inputs: {', '.join(sorted(names))})")
    out: Feed = {}
    symbolic: dict[str, tuple[int, str, int]] = {}  # dim name -> (size, input, axis) first seen
    for spec in specs:
        if spec.name not in feed:
            raise UserError(f"{where}: missing input '{spec.name}'")
        try:
            arr = np.asarray(feed[spec.name])
        except Exception as exc:  # ragged lists and the like
            raise UserError(f"{where}: input '{spec.name}' is not an array ({exc})") from exc
        if arr.dtype.kind not in "biuf":
            raise UserError(f"{where}: input '{spec.name}' is {arr.dtype}, model expects {spec.dtype}")
        if spec.shape and arr.ndim != len(spec.shape):
            raise UserError(f"{where}: input '{spec.name}' has rank {arr.ndim}, model expects "
                            f"{len(spec.shape)} {list(spec.shape)}")
        if arr.dtype != spec.dtype:
            same_kind = arr.dtype.kind == spec.dtype.kind or (arr.dtype.kind in "iu" and spec.dtype.kind in "iu")
            if not same_kind:
                raise UserError(f"{where}: input '{spec.name}' is {arr.dtype}, model expects {spec.dtype}")
            if arr.dtype.kind in "iu" and spec.dtype.kind in "iu" and arr.size:
                info = np.iinfo(spec.dtype)
                lo, hi = int(arr.min()), int(arr.max())
                if lo < info.min or hi > info.max:
                    raise UserError(f"{where}: input '{spec.name}' holds {lo if lo < info.min else hi}, which "
                                    f"{spec.dtype} cannot represent")
            arr = arr.astype(spec.dtype)
        for axis, (have, want) in enumerate(zip(arr.shape, spec.shape)):
            if isinstance(want, int) and want > 0 and have != want:
                raise UserError(f"{where}: input '{spec.name}' has shape {list(arr.shape)}, model expects "
                                f"{want} on axis {axis} ({list(spec.shape)})")
            if isinstance(want, str) and not _ANONYMOUS_DIM.match(want):
                seen = symbolic.setdefault(want, (have, spec.name, axis))
                if seen[0] != have:
                    raise UserError(f"{where}: input '{spec.name}' has {have} on axis {axis} but input "
                                    f"'{seen[1]}' has {seen[0]} on axis {seen[2]} (both are dimension '{want}')")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            bad = "NaN" if np.isnan(arr).any() else "Inf"
            raise UserError(f"{where}: input '{spec.name}' contains {bad}")
        out[spec.name] = arr
    return out


class CalibrationData:
    """A re-iterable, validated stream of feed dicts.

    ``real_data`` is False only for ``random:N``: ranges calibrated on it say nothing about
    real inputs, and the report marks them. ``limit`` keeps the first N samples.
    """

    def __init__(self, source: Any, specs: list[InputSpec], *, limit: int | None = None,
                 image_spec: Any = None) -> None:
        if limit is not None and limit < 1:
            raise UserError(f"--calibration-limit {limit}: must be at least 1")
        self.source = source
        self.specs = specs
        self.limit = limit
        self.image_spec = image_spec
        self.real_data = not (isinstance(source, str) and _RANDOM.match(source.strip()) is not None)
        if isinstance(source, (str, os.PathLike)):
            self.description = str(source)
        else:
            self.description = getattr(source, "__name__", None) or type(source).__name__
        if image_spec is not None and not (isinstance(source, (str, os.PathLike)) and Path(source).is_dir()):
            raise UserError(f"{self.description}: an image preprocessing spec needs a directory of images "
                            "as calibration data")
        self._cached: list[Feed] | None = None
        if isinstance(source, Iterator):
            # a one-shot iterator is read once and kept: calibration reads the data twice
            head = source if limit is None else itertools.islice(source, limit)
            self._cached = [check_sample(_as_mapping(f, i), specs, f"calibration sample {i}")
                            for i, f in enumerate(head)]
        if next(iter(self), None) is None:
            raise UserError(f"{self.description}: calibration set is empty")

    def __iter__(self) -> Iterator[Feed]:
        raw = self._raw()
        return raw if self.limit is None else itertools.islice(raw, self.limit)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def _raw(self) -> Iterator[Feed]:
        if self._cached is not None:
            yield from self._cached
            return
        src = self.source
        if isinstance(src, str) and _RANDOM.match(src.strip()):
            yield from random_feeds(src.strip(), self.specs)
            return
        if isinstance(src, (str, os.PathLike)):
            yield from _from_path(Path(src), self.specs, self.image_spec)
            return
        if isinstance(src, Mapping):
            yield from _from_stacked(src, self.specs, "calibration dict")
            return
        if callable(src) and not isinstance(src, Iterable):
            fresh = src()
            if not isinstance(fresh, Iterable):
                raise UserError(f"{self.description}: the calibration callable must return an iterable of "
                                f"feed dicts, got {type(fresh).__name__}")
            src = fresh
        if not isinstance(src, Iterable):
            raise UserError(f"calibration data of type {type(src).__name__}: expected a path, 'random:N', a dict "
                            "of stacked arrays, an iterable of feed dicts or a callable returning one")
        for i, feed in enumerate(src):
            yield check_sample(_as_mapping(feed, i), self.specs, f"calibration sample {i}")


def _as_mapping(feed: Any, index: int) -> Mapping[str, Any]:
    if not isinstance(feed, Mapping):
        raise UserError(f"calibration sample {index}: expected a dict of input name -> array, "
                        f"got {type(feed).__name__}")
    return feed


def random_feeds(text: str, specs: list[InputSpec]) -> Iterator[Feed]:
    """``random:N[:SEED]``: N samples drawn from one seeded generator (same text, same
    samples). Each input keeps its dtype and shape; symbolic dims get
    :data:`RANDOM_SYMBOLIC_DIM`. Floats are standard normal; integers are 0 or 1 (valid as
    token ids, masks and segment ids alike); booleans are fair coin flips."""
    m = _RANDOM.match(text)
    if m is None:
        raise UserError(f"{text}: expected random:N or random:N:SEED")
    count = int(m.group(1))
    rng = np.random.default_rng(int(m.group(2)) if m.group(2) else RANDOM_DEFAULT_SEED)
    for i in range(count):
        feed: Feed = {}
        for spec in specs:
            shape = tuple(d if isinstance(d, int) and d > 0 else RANDOM_SYMBOLIC_DIM for d in spec.shape)
            size = int(np.prod(shape, dtype=object)) * spec.dtype.itemsize
            if size > RANDOM_MAX_BYTES:
                raise UserError(f"{text}: input '{spec.name}' declares shape {list(spec.shape)} ({size:,} bytes per "
                                f"sample); random data is limited to {RANDOM_MAX_BYTES:,} bytes per input")
            if spec.dtype.kind == "f":
                arr = rng.standard_normal(shape).astype(spec.dtype)
            elif spec.dtype.kind == "b":
                arr = rng.integers(0, 2, shape).astype(bool)
            else:
                arr = rng.integers(0, 2, shape).astype(spec.dtype)
            feed[spec.name] = arr
        yield check_sample(feed, specs, f"{text} sample {i}")


def _from_stacked(arrays: Mapping[str, Any], specs: list[InputSpec], where: str) -> Iterator[Feed]:
    names = list(arrays.keys())
    if not names:
        raise UserError(f"{where}: no arrays")
    stacked = {k: np.asarray(arrays[k]) for k in names}
    scalar = [k for k, a in stacked.items() if a.ndim == 0]
    if scalar:
        raise UserError(f"{where}: array '{scalar[0]}' is a scalar; samples must be stacked on axis 0")
    counts = {k: a.shape[0] for k, a in stacked.items()}
    if len(set(counts.values())) != 1:
        raise UserError(f"{where}: inputs have different sample counts on axis 0: {counts}")
    n = min(counts.values())
    rank = {s.name: len(s.shape) for s in specs}
    for i in range(n):
        feed = {}
        for k, arr in stacked.items():
            # same rank as the model input: keep a batch of 1; one more axis: samples carry their own batch
            feed[k] = arr[i : i + 1] if arr.ndim == rank.get(k, arr.ndim) else arr[i]
        yield check_sample(feed, specs, f"{where} sample {i}")


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as exc:
        raise UserError(f"{path}: not a readable .npz file ({type(exc).__name__}: {exc})") from exc


def _from_path(path: Path, specs: list[InputSpec], image_spec: Any = None) -> Iterator[Feed]:
    if not path.exists():
        raise UserError(f"{path}: no such calibration file or directory")
    if path.is_dir():
        from .images import image_feeds, image_files

        npz = sorted(p for p in path.iterdir() if p.suffix == ".npz")
        if npz and image_spec is None:
            for f in npz:
                yield check_sample(_load_npz(f), specs, str(f))
        elif image_files(path):
            yield from image_feeds(path, specs, image_spec)
        else:
            raise UserError(f"{path}: directory holds no .npz samples and no images")
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
    else:
        raise UserError(f"{path}: calibration data must be a .npz file, a .npy file, a directory of .npz "
                        "files or images, or random:N")


def load_calibration(source: Any, specs: list[InputSpec], *, limit: int | None = None,
                     image_spec: Any = None) -> CalibrationData:
    """Wrap ``source`` (see the module docstring) as validated :class:`CalibrationData`;
    the first sample is read and checked now, so bad data fails before any pass runs."""
    if isinstance(source, CalibrationData):
        return source
    return CalibrationData(source, specs, limit=limit, image_spec=image_spec)

