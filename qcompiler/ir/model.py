"""Model: an ONNX model held as a mutable onnx-graphsurgeon graph plus what ONNX keeps around it.

Loading validates the file and turns every way it can be bad into one :class:`UserError`
naming the file and the node at fault. Saving writes a temp file and renames it, so a failed
save never leaves a partial output behind.
"""

from __future__ import annotations

import logging
import re
import os
from collections.abc import Callable
from pathlib import Path

import onnx
import onnx.numpy_helper
import numpy as np
import onnx_graphsurgeon as gs

from ..errors import UserError
from .graph import Graph, node_subgraphs

__all__ = ["Model", "load_model"]

logging.getLogger("onnx_graphsurgeon").setLevel(logging.ERROR)
from onnx_graphsurgeon.logger import G_LOGGER as _GS_LOGGER  # noqa: E402

_GS_LOGGER.severity = _GS_LOGGER.ERROR

_TWO_GB = 2**31 - 2**20  # above this a model is saved with external data (headroom below
# protobuf's 2 GB hard limit); a module constant so tests can lower it
_EXTERNAL_MIN_BYTES = 1024  # in a model saved with external data, smaller tensors stay inline
_SUFFIX = re.compile(r"_\d+$")  # a counter suffix added by fresh_name
# the dtypes whose payload numpy holds exactly (onnx_graphsurgeon would cast the others)
_NATIVE = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                     onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT16,
                     onnx.TensorProto.UINT16, onnx.TensorProto.INT32, onnx.TensorProto.UINT32,
                     onnx.TensorProto.INT64, onnx.TensorProto.UINT64, onnx.TensorProto.BOOL})
SHARED_LOCATION = "qcompiler-shared-initializer"  # external-data placeholder of to_proto(shared=...)
_SHARED_MIN_BYTES = 1024


