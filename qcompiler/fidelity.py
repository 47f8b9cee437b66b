"""The compile report's ``fidelity`` section: the compiled model against the float model on
samples calibration did not see.

Eval samples are ``eval_data`` when given, otherwise the last ``max(1, n // 10)`` (at most
16) samples of an ``n``-sample calibration set with ``n >= 10``, which are then held out of
calibration (so compiled bytes change with the hold-out: see docs/design.md, "Accuracy
analysis"). Both models run in onnxruntime's CPU provider. A QOperator model runs with the
integer kernels it names (what a user runs; ort-cpu's pair-sum limit keeps them exact without
VNNI); a QDQ model runs as written (graph optimizations off: Q/DQ in float, the grid's math on
every CPU) - onnxruntime would otherwise fuse its groups into its own int8 kernels, which
saturate on x86 without VNNI (qcompiler.host), and that is not the target's arithmetic.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import threading
from typing import Any, Union

import numpy as np
import onnx

from .calibration.data import CalibrationData

__all__ = ["ModelSource", "FloatReference", "hold_out", "measure_fidelity", "run_outputs", "HOLD_OUT_MIN", "HOLD_OUT_MAX", "HOLD_OUT_MAX_MODEL_BYTES"]

#: smallest calibration set a slice is held out of (smaller sets keep every sample)
HOLD_OUT_MIN = 10
#: most samples held out
HOLD_OUT_MAX = 16
#: input models above this size (weights included) hold nothing out: the fidelity run would load
#: a second full-precision copy next to a compile that streams weights (--eval-data still measures)
HOLD_OUT_MAX_MODEL_BYTES = 2**31


def hold_out(calib: CalibrationData) -> tuple[list[dict[str, np.ndarray]], dict[str, Any]]:
    """Split the held-out slice off ``calib`` (in place: its ``limit`` shrinks) and describe it."""
    if not calib.real_data:
        return [], {"status": "no real data: calibration used random samples, so fidelity is not measured",
                    "source": calib.description}
    n = len(calib)
    if n < HOLD_OUT_MIN:
        return [], {"status": f"not measured: {n} calibration sample(s) (< {HOLD_OUT_MIN}), none held out; "
                              "pass --eval-data", "source": calib.description}
    k = min(HOLD_OUT_MAX, max(1, n // 10))
    samples = list(itertools.islice(iter(calib), n - k, n))
    calib.limit = n - k
    return samples, {"source": calib.description, "held_out": f"calibration samples {n - k}..{n - 1} "
                     f"(the last {k} of {n}; calibrated on the first {n - k})", "samples": k}


#: a model as onnxruntime takes it: a proto, its serialized bytes, or a file path (read by
#: onnxruntime itself, external data included: no second Python-side copy or serialization)
ModelSource = Union[onnx.ModelProto, bytes, str]


def _session(m: ModelSource, *, plain: bool = False, threads: int = 0) -> Any:
    """An onnxruntime CPU session; ``plain``: graph optimizations off (the graph as written)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    if plain:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    src = m.SerializeToString() if isinstance(m, onnx.ModelProto) else m
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


class FloatReference:
    """The float model's graph outputs on the eval samples, computed in a background thread
    started before the passes run. Why: they do not depend on the compile, and onnxruntime
    releases the GIL while it builds a session and runs it, so the float half of the fidelity
    section (a session build and the held-out runs: about 0.4 s of MiniLM's 6 s compile) runs
    on the core the single-threaded passes leave idle. One intra-op thread, so it does not
    compete with calibration's own session for both cores."""

    def __init__(self, source: ModelSource, samples: list[dict[str, np.ndarray]]) -> None:
        self._source, self._samples = source, samples
        self._outputs: list[dict[str, np.ndarray]] | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="qcompiler-float-reference", daemon=True)
        self._thread.start()

    @classmethod
    def start(cls, source: ModelSource, samples: list[dict[str, np.ndarray]]) -> "FloatReference":
        """A reference for ``source`` on ``samples``: the last one again when both are the same
        (a budget search compiles the same model on the same samples several times)."""
        global _LAST
        key = _reference_key(source, samples)
        if key is not None and _LAST is not None and _LAST[0] == key:
            return _LAST[1]
        ref = cls(source, samples)
        _LAST = (key, ref) if key is not None else None
        return ref

    def _run(self) -> None:
        try:
            sess = _session(self._source, threads=1)
            names = [o.name for o in sess.get_outputs()]
            self._outputs = [dict(zip(names, sess.run(names, feed))) for feed in self._samples]
        except BaseException as exc:  # re-raised in the caller's thread by outputs()
            self._error = exc

    def outputs(self) -> list[dict[str, np.ndarray]]:
        """The outputs per sample (waits for the thread; its error is raised here)."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._outputs is not None
        return self._outputs


_LAST: tuple[tuple[object, ...], FloatReference] | None = None


def _reference_key(source: ModelSource, samples: list[dict[str, np.ndarray]]) -> tuple[object, ...] | None:
    """Content key of a float reference: the model file (path, size, mtime) and the samples'
    bytes; None for an in-memory model (not worth hashing: it is not re-read)."""
    if not isinstance(source, str):
        return None
    try:
        st = os.stat(source)
    except OSError:
        return None
    h = hashlib.sha256()
    for feed in samples:
        for name in sorted(feed):
            arr = np.ascontiguousarray(feed[name])
            h.update(f"{name}|{arr.dtype.str}|{arr.shape}\n".encode())
            h.update(arr.tobytes())
    return (os.path.realpath(source), st.st_size, st.st_mtime_ns, h.hexdigest())


def run_outputs(float_model: ModelSource, quant_model: ModelSource,
                samples: list[dict[str, np.ndarray]], *, as_written: bool
                ) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
    """Both models' graph outputs (those of ``quant_model``) per sample, run as the module
    text says. ``as_written``: run the quantized model without graph optimizations (QDQ)."""
    fs, qs = _session(float_model), _session(quant_model, plain=as_written)
    names = [o.name for o in qs.get_outputs()]
    ref = [dict(zip(names, fs.run(names, feed))) for feed in samples]
    got = [dict(zip(names, qs.run(names, feed))) for feed in samples]
    return ref, got


def measure_fidelity(float_model: ModelSource | FloatReference, quant_model: ModelSource,
                     samples: list[dict[str, np.ndarray]], *, as_written: bool) -> dict[str, Any]:
    """Per graph output of ``quant_model``: cosine, SQNR and (classifier outputs) top-1
    agreement against the float model (or its :class:`FloatReference`), over ``samples`` (see
    :func:`run_outputs`)."""
    from .analysis.metrics import OutputFidelity

    fid = OutputFidelity()
    if isinstance(float_model, FloatReference):
        qs = _session(quant_model, plain=as_written)
        names = [o.name for o in qs.get_outputs()]
        pairs: Any = ((ref, dict(zip(names, qs.run(names, feed)))) for ref, feed in zip(float_model.outputs(), samples))
    else:
        pairs = zip(*run_outputs(float_model, quant_model, samples, as_written=as_written))
    for ref, got in pairs:
        fid.add({k: v for k, v in ref.items() if k in got}, got)
    return fid.result()
