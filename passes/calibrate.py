"""calibrate: observe activation ranges by running the float model on real samples."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from qcompiler import Model, Pass, PassContext, PassResult, RangeCollector, UserError, run_collect

__all__ = ["Calibrate"]


@dataclass(frozen=True)
class Calibrate(Pass):
    """Run the current (float) model in onnxruntime over the calibration samples and record
    each float activation's min/max in the analysis (`ranges`), for insert-qdq.

    Why here, mid-pipeline: ranges are observed on the graph after fusions, so they describe
    exactly the tensors that get quantized. Values already quantized (inputs of an existing
    QuantizeLinear, from quantization-aware training) are not observed. Streaming: each
    sample's tensors are reduced and dropped. Requires calibration data. Does not change the graph.
    """

    name = "calibrate"
    method: str = "minmax"
    limit: int = 0

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        if self.method != "minmax":
            raise UserError(f"pass 'calibrate': method '{self.method}' is not available (methods: minmax)")
        if ctx.calibration is None:
            raise UserError("pass 'calibrate' needs calibration data (--calibration PATH)")
        start = time.perf_counter()
        graph = model.graph
        names: list[str] = []
        for node in graph.gs.nodes:
            if node.op == "QuantizeLinear":
                continue
            for value in node.outputs:
                if not value.name or any(c.op == "QuantizeLinear" for c in value.outputs):
                    continue
                if value.dtype is None or np.dtype(value.dtype).kind == "f":
                    names.append(value.name)
        collector = RangeCollector()
        inputs = [v.name for v in graph.inputs if not isinstance(v, gs.Constant)]

        def feeds():
            for i, feed in enumerate(ctx.calibration):
                if self.limit and i >= self.limit:
                    return
                for name in inputs:
                    if feed[name].dtype.kind == "f":
                        collector.update(name, feed[name])
                yield feed

        count = run_collect(model.to_proto(), names, feeds(), collector)
        ctx.analysis["ranges"] = collector.ranges()
        ctx.report["calibration"] = {"method": self.method, "samples": count,
                                     "tensors": len(ctx.analysis["ranges"]),
                                     "seconds": round(time.perf_counter() - start, 3)}
        return PassResult(False)
