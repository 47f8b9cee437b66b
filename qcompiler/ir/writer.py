"""Writing a Model's file one tensor at a time, never holding its serialized whole.

``Model.to_proto()`` followed by ``SerializeToString()`` holds every weight three times (the
IR's arrays, the proto's ``raw_data``, the bytes): for a billion-parameter compile that was
the peak of the whole run. :class:`ModelWriter` exports a *skeleton* instead (the proto with
each large main-graph initializer replaced by a payload-less stub, ``Model.to_proto(shared=)``)
and streams each payload from the IR's own array:

- inline (the model fits protobuf's 2 GB): the bytes are exactly
  ``to_proto().SerializeToString(deterministic=True)``. Deterministic protobuf serialization
  writes a message's fields in field-number order, so the file is the model's fields before
  ``graph`` (7), the graph's fields before ``initializer`` (5), each initializer (fields
  before ``raw_data`` (9), the payload, the fields after it), and the remaining fields; the
  lengths protobuf prefixes are computed from the array sizes.
- external data (above the limit): each stub's payload goes to ``<model>.data`` at the next
  4 KiB boundary (onnxruntime can map page-aligned tensors), in initializer order, and the
  model file is the skeleton with ``location``/``offset``/``length`` filled in. The same IR
  gives the same bytes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO

import numpy as np
import onnx

from .model import SHARED_LOCATION, Model

__all__ = ["ModelWriter"]

_PAGE = 4096
_GRAPH_FIELD = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number
_INIT_FIELD = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number
_RAW_FIELD = onnx.TensorProto.DESCRIPTOR.fields_by_name["raw_data"].number


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _key(field: int) -> bytes:
    return _varint(field << 3 | 2)  # wire type 2: length-delimited


def _split(msg, field: int, drop: tuple[str, ...] = ()) -> tuple[bytes, bytes]:  # noqa: ANN001 - any message
    """The deterministic serialization of ``msg``'s fields numbered below ``field`` and above it
    (``drop``: fields left out of both)."""
    head, tail = type(msg)(), type(msg)()
    head.CopyFrom(msg)
    tail.CopyFrom(msg)
    for f in msg.DESCRIPTOR.fields:
        if f.number >= field or f.name in drop:
            head.ClearField(f.name)
        if f.number <= field or f.name in drop:
            tail.ClearField(f.name)
    return head.SerializeToString(deterministic=True), tail.SerializeToString(deterministic=True)


def _payload(arr: np.ndarray) -> memoryview:
    """The array's bytes as ``numpy_helper.from_array`` / graphsurgeon store them (C order,
    little-endian), as a view when the array already is that."""
    a = np.ascontiguousarray(arr)
    if a.dtype.byteorder == ">" or (a.dtype.byteorder == "=" and not np.little_endian):
        a = a.astype(a.dtype.newbyteorder("<"))
    return memoryview(a.reshape(-1).view(np.uint8))


class ModelWriter:
    """One model's file layout, computed from a skeleton export (payloads stay the IR's arrays).

    ``min_bytes``: initializers of at least this size are streamed (and, above the limit, go to
    external data); smaller ones stay in the skeleton. ``strip_value_info``: leave out the
    intermediate shape annotations (what a compiled model is saved without)."""

    def __init__(self, model: Model, *, min_bytes: int, strip_value_info: bool = True) -> None:
        self._arrays: dict[str, np.ndarray] = {}
        proto = model.to_proto(shared=self._arrays, min_bytes=min_bytes)
        if strip_value_info:
            del proto.graph.value_info[:]
        self.skeleton = proto
        consts = model.graph.gs.tensors()
        self._location = {name: consts[name].data_location for name in self._arrays}
        self._inits: list[tuple[onnx.TensorProto, np.ndarray | None]] = [
            (t, self._arrays.get(t.name) if _is_stub(t) else None) for t in proto.graph.initializer]
        self._model_head, self._model_tail = _split(proto, _GRAPH_FIELD)
        self._graph_head, self._graph_tail = _split(proto.graph, _INIT_FIELD, drop=("initializer",))

    # -- inline: the exact bytes of the serialized proto ---------------------------------------
    def _records(self) -> Iterator[tuple[bytes, memoryview | None, bytes]]:
        """Per initializer: (bytes before the payload, payload, bytes after it), with its
        GraphProto.initializer key and length prefix included."""
        for t, arr in self._inits:
            if arr is None:
                body = t.SerializeToString(deterministic=True)
                yield _key(_INIT_FIELD) + _varint(len(body)) + body, None, b""
                continue
            full = onnx.TensorProto()
            full.CopyFrom(t)
            full.ClearField("data_location")
            del full.external_data[:]
            if self._location[t.name] is not None:
                full.data_location = self._location[t.name]
            head, tail = _split(full, _RAW_FIELD)
            data = _payload(arr)
            head += _key(_RAW_FIELD) + _varint(data.nbytes)
            yield _key(_INIT_FIELD) + _varint(len(head) + data.nbytes + len(tail)) + head, data, tail

    def _graph_size(self) -> int:
        return len(self._graph_head) + len(self._graph_tail) + sum(
            len(a) + (0 if d is None else d.nbytes) + len(b) for a, d, b in self._records())

    def inline_size(self) -> int:
        """The size of the model saved as one file (whether or not protobuf could parse it)."""
        g = self._graph_size()
        return len(self._model_head) + len(_key(_GRAPH_FIELD)) + len(_varint(g)) + g + len(self._model_tail)

    def write_inline(self, fh: BinaryIO) -> int:
        """Write the model as one file; returns the bytes written."""
        g = self._graph_size()
        fh.write(self._model_head + _key(_GRAPH_FIELD) + _varint(g) + self._graph_head)
        size = len(self._model_head) + len(_key(_GRAPH_FIELD)) + len(_varint(g)) + len(self._graph_head)
        for head, data, tail in self._records():
            fh.write(head)
            if data is not None:
                fh.write(data)
            fh.write(tail)
            size += len(head) + (0 if data is None else data.nbytes) + len(tail)
        fh.write(self._graph_tail + self._model_tail)
        return size + len(self._graph_tail) + len(self._model_tail)

    # -- external data ----------------------------------------------------------------------------
    def write_external(self, fh: BinaryIO, data_fh: BinaryIO, location: str) -> tuple[int, int]:
        """Write the streamed payloads to ``data_fh`` (page-aligned, initializer order) and the
        model referring to them as ``location`` to ``fh``; returns (model bytes, data bytes)."""
        pos = 0
        for t, arr in self._inits:
            if arr is None:
                continue
            data = _payload(arr)
            pad = -pos % _PAGE
            if pad:
                data_fh.write(b"\0" * pad)
            del t.external_data[:]
            for key, value in (("location", location), ("offset", pos + pad), ("length", data.nbytes)):
                t.external_data.add(key=key, value=str(value))
            data_fh.write(data)
            pos += pad + data.nbytes
        model = self.skeleton.SerializeToString(deterministic=True)
        fh.write(model)
        return len(model), pos

    def fits_skeleton(self, limit: int) -> bool:
        """Whether the skeleton (what stays in the model file with external data) is below ``limit``."""
        try:
            return self.skeleton.ByteSize() <= limit
        except Exception:  # noqa: BLE001 - protobuf refuses to size a message above 2 GB
            return False


def _is_stub(t: onnx.TensorProto) -> bool:
    return t.data_location == onnx.TensorProto.EXTERNAL and any(
        e.key == "location" and e.value == SHARED_LOCATION for e in t.external_data)
