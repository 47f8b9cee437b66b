"""``qcompiler inspect``: what a target would do to a model, without calibrating it."""

from __future__ import annotations

import os
from typing import Any

from .api import build_pipeline, op_histogram
from .ir import Model, load_model
from .pass_manager import Instrumentation, PassContext, PassManager
from .plan import partitions, plan_for, quantization_walk
from .wide import WIDE
from .registry import default_registry
from .target import Target, load_target

__all__ = ["inspect_model", "prepare_model", "integer_nodes"]


def prepare_model(model: Model, tgt: Target, plan_overrides: dict[str, tuple[str, str]] | None = None
                  ) -> PassContext:
    """Run ``tgt``'s static pipeline up to calibration on ``model`` (in place): the graph whose
    node names and weights the compiled model's integer nodes come from. Returns the context
    (``ctx.analysis["groups"]``: fused head -> activation; ``plan_overrides`` as given)."""
    passes = build_pipeline(tgt.pipeline("static"), default_registry())
    prefix = []
    for p in passes:
        if p.name in ("calibrate", "insert-qdq"):
            break
        prefix.append(p)
    ctx = PassContext(target=tgt, mode="static", format=tgt.default_format)
    ctx.analysis["plan_overrides"] = plan_overrides  # (as compile has them: upgrade-opset reads them)
    PassManager(prefix, Instrumentation(verify_each=False)).run(model, ctx)
    return ctx


def integer_nodes(model: Model, tgt: Target, ctx: PassContext) -> tuple[dict[str, str], dict[str, str]]:
    """On a prepared model: the nodes ``tgt`` would run in integer (name -> kernel) and the
    float ones (name -> reason), as the plan decides them."""
    plan = plan_for(model, ctx)
    lowered: dict[str, str] = {}
    for name, np_ in plan.nodes.items():
        lowered[name] = np_.config.kernel or f"{np_.node.op} (Q/DQ)"
        if plan.outcome(name).kind == WIDE:  # type: ignore[union-attr]
            lowered[name] = f"{np_.node.op} (Q/DQ, int16-activations)"
    for tail, head in plan.fused.items():
        lowered[tail] = f"fused into '{head}'"
    for name, kernel in plan.dynamic.items():
        lowered[name] = f"{kernel} (dynamic: activation quantized per call)"
    floats = dict(plan.float_nodes)
    # data movement follows its input, as insert-qdq will place it (the same walk)
    for step in quantization_walk(model, tgt, plan):
        if step.kind == "inherit" and step.node is not None:
            lowered[step.node.name] = f"{step.node.op} on integer data"
        elif step.kind == "float-move" and step.node is not None:
            floats[step.node.name] = "data movement on a float input"
    return dict(sorted(lowered.items())), dict(sorted(floats.items()))


def inspect_model(path: str | os.PathLike[str], target: str = "ort-cpu",
                  plan_overrides: dict[str, tuple[str, str]] | None = None) -> dict[str, Any]:
    """Op histogram, the nodes the target would run in integer (with their kernel), the
    nodes that stay float with the reason, and the integer partitions (regions with their
    host<->accelerator boundary values, as the compile report gives them). Runs the target's
    pipeline up to calibration."""
    tgt = load_target(target)
    model = load_model(path)
    ops = op_histogram(model)
    ctx = prepare_model(model, tgt, plan_overrides)
    lowered, floats = integer_nodes(model, tgt, ctx)
    return {"target": tgt.name, "ops": ops, "ops_after_prepare": op_histogram(model),
            "lowered": lowered, "float_nodes": floats,
            "partitions": partitions(model, sorted(lowered))}
