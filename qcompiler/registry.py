"""The pass registry: name -> "module:Class", loaded only when a pass is used.

Built-in passes are listed here the same way a third party lists theirs in the
``qcompiler.passes`` entry-point group, so they go through the same door. A plugin file or
module given with ``--plugin`` contributes every :class:`Pass` subclass it defines (an
explicit scan of what the module defines, not registration as an import side effect).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.util
import sys
import types
import typing
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UserError, did_you_mean
from .pipeline import PassSpec, pass_summary

if TYPE_CHECKING:
    from .pass_manager import Pass

__all__ = ["PassRegistry", "BUILTIN_PASSES", "default_registry"]

BUILTIN_PASSES: dict[str, str] = {
    "infer-shapes": "qcompiler.passes.infer_shapes:InferShapes",
    "upgrade-opset": "qcompiler.passes.upgrade_opset:UpgradeOpset",
    "canonicalize": "qcompiler.passes.canonicalize:Canonicalize",
    "fold-constants": "qcompiler.passes.fold_constants:FoldConstants",
    "fuse-conv-bn": "qcompiler.passes.fuse_conv_bn:FuseConvBn",
    "fuse-pad-conv": "qcompiler.passes.fuse_pad_conv:FusePadConv",
    "fold-conv-affine": "qcompiler.passes.fold_conv_affine:FoldConvAffine",
    "fuse-hardswish": "qcompiler.passes.fuse_hardswish:FuseHardswish",
    "fuse-gelu": "qcompiler.passes.fuse_gelu:FuseGelu",
    "smooth-quant": "qcompiler.passes.smooth_quant:SmoothQuant",
    "equalize-layers": "qcompiler.passes.equalize_layers:EqualizeLayers",
    "fold-matmul-add": "qcompiler.passes.fold_matmul_add:FoldMatmulAdd",
    "group-activations": "qcompiler.passes.group_activations:GroupActivations",
    "calibrate": "qcompiler.passes.calibrate:Calibrate",
    "insert-qdq": "qcompiler.passes.insert_qdq:InsertQdq",
    "lower-qoperator": "qcompiler.passes.lower_qoperator:LowerQoperator",
    "cleanup-qdq": "qcompiler.passes.cleanup_qdq:CleanupQdq",
    "compact-qparams": "qcompiler.passes.compact_qparams:CompactQparams",
    "compress-weights": "qcompiler.passes.compress_weights:CompressWeights",
    "guard-float-convs": "qcompiler.passes.guard_float_convs:GuardFloatConvs",
    "convert-float16": "qcompiler.passes.convert_float16:ConvertFloat16",
    "quantize-dynamic": "qcompiler.passes.quantize_dynamic:QuantizeDynamic",
    "quantize-weights": "qcompiler.passes.quantize_weights:QuantizeWeights",
}


class PassRegistry:
    def __init__(self, refs: dict[str, str] | None = None, *, use_entry_points: bool = True) -> None:
        self._refs: dict[str, str] = dict(BUILTIN_PASSES if refs is None else refs)
        self._classes: dict[str, type[Pass]] = {}
        self._origin: dict[str, str] = {n: "builtin" for n in self._refs}
        if use_entry_points:
            for ep in entry_points(group="qcompiler.passes"):
                if ep.name not in self._refs:
                    self._refs[ep.name] = ep.value
                    self._origin[ep.name] = f"entry point ({ep.dist.name if ep.dist else '?'})"

    def names(self) -> list[str]:
        return sorted(set(self._refs) | set(self._classes))

    def register(self, cls: type[Pass], origin: str = "api") -> None:
        from .pass_manager import Pass

        if not (isinstance(cls, type) and issubclass(cls, Pass) and cls.name):
            raise UserError(f"{cls!r} is not a Pass subclass with a name")
        self._classes[cls.name] = cls
        self._origin[cls.name] = origin

    def origin(self, name: str) -> str:
        return self._origin.get(name, "?")

    def get(self, name: str) -> type[Pass]:
        if name in self._classes:
            return self._classes[name]
        ref = self._refs.get(name)
        if ref is None:
            raise UserError(f"unknown pass '{name}'{did_you_mean(name, self.names())}; 'qcompiler passes' lists them")
        module_name, _, attr = ref.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise UserError(f"pass '{name}': cannot load '{ref}' ({exc})") from exc
        self._classes[name] = cls
        return cls

    def load_plugin(self, spec: str) -> list[str]:
        """Load a plugin file (``path/to/file.py``) or importable module; returns pass names."""
        if spec.endswith(".py") or Path(spec).is_file():
            path = Path(spec)
            if not path.is_file():
                raise UserError(f"--plugin {spec}: no such file")
            mod_name = f"qcompiler_plugin_{path.stem}"
            loader_spec = importlib.util.spec_from_file_location(mod_name, path)
            if loader_spec is None or loader_spec.loader is None:
                raise UserError(f"--plugin {spec}: cannot load as a Python module")
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[mod_name] = module
            try:
                loader_spec.loader.exec_module(module)
            except Exception as exc:
                raise UserError(f"--plugin {spec}: error while importing: {type(exc).__name__}: {exc}") from exc
        else:
            try:
                module = importlib.import_module(spec)
            except ImportError as exc:
                raise UserError(f"--plugin {spec}: cannot import module ({exc})") from exc
        found = _passes_defined_in(module)
        if not found:
            raise UserError(f"--plugin {spec}: defines no Pass subclass with a name")
        for cls in found:
            self.register(cls, origin=f"plugin {spec}")
        return [c.name for c in found]

    def instantiate(self, spec: PassSpec) -> Pass:
        cls = self.get(spec.name)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        kwargs: dict[str, Any] = {}
        for key, raw in spec.options:
            attr = key.replace("-", "_")
            if attr not in fields:
                known = ", ".join(k.replace("_", "-") for k in fields) or "none"
                raise UserError(f"pass '{spec.name}': unknown option '{key}' (options: {known})")
            kwargs[attr] = _convert(spec.name, key, raw, hints.get(attr, str))
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise UserError(f"pass '{spec.name}': {exc}") from exc

    def options(self, name: str) -> list[tuple[str, str, Any]]:
        """(option, type, default) rows for ``qcompiler passes``."""
        listed = self._from_source(name)
        if listed is not None:
            return listed[1]
        cls = self.get(name)
        hints = typing.get_type_hints(cls)
        rows = []
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else None
            rows.append((f.name.replace("_", "-"), _type_name(hints.get(f.name, str)), default))
        return rows

    def summary(self, name: str) -> str:
        listed = self._from_source(name)
        return pass_summary(listed[0]) if listed is not None else pass_summary(self.get(name))

    def _from_source(self, name: str) -> tuple[str, list[tuple[str, str, Any]]] | None:
        """Docstring and option rows of a not yet imported pass, read from its source with
        ``ast``: `qcompiler passes` then imports no pass module, and so not onnx (0.7 s of
        CPU; docs/design.md, "Import time"). None (import it instead) unless the class derives
        from ``Pass`` first (then from option classes it imports by name, whose fields come
        first, as in the dataclass) and every option has a literal default."""
        if name in self._classes or name not in self._refs:
            return None
        module_name, _, attr = self._refs[name].partition(":")
        try:
            spec = importlib.util.find_spec(module_name)
            tree = ast.parse(Path(spec.origin).read_text()) if spec and spec.origin else None
        except (ImportError, OSError, SyntaxError, ValueError):
            return None
        cls = _class_def(tree, attr) if tree else None
        bases = [ast.unparse(b) for b in cls.bases] if cls else []
        if cls is None or tree is None or bases[:1] != ["Pass"]:
            return None
        rows: list[tuple[str, str, Any]] = []
        try:
            for base in bases[1:]:  # an options dataclass the pass extends, in another module
                other, source = _imported_tree(base, tree, spec.name)
                rows += _option_rows(_class_def(other, base), other, source)
            rows += _option_rows(cls, tree, spec.name)
        except ValueError:
            return None
        return ast.get_docstring(cls, clean=False) or "", rows


def _class_def(tree: ast.Module, name: str) -> ast.ClassDef | None:
    return next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name), None)


def _option_rows(cls: ast.ClassDef | None, tree: ast.Module, module: str) -> list[tuple[str, str, Any]]:
    """(option, type, default) of the annotated fields of ``cls``; ValueError if a default is
    not a literal."""
    if cls is None:
        raise ValueError("class not found")
    rows = []
    for item in cls.body:
        if not isinstance(item, ast.AnnAssign) or not isinstance(item.target, ast.Name):
            continue
        kind = ast.unparse(getattr(item.annotation, "value", item.annotation))  # tuple[str, ...] -> tuple
        if kind.startswith("ClassVar"):
            continue
        default = _constant(item.value, tree, module) if item.value is not None else None
        rows.append((item.target.id.replace("_", "-"), kind, default))
    return rows


def _imported_tree(name: str, tree: ast.Module, module: str) -> tuple[ast.Module, str]:
    """The parsed source of the module ``name`` is imported from (``from X import name`` in
    ``tree``, the source of ``module``), and that module's name; ValueError if there is none."""
    for stmt in tree.body:
        if isinstance(stmt, ast.ImportFrom) and any(a.name == name and a.asname is None for a in stmt.names):
            source = importlib.util.resolve_name("." * stmt.level + (stmt.module or ""), module.rpartition(".")[0]) \
                if stmt.level else stmt.module or ""
            try:
                spec = importlib.util.find_spec(source)
                other = ast.parse(Path(spec.origin).read_text()) if spec and spec.origin else None
            except (ImportError, OSError, SyntaxError) as exc:
                raise ValueError(str(exc)) from None
            if other is None:
                raise ValueError(source)
            return other, source
    raise ValueError(f"name {name}")


