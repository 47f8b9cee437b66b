"""Accuracy analysis of a quantized model against its float model (``qcompiler analyze``):
per-layer accumulated error, per-layer sensitivity, ranges against the observed data, and a
self-contained HTML report. See docs/design.md ("Accuracy analysis")."""

from .html import render_html
from .layers import FakeQuantModel, Layer, TensorGrid, batches, find_layers
from .metrics import OutputFidelity
from .report import DEFAULT_LIMIT, AnalysisSetup, analyze, layer_sensitivity, setup_analysis, to_json

__all__ = ["AnalysisSetup", "DEFAULT_LIMIT", "FakeQuantModel", "Layer", "OutputFidelity", "TensorGrid", "analyze",
           "batches", "find_layers", "layer_sensitivity", "render_html", "setup_analysis", "to_json"]
