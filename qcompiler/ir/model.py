"""Model: an ONNX model held as a mutable onnx-graphsurgeon graph plus what ONNX keeps around it.

Reading and writing files (validation, atomic saves) live in :mod:`.io`, which builds on this
module; this one knows nothing of files.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable

import onnx
import onnx.numpy_helper
import onnx.shape_inference
import numpy as np
import onnx_graphsurgeon as gs

from .graph import Graph, node_subgraphs

__all__ = ["Model", "SHARED_LOCATION"]

logging.getLogger("onnx_graphsurgeon").setLevel(logging.ERROR)
from onnx_graphsurgeon.logger import G_LOGGER as _GS_LOGGER  # noqa: E402

_GS_LOGGER.severity = _GS_LOGGER.ERROR

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

    def _take_payloads(self, base_dir: str | None = None) -> None:
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
            if base_dir is not None and isinstance(src, onnx.TensorProto) \
                    and src.data_location == onnx.TensorProto.EXTERNAL:
                const._values = _MappedValues(src, base_dir)
                const.data_location = None  # exported inline (save_proto decides on external data)
            elif isinstance(src, onnx.TensorProto) and src.data_type in _NATIVE \
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
        ``add_initializer`` runs on them without a copy, see ``qcompiler.calibration.engine``);
        ``share`` narrows which constants qualify."""
        self._gs.opset = self.opsets.get("", self._gs.opset)
        _repack_4bit(self)
        mapped = _map_for_export(self)
        swapped = _swap_shared(self, shared, min_bytes, share) if shared is not None else []
        try:
            proto = gs.export_onnx(self._gs, do_type_check=False)
        finally:
            for tensor, values in swapped + mapped:
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


def _mapped_lazy_base():  # noqa: ANN202 - graphsurgeon's LazyValues, imported late like elsewhere here
    from onnx_graphsurgeon.ir.tensor import LazyValues

    return LazyValues


class _MappedValues(_mapped_lazy_base()):  # type: ignore[misc]
    """An initializer kept in its external-data file: ``load()`` memory-maps just that tensor
    (read-only), so a weight costs memory only while a pass holds its array, and a billion-
    parameter model is never read whole. The stub (name, dims, type, location) stays as the
    LazyValues tensor; to_proto exports the mapped bytes, never the stub's file reference."""

    def __init__(self, stub: onnx.TensorProto, base_dir: str) -> None:
        own = onnx.TensorProto()
        own.CopyFrom(stub)
        super().__init__(own)
        self.base_dir = base_dir

    def load(self) -> np.ndarray:
        info = {e.key: e.value for e in self.tensor.external_data}
        if self.tensor.data_type not in _NATIVE or self.tensor.data_type == onnx.TensorProto.BOOL:
            full = onnx.TensorProto()
            full.CopyFrom(self.tensor)
            onnx.external_data_helper.load_external_data_for_tensor(full, self.base_dir)
            return np.array(onnx.numpy_helper.to_array(full))
        dtype = onnx.helper.tensor_dtype_to_np_dtype(self.tensor.data_type)
        shape = tuple(int(d) for d in self.tensor.dims)
        path = os.path.join(self.base_dir, info["location"])
        if int(np.prod(shape)) == 0:
            return np.zeros(shape, dtype)
        return np.memmap(path, dtype=np.dtype(dtype).newbyteorder("<"), mode="r", offset=int(info.get("offset", 0)),
                         shape=shape)


def _map_for_export(model: "Model") -> list[tuple[gs.Constant, object]]:
    """Give each still-mapped constant its mapped array for one export; returns what to put back."""
    out: list[tuple[gs.Constant, object]] = []
    for graph in model.graph.walk():
        for tensor in graph.gs.tensors().values():
            values = getattr(tensor, "_values", None)
            if isinstance(tensor, gs.Constant) and isinstance(values, _MappedValues):
                out.append((tensor, values))
                tensor._values = values.load()
    return out


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
