"""Calibration data sources and their validation: every source yields the same validated feed
dicts; one-shot iterators are read once, callables are called per pass; random:N is seeded
and follows each input's dtype and shape; the first N samples with a limit; every bad-data
case is one UserError line naming the sample (file or index) and the input, and through the
CLI exits 2 with no output file."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import qcompiler
from conftest import make_model, tensor_info, tiny_calibration, tiny_model
from qcompiler.calibration.data import RANDOM_SYMBOLIC_DIM, CalibrationData, input_specs, load_calibration
from qcompiler.cli import main


def _specs(proto: onnx.ModelProto) -> list[qcompiler.InputSpec]:
    return input_specs(qcompiler.load_model(proto))


def _two_inputs() -> onnx.ModelProto:
    """a, b: float [N, s]; ids: int64 [N, s]; y = a + b + float(ids)."""
    nodes = [helper.make_node("Add", ["a", "b"], ["s1"], name="add1"),
             helper.make_node("Cast", ["ids"], ["idf"], name="cast", to=TensorProto.FLOAT),
             helper.make_node("Add", ["s1", "idf"], ["y"], name="add2")]
    return make_model(nodes, [tensor_info("a", ["N", "s"]), tensor_info("b", ["N", "s"]),
                              tensor_info("ids", ["N", "s"], TensorProto.INT64)], [tensor_info("y", ["N", "s"])])


TINY = _specs(tiny_model())
TWO = _specs(_two_inputs())


def _two_feed(n: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"a": rng.standard_normal((1, n)).astype(np.float32), "b": rng.standard_normal((1, n)).astype(np.float32),
            "ids": np.arange(n, dtype=np.int64)[None]}


def _same(feeds_a: list[dict[str, np.ndarray]], feeds_b: list[dict[str, np.ndarray]]) -> None:
    assert len(feeds_a) == len(feeds_b)
    for fa, fb in zip(feeds_a, feeds_b):
        assert fa.keys() == fb.keys()
        for k in fa:
            assert fa[k].dtype == fb[k].dtype and np.array_equal(fa[k], fb[k]), k


# -- sources -----------------------------------------------------------------------------------

def test_all_file_sources_agree(tmp_path: Path) -> None:
    """Stacked .npz, a directory of per-sample .npz, .npy and a list of dicts give the same
    samples, batch 1 each, in order; float64 data is cast to the model's float32."""
    stacked = tiny_calibration(5)["x"]
    np.savez(tmp_path / "s.npz", x=stacked)
    np.save(tmp_path / "s.npy", stacked.astype(np.float64))
    d = tmp_path / "dir"
    d.mkdir()
    for i in range(5):
        np.savez(d / f"{i:03d}.npz", x=stacked[i : i + 1])
    want = [{"x": stacked[i : i + 1]} for i in range(5)]
    for source in (tmp_path / "s.npz", str(tmp_path / "s.npy"), d, want, {"x": stacked}):
        data = load_calibration(source, TINY)
        assert data.real_data is True
        _same(list(data), want)
        _same(list(data), want)  # re-iterable


def test_npy_needs_a_single_input(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.zeros((2, 3), np.float32))
    with pytest.raises(qcompiler.UserError, match=r"a\.npy: a \.npy file only works for single-input models"):
        load_calibration(tmp_path / "a.npy", TWO)


def test_generator_is_read_once_and_kept() -> None:
    """A one-shot iterator is materialised (calibration iterates twice); with a limit only the
    first N items are pulled from it."""
    pulled: list[int] = []

    def gen() -> Iterator[dict[str, np.ndarray]]:
        for i in range(6):
            pulled.append(i)
            yield _two_feed(seed=i)

    data = load_calibration(gen(), TWO)
    assert len(data) == 6 and len(list(data)) == 6 and pulled == list(range(6))
    pulled.clear()
    limited = load_calibration(gen(), TWO, limit=2)
    assert len(list(limited)) == 2 and pulled == [0, 1]


def test_callable_streams_a_fresh_iterator_per_pass() -> None:
    """A zero-argument callable is called on every iteration, so nothing is kept in memory."""
    calls: list[int] = []

    def make() -> Iterator[dict[str, np.ndarray]]:
        calls.append(1)
        return (_two_feed(seed=i) for i in range(4))

    data = load_calibration(make, TWO)
    n_before = len(calls)
    first, second = [f for f in data], [f for f in data]  # list() would call len() too: one more pass
    _same(first, second)
    assert len(first) == 4 and len(calls) == n_before + 2
    assert data._cached is None


