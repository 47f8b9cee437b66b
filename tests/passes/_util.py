"""Shared helpers for the per-pass tests: run one pass, run a model, read results back.

Building models (``make_model``, ``tensor``, ``init``) is tests/conftest.py's, re-exported here.

Kept as plain functions (not fixtures) so each test reads top to bottom: build, run, check.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import qcompiler

from conftest import IR_VERSION, init, make_model
from conftest import tensor_info as tensor  # the per-pass tests' short name for it

__all__ = ["IR_VERSION", "FLOAT", "make_model", "tensor", "init", "rand", "run_pass", "modified", "op_types",
           "initializer_names", "initializers", "run_ort", "assert_same_outputs", "attrs_of"]

FLOAT = TensorProto.FLOAT


def rand(shape: Sequence[int], seed: int = 0, low: float = -1.0, high: float = 1.0) -> np.ndarray:
    """Fixed-seed float32 data, so every numeric comparison is reproducible."""
    return np.random.default_rng(seed).uniform(low, high, size=tuple(shape)).astype(np.float32)


def run_pass(proto: onnx.ModelProto | qcompiler.Model, name: str, options: Sequence[tuple[str, str]] = (),
             *, target: str | Path = "ort-cpu", check: bool = True
             ) -> tuple[qcompiler.Model, qcompiler.PassContext, qcompiler.PassManager]:
    """Run one registered pass through the PassManager (verify-each on) and hand back all three."""
    model = proto if isinstance(proto, qcompiler.Model) else qcompiler.load_model(proto, check=check)
    ctx = qcompiler.PassContext(target=qcompiler.load_target(target))
    p = qcompiler.default_registry().instantiate(qcompiler.PassSpec(name, tuple(options)))
    pm = qcompiler.PassManager([p])
    pm.run(model, ctx)
    return model, ctx, pm


def modified(pm: qcompiler.PassManager) -> bool:
    return bool(pm.records[-1]["modified"])


def op_types(model: qcompiler.Model | onnx.ModelProto) -> list[str]:
    graph = model.graph if isinstance(model, onnx.ModelProto) else model.to_proto().graph
    return [n.op_type for n in graph.node]


def initializer_names(model: qcompiler.Model) -> list[str]:
    return sorted(t.name for t in model.to_proto().graph.initializer)


def initializers(model: qcompiler.Model) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.to_proto().graph.initializer}


def run_ort(model: qcompiler.Model | onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run with onnxruntime, graph optimizations off so ORT itself fuses nothing."""
    proto = model if isinstance(model, onnx.ModelProto) else model.to_proto()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return [np.asarray(r) for r in sess.run(None, feeds)]


def assert_same_outputs(before: onnx.ModelProto, after: qcompiler.Model, feeds: dict[str, np.ndarray],
                        *, rtol: float = 1e-5, atol: float = 1e-5, exact: bool = False) -> None:
    """The rewritten model computes what the original did (ORT on both)."""
    want = run_ort(before, feeds)
    got = run_ort(after, feeds)
    assert len(want) == len(got)
    for w, g in zip(want, got):
        assert w.shape == g.shape and w.dtype == g.dtype
        if exact:
            np.testing.assert_array_equal(g, w)
        else:
            np.testing.assert_allclose(g, w, rtol=rtol, atol=atol)


def attrs_of(model: qcompiler.Model, op: str) -> dict[str, Any]:
    """Attributes of the single node of type ``op`` (as Python values)."""
    nodes = [n for n in model.to_proto().graph.node if n.op_type == op]
    assert len(nodes) == 1, f"expected one {op}, got {len(nodes)}"
    return {a.name: helper.get_attribute_value(a) for a in nodes[0].attribute}
