"""qcompiler: compile ONNX models into quantized ONNX models for a hardware target.

The public API: ``compile`` for users, and for pass and target authors the IR (``Model``,
``Graph``, ``Rewriter``, patterns), the pass base and manager, the registry, targets, and the
quantization helpers. Built-in passes in ``qcompiler.passes`` use nothing else.
"""

from ._source_tree import install as _map_source_tree

_map_source_tree(__file__)  # a source checkout: passes/ and targets/ as qcompiler.passes/.targets

from .api import INTEGER_OPS, CompileResult, compile, op_histogram
from .calibration import (CalibrationData, InputSpec, PatchSpec, RangeCollector, Statistics, input_patches,
                          input_specs, load_calibration)
from .check import CheckResult, Problem, check_model
from .errors import PassFailure, UserError
from .imagedata import ImageSpec
from .ir import (AnyValue, Const, Constant, Graph, Match, Model, Node, Op, Rewriter, Rule, Value, Variable,
                 apply_rules, load_model, match, node_subgraphs, verify_model)
from .observe import observe_values
from .pass_manager import Instrumentation, Pass, PassContext, PassManager, PassResult
from .pipeline import PassSpec, format_pipeline, parse_pipeline
from .plan import NodePlan, Plan, is_float, plan_quantization, producer_op, weight_axis
from .rangefile import read_ranges, write_ranges, write_tensorrt_table
from .quant import QParams, QType, compute_qparams, dequantize, gptq_round, qrange, quantize, weight_qparams
from .registry import PassRegistry, default_registry
from .sim import SimResult, simulate
from .target import OpConfig, Target, TensorRule, builtin_targets, load_target
from .version import __version__

__all__ = [
    "ImageSpec", "read_ranges", "write_ranges", "write_tensorrt_table",
    "AnyValue", "CalibrationData", "PatchSpec", "input_patches", "gptq_round", "CompileResult", "Const", "Constant", "Graph", "INTEGER_OPS", "InputSpec",
    "Instrumentation", "Match", "Model", "Node", "NodePlan", "Op", "OpConfig", "Pass", "PassContext",
    "PassFailure", "PassManager", "PassRegistry", "PassResult", "PassSpec", "Plan", "QParams", "QType",
    "RangeCollector", "Rewriter", "Rule", "Target", "TensorRule", "UserError", "Value", "Variable",
    "CheckResult", "Problem", "check_model",
    "SimResult", "simulate", "observe_values",
    "__version__", "apply_rules", "builtin_targets", "compile", "compute_qparams", "default_registry",
    "dequantize", "format_pipeline", "input_specs", "is_float", "load_calibration", "load_model", "load_target",
    "match", "node_subgraphs", "op_histogram", "parse_pipeline", "plan_quantization", "producer_op",
    "qrange", "quantize", "Statistics", "verify_model", "weight_axis", "weight_qparams",
]