def test_limit_keeps_the_first_n(tmp_path: Path) -> None:
    stacked = tiny_calibration(6)["x"]
    data = load_calibration({"x": stacked}, TINY, limit=4)
    _same(list(data), [{"x": stacked[i : i + 1]} for i in range(4)])
    with pytest.raises(qcompiler.UserError, match="--calibration-limit 0"):
        load_calibration({"x": stacked}, TINY, limit=0)


def test_random_is_seeded_and_typed() -> None:
    """random:N: N samples, same text -> same arrays, another seed -> other arrays; dtype and
    shape follow the inputs; symbolic dims get RANDOM_SYMBOLIC_DIM; real_data is False."""
    data = load_calibration("random:3", TWO)
    feeds = list(data)
    assert data.real_data is False and len(feeds) == 3
    for f in feeds:
        assert f["a"].dtype == np.float32 and f["a"].shape == (RANDOM_SYMBOLIC_DIM, RANDOM_SYMBOLIC_DIM)
        assert f["ids"].dtype == np.int64 and set(np.unique(f["ids"])) <= {0, 1}
    _same(feeds, list(load_calibration("random:3", TWO)))
    _same(feeds, list(load_calibration("random:3:0", TWO)))
    other = list(load_calibration("random:3:7", TWO))
    assert not np.array_equal(other[0]["a"], feeds[0]["a"])
    tiny = list(load_calibration("random:2", TINY))
    assert tiny[0]["x"].shape == (1, 3, 8, 8)


def test_random_compiles_and_report_marks_it() -> None:
    result = qcompiler.compile(tiny_model(), calibration="random:2")
    assert result.report["calibration"]["real_data"] is False
    real = qcompiler.compile(tiny_model(), calibration={"x": tiny_calibration(2)["x"]})
    assert real.report["calibration"]["real_data"] is True


# -- validation ----------------------------------------------------------------------------------

def _bad(feed: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    return [_two_feed(), feed]  # the bad sample is index 1


@pytest.mark.parametrize("feed, fragments", [
    ({**_two_feed(), "c": np.zeros((1, 3), np.float32)}, ["sample 1", "unknown input 'c'"]),
    ({k: v for k, v in _two_feed().items() if k != "b"}, ["sample 1", "missing input 'b'"]),
    ({**_two_feed(), "a": np.zeros((1, 1, 3), np.float32)}, ["sample 1", "'a'", "rank 3"]),
    ({**_two_feed(), "ids": np.zeros((1, 3), np.float32)}, ["sample 1", "'ids'", "float32", "int64"]),
    ({**_two_feed(), "a": np.array([["x", "y", "z"]])}, ["sample 1", "'a'", "<U1"]),
    ({**_two_feed(), "b": np.array([[0, np.nan, 0]], np.float32)}, ["sample 1", "'b'", "NaN"]),
    ({**_two_feed(), "b": np.array([[0, -np.inf, 0]], np.float32)}, ["sample 1", "'b'", "Inf"]),
    ({**_two_feed(), "b": np.zeros((1, 4), np.float32)}, ["sample 1", "'b'", "axis 1", "'a'", "dimension 's'"]),
])
def test_bad_sample_is_one_line_naming_it(feed: dict[str, np.ndarray], fragments: list[str]) -> None:
    data = load_calibration(_bad(feed), TWO)  # the first sample is fine: checked lazily
    with pytest.raises(qcompiler.UserError) as info:
        list(data)
    msg = str(info.value)
    assert "\n" not in msg
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)


def test_not_a_dict_and_wrong_fixed_dim() -> None:
    with pytest.raises(qcompiler.UserError, match="calibration sample 0: expected a dict"):
        load_calibration([np.zeros(3)], TWO)
    with pytest.raises(qcompiler.UserError, match=r"'x' has shape \[1, 3, 8, 9\], model expects 8 on axis 3"):
        load_calibration([{"x": np.zeros((1, 3, 8, 9), np.float32)}], TINY)


