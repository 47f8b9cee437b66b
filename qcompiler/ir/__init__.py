"""The intermediate representation: a Model of Graphs over onnx-graphsurgeon, changed only
through a Rewriter, checked by a verifier, rewritten by declarative patterns."""

from .graph import Constant, Graph, Node, Value, Variable, node_subgraphs
from .model import Model, load_model, save_proto
from .patterns import AnyValue, Const, Match, Op, Rule, apply_rules, match
from .rewriter import Listener, Rewriter
from .verify import VerificationError, verify_model

__all__ = [
    "AnyValue", "Const", "Constant", "Graph", "Listener", "Match", "Model", "Node", "Op", "Rewriter",
    "Rule", "Value", "Variable", "VerificationError", "apply_rules", "load_model", "match",
    "node_subgraphs", "save_proto", "verify_model",
]