class Model:
    """The unit every pass works on: the main :class:`Graph` plus opsets and metadata."""

    def __init__(self, proto: onnx.ModelProto, source: str = "<model>", *, owned: bool = False) -> None:
        self.source = source
        self.files: list[Path] = []  # the files it was loaded from (model, external data), if any
        self.ir_version = int(proto.ir_version)
        self.opsets: dict[str, int] = {}
        for imp in proto.opset_import:
            self.opsets["" if imp.domain == "ai.onnx" else imp.domain] = int(imp.version)
        self.producer_name = proto.producer_name
        self.producer_version = proto.producer_version
        self.domain = proto.domain
        self.model_version = proto.model_version
        self.doc_string = proto.doc_string
        self.metadata: dict[str, str] = {p.key: p.value for p in proto.metadata_props}
        self._gs = gs.import_onnx(proto)
        self._names: set[str] = set()
        self._counters: dict[str, int] = {}
        for g in self.graph.walk():
            for node in g.gs.nodes:
                self._names.add(node.name)
                self._names.update(v.name for v in node.outputs)
            self._names.update(g.values().keys())
        if owned:
            self._take_payloads()

    def _take_payloads(self) -> None:
        """Detach every constant from the (owned) source proto.

        graphsurgeon keeps imported initializers and Constant-node values as views of the
        proto's tensors, and protobuf frees a message's memory only with the whole message:
        any one view keeps every weight of the file alive, so a model whose weights a pass
        rewrote was held twice. Payloads numpy holds exactly become arrays; the rest (int4,
        bfloat16, external, ...) become standalone protos."""
        from onnx_graphsurgeon.ir.tensor import LazyValues

        def detach(const: gs.Constant) -> None:
            lazy = getattr(const, "_values", None)
            if not isinstance(lazy, LazyValues):
                return
            src = lazy.tensor
            if isinstance(src, onnx.TensorProto) and src.data_type in _NATIVE \
                    and src.data_location != onnx.TensorProto.EXTERNAL:
                const._values = np.array(onnx.numpy_helper.to_array(src))
            else:
                own = type(src)()
                own.CopyFrom(src)
                const._values = LazyValues(own)

        for g in self.graph.walk():
            domains = getattr(g.gs, "import_domains", None)
            if domains is not None:  # a view of the proto's opset_import: copy it out
                g.gs.import_domains = [onnx.helper.make_opsetid(d.domain, d.version) for d in domains]
            for tensor in g.gs.tensors().values():
                if isinstance(tensor, gs.Constant):
                    detach(tensor)
            for node in g.gs.nodes:
                for value in node.attrs.values():
                    if isinstance(value, gs.Constant):
                        detach(value)

    def _replace_contents(self, proto: onnx.ModelProto) -> None:
        """Re-import from a proto (used by whole-model rewrites such as opset conversion)."""
        fresh = Model(proto, self.source, owned=True)
        self.ir_version, self.opsets, self._gs = fresh.ir_version, fresh.opsets, fresh._gs
        self._names |= fresh._names

    # -- access --------------------------------------------------------------------------
    @property
    def graph(self) -> Graph:
        return Graph(self._gs, self)

    def opset(self, domain: str = "") -> int | None:
        return self.opsets.get("" if domain == "ai.onnx" else domain)

    def require_opset(self, domain: str, version: int) -> None:
        """Declare a domain a rewrite starts using (e.g. com.microsoft for contrib kernels)."""
        domain = "" if domain == "ai.onnx" else domain
        if domain not in self.opsets:
            self.opsets[domain] = version

    def fresh_name(self, hint: str) -> str:
        """A name no node or value in the model uses yet; deterministic for a given history."""
        hint = hint or "v"
        base = _SUFFIX.sub("", hint)
        if base != hint and base in self._names:
            hint = base  # "w_1" asked again -> "w_2", not "w_1_1": names stay short
        if hint not in self._names:
            self._names.add(hint)
            return hint
        n = self._counters.get(hint, 0)
        while True:
            n += 1
            cand = f"{hint}_{n}"
            if cand not in self._names:
                self._counters[hint] = n
                self._names.add(cand)
                return cand

    def reserve_name(self, name: str) -> None:
        self._names.add(name)

    # -- export --------------------------------------------------------------------------
    def to_proto(self, shared: dict[str, np.ndarray] | None = None, min_bytes: int = _SHARED_MIN_BYTES,
                 share: "Callable[[gs.Constant], bool] | None" = None) -> onnx.ModelProto:
        """The model as an ONNX proto (a copy: later IR edits do not reach it).

        With ``shared`` (a dict to fill), main-graph initializers of ``min_bytes`` or more are not
        copied: the proto refers to them as external data at ``SHARED_LOCATION`` and
        ``shared`` maps their names to the IR's own arrays (read-only use: onnxruntime's
        ``add_initializer`` runs on them without a copy, see ``qcompiler.calib_engine``);
        ``share`` narrows which constants qualify."""
        self._gs.opset = self.opsets.get("", self._gs.opset)
        _repack_4bit(self)
        swapped = _swap_shared(self, shared, min_bytes, share) if shared is not None else []
        try:
            proto = gs.export_onnx(self._gs, do_type_check=False)
        finally:
            for tensor, values in swapped:
                tensor._values = values
        del proto.opset_import[:]
        used = _used_domains(self._gs)
        for domain in sorted(set(self.opsets) | used):
            version = self.opsets.get(domain, 1)
            proto.opset_import.append(onnx.helper.make_opsetid(domain, version))
        proto.ir_version = max(self.ir_version, _min_ir_version(self.opsets))
        proto.producer_name = self.producer_name
        proto.producer_version = self.producer_version
        proto.domain = self.domain
        proto.model_version = self.model_version
        proto.doc_string = self.doc_string
        del proto.metadata_props[:]
        for key in sorted(self.metadata):
            proto.metadata_props.append(onnx.StringStringEntryProto(key=key, value=self.metadata[key]))
        return proto

    def save(self, path: str | os.PathLike[str]) -> int:
        """Write atomically (temp file + rename). Returns the bytes written (model + external data)."""
        return save_proto(self.to_proto(), path)


