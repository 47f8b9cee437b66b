"""A third-party pass for qcompiler, loaded with ``--plugin examples/02_custom_pass/my_pass.py``.

qcompiler registers every :class:`qcompiler.Pass` subclass this file defines; the pipeline
text then refers to it by its ``name``, with options in braces:
``...,fuse-pad-conv,prune-small-weights{threshold=0.002},group-activations,...``.
It uses only the public API (``qcompiler.__all__``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qcompiler import Constant, Model, Pass, PassContext, PassResult, const_value


@dataclass(frozen=True)
class PruneSmallWeights(Pass):
    """Zero every weight entry whose magnitude is below `threshold` in Conv, Gemm and MatMul
    nodes (their input 1, when it is an initializer).

    Why: magnitude pruning is the simplest form of sparsification; zeros compress well and
    sparse kernels can skip them. Run it after fuse-conv-bn so it prunes the weights that are
    actually used (batch-norm scales already folded in), and before calibrate so activation
    ranges are measured on the pruned model. Approximate: changes the model's outputs.
    Writes ``prune_small_weights`` (threshold, counts) into the compile report.
    """

    name = "prune-small-weights"

    threshold: float = 1e-3
    ops: tuple[str, ...] = ("Conv", "Gemm", "MatMul")

    def __post_init__(self) -> None:
        if not self.threshold >= 0.0:
            raise ValueError(f"threshold must be >= 0, got {self.threshold}")

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        rw = ctx.rewriter(model)  # every change goes through the rewriter: `modified` stays honest
        replacement: dict[int, Constant | None] = {}  # per weight tensor: a weight shared by nodes is pruned once
        pruned = total = 0
        for graph in model.graph.walk():
            for node in graph.nodes:
                if node.op not in self.ops or len(node.inputs) < 2:
                    continue
                weight = node.inputs[1]
                array = const_value(weight)
                if array is None or array.dtype.kind != "f":
                    continue  # a run-time value, or already quantized
                if id(weight) not in replacement:
                    small = (np.abs(array) < self.threshold) & (array != 0)
                    total += array.size
                    pruned += int(small.sum())
                    zeroed = np.where(small, 0, array).astype(array.dtype)
                    replacement[id(weight)] = rw.constant(weight.name + "_pruned", zeroed) if small.any() else None
                new = replacement[id(weight)]
                if new is not None:
                    rw.set_input(node, 1, new)
        tensors = sum(v is not None for v in replacement.values())
        if tensors:
            rw.cleanup(model.graph)  # the original initializers are now unread
        ctx.report["prune_small_weights"] = {"threshold": self.threshold, "pruned": pruned, "total": total,
                                             "tensors": tensors}
        ctx.log(f"prune-small-weights: zeroed {pruned} of {total} weights in {tensors} tensors")
        return PassResult(rw.modified)
