"""upgrade-opset: raise the default-domain opset with onnx's version converter."""

from __future__ import annotations

from dataclasses import dataclass

import onnx
import onnx.version_converter

from qcompiler import Model, PassContext, PassResult, UserError, Pass
from qcompiler.wide import override_opset

__all__ = ["UpgradeOpset"]


@dataclass(frozen=True)
class UpgradeOpset(Pass):
    """Convert the model to at least opset `min-version` (0: the target's `defaults.min_opset`).

    Why: per-channel DequantizeLinear (`axis`) and most integer kernels need opset 13; a model
    exported at opset 11-12 is converted once, up front, so no later pass ever emits a node
    its opset does not define. A compile whose plan overrides put a node on 16-bit activations
    (`int16-activations`, `qcompiler.wide`) goes to at least 21, the first opset with 16-bit
    Q/DQ. Requires nothing; replaces the model in place. Models already at or above the
    version are left alone.
    """

    name = "upgrade-opset"
    min_version: int = 0

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        want = max(self.min_version or ctx.target.min_opset,
                   override_opset(ctx.target, ctx.analysis.get("plan_overrides")))
        have = model.opset("") or 0
        if have >= want:
            return PassResult(False)
        proto = model.to_proto()
        try:
            converted = onnx.version_converter.convert_version(proto, want)
        except Exception as exc:
            raise UserError(f"{model.source}: cannot convert from opset {have} to {want} "
                            f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from exc
        ctx.rewriter(model).replace_model(converted)
        ctx.log(f"upgrade-opset: {have} -> {want}")
        return PassResult(True)
