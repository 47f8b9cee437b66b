"""Bit-exact integer simulation of quantized models on a target's arithmetic.

``simulate(model, target, inputs, reference=...)`` runs a QOperator or QDQ model with the
target's integer kernels (requantization, rounding, accumulator width, int16 pair saturation)
in numpy and reports fidelity against the float model. See ``docs/design.md`` ("Integer
simulator").
"""

from .arith import Arithmetic, quantize_multiplier, requantize, round_shift
from .kernels import SIM_DOMAIN, make_kernels
from .qdq import integer_groups
from .run import SimResult, TensorFidelity, quantized_tensors, simulate

__all__ = ["Arithmetic", "SIM_DOMAIN", "SimResult", "TensorFidelity", "integer_groups", "make_kernels",
           "quantize_multiplier", "quantized_tensors", "requantize", "round_shift", "simulate"]
