"""calibrate: observe activation ranges by running the float model on real samples."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from qcompiler import Model, Pass, PassContext, PassResult, PatchSpec, RangeCollector, UserError, run_collect
from qcompiler.calibration import HistogramCollector, mse_range

__all__ = ["Calibrate"]


def _limited(data, limit: int):
    for i, feed in enumerate(data):
        if limit and i >= limit:
            return
        yield feed


def _weighted_inputs(model: Model) -> dict[str, int]:
    """Activations multiplied by a constant weight, with the axis their channels lie on;
    their per-channel means let insert-qdq correct the bias shift weight rounding causes."""
    axes: dict[str, int] = {}
    for node in model.graph.gs.nodes:
        if node.op not in ("Conv", "Gemm", "MatMul") or len(node.inputs) < 2:
            continue
        if not isinstance(node.inputs[1], gs.Constant) or isinstance(node.inputs[0], gs.Constant):
            continue
        if node.op == "Conv":
            axes[node.inputs[0].name] = 1
        elif node.op == "Gemm":
            axes[node.inputs[0].name] = 0 if int(node.attrs.get("transA", 0)) else -1
        else:
            axes[node.inputs[0].name] = -1
    return axes


def _moment_specs(model: Model, max_dim: int) -> dict[str, list[tuple[str, PatchSpec]]]:
    """Per activation, the (node, window) pairs whose input second moments to accumulate."""
    specs: dict[str, list[tuple[str, PatchSpec]]] = {}
    for node in model.graph.gs.nodes:
        if node.op not in ("Conv", "Gemm", "MatMul") or len(node.inputs) < 2:
            continue
        w = node.inputs[1]
        if not isinstance(w, gs.Constant) or isinstance(node.inputs[0], gs.Constant) or w.shape is None:
            continue
        shape = list(w.shape)
        if node.op == "Conv":
            if node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
                continue
            k = int(np.prod(shape[1:]))
            spec = PatchSpec(tuple(shape[2:]), tuple(node.attrs.get("pads", ())), tuple(node.attrs.get("strides", ())),
                             tuple(node.attrs.get("dilations", ())), int(node.attrs.get("group", 1)))
        else:
            if len(shape) != 2:
                continue
            trans_b = node.op == "Gemm" and int(node.attrs.get("transB", 0))
            k = shape[1] if trans_b else shape[0]
            spec = PatchSpec(trans=node.op == "Gemm" and bool(int(node.attrs.get("transA", 0))))
        if k > max_dim:
            continue
        specs.setdefault(node.inputs[0].name, []).append((node.name, spec))
    return specs


@dataclass(frozen=True)
class Calibrate(Pass):
    """Run the current (float) model in onnxruntime over the calibration samples and record
    each float activation's min/max in the analysis (`ranges`), for insert-qdq.

    Methods: `minmax` (observed range) and `mse` (a second pass histograms each tensor over
    its observed range and picks the clipping range with the least expected quantization
    error; heavy-tailed activations such as hard-swish outputs gain most). The default is the
    target's `defaults.calibration_method`. The second pass also accumulates, over the first
    `moment-samples` samples, the input second moments that GPTQ rounding in insert-qdq uses.

    Why here, mid-pipeline: ranges are observed on the graph after fusions, so they describe
    exactly the tensors that get quantized. Values already quantized (inputs of an existing
    QuantizeLinear, from quantization-aware training) are not observed. Streaming: each
    sample's tensors are reduced and dropped. Requires calibration data. Does not change the graph.
    """

    name = "calibrate"
    method: str = ""
    limit: int = 0
    second_moments: bool = True
    moment_samples: int = 16
    clip_weight: float = 1.0
    max_moment_dim: int = 4608

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        method = self.method or ctx.target.calibration_method
        if method not in ("minmax", "mse"):
            raise UserError(f"pass 'calibrate': method '{method}' is not available (methods: minmax, mse)")
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

        proto = model.to_proto()
        specs = _moment_specs(model, self.max_moment_dim) if self.second_moments else {}
        count = run_collect(proto, names + inputs, _limited(ctx.calibration, self.limit), collector,
                            channel_axes=_weighted_inputs(model))
        ranges = collector.ranges()
        moments: dict = {}
        histograms = method == "mse"
        if histograms or specs:
            # second pass: histograms over the now known ranges, and layer input moments
            hist = HistogramCollector(ranges if histograms else {})
            run_collect(proto, (names + inputs) if histograms else list(specs), _limited(ctx.calibration, self.limit),
                        hist, moment_specs=specs, moment_limit=self.moment_samples)
            moments = hist.moments
            if histograms:
                qtype = ctx.target.activation_rule().qtype
                levels = (qtype.qmax - qtype.qmin) if qtype is not None else 255
                symmetric = bool(qtype and qtype.symmetric)
                for name, counts in hist.counts.items():
                    lo, hi = ranges[name]
                    ranges[name] = mse_range(counts, lo, hi, levels, symmetric, self.clip_weight, hist.zeros.get(name, 0))
        ctx.analysis["input_moments"] = moments
        ctx.analysis["ranges"] = ranges
        ctx.analysis["channel_means"] = collector.means()
        ctx.report["calibration"] = {"method": method, "samples": count,
                                     "tensors": len(ctx.analysis["ranges"]),
                                     "seconds": round(time.perf_counter() - start, 3)}
        return PassResult(False)
