"""calibrate: observe activation ranges by running the float model on real samples."""

from __future__ import annotations

from dataclasses import dataclass

from qcompiler import Model, Pass, PassContext, PassResult, plan_for, plan_quantization
from qcompiler.calibration import calibrate
from qcompiler.calibration.options import CalibrationOptions

__all__ = ["Calibrate"]


@dataclass(frozen=True)
class Calibrate(Pass, CalibrationOptions):
    """Run the current (float) model in onnxruntime over the calibration samples and record
    each float activation's clipping range in the analysis (`ranges`, for insert-qdq), with
    the per-channel means (`channel_means`) and input second moments (`input_moments`) its
    bias correction and GPTQ rounding read; the report gets a `calibration` section.

    The options are those of `qcompiler.calibration.CalibrationOptions` (validated there;
    docs/calibration.md): the method (`method`, default the target's
    `defaults.calibration_method`; `overrides=[Softmax=minmax,/node/name=percentile]`, node
    names win), what is observed (`observe`, `statistics`), the engine (`memory`, `lanes`,
    `workers`, `scheduler`, `cache`) and `ranges-file`, a range JSON that pins ranges (and
    replaces the data if it pins every observed tensor). Which values are quantized, and on
    which QType, comes from the plan (`qcompiler.plan`). Does not change the graph.
    """

    name = "calibrate"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        # the plan insert-qdq will follow, planned as if every value had a range (the plan
        # after calibration is then the same one)
        every = {v.name for g in model.graph.walk() for v in g.inputs}
        every.update(v.name for g in model.graph.walk() for n in g.nodes for v in n.outputs)
        plan = plan_for(model, ctx, ranges=dict.fromkeys(every))
        # with plan overrides (an accuracy-budget recompile) the full-integer plan's values are
        # observed too, so every recompile of a search hits the calibration cache
        full = plan_quantization(model, ctx.target, ranges=dict.fromkeys(every), groups=ctx.analysis.get("groups", {})) \
            if ctx.analysis.get("plan_overrides") else None
        result = calibrate(model, ctx.calibration, plan, self, target=ctx.target,
                           groups=ctx.analysis.get("groups", {}),
                           progress=ctx.progress if ctx.status.enabled else None, full_plan=full)
        ctx.analysis["input_moments"] = result.moments
        if self.cache:  # later passes keep their expensive results there too (insert-qdq's GPTQ codes)
            ctx.analysis["cache_dir"] = self.cache
        ctx.analysis["ranges"] = result.ranges
        ctx.analysis["wide_ranges"] = result.wide_ranges  # int16-activations overrides' 16-bit grid
        ctx.analysis["channel_means"] = result.channel_means
        ctx.report["calibration"] = result.report
        return PassResult(False)