def _constant(node: ast.expr, tree: ast.Module, module: str, depth: int = 0) -> Any:
    """The value of a default written as a literal, an integer expression of literals
    (``1 << 24``) or a name bound to one at module level here or in a module this one imports
    it from (``DEFAULT_MEMORY``); ValueError for anything else."""
    if isinstance(node, ast.BinOp):
        ops = {ast.LShift: int.__lshift__, ast.Mult: int.__mul__, ast.Add: int.__add__, ast.Pow: int.__pow__}
        left, right = _constant(node.left, tree, module, depth), _constant(node.right, tree, module, depth)
        if type(node.op) not in ops or not (type(left) is int and type(right) is int):
            raise ValueError("not an integer expression")
        return ops[type(node.op)](left, right)
    if not isinstance(node, ast.Name):
        return ast.literal_eval(node)
    for stmt in tree.body:
        if isinstance(stmt, (ast.Assign, ast.AnnAssign)) and stmt.value is not None:
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
            if any(isinstance(t, ast.Name) and t.id == node.id for t in targets):
                return _constant(stmt.value, tree, module, depth)
        if isinstance(stmt, ast.ImportFrom) and depth < 2 and any(a.name == node.id and a.asname is None
                                                                  for a in stmt.names):
            other, source = _imported_tree(node.id, tree, module)
            return _constant(node, other, source, depth + 1)
    raise ValueError(f"name {node.id}")


