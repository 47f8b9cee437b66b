"""Input-model checks that onnx's checker does not make but the passes rely on.

``load_model`` runs :func:`check_proto` before it imports a graph, so a model the passes
cannot carry (sparse tensors, string constants, names that are not UTF-8, an opset newer
than onnx knows) fails with one line naming the tensor or node instead of an exception deep
inside a pass. :func:`check_runnable_domains` is the compile-time check that onnxruntime,
which calibration runs, knows every op domain (docs/design.md, "Input validation").
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import onnx

from ..errors import UserError

if TYPE_CHECKING:
    from .model import Model

__all__ = ["check_proto", "check_runnable_domains", "ORT_DOMAINS"]

#: op domains onnxruntime's CPU build registers kernels for (its contrib ops included)
ORT_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "com.microsoft.nchwc",
                         "com.microsoft.experimental", "ai.onnx.preview.training", "ai.onnx.training"})


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _graphs(g)


def _text(value: object, what: str, source: str) -> str:
    """A name as str; protobuf hands back bytes when the field is not valid UTF-8."""
    if isinstance(value, bytes):
        raise UserError(f"{source}: {what} {value!r} is not valid UTF-8 (ONNX names are UTF-8 text)")
    return str(value)


def check_proto(proto: onnx.ModelProto, source: str) -> None:
    """Raise UserError for the first thing in ``proto`` qcompiler cannot carry."""
    newest = onnx.defs.onnx_opset_version()
    for imp in proto.opset_import:
        domain = _text(imp.domain, "opset domain", source)
        if domain in ("", "ai.onnx") and not 1 <= imp.version <= newest:
            raise UserError(f"{source}: imports opset {imp.version} of the default domain; this onnx knows 1 to {newest}")
    if not proto.graph.output:
        raise UserError(f"{source}: graph '{proto.graph.name}' has no outputs")
    for graph in _graphs(proto.graph):
        if graph.sparse_initializer:
            name = graph.sparse_initializer[0].values.name
            raise UserError(f"{source}: sparse initializer '{name}' is not supported (store it dense)")
        for init in graph.initializer:
            name = _text(init.name, "initializer name", source)
            if init.data_type == onnx.TensorProto.STRING:
                raise UserError(f"{source}: initializer '{name}' is a string tensor, which qcompiler cannot carry")
        for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
            _text(vi.name, "value name", source)
        for node in graph.node:
            label = _text(node.name, "node name", source) or node.op_type
            for value in list(node.input) + list(node.output):
                _text(value, f"node '{label}' value name", source)
            for attr in node.attribute:
                if attr.type in (onnx.AttributeProto.SPARSE_TENSOR, onnx.AttributeProto.SPARSE_TENSORS):
                    raise UserError(f"{source}: node '{label}' ({node.op_type}) holds a sparse tensor in attribute "
                                    f"'{attr.name}', which is not supported (store it dense)")
                if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == onnx.TensorProto.STRING:
                    raise UserError(f"{source}: node '{label}' ({node.op_type}) holds a string tensor, which "
                                    "qcompiler cannot carry")


def check_runnable_domains(model: "Model") -> None:
    """Every node's op domain is one onnxruntime runs (calibration and the output need it)."""
    source = model.source
    for graph in model.graph.walk():
        for node in graph.gs.nodes:
            if (node.domain or "") not in ORT_DOMAINS:
                raise UserError(f"{source}: node '{node.name or node.op}' ({node.op}) is in op domain "
                                f"'{node.domain}', which onnxruntime cannot run; qcompiler needs to run the model")
