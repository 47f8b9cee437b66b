"""The intermediate representation: a Model of Graphs over onnx-graphsurgeon, changed only
through a Rewriter, checked by a verifier, rewritten by declarative patterns, read and written
by :mod:`.io`. Module order (each imports only those before it): graph, model, verify,
rewriter, patterns, io."""

from .graph import Constant, Graph, Node, Value, Variable, const_value, is_constant, node_subgraphs, producer, users
from .io import atomic_write_text, load_model, save_proto
from .model import Model
from .patterns import AnyValue, Const, Either, Match, Op, Rule, apply_rules, match
from .rewriter import Listener, Rewriter
from .verify import VerificationError, verify_model

__all__ = [
    "AnyValue", "Const", "Constant", "Either", "Graph", "Listener", "Match", "Model", "Node", "Op", "Rewriter",
    "Rule", "Value", "Variable", "VerificationError", "apply_rules", "atomic_write_text", "const_value",
    "is_constant", "load_model", "match", "node_subgraphs", "producer", "save_proto", "users", "verify_model",
]
