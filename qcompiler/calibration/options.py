"""Calibration options: every knob of :func:`qcompiler.calibration.calibrate` in one frozen,
validated object.

Why one object: the calibrate pass (pipeline text), ``qcompiler.compile`` (Python) and the CLI
(flags) all set the same knobs; each builds a :class:`CalibrationOptions`, so every rule about
a value lives in ``__post_init__`` here and a bad value fails the same way everywhere: a
``UserError`` naming the option (exit 2 on the CLI) before any model run.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import UserError

__all__ = ["CalibrationOptions", "parse_overrides", "check_method", "parse_memory", "DEFAULT_MEMORY", "METHODS",
           "OBSERVE", "STATISTICS"]

DEFAULT_MEMORY = "1GB"
#: ``method``: the range selection methods (:mod:`.methods`; this module stays free of numpy,
#: so the CLI lists them without importing it)
METHODS = ("minmax", "percentile", "entropy", "mse")
#: ``observe``: the tensors insert-qdq reads a range of, or every float tensor
OBSERVE = ("quantized", "all")
#: ``statistics``: ranges + bias-correction means + GPTQ moments, or ranges only
STATISTICS = ("all", "ranges")
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MB": 1 << 20,
          "MIB": 1 << 20, "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30, "T": 1 << 40, "TB": 1 << 40, "TIB": 1 << 40}


def parse_memory(text: str | int) -> int:
    """Bytes from ``1073741824``, ``512MB``, ``1GB``, ``1.5G`` (K/M/G/T are powers of 1024)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).upper() if m else None
    if m is None or unit not in _UNITS:
        raise UserError(f"--calibration-memory {text}: not a size (bytes, or a number with KB, MB, GB)")
    value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise UserError(f"--calibration-memory {text}: must be positive")
    return value


def _bad(option: str, value: Any, rule: str) -> UserError:
    return UserError(f"pass 'calibrate': option '{option}={value}' {rule}")


def check_method(method: str, where: str) -> str:
    """``method`` if it is a calibration method, else a UserError naming ``where`` it was set."""
    if method not in METHODS:
        raise UserError(f"pass 'calibrate': {where} '{method}' is not available (methods: {', '.join(METHODS)})")
    return method


