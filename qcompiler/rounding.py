"""GPTQ weight rounding as a build step: cached by content, one BLAS thread, counted, observable.

:func:`qcompiler.quant.gptq_round` is the arithmetic. A :class:`WeightRounder` wraps it for a
pass: results are looked up in (and written to) the build cache under a key of everything
they depend on (weights, input second moments, scales, zero points, integer range, options,
algorithm version), BLAS runs on one thread while it works (see :func:`one_blas_thread`), it
counts what it computed and what it found cached (the compile report's ``weight_rounding``),
and it calls a progress hook after each layer.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .calibration.cache import array_key, load_array, store_array
from .quant import QType, gptq_round

__all__ = ["WeightRounder", "one_blas_thread", "GPTQ_VERSION"]

# bump when gptq_round's results change, so that caches never serve codes of another algorithm
GPTQ_VERSION = "gptq-v2"


def one_blas_thread() -> Any:
    """Context manager limiting BLAS to one thread (threadpoolctl). OpenBLAS's worker threads
    spin after each product: with calibration lanes, a lane's moment GEMM spinning on both cores
    stalls the other lane's model run (lanes 1.4x slower on EfficientNet); in GPTQ rounding, the
    many small products of the column loop made two BLAS threads 4x slower in CPU time than
    one on a loaded 2-core machine (docs/design.md, "GPTQ rounding cost")."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # a dependency; without it everything still works, only slower
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


class WeightRounder:
    """Rounds layers with GPTQ for one pass run. Use as a context manager (one BLAS thread
    inside); ``cache_dir`` "" disables the cache; ``progress(done, total)`` is called after each
    :meth:`round` call, ``total`` being what the caller announced (0 if unknown)."""

    def __init__(self, cache_dir: str = "", *, total: int = 0,
                 progress: Callable[[int, int], None] | None = None, damp: float = 0.01) -> None:
        self.cache_dir = cache_dir
        self.total = total
        self.progress = progress
        self.damp = damp
        self.computed = 0
        self.cached = 0
        self.seconds = 0.0
        self._stack = contextlib.ExitStack()
        self._lock = threading.Lock()

    def __enter__(self) -> "WeightRounder":
        self._stack.enter_context(one_blas_thread())
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def round(self, w: np.ndarray, moment: np.ndarray, scale: np.ndarray, zero_point: np.ndarray,
              qtype: QType) -> np.ndarray:
        """GPTQ codes [G, R, K] of ``w`` [G, R, K] as ``qtype``'s dtype (see :func:`gptq_round`)."""
        start = time.perf_counter()
        key = ""
        codes = None
        if self.cache_dir:
            key = array_key(GPTQ_VERSION, (w, moment, scale, zero_point),
                            {"qmin": qtype.qmin, "qmax": qtype.qmax, "pair_sum_max": qtype.pair_sum_max,
                             "dtype": qtype.dtype, "damp": self.damp})
            codes = load_array(self.cache_dir, key, qtype.np_dtype, w.shape)
        hit = codes is not None
        if codes is None:
            codes = gptq_round(w, moment, scale, zero_point, qtype.qmin, qtype.qmax, damp=self.damp,
                               pair_sum_max=qtype.pair_sum_max).astype(qtype.np_dtype)
            if key:
                store_array(self.cache_dir, key, codes)
        with self._lock:  # layers may be rounded from several threads (insert-qdq rounds two at once)
            self.cached += hit
            self.computed += not hit
            self.seconds += time.perf_counter() - start
            done = self.computed + self.cached
        if self.progress is not None:
            self.progress(done, self.total)
        return codes

    def summary(self) -> dict[str, Any]:
        """The compile report's ``weight_rounding`` entry."""
        return {"gptq_layers": self.computed, "gptq_cache_hits": self.cached, "seconds": round(self.seconds, 3)}