def _swap_shared(model: "Model", shared: dict[str, np.ndarray], min_bytes: int,
                 share: "Callable[[gs.Constant], bool] | None") -> list[tuple[gs.Constant, np.ndarray]]:
    """Replace large main-graph initializer values by payload-less external-data stubs (for
    one export); returns what to put back. Constants a subgraph reads stay inline."""
    from onnx_graphsurgeon.ir.tensor import LazyValues

    in_bodies = {name for g in list(model.graph.walk())[1:] for name in g.gs.tensors()}
    swapped: list[tuple[gs.Constant, np.ndarray]] = []
    for name, tensor in model.graph.gs.tensors().items():
        values = getattr(tensor, "_values", None)
        if not isinstance(tensor, gs.Constant) or not isinstance(values, np.ndarray) or name in in_bodies \
                or values.nbytes < min_bytes or (share is not None and not share(tensor)):
            continue
        try:
            dtype = onnx.helper.np_dtype_to_tensor_dtype(values.dtype)
        except (KeyError, TypeError, ValueError):
            continue
        if dtype not in _NATIVE:
            continue
        arr = np.ascontiguousarray(values)
        stub = onnx.TensorProto(name=name, dims=list(arr.shape), data_type=dtype,
                                data_location=onnx.TensorProto.EXTERNAL)
        stub.external_data.add(key="location", value=SHARED_LOCATION)
        swapped.append((tensor, values))
        tensor._values = LazyValues(stub)
        shared[name] = arr
    return swapped


def _repack_4bit(model: "Model") -> None:
    """4-bit initializers someone has read (``.values`` unpacks them into one ml_dtypes int4
    element per byte) are stored packed again: graphsurgeon would export them unpacked, which
    onnx rejects (twice the bytes the dims allow)."""
    from onnx_graphsurgeon.ir.tensor import LazyValues

    for graph in model.graph.walk():
        for tensor in graph.gs.tensors().values():
            values = getattr(tensor, "_values", None)
            if isinstance(tensor, gs.Constant) and isinstance(values, np.ndarray) \
                    and values.dtype.name in ("int4", "uint4"):
                tensor._values = LazyValues(onnx.numpy_helper.from_array(np.ascontiguousarray(values), tensor.name))


def save_proto(proto: onnx.ModelProto, path: str | os.PathLike[str]) -> int:
    """Write ``proto`` to ``path`` through :mod:`qcompiler.files` (temp + rename, or through to a
    special file; symlinks followed); a model above ``_TWO_GB`` goes with its
    weights in ``<name>.data`` beside it. Returns the bytes written (model + external data)."""
    from .. import files

    out = files.real_path(path)
    directory = out.parent
    if not directory.is_dir():
        raise UserError(f"{path}: cannot write output: directory '{Path(path).parent}' does not exist")
    large = not _fits(proto) or proto.ByteSize() > _TWO_GB
    if files.is_special(out):
        if large:
            raise UserError(f"{path}: cannot write a model above 2 GB (saved with external data) to a special file")
        data = proto.SerializeToString(deterministic=True)
        files.write_bytes(out, data)
        return len(data)
    data_name = out.name + ".data"
    try:
        tmp = files.temp_beside(out)
        tmp_data = directory / (tmp.name + ".data")
        try:
            if large:
                onnx.save_model(proto, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                                location=tmp_data.name, size_threshold=_EXTERNAL_MIN_BYTES)
                if tmp_data.exists():  # (no tensor above the threshold: everything stayed inline)
                    # the model refers to the data file by name: rewrite it to the final name
                    _rename_external(str(tmp), tmp_data.name, data_name)
                    _restore_inline(proto, tmp_data.name, directory)
            else:
                tmp.write_bytes(proto.SerializeToString(deterministic=True))
            size = tmp.stat().st_size + (tmp_data.stat().st_size if tmp_data.exists() else 0)
            if tmp_data.exists():
                files.publish(tmp_data, directory / data_name)
            files.publish(tmp, out)
        except BaseException:
            files.discard(tmp)
            files.discard(tmp_data)
            raise
    except OSError as exc:
        raise UserError(f"{path}: cannot write output: {exc.strerror or exc}") from exc
    return size


def proto_size(proto: onnx.ModelProto) -> int | None:
    """Serialized size in bytes, or None above the size :func:`save_proto` stores with external
    data (protobuf cannot size or serialize a message above 2 GB)."""
    size = proto.ByteSize() if _fits(proto) else None
    return size if size is not None and size <= _TWO_GB else None


