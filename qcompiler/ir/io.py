"""Reading and writing models: load (validated), save (atomic) and small atomic text files.

Kept apart from :mod:`.model` so that the in-memory model, the verifier (which load uses) and
the graph facade do not import each other: io sits on top of all three.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx

from ..errors import UserError
from .model import Model
from .verify import verify_model

__all__ = ["load_model", "save_proto", "atomic_write_text"]

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
        if not p.is_file():
            raise UserError(f"{p}: no such model file")
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
            elif not _fits(proto) or proto.ByteSize() > _TWO_GB:
                if isinstance(path, (str, os.PathLike)):
                    onnx.checker.check_model(str(path), full_check=True)
            else:
                # onnx's checker insists on topological order: check the sorted graph
                onnx.checker.check_model(model.to_proto() if reordered else proto, full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
            raise UserError(f"{source}: invalid model: {' '.join(lines[:2])}") from exc
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
    """Write a small text file via temp + rename (reports, tables)."""
    directory = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as exc:
        raise UserError(f"{path}: cannot write: {exc.strerror or exc}") from exc


def save_proto(proto: onnx.ModelProto, path: str | os.PathLike[str]) -> int:
    out = Path(path)
    directory = out.parent if str(out.parent) else Path(".")
    if not directory.is_dir():
        raise UserError(f"{out}: cannot write output: directory '{directory}' does not exist")
    if not os.access(directory, os.W_OK):
        raise UserError(f"{out}: cannot write output: directory '{directory}' is not writable")
    large = proto.ByteSize() > _TWO_GB if _fits(proto) else True
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    data_name = out.name + ".data"
    tmp_data = directory / (Path(tmp).name + ".data")
    try:
        if large:
            onnx.save_model(proto, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=tmp_data.name, size_threshold=_EXTERNAL_MIN_BYTES)
            if tmp_data.exists():  # (no tensor above the threshold: everything stayed inline)
                # the model refers to the data file by name: rewrite it to the final name
                _rename_external(tmp, tmp_data.name, data_name)
                os.replace(tmp_data, directory / data_name)
        else:
            with open(tmp, "wb") as fh:
                fh.write(proto.SerializeToString(deterministic=True))
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, out)
        if large:
            _restore_inline(proto, tmp_data.name, data_name, directory)
    except OSError as exc:
        raise UserError(f"{out}: cannot write output: {exc.strerror or exc}") from exc
    finally:
        for leftover in (Path(tmp), tmp_data):
            if leftover.exists():
                leftover.unlink()
    size = out.stat().st_size
    if large and (directory / data_name).exists():
        size += (directory / data_name).stat().st_size
    return size


def _restore_inline(proto: onnx.ModelProto, old: str, new: str, directory: Path) -> None:
    """onnx.save_model with external data rewrites the proto in place (tensors become references
    to the temporary data file); read the saved data back so the caller's proto is whole again."""
    from onnx import external_data_helper

    tensors = [t for t in external_data_helper._get_all_tensors(proto) if t.external_data]
    if not tensors:
        return
    for t in tensors:
        for entry in t.external_data:
            if entry.key == "location" and entry.value == old:
                entry.value = new
    external_data_helper.load_external_data_for_model(proto, str(directory))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
