"""Reading and writing models: load (validated), save (atomic) and small atomic text files.

Kept apart from :mod:`.model` so that the in-memory model, the verifier (which load uses) and
the graph facade do not import each other: io sits on top of all three.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import onnx

from ..errors import UserError
from .model import Model
from .verify import verify_model

__all__ = ["load_model", "save_proto", "save_model", "model_bytes", "model_size", "save_bytes", "atomic_write_text",
           "proto_bytes", "external_data_files"]

_TWO_GB = 2**31 - 2**20  # leave headroom below protobuf's hard limit
_EXTERNAL_MIN_BYTES = 1024  # in a model saved with external data, smaller tensors stay inline


def load_model(path: str | os.PathLike[str] | onnx.ModelProto, *, check: bool = True) -> Model:
    """Load and validate a model file (or take a ModelProto, which is copied, never changed)."""
    external = False
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
            external = _check_external(proto, p.parent)  # payloads are memory-mapped later
        except Exception as exc:  # protobuf DecodeError, missing external data, ...
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"{p}: not a readable ONNX model ({first})") from exc
    if proto.ir_version <= 0 or not proto.HasField("graph") or not proto.opset_import:
        raise UserError(f"{source}: not an ONNX model (no IR version, graph or opset import)")
    if check:
        from .validate import check_proto

        check_proto(proto, source)
    try:
        model = Model(proto, source)
    except Exception as exc:
        raise UserError(f"{source}: cannot import graph ({exc})") from exc
    if check:
        problems = verify_model(model, sorted_check=False)
        if problems:
            raise UserError(f"{source}: invalid model: {problems[0]}")
        reordered = model.graph.toposort()
        try:
            # the full check adds strict shape and type inference: a shape-mismatched MatMul or
            # If branches of different types fail here, not as an invalid output
            if external and not reordered:
                onnx.checker.check_model(str(path), full_check=True)  # resolves external data itself
            elif external:
                onnx.checker.check_model(model.to_proto(), full_check=True)
            elif not reordered and not isinstance(path, onnx.ModelProto):
                # onnx's C++ reads the file itself: no Python-side serialization of the proto
                # (protobuf's ByteSize/SerializeToString cost 0.3-1.3 s on a 90 MB model)
                onnx.checker.check_model(str(path), full_check=True)
            else:
                # onnx's checker insists on topological order: check the sorted graph
                data = proto_bytes(model.to_proto() if reordered else proto)
                if data is not None:  # serialized once; above 2 GB only a file can be checked
                    onnx.checker.check_model(data, full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
            raise UserError(f"{source}: invalid model: {' '.join(lines[:2])}") from exc
    model.files = ([] if isinstance(path, onnx.ModelProto)
                   else [Path(path), *external_data_files(proto, Path(path).parent)])
    # the proto is ours (read from the file or copied): hold weights once; external ones mapped
    model._take_payloads(str(Path(path).parent) if external else None)
    return model


def _check_external(proto: onnx.ModelProto, base: Path) -> bool:
    """Whether the model keeps tensors in external files; raises if one is missing or short."""
    from onnx import external_data_helper

    found = False
    for t in external_data_helper._get_all_tensors(proto):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        found = True
        info = {e.key: e.value for e in t.external_data}
        f = base / info.get("location", "")
        end = int(info.get("offset", 0)) + int(info.get("length", 0))
        if not info.get("location") or not f.is_file() or f.stat().st_size < end:
            raise ValueError(f"external data of tensor '{t.name}' not found in '{info.get('location', '')}'")
    return found


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small text file safely (reports, tables): through :func:`qcompiler.files.write_bytes`
    (temp + rename, staged with the other outputs of a CLI command, special files written through)."""
    from .. import files

    files.write_bytes(path, text.encode())


def save_proto(proto: onnx.ModelProto, path: str | os.PathLike[str]) -> int:
    """Write ``proto`` to ``path`` through :mod:`qcompiler.files` (temp + rename, or through to a
    special file; symlinks followed); a model above ``_TWO_GB`` goes with its
    weights in ``<name>.data`` beside it. Returns the bytes written (model + external data)."""
    from .. import files

    out = _output_path(path)
    directory = out.parent
    data = proto_bytes(proto)
    large = data is None
    if files.is_special(out):
        if data is None:
            raise UserError(f"{path}: cannot write a model above 2 GB (saved with external data) to a special file")
        files.write_bytes(out, data)
        return len(data)
    with _staged(path, out) as (tmp, tmp_data):
        if large:
            onnx.save_model(proto, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=tmp_data.name, size_threshold=_EXTERNAL_MIN_BYTES)
            if tmp_data.exists():  # (no tensor above the threshold: everything stayed inline)
                # the model refers to the data file by name: rewrite it to the final name
                _rename_external(str(tmp), tmp_data.name, out.name + ".data")
                _restore_inline(proto, tmp_data.name, directory)
        else:
            tmp.write_bytes(data)
        size = tmp.stat().st_size + (tmp_data.stat().st_size if tmp_data.exists() else 0)
    return size


