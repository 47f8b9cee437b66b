"""Image folders as calibration data: a directory of pictures plus a preprocessing spec.

Vision models want their input preprocessed exactly as in training (resize, crop, scale,
normalise, channel order, layout). Writing that as numpy code for every model is where
calibration sets go wrong, so the common recipe is data: an :class:`ImageSpec`, written
either inline (``--image-spec "resize=256,crop=224,scale=1/255,mean=0.5,0.5,0.5,std=0.5,0.5,0.5"``)
or as a ``preprocess.toml`` kept next to the images (found automatically) or anywhere else
(``--image-spec path/to/spec.toml``).

Steps, in this order, for each image file (sorted by name, so the order is deterministic):

1. decode with Pillow and convert to RGB (``order=GRAY``: to 8-bit grey);
2. ``resize=N``: scale so the shorter side is N (the other side rounded half up), or
   ``resize=H,W``: to exactly H x W; Pillow's BILINEAR filter either way;
3. ``crop=N`` or ``crop=H,W``: a center crop (offsets rounded down);
4. ``x * scale`` (``scale`` may be written as a fraction, ``1/255``), then
   ``(x - mean) / std`` per channel (in the output channel order);
5. ``order=BGR`` reverses the channels; ``layout=NCHW`` or ``NHWC``; a batch axis of 1 is added;
6. cast to ``dtype`` (integer dtypes are rounded and clipped to their range).

Pillow is an optional extra (``pip install 'qcompiler[image]'``); it is imported only here.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from ..tomlfile import read_toml
from .data import check_sample

__all__ = ["ImageSpec", "IMAGE_SUFFIXES", "SPEC_FILE", "parse_image_spec", "load_image_spec", "resolve_image_spec",
           "image_files", "image_feeds", "preprocess_image"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
SPEC_FILE = "preprocess.toml"
_DTYPES = ("float32", "float16", "float64", "uint8", "int8")


@dataclass(frozen=True)
class ImageSpec:
    """How one image becomes one model input (see the module docstring for the steps).

    The defaults are the identity: raw 0..255 pixel values, RGB, NCHW, float32."""

    resize: tuple[int, ...] = ()  # (N,) shorter side, (H, W) exact, () none
    crop: tuple[int, ...] = ()  # (N,) square, (H, W), () none
    scale: float = 1.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    order: str = "RGB"  # RGB, BGR or GRAY
    layout: str = "NCHW"  # NCHW or NHWC
    dtype: str = "float32"
    input: str = ""  # the model input that receives the images ("": the single rank-4 input)

    @property
    def channels(self) -> int:
        return 1 if self.order == "GRAY" else 3


def _number(text: str, where: str, key: str) -> float:
    """A float, or a fraction ``a/b`` (so ``scale=1/255`` reads as written)."""
    try:
        if "/" in text:
            num, den = text.split("/", 1)
            return float(num) / float(den)
        return float(text)
    except (ValueError, ZeroDivisionError):
        raise UserError(f"{where}: '{key}' must be a number, got '{text}'") from None


def _build(values: Mapping[str, Any], where: str) -> ImageSpec:
    """An ImageSpec from key -> value(s) (strings from the command line or TOML values)."""
    known = {f.name for f in fields(ImageSpec)}
    kwargs: dict[str, Any] = {}
    for key, raw in values.items():
        if key not in known:
            raise UserError(f"{where}: unknown key '{key}' (keys: {', '.join(sorted(known))})")
        items = list(raw) if isinstance(raw, (list, tuple)) else [raw]
        if key in ("resize", "crop"):
            ints = []
            for v in items:
                number = _number(str(v), where, key)
                if number != int(number) or number < 1:
                    raise UserError(f"{where}: '{key}' must be positive integers, got '{v}'")
                ints.append(int(number))
            if len(ints) not in (1, 2):
                raise UserError(f"{where}: '{key}' takes one size (N) or two (H,W), got {len(ints)}")
            kwargs[key] = tuple(ints)
        elif key == "scale":
            if len(items) != 1:
                raise UserError(f"{where}: 'scale' takes one number")
            kwargs[key] = _number(str(items[0]), where, key)
        elif key in ("mean", "std"):
            nums = tuple(_number(str(v), where, key) for v in items)
            if len(nums) not in (1, 3):
                raise UserError(f"{where}: '{key}' takes 1 or 3 numbers, got {len(nums)}")
            if key == "std" and any(v == 0 or not math.isfinite(v) for v in nums):
                raise UserError(f"{where}: 'std' must be finite and non-zero")
            kwargs[key] = nums
        else:
            if len(items) != 1:
                raise UserError(f"{where}: '{key}' takes one value")
            text = str(items[0]).strip()
            choices = {"order": ("RGB", "BGR", "GRAY"), "layout": ("NCHW", "NHWC"), "dtype": _DTYPES}.get(key)
            if choices is not None:
                text = text.upper() if key != "dtype" else text.lower()
                if text not in choices:
                    raise UserError(f"{where}: '{key}' must be one of {', '.join(choices)}, got '{items[0]}'")
            kwargs[key] = text
    spec = ImageSpec(**kwargs)
    if spec.order == "GRAY" and (len(spec.mean) == 3 or len(spec.std) == 3):
        raise UserError(f"{where}: order=GRAY has one channel; give one 'mean' and one 'std'")
    return spec


def parse_image_spec(text: str, where: str = "--image-spec") -> ImageSpec:
    """Parse ``key=value,key=v1,v2,v3,...``: a comma-separated item without ``=`` adds a value
    to the key before it (so ``mean=0.485,0.456,0.406`` is one key with three numbers)."""
    values: dict[str, list[str]] = {}
    last = None
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        if "=" in item:
            key, value = (s.strip() for s in item.split("=", 1))
            if key in values:
                raise UserError(f"{where}: key '{key}' given twice")
            values[key] = [value]
            last = key
        elif last is None:
            raise UserError(f"{where}: '{item}' needs key=value")
        else:
            values[last].append(item)
    return _build(values, where)


def load_image_spec(path: Path) -> ImageSpec:
    """Read a TOML spec: the same keys at top level, lists for mean/std/resize/crop."""
    return _build(read_toml(path, "image spec"), str(path))


def resolve_image_spec(spec: Any, directory: Path) -> ImageSpec:
    """The spec for ``directory``: an ImageSpec as is; a ``.toml`` path or an existing file is
    read; other text is parsed inline; None means ``directory/preprocess.toml``."""
    if isinstance(spec, ImageSpec):
        return spec
    if spec is None:
        found = directory / SPEC_FILE
        if not found.is_file():
            raise UserError(f"{directory}: images need a preprocessing spec: pass --image-spec "
                            f"(e.g. 'resize=256,crop=224,scale=1/255') or put a {SPEC_FILE} next to them")
        return load_image_spec(found)
    text = str(spec)
    if text.endswith(".toml") or ("=" not in text and Path(text).is_file()):
        if not Path(text).is_file():
            raise UserError(f"{text}: no such image spec file")
        return load_image_spec(Path(text))
    return parse_image_spec(text)


def image_files(directory: Path) -> list[Path]:
    """The images of ``directory`` (not recursive), sorted by name."""
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _pillow() -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise UserError("reading an image folder needs Pillow: pip install 'qcompiler[image]'") from None
    return Image


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def preprocess_image(path: Path, spec: ImageSpec) -> np.ndarray:
    """One image file -> one input array with a batch axis of 1 (steps in the module docstring)."""
    Image = _pillow()
    try:
        with Image.open(path) as im:
            im = im.convert("L" if spec.order == "GRAY" else "RGB")
            if spec.resize:
                w, h = im.size
                if len(spec.resize) == 2:
                    size = (spec.resize[1], spec.resize[0])
                else:
                    k = spec.resize[0] / min(w, h)
                    size = (max(spec.resize[0], _round_half_up(w * k)), max(spec.resize[0], _round_half_up(h * k)))
                im = im.resize(size, Image.BILINEAR)
            if spec.crop:
                ch, cw = spec.crop if len(spec.crop) == 2 else (spec.crop[0], spec.crop[0])
                w, h = im.size
                if cw > w or ch > h:
                    raise UserError(f"{path}: image is {w}x{h} after resizing, smaller than the crop {cw}x{ch}")
                left, top = (w - cw) // 2, (h - ch) // 2
                im = im.crop((left, top, left + cw, top + ch))
            x = np.asarray(im, dtype=np.float32)
    except UserError:
        raise
    except Exception as exc:  # PIL.UnidentifiedImageError, truncated files, OSError
        raise UserError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from exc
    if x.ndim == 2:
        x = x[:, :, None]
    if spec.order == "BGR":
        x = x[:, :, ::-1]
    x = x * np.float32(spec.scale)
    x = (x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    if spec.layout == "NCHW":
        x = x.transpose(2, 0, 1)
    x = x[None]
    dtype = np.dtype(spec.dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        x = np.clip(np.rint(x), info.min, info.max)
    return np.ascontiguousarray(x.astype(dtype))


def _target_input(specs: list[Any], spec: ImageSpec, where: str) -> str:
    names = [s.name for s in specs]
    if spec.input:
        if spec.input not in names:
            raise UserError(f"{where}: image spec input '{spec.input}' is not a model input "
                            f"(model inputs: {', '.join(names)})")
        chosen = spec.input
    else:
        rank4 = [s.name for s in specs if len(s.shape) == 4]
        if len(rank4) != 1:
            raise UserError(f"{where}: cannot tell which input gets the images ({len(rank4)} rank-4 inputs "
                            f"among {', '.join(names)}); add input=NAME to the image spec")
        chosen = rank4[0]
    others = [n for n in names if n != chosen]
    if others:
        raise UserError(f"{where}: an image folder feeds only input '{chosen}', but the model also needs "
                        f"{', '.join(repr(n) for n in others)}; use .npz samples instead")
    return chosen


def image_feeds(directory: Path, specs: list[Any], image_spec: Any = None) -> Iterator[dict[str, np.ndarray]]:
    """One validated feed per image of ``directory``, in name order."""
    spec = resolve_image_spec(image_spec, directory)
    name = _target_input(specs, spec, str(directory))
    files = image_files(directory)
    if not files:
        raise UserError(f"{directory}: no images ({', '.join(IMAGE_SUFFIXES)})")
    _pillow()  # fail with the install hint before the first file
    for path in files:
        yield check_sample({name: preprocess_image(path, spec)}, specs, str(path))