def parse_overrides(items: tuple[str, ...]) -> dict[str, str]:
    """``("Softmax=minmax", "/node/name=percentile")`` -> {key: method}; the method is after
    the last '=' (node names may contain '=')."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, method = item.rpartition("=")
        if not sep or not key.strip():
            raise UserError(f"pass 'calibrate': override '{item}' must be KEY=METHOD (KEY: a node name or op type)")
        out[key.strip()] = check_method(method.strip(), f"override '{key.strip()}': method")
    return out


@dataclass(frozen=True)
class CalibrationOptions:
    """How calibration runs (the ``calibrate`` pass's options; ``qcompiler.compile(calibration_options=...)``).

    Methods: ``method`` (minmax, percentile, entropy, mse; "" = the target's
    ``defaults.calibration_method``); ``overrides`` per producer node name or op type
    (``{"Softmax": "minmax"}`` or ``("Softmax=minmax",)``; node names win); ``range_overrides``
    the same, over ``overrides``, but each reads the statistics collected without it (an abs
    histogram derived from a signed one) wherever they serve its method, so the statistics key
    stays and a cached calibration is reused (the accuracy budget's method trial); ``percentile``
    (0, 100]; ``momentum`` [0, 1): minmax as a moving average of per-sample extremes; ``bins``
    per histogram (>= 16); ``clip_weight`` (> 0): mse's weight of clipping error against
    rounding noise; ``saturation``: clamp a range to where its readers (Relu, HardSwish,
    Clip...) do not saturate.

    Statistics: ``statistics`` "all" (ranges, the per-channel means of bias correction and
    the input second moments of GPTQ rounding) or "ranges"; ``second_moments``,
    ``moment_samples`` / ``grouped_moment_samples`` (samples the moments use; depthwise layers
    the second), ``max_moment_dim`` (wider layers get none); ``observe`` "quantized" (only the
    tensors insert-qdq reads a range of), "all" (every float tensor) or "" (quantized, or all
    when ``compile`` exports ranges); ``limit`` (use the first N samples, 0: all).

    Engine: ``memory`` (bytes or "512MB": the observed tensors of one run), ``lanes`` (samples in
    flight on threads), ``workers`` (local processes) or ``scheduler`` (a Dask address),
    ``cache`` (a directory: statistics, GPTQ rounding and whole builds are reused), and
    ``ranges_file`` (a range JSON pinning ranges over the calibrated ones).
    """

    method: str = ""
    overrides: tuple[str, ...] = ()  # KEY=METHOD
    range_overrides: tuple[str, ...] = ()  # KEY=METHOD, on the statistics the others collect
    percentile: float = 99.99
    momentum: float = 0.0
    bins: int = 2048
    limit: int = 0
    second_moments: bool = True
    moment_samples: int = 16
    grouped_moment_samples: int = 8  # depthwise layers: K = 9 or 25, C matrices a sample
    clip_weight: float = 1.0
    max_moment_dim: int = 4608
    memory: str = DEFAULT_MEMORY
    cache: str = ""
    workers: int = 1
    scheduler: str = ""
    lanes: int = 2
    observe: str = ""  # "": quantized (all when compile exports ranges)
    statistics: str = "all"
    saturation: bool = False
    ranges_file: str = ""  # a range JSON (qcompiler.rangefile)

    def __post_init__(self) -> None:
        # accepted spellings, stored in one canonical form (the pass's pipeline-text types)
        for name in ("overrides", "range_overrides"):
            value = getattr(self, name)
            if isinstance(value, Mapping):
                value = tuple(f"{k}={v}" for k, v in sorted(value.items()))
            elif isinstance(value, str) or not isinstance(value, (tuple, list)):
                raise _bad(name.replace("_", "-"), value, "must be a mapping {KEY: METHOD} or a sequence of "
                           "'KEY=METHOD'")
            object.__setattr__(self, name, tuple(value))
        if isinstance(self.memory, int) and not isinstance(self.memory, bool):  # bytes
            object.__setattr__(self, "memory", str(self.memory))
        for name in ("cache", "ranges_file"):
            if not isinstance(getattr(self, name), str):
                object.__setattr__(self, name, _path(name, getattr(self, name)))
        for f in dataclasses.fields(self):  # types (pipeline text converts; Python callers may not)
            value, kind = getattr(self, f.name), type(f.default)
            ok = isinstance(value, (int, float)) if kind is float else isinstance(value, kind)
            if not ok or (kind is not bool and isinstance(value, bool)):
                raise _bad(f.name.replace("_", "-"), value, f"must be {kind.__name__}, not {type(value).__name__}")
        # methods
        if self.method:
            check_method(self.method, "method")
        parse_overrides(self.overrides)
        parse_overrides(self.range_overrides)
        if not 0.0 < self.percentile <= 100.0:
            raise _bad("percentile", self.percentile, "must be in (0, 100]")
        if not 0.0 <= self.momentum < 1.0:
            raise _bad("momentum", self.momentum, "must be in [0, 1)")
        if self.bins < 16:
            raise _bad("bins", self.bins, "must be at least 16")
        if not (self.clip_weight > 0 and math.isfinite(self.clip_weight)):
            raise _bad("clip-weight", self.clip_weight, "must be a positive number")
        # statistics and the samples they use
        if self.observe not in ("", *OBSERVE):
            raise _bad("observe", self.observe, "must be 'quantized' or 'all'")
        if self.statistics not in STATISTICS:
            raise _bad("statistics", self.statistics, "must be 'all' or 'ranges'")
        for name in ("limit", "moment_samples", "grouped_moment_samples", "max_moment_dim"):
            if getattr(self, name) < 0:
                raise _bad(name.replace("_", "-"), getattr(self, name), "must be 0 or more")
        # engine
        parse_memory(self.memory)
        if self.workers < 1:
            raise _bad("workers", self.workers, "must be at least 1")
        if self.lanes < 1:
            raise _bad("lanes", self.lanes, "must be at least 1")

    @property
    def override_map(self) -> dict[str, str]:
        """``overrides`` as {node name or op type: method}."""
        return parse_overrides(self.overrides)

    @property
    def range_override_map(self) -> dict[str, str]:
        """``range_overrides`` as {node name or op type: method}."""
        return parse_overrides(self.range_overrides)

    @property
    def memory_bytes(self) -> int:
        return parse_memory(self.memory)

    @property
    def observed(self) -> str:
        """``observe`` with the default resolved ("" -> "quantized")."""
        return self.observe or "quantized"

    def changed(self) -> dict[str, Any]:
        """The options that differ from their defaults (what a caller set)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) != f.default}


def _path(option: str, value: Any) -> str:
    import os

    try:
        return os.fspath(value)
    except TypeError:
        raise _bad(option.replace("_", "-"), value, "must be a path") from None