@pytest.mark.parametrize("make, fragment", [
    (lambda d: np.savez(d / "e.npz", x=np.zeros((0, 3, 8, 8), np.float32)) or d / "e.npz", "calibration set is empty"),
    (lambda d: (d / "empty").mkdir() or d / "empty", "no .npz samples and no images"),
    (lambda d: np.savez(d / "n.npz", x=np.float32(1)) or d / "n.npz", "scalar"),
    (lambda d: np.savez(d / "c.npz", a=np.zeros((2, 3)), b=np.zeros((3, 3))) or d / "c.npz", "different sample counts"),
    (lambda d: (d / "t.txt").write_text("hi") and d / "t.txt", "must be a .npz file"),
    (lambda d: d / "nope.npz", "no such calibration file"),
    (lambda d: (d / "junk.npz").write_bytes(b"junk") and d / "junk.npz", "not a readable .npz"),
])
def test_bad_files(tmp_path: Path, make, fragment: str) -> None:  # type: ignore[no-untyped-def]
    path = make(tmp_path)
    with pytest.raises(qcompiler.UserError) as info:
        load_calibration(path, TWO if path.name == "c.npz" else TINY)
    assert str(path) in str(info.value) and fragment in str(info.value)


def test_empty_iterable_and_dir_sample_names_file(tmp_path: Path) -> None:
    with pytest.raises(qcompiler.UserError, match="calibration set is empty"):
        load_calibration([], TWO)
    d = tmp_path / "samples"
    d.mkdir()
    np.savez(d / "000.npz", **_two_feed())
    np.savez(d / "001.npz", **{**_two_feed(), "a": np.full((1, 3), np.inf, np.float32)})
    with pytest.raises(qcompiler.UserError) as info:
        list(load_calibration(d, TWO))
    assert str(d / "001.npz") in str(info.value) and "'a'" in str(info.value) and "Inf" in str(info.value)


def test_calibration_data_passes_through() -> None:
    data = CalibrationData([_two_feed()], TWO)
    assert load_calibration(data, TWO) is data


# -- through the CLI -----------------------------------------------------------------------------

def _cli_cases(d: Path) -> dict[str, tuple[list[str], list[str]]]:
    """name -> (extra compile args, fragments the one error line must contain)."""
    x = tiny_calibration(3)["x"]
    samples = d / "samples"
    samples.mkdir()
    np.savez(samples / "000.npz", x=x[:1])
    np.savez(samples / "001.npz", x=x[1:2], extra=x[1:2])
    missing = d / "missing"
    missing.mkdir()
    np.savez(missing / "000.npz", y=x[:1])
    inf = x.copy()
    inf[1, 0, 0, 0] = np.inf
    np.savez(d / "inf.npz", x=inf)
    np.savez(d / "empty.npz", x=x[:0])
    np.save(d / "rank.npy", np.zeros((2, 8, 8), np.float32))
    return {
        "unknown-input-dir": (["--calibration", str(samples)], [str(samples / "001.npz"), "'extra'"]),
        "missing-input": (["--calibration", str(missing)], [str(missing / "000.npz"), "'y'"]),
        "inf": (["--calibration", str(d / "inf.npz")], [str(d / "inf.npz"), "sample 1", "'x'", "Inf"]),
        "empty": (["--calibration", str(d / "empty.npz")], [str(d / "empty.npz"), "empty"]),
        "wrong-rank-npy": (["--calibration", str(d / "rank.npy")], [str(d / "rank.npy"), "'x'", "rank"]),
        "bad-random": (["--calibration", "random:x"], ["random:x"]),
        "limit-zero": (["--calibration", "random:2", "--calibration-limit", "0"], ["--calibration-limit 0"]),
    }


@pytest.mark.parametrize("name", ["unknown-input-dir", "missing-input", "inf", "empty", "wrong-rank-npy",
                                  "bad-random", "limit-zero"])
def test_cli_bad_data_exit_2(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "tiny.onnx"
    onnx.save(tiny_model(), str(model))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    args, fragments = _cli_cases(tmp_path)[name]
    rc = main(["compile", str(model), "-o", str(out_dir / "q.onnx"), *args])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1, err
    assert lines[0].startswith("qcompiler: error: ") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert list(out_dir.iterdir()) == []


def test_cli_random_compiles(tmp_path: Path) -> None:
    model = tmp_path / "tiny.onnx"
    onnx.save(tiny_model(), str(model))
    assert main(["compile", str(model), "-o", str(tmp_path / "q.onnx"), "--calibration", "random:2", "-q"]) == 0
    assert (tmp_path / "q.onnx").exists()
