"""qcompiler: compile ONNX models into quantized ONNX models for a hardware target.

The public API: ``compile`` for users, and for pass and target authors the IR (``Model``,
``Graph``, ``Rewriter``, patterns), the pass base and manager, the registry, targets, and the
quantization helpers. Built-in passes in ``qcompiler.passes`` use nothing else.
"""

from __future__ import annotations

from ._lazy import lazy_exports as _lazy_exports
from ._source_tree import install as _map_source_tree

_map_source_tree(__file__)  # a source checkout: passes/ and targets/ as qcompiler.passes/.targets

# The public names and the module defining each. They are imported on first use (PEP 562), so
# that `qcompiler --version` and `targets` do not pay for onnx, networkx and onnxruntime
# (docs/design.md, "Import time").
_LAZY: dict[str, str] = {
    **dict.fromkeys(['analyze', 'layer_sensitivity'], ".analysis"),
    **dict.fromkeys(['CompileResult', 'compile', 'op_histogram'], ".api"),
    **dict.fromkeys(['CalibrationData', 'CalibrationOptions', 'CalibrationResult', 'ImageSpec', 'InputSpec', 'PatchSpec',
                     'RangeCollector', 'Statistics', 'calibrate', 'input_patches', 'input_specs', 'load_calibration'],
                    ".calibration"),
    **dict.fromkeys(['CheckResult', 'Problem', 'check_model'], ".check"),
    **dict.fromkeys(['PassFailure', 'UserError'], ".errors"),
    **dict.fromkeys(['INTEGER_OPS', 'KERNELS', 'KernelSpec', 'Operand', 'assemble_inputs', 'kernel_spec', 'kernels_for'],
                    ".kernels"),
    **dict.fromkeys(['AnyValue', 'Const', 'Constant', 'Either', 'Graph', 'Match', 'Model', 'Node', 'Op', 'Rewriter', 'Rule',
                     'Value', 'Variable', 'apply_rules', 'const_value', 'is_constant', 'load_model', 'match',
                     'node_subgraphs', 'producer', 'users', 'verify_model'], ".ir"),
    **dict.fromkeys(['observe_values'], ".observe"),
    **dict.fromkeys(['Instrumentation', 'Pass', 'PassContext', 'PassManager', 'PassResult'], ".pass_manager"),
    **dict.fromkeys(['PassSpec', 'format_pipeline', 'parse_pipeline'], ".pipeline"),
    **dict.fromkeys(['NodePlan', 'Outcome', 'Plan', 'is_float', 'plan_for', 'plan_quantization', 'producer_op',
                     'weight_axis'], ".plan"),
    **dict.fromkeys(['read_ranges', 'write_ranges', 'write_tensorrt_table'], ".rangefile"),
    **dict.fromkeys(['QParams', 'QType', 'compute_qparams', 'dequantize', 'gptq_round', 'qrange', 'quantize', 'weight_qparams'], ".quant"),
    **dict.fromkeys(['PassRegistry', 'default_registry'], ".registry"),
    **dict.fromkeys(['SimResult', 'simulate'], ".sim"),
    **dict.fromkeys(['OpConfig', 'Target', 'TensorRule', 'builtin_targets', 'load_target'], ".target"),
    **dict.fromkeys(['__version__'], ".version"),
}

__all__ = list(_LAZY)


__getattr__, __dir__ = _lazy_exports(__name__, _LAZY)
