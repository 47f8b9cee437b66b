"""Image folders as calibration data, on tiny synthetic PNGs written to tmp_path (lossless, so
the pixel values are known): the numeric steps against a numpy reference, resize/crop
geometry, spec parsing (inline and TOML, auto-detected), input selection, and every error
naming the file or key at fault. An image folder compiles to the same model as the same
arrays given as .npz."""

from __future__ import annotations

import builtins
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

import qcompiler
from conftest import make_model, tensor_info, tiny_model
from qcompiler.calibration.data import input_specs, load_calibration
from qcompiler.cli import main
from qcompiler.calibration.images import ImageSpec, image_files, parse_image_spec, preprocess_image, resolve_image_spec

Image = pytest.importorskip("PIL.Image")

TINY = input_specs(qcompiler.load_model(tiny_model()))


def _pixels(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _png(path: Path, arr: np.ndarray) -> Path:
    Image.fromarray(arr).save(path)
    return path


def _folder(d: Path, n: int = 3, h: int = 8, w: int = 8) -> list[np.ndarray]:
    """n RGB PNGs named so that name order differs from creation order; returns them in name order."""
    d.mkdir(exist_ok=True)
    arrs = {f"img_{i:02d}.png": _pixels(h, w, i) for i in reversed(range(n))}
    for name, arr in arrs.items():
        _png(d / name, arr)
    (d / "notes.txt").write_text("not an image")
    return [arrs[k] for k in sorted(arrs)]


def _reference(arr: np.ndarray, scale: float, mean: list[float], std: list[float], bgr: bool, nchw: bool) -> np.ndarray:
    """The numeric steps written out plainly, pixel by pixel (float64)."""
    h, w, _ = arr.shape
    out = np.zeros((h, w, 3))
    for y in range(h):
        for x in range(w):
            px = arr[y, x, ::-1] if bgr else arr[y, x]
            for c in range(3):
                out[y, x, c] = (float(px[c]) * scale - mean[c]) / std[c]
    return (out.transpose(2, 0, 1) if nchw else out)[None]


@pytest.mark.parametrize("order, layout", [("RGB", "NCHW"), ("BGR", "NHWC")])
def test_numeric_steps_match_reference(tmp_path: Path, order: str, layout: str) -> None:
    arr = _pixels(5, 7, 3)
    spec = parse_image_spec(f"scale=1/255,mean=0.1,0.2,0.3,std=0.5,0.25,2,order={order},layout={layout}")
    got = preprocess_image(_png(tmp_path / "a.png", arr), spec)
    want = _reference(arr, 1 / 255, [0.1, 0.2, 0.3], [0.5, 0.25, 2.0], order == "BGR", layout == "NCHW")
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_gray_and_integer_dtypes(tmp_path: Path) -> None:
    """GRAY gives one channel (Pillow's L conversion); integer dtypes round and clip."""
    arr = _pixels(4, 4, 5)
    path = _png(tmp_path / "g.png", arr)
    gray = preprocess_image(path, parse_image_spec("order=gray"))
    with Image.open(path) as im:
        want = np.asarray(im.convert("L"), dtype=np.float32)
    assert gray.shape == (1, 1, 4, 4) and np.array_equal(gray[0, 0], want)
    s8 = preprocess_image(path, parse_image_spec("mean=128,dtype=int8"))
    assert s8.dtype == np.int8
    assert np.array_equal(s8, np.clip(arr.astype(np.int16) - 128, -128, 127).transpose(2, 0, 1)[None])
    u8 = preprocess_image(path, parse_image_spec("scale=2,dtype=uint8"))
    assert np.array_equal(u8, np.minimum(arr.astype(np.int32) * 2, 255).transpose(2, 0, 1)[None])


def test_resize_and_center_crop_geometry(tmp_path: Path) -> None:
    """resize=N scales the shorter side to N (other side rounded half up); resize=H,W is exact;
    crop takes the centre with offsets rounded down (checked on an un-resized image)."""
    path = _png(tmp_path / "wide.png", _pixels(20, 50, 1))  # h=20, w=50
    assert preprocess_image(path, parse_image_spec("resize=10")).shape == (1, 3, 10, 25)
    assert preprocess_image(path, parse_image_spec("resize=9")).shape == (1, 3, 9, 23)  # 22.5 -> 23
    assert preprocess_image(path, parse_image_spec("resize=6,4,layout=NHWC")).shape == (1, 6, 4, 3)
    arr = _pixels(5, 8, 2)
    small = _png(tmp_path / "small.png", arr)
    got = preprocess_image(small, parse_image_spec("crop=3,layout=NHWC"))[0]
    assert np.array_equal(got, arr[1:4, 2:5].astype(np.float32))  # top (5-3)//2=1, left (8-3)//2=2
    got = preprocess_image(small, parse_image_spec("crop=4,5,layout=NHWC"))[0]
    assert np.array_equal(got, arr[0:4, 1:6].astype(np.float32))
    with pytest.raises(qcompiler.UserError, match="smaller than the crop"):
        preprocess_image(small, parse_image_spec("crop=6"))
    resized = preprocess_image(path, parse_image_spec("resize=10,layout=NHWC"))[0]
    with Image.open(path) as im:  # the documented filter: Pillow BILINEAR
        want = np.asarray(im.convert("RGB").resize((25, 10), Image.BILINEAR), dtype=np.float32)
    assert np.array_equal(resized, want)


def test_inline_spec_forms() -> None:
    long = parse_image_spec("resize=256,crop=224,scale=0.00392156862745098,mean=0.5,0.5,0.5,std=0.5,0.5,0.5,"
                            "layout=NCHW,order=RGB,dtype=float32")
    assert long == ImageSpec(resize=(256,), crop=(224,), scale=1 / 255, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert parse_image_spec("resize=256, crop=224, scale=1/255, mean=0.5, std=0.5, input=img").input == "img"
    assert parse_image_spec("") == ImageSpec()


@pytest.mark.parametrize("text, fragment", [
    ("rezise=256", "unknown key 'rezise'"),
    ("order=RBG", "'order' must be one of"),
    ("std=0.5,0,1", "'std' must be finite and non-zero"),
    ("mean=1,2", "'mean' takes 1 or 3"),
    ("crop=2.5", "positive integers"),
    ("scale=1/0", "'scale' must be a number"),
    ("order=GRAY,mean=1,2,3", "one channel"),
    ("crop=3,crop=4", "given twice"),
    ("224", "needs key=value"),
])
def test_bad_inline_spec(text: str, fragment: str) -> None:
    with pytest.raises(qcompiler.UserError) as info:
        parse_image_spec(text)
    assert "--image-spec" in str(info.value) and fragment in str(info.value)


def test_toml_spec_auto_detected_and_by_path(tmp_path: Path) -> None:
    d = tmp_path / "imgs"
    _folder(d)
    with pytest.raises(qcompiler.UserError, match=r"imgs: images need a preprocessing spec.*preprocess\.toml"):
        resolve_image_spec(None, d)
    (d / "preprocess.toml").write_text('scale = "1/255"\nmean = [0.5, 0.5, 0.5]\nstd = [0.5, 0.5, 0.5]\n'
                                       'layout = "NCHW"\n')
    want = ImageSpec(scale=1 / 255, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert resolve_image_spec(None, d) == want
    other = tmp_path / "spec.toml"
    other.write_text("resize = [6, 6]\ncrop = 4\n")
    assert resolve_image_spec(str(other), d) == ImageSpec(resize=(6, 6), crop=(4,))
    bad = tmp_path / "bad.toml"
    bad.write_text("sclae = 2\n")
    with pytest.raises(qcompiler.UserError, match=r"bad\.toml: unknown key 'sclae'"):
        resolve_image_spec(str(bad), d)
    broken = tmp_path / "broken.toml"
    broken.write_text("scale = \n")
    with pytest.raises(qcompiler.UserError, match=r"broken\.toml: not valid TOML"):
        resolve_image_spec(str(broken), d)


def test_folder_feeds_sorted_and_validated(tmp_path: Path) -> None:
    d = tmp_path / "imgs"
    arrs = _folder(d)
    assert [p.name for p in image_files(d)] == ["img_00.png", "img_01.png", "img_02.png"]
    data = load_calibration(d, TINY, image_spec="scale=1/255")
    feeds = [f["x"] for f in data]
    assert len(feeds) == 3
    for got, arr in zip(feeds, arrs):
        np.testing.assert_allclose(got, arr.astype(np.float32).transpose(2, 0, 1)[None] / 255, atol=1e-6)
    with pytest.raises(qcompiler.UserError) as info:  # 8x8 images, but crop=4 -> wrong spatial size
        list(load_calibration(d, TINY, image_spec="crop=4"))
    assert str(d / "img_00.png") in str(info.value) and "'x'" in str(info.value)


def test_unreadable_image_names_file(tmp_path: Path) -> None:
    d = tmp_path / "imgs"
    _folder(d)
    (d / "img_01.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(qcompiler.UserError) as info:
        list(load_calibration(d, TINY, image_spec="scale=1/255"))
    assert str(d / "img_01.png") in str(info.value) and "cannot read image" in str(info.value)


def _two_image_inputs(extra: bool) -> list[qcompiler.InputSpec]:
    inputs = [tensor_info("left", [1, 3, 8, 8]), tensor_info("right", [1, 3, 8, 8])]
    nodes = [helper.make_node("Add", ["left", "right"], ["y"], name="add")]
    if extra:
        inputs = [tensor_info("left", [1, 3, 8, 8]), tensor_info("k", [1])]
        nodes = [helper.make_node("Mul", ["left", "k"], ["y"], name="mul")]
    proto = make_model(nodes, inputs, [tensor_info("y", [1, 3, 8, 8])])
    return input_specs(qcompiler.load_model(proto))


def test_input_selection(tmp_path: Path) -> None:
    d = tmp_path / "imgs"
    _folder(d, n=1)
    two = _two_image_inputs(extra=False)
    with pytest.raises(qcompiler.UserError, match="cannot tell which input gets the images.*input=NAME"):
        list(load_calibration(d, two, image_spec="scale=1"))
    with pytest.raises(qcompiler.UserError, match="also needs 'right'"):
        list(load_calibration(d, two, image_spec="input=left"))
    with pytest.raises(qcompiler.UserError, match="image spec input 'nope' is not a model input"):
        list(load_calibration(d, two, image_spec="input=nope"))
    with pytest.raises(qcompiler.UserError, match="also needs 'k'"):
        list(load_calibration(d, _two_image_inputs(extra=True), image_spec="scale=1"))


def test_missing_pillow_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "imgs"
    _folder(d, n=1)
    real_import = builtins.__import__

    def no_pil(name: str, *args: object, **kw: object) -> object:
        if name == "PIL" or name.startswith("PIL."):
            raise ImportError("No module named 'PIL'")
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_pil)
    with pytest.raises(qcompiler.UserError, match=r"needs Pillow: pip install 'qcompiler\[image\]'"):
        list(load_calibration(d, TINY, image_spec="scale=1"))


def test_image_folder_compiles_like_npz(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """CLI: an image folder with --image-spec, or with preprocess.toml, gives the same bytes as
    the same preprocessed arrays stacked in an .npz; a spec without an image folder is exit 2."""
    d = tmp_path / "imgs"
    arrs = _folder(d, n=4)
    model = tmp_path / "tiny.onnx"
    onnx.save(tiny_model(), str(model))
    # mean 128, std 64: exact in float32, so both routes give bit-identical arrays
    x = np.stack([((a.astype(np.float32) - 128) / 64).transpose(2, 0, 1) for a in arrs])
    np.savez(tmp_path / "same.npz", x=x)
    outs = [tmp_path / f"{k}.onnx" for k in ("npz", "spec", "toml")]
    assert main(["compile", str(model), "-o", str(outs[0]), "--calibration", str(tmp_path / "same.npz"), "-q"]) == 0
    spec = "mean=128,128,128,std=64,64,64"
    assert main(["compile", str(model), "-o", str(outs[1]), "--calibration", str(d), "--image-spec", spec, "-q"]) == 0
    (d / "preprocess.toml").write_text('scale = 1\nmean = 128\nstd = [64, 64, 64]\n')
    assert main(["compile", str(model), "-o", str(outs[2]), "--calibration", str(d), "-q"]) == 0
    assert outs[0].read_bytes() == outs[1].read_bytes() == outs[2].read_bytes()
    capsys.readouterr()
    bad_out = tmp_path / "bad.onnx"
    rc = main(["compile", str(model), "-o", str(bad_out), "--calibration", str(tmp_path / "same.npz"),
               "--image-spec", spec])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "same.npz" in err[0] and "directory of images" in err[0]
    assert not bad_out.exists()