def external_data_files(proto: onnx.ModelProto, base: Path) -> list[Path]:
    """The distinct files ``proto``'s external tensors name, relative to ``base`` (in order)."""
    from onnx import external_data_helper

    found: dict[Path, None] = {}
    for t in external_data_helper._get_all_tensors(proto):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            for entry in t.external_data:
                if entry.key == "location":
                    found[base / entry.value] = None
    return list(found)


def _restore_inline(proto: onnx.ModelProto, location: str, directory: Path) -> None:
    """onnx.save_model with external data rewrites the proto in place (tensors become references
    to the data file); read the saved data back so the caller's proto is whole again."""
    from onnx import external_data_helper

    if any(t.external_data for t in external_data_helper._get_all_tensors(proto)):
        external_data_helper.load_external_data_for_model(proto, str(directory))


def _fits(proto: onnx.ModelProto) -> bool:
    try:
        proto.ByteSize()
        return True
    except Exception:  # protobuf refuses to size messages above 2 GB
        return False


def _rename_external(model_path: str, old: str, new: str) -> None:
    m = onnx.load(model_path, load_external_data=False)
    for t in onnx.external_data_helper._get_all_tensors(m):
        for entry in t.external_data:
            if entry.key == "location" and entry.value == old:
                entry.value = new
    with open(model_path, "wb") as fh:
        fh.write(m.SerializeToString(deterministic=True))


def _used_domains(graph: gs.Graph) -> set[str]:
    used: set[str] = set()
    for node in graph.nodes:
        used.add("" if node.domain in (None, "ai.onnx") else node.domain)
        for sg in node_subgraphs(node):
            used |= _used_domains(sg)
    return used


def _min_ir_version(opsets: dict[str, int]) -> int:
    try:
        return int(onnx.helper.find_min_ir_version_for(
            [onnx.helper.make_opsetid(d, v) for d, v in opsets.items()], ignore_unknown=True))
    except Exception:
        return 3


def load_model(path: str | os.PathLike[str] | onnx.ModelProto, *, check: bool = True) -> Model:
    """Load and validate a model file (or take a ModelProto, which is copied, never changed)."""
    if isinstance(path, onnx.ModelProto):
        proto = onnx.ModelProto()
        proto.CopyFrom(path)
        source = "<ModelProto>"
    else:
        p = Path(path)
        source = str(p)
        if p.is_dir():
            raise UserError(f"{p}: is a directory, not a model file")
        if not p.is_file():
            raise UserError(f"no such model file: {p}" if not p.exists() else f"{p}: not a regular file")
        try:
            proto = onnx.load(str(p), load_external_data=False)
            external = external_data_files(proto, p.parent)
            if external:
                onnx.external_data_helper.load_external_data_for_model(proto, str(p.parent))
        except Exception as exc:  # protobuf DecodeError, missing external data, ...
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"{p}: not a readable ONNX model ({first})") from exc
    if proto.ir_version <= 0 or not proto.HasField("graph") or not proto.opset_import:
        raise UserError(f"{source}: not an ONNX model (no IR version, graph or opset import)")
    try:
        model = Model(proto, source)
    except Exception as exc:
        raise UserError(f"{source}: cannot import graph ({exc})") from exc
    if check:
        from .verify import verify_model

        problems = verify_model(model, sorted_check=False)
        if problems:
            raise UserError(f"{source}: invalid model: {problems[0]}")
        reordered = model.graph.toposort()
        try:
            if not _fits(proto) or proto.ByteSize() > _TWO_GB:
                if isinstance(path, (str, os.PathLike)):
                    onnx.checker.check_model(str(path))
            else:
                # onnx's checker insists on topological order: check the sorted graph
                onnx.checker.check_model(model.to_proto() if reordered else proto)
        except onnx.checker.ValidationError as exc:
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
            raise UserError(f"{source}: invalid model: {' '.join(lines[:2])}") from exc
    model.files = [] if isinstance(path, onnx.ModelProto) else [Path(path), *external]
    model._take_payloads()  # the proto is ours (read from the file or copied): hold weights once
    return model


def _atomic_write_text(path: Path, text: str) -> None:
    """Write a small text file safely (reports, tables): see :func:`qcompiler.files.write_bytes`."""
    from .. import files

    files.write_bytes(path, text.encode())
