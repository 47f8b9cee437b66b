"""``qcompiler inspect``: what a target would do to a model, without calibrating it."""

from __future__ import annotations

import os
from typing import Any

from .api import build_pipeline, op_histogram
from .ir import load_model
from .pass_manager import Instrumentation, PassContext, PassManager
from .plan import partitions, plan_for, quantization_walk
from .registry import default_registry
from .target import load_target

__all__ = ["inspect_model"]


def inspect_model(path: str | os.PathLike[str], target: str = "ort-cpu",
                  plan_overrides: dict[str, tuple[str, str]] | None = None) -> dict[str, Any]:
    """Op histogram, the nodes the target would run in integer (with their kernel), the
    nodes that stay float with the reason, and the integer partitions (regions with their
    host<->accelerator boundary values, as the compile report gives them). Runs the target's
    pipeline up to calibration."""
    tgt = load_target(target)
    model = load_model(path)
    ops = op_histogram(model)
    passes = build_pipeline(tgt.pipeline("static"), default_registry())
    prefix = []
    for p in passes:
        if p.name in ("calibrate", "insert-qdq"):
            break
        prefix.append(p)
    ctx = PassContext(target=tgt, mode="static", format=tgt.default_format)
    PassManager(prefix, Instrumentation(verify_each=False)).run(model, ctx)
    ctx.analysis["plan_overrides"] = plan_overrides
    plan = plan_for(model, ctx)
    lowered: dict[str, str] = {}
    for name, np_ in plan.nodes.items():
        lowered[name] = np_.config.kernel or f"{np_.node.op} (Q/DQ)"
    for tail, head in plan.fused.items():
        lowered[tail] = f"fused into '{head}'"
    floats = dict(plan.float_nodes)
    # data movement follows its input, as insert-qdq will place it (the same walk)
    for step in quantization_walk(model, tgt, plan):
        if step.kind == "inherit" and step.node is not None:
            lowered[step.node.name] = f"{step.node.op} on integer data"
        elif step.kind == "float-move" and step.node is not None:
            floats[step.node.name] = "data movement on a float input"
    return {"target": tgt.name, "ops": ops, "ops_after_prepare": op_histogram(model),
            "lowered": dict(sorted(lowered.items())), "float_nodes": dict(sorted(floats.items())),
            "partitions": partitions(model, sorted(lowered))}
