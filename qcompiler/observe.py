"""Run the float model over calibration samples and hand chosen intermediate tensors to a
callback: the statistics a graph-rewriting pass needs before calibrate runs (smooth-quant's
per-channel maxima, equalize-layers' pre-activation means).

Why not the calibrate pass: calibrate observes the graph *after* every rewrite, for the ranges
insert-qdq reads; a pass that rewrites scales must see the tensors first, on the graph it
is about to change. Samples are visited in the data's order, so what a callback accumulates is
deterministic.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from .errors import UserError
from .ir import Model

__all__ = ["observe_values"]


def observe_values(model: Model, data: Iterable[dict[str, np.ndarray]] | None, names: Sequence[str],
                   visit: Callable[[str, np.ndarray], None], *, limit: int = 0, who: str = "pass") -> int:
    """Run ``model`` (float, graph as written) on each sample of ``data`` and call
    ``visit(name, array)`` for every value in ``names``; returns the number of samples run
    (at most ``limit`` when > 0). Raises UserError (naming ``who``) without data."""
    import onnx
    import onnxruntime as ort

    if data is None:
        raise UserError(f"pass '{who}' needs calibration data (--calibration PATH)")
    names = list(dict.fromkeys(names))
    if not names:
        return 0
    proto = model.to_proto()
    known = {o.name for o in proto.graph.output}
    proto.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in known)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # values as written
    so.log_severity_level = 3
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    wanted = {i.name for i in sess.get_inputs()}
    count = 0
    for feed in data:
        if limit and count >= limit:
            break
        feed_in: dict[str, Any] = {k: v for k, v in feed.items() if k in wanted}
        for name, arr in zip(names, sess.run(names, feed_in)):
            visit(name, np.asarray(arr))
        count += 1
    if count == 0:
        raise UserError(f"pass '{who}': the calibration set is empty")
    return count