def _passes_defined_in(module: types.ModuleType) -> list[type[Pass]]:
    from .pass_manager import Pass

    found = []
    for value in vars(module).values():
        if (isinstance(value, type) and issubclass(value, Pass) and value is not Pass
                and value.__module__ == module.__name__ and value.name):
            found.append(value)
    return sorted(found, key=lambda c: c.name)


def _type_name(t: Any) -> str:
    return getattr(t, "__name__", str(t)).replace("typing.", "")


def _convert(pass_name: str, key: str, raw: str, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        if raw in ("none", "None", ""):
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    try:
        if hint is bool:
            if raw.lower() in ("true", "1", "yes", "on"):
                return True
            if raw.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError(raw)
        if hint is int:
            return int(raw, 0)
        if hint is float:
            return float(raw)
        if origin in (tuple, list):
            body = raw[1:-1] if raw.startswith("[") and raw.endswith("]") else raw
            items = [s.strip() for s in body.split(",") if s.strip()] if body else []
            inner = args[0] if args else str
            return tuple(_convert(pass_name, key, s, inner) for s in items)
        return raw
    except ValueError:
        raise UserError(f"pass '{pass_name}': option '{key}={raw}' is not a valid {_type_name(hint)}") from None


_default: PassRegistry | None = None


def default_registry() -> PassRegistry:
    global _default
    if _default is None:
        _default = PassRegistry()
    return _default