@contextlib.contextmanager
def _staged(path: str | os.PathLike[str], out: Path) -> Iterator[tuple[Path, Path]]:
    """Temp files beside ``out`` for the model and its ``.data`` file: both are published when
    the body returns (the data file first, so the model never names a missing file) and removed
    when it raises; an OSError becomes one line naming ``path``."""
    from .. import files

    try:
        tmp = files.temp_beside(out)
        tmp_data = out.parent / (tmp.name + ".data")
        try:
            yield tmp, tmp_data
            if tmp_data.exists():
                files.publish(tmp_data, out.parent / (out.name + ".data"))
            files.publish(tmp, out)
        except BaseException:
            files.discard(tmp)
            files.discard(tmp_data)
            raise
    except OSError as exc:
        raise UserError(f"{path}: cannot write output: {exc.strerror or exc}") from exc


def save_model(model: Model, path: str | os.PathLike[str]) -> int:
    """Write a compiled ``model`` (without its intermediate shape annotations) as
    :func:`save_proto` would write its proto, one tensor at a time (:mod:`.writer`): at most
    one payload is copied at once, never the whole model. A model above ``_TWO_GB`` goes with
    its large initializers in ``<name>.data`` beside it. Returns the bytes written."""
    from .. import files
    from .writer import ModelWriter

    out = _output_path(path)
    writer = ModelWriter(model, min_bytes=_EXTERNAL_MIN_BYTES)
    inline = writer.inline_size() <= _TWO_GB
    if not inline and not writer.fits_skeleton(_TWO_GB):
        # what stays in the model file (subgraph or attribute tensors) is itself too large
        return save_proto(_stripped(model), path)
    if files.is_special(out):
        if not inline:
            raise UserError(f"{path}: cannot write a model above 2 GB (saved with external data) to a special file")
        data = model_bytes(model)
        files.write_bytes(out, data)
        return len(data)
    with _staged(path, out) as (tmp, tmp_data), open(tmp, "wb") as fh:
        if inline:
            size = writer.write_inline(fh)
        else:
            with open(tmp_data, "wb") as dfh:
                size = sum(writer.write_external(fh, dfh, out.name + ".data"))
    return size


def model_bytes(model: Model) -> bytes | None:
    """The bytes :func:`save_model` writes for a model that fits in one file (None above
    ``_TWO_GB``): ``to_proto().SerializeToString(deterministic=True)`` without value_info."""
    import io

    from .writer import ModelWriter

    writer = ModelWriter(model, min_bytes=_EXTERNAL_MIN_BYTES)
    if writer.inline_size() > _TWO_GB:
        return None
    buf = io.BytesIO()
    writer.write_inline(buf)
    return buf.getvalue()


def model_size(model: Model) -> int | None:
    """The size of ``model``'s file as :func:`save_model` writes it inline, or None above
    ``_TWO_GB`` (then known once saved, with external data); no payload is copied."""
    from .writer import ModelWriter

    size = ModelWriter(model, min_bytes=_EXTERNAL_MIN_BYTES).inline_size()
    return size if size <= _TWO_GB else None


def _stripped(model: Model) -> onnx.ModelProto:
    proto = model.to_proto()
    del proto.graph.value_info[:]
    return proto


def _output_path(path: str | os.PathLike[str]) -> Path:
    from .. import files

    out = files.real_path(path)
    if not out.parent.is_dir():
        raise UserError(f"{path}: cannot write output: directory '{Path(path).parent}' does not exist")
    return out


def save_bytes(data: bytes, path: str | os.PathLike[str]) -> int:
    """Write a serialized model (below 2 GB) as :func:`save_proto` would; returns its size."""
    from .. import files

    files.write_bytes(_output_path(path), data)
    return len(data)


def proto_bytes(proto: onnx.ModelProto) -> bytes | None:
    """The model file's bytes (deterministic serialization), or None above the size
    :func:`save_proto` stores with external data. Serializing is the cheap way to learn the
    size: upb's ``ByteSize()`` costs several times a serialization on large models."""
    try:
        data = proto.SerializeToString(deterministic=True)
    except Exception:  # protobuf refuses to serialize messages above 2 GB
        return None
    return data if len(data) <= _TWO_GB else None


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


def _rename_external(model_path: str, old: str, new: str) -> None:
    m = onnx.load(model_path, load_external_data=False)
    for t in onnx.external_data_helper._get_all_tensors(m):
        for entry in t.external_data:
            if entry.key == "location" and entry.value == old:
                entry.value = new
    with open(model_path, "wb") as fh:
        fh.write(m.SerializeToString(deterministic=True))
