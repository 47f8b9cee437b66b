"""Calibration: observe a float model's activations on real samples and choose the ranges
(and the statistics) quantization uses.

One entry point, :func:`calibrate` ``(model, data, plan, options) -> CalibrationResult``;
:class:`CalibrationOptions` holds and validates every knob. Modules:

* :mod:`.data` - calibration sources and their validation; :mod:`.images` - image folders;
* :mod:`.options` - :class:`CalibrationOptions`; :mod:`.selection` - what to observe, how;
* :mod:`.stats` - the mergeable collectors; :mod:`.methods` - statistics -> range;
* :mod:`.engine` - runs the model in memory-bounded groups and lanes;
  :mod:`.distributed` - shards over processes or Dask; :mod:`.subgraphs` - If/Loop bodies;
* :mod:`.cache` - the content-keyed build cache; :mod:`.core` - :func:`calibrate`.

Names are imported on first use (PEP 562): ``qcompiler.rounding`` imports :mod:`.cache`
while :mod:`.engine` imports ``qcompiler.rounding``, and `qcompiler --version` pays for none.
"""

from __future__ import annotations

from .._lazy import lazy_exports as _lazy_exports

_LAZY: dict[str, str] = {
    **dict.fromkeys(["calibrate", "CalibrationResult", "input_moments", "method_range"], ".core"),
    **dict.fromkeys(["CalibrationOptions", "parse_memory", "DEFAULT_MEMORY", "METHODS"], ".options"),
    **dict.fromkeys(["CalibrationData", "InputSpec", "Feed", "input_specs", "load_calibration"], ".data"),
    **dict.fromkeys(["ImageSpec"], ".images"),
    **dict.fromkeys(["RangeTarget"], ".methods"),
    **dict.fromkeys(["PatchSpec", "RangeCollector", "Statistics", "input_patches"], ".stats"),
    **dict.fromkeys(["saturation_bounds"], ".selection"),
}

__all__ = list(_LAZY)


__getattr__, __dir__ = _lazy_exports(__name__, _LAZY)
