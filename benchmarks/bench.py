#!/usr/bin/env python
"""Benchmark qcompiler against onnxruntime's own quantizer on real models, in one run.

For each model this builds, in the same process run:

* ``fp32``: the original model;
* ``qcompiler``: ``qcompiler.compile(..., target="ort-cpu")`` (static; MiniLM also dynamic);
* ``ort static``: ``quant_pre_process`` then ``quantize_static`` (QDQ, per-channel, MinMax,
  uint8 activations, int8 weights) on the same calibration samples (PP-OCR, opset 12, also
  with the model upgraded to opset 13 first, since ORT's per-channel output needs opset 13);
* ``ort dynamic``: ``quant_pre_process`` then ``quantize_dynamic`` (default settings, int8 weights;
  MiniLM also with ``per_channel=True``, the bench README's baseline configuration);

and measures latency (interleaved round-robin, ratio vs fp32 from the same run), fidelity vs fp32
on the evaluation inputs, output size, and the wall time and peak RSS of each compile (each compile
runs in its own spawned child process). Results are printed and written as markdown between the
``<!-- bench:begin -->`` / ``<!-- bench:end -->`` markers of ``--out``.

The benchmark material (models, images, tokenized text, baseline numbers) lives outside the
repository; see ``../shared/bench/README.md`` and ``benchmarks/README.md``. Only this script reads it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import ListReader, cpu_info, current_rss_mb, escape_cell, peak_rss_mb, spawn_in_child  # noqa: E402
from harness import write_report  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BENCH_DIR = REPO_ROOT.parent / "shared" / "bench"
MODEL_NAMES = ("effnet_lite0", "minilm_l6", "ppocrv4_det")
THREADS = 2
WARMUP_RUNS = 5

Feed = dict[str, np.ndarray]


# --------------------------------------------------------------------------------------------
# Inputs: preprocessing exactly as described in the bench README
# --------------------------------------------------------------------------------------------

def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def image_files(bench_dir: Path, split: str, limit: int | None = None) -> list[Path]:
    """Images of ``images/<split>/`` in name order (deterministic sample selection)."""
    files = sorted(p for p in (bench_dir / "images" / split).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    return files[:limit] if limit is not None else files


def effnet_preprocess(path: Path) -> np.ndarray:
    """RGB, shorter side -> 256 (bilinear), center crop 224, x/255, (x-0.5)/0.5, NCHW float32."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        scale = 256 / min(w, h)
        nw, nh = max(256, _round_half_up(w * scale)), max(256, _round_half_up(h * scale))
        im = im.resize((nw, nh), Image.BILINEAR)
        left, top = _round_half_up((nw - 224) / 2), _round_half_up((nh - 224) / 2)
        im = im.crop((left, top, left + 224, top + 224))
        x = np.asarray(im, dtype=np.float32) / 255.0
    x = (x - 0.5) / 0.5
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


PPOCR_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
PPOCR_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def ppocr_size(w: int, h: int, longer: int = 320) -> tuple[int, int]:
    """Longer side -> ``longer``, each side rounded to the nearest multiple of 32 (min 32)."""
    scale = longer / max(w, h)
    return (max(32, _round_half_up(w * scale / 32) * 32), max(32, _round_half_up(h * scale / 32) * 32))


def ppocr_preprocess(path: Path) -> np.ndarray:
    """RGB, resize to multiples of 32 with longer side 320 (bilinear), (x/255-mean)/std, NCHW float32."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        im = im.resize(ppocr_size(*im.size), Image.BILINEAR)
        x = np.asarray(im, dtype=np.float32) / 255.0
    x = (x - PPOCR_MEAN) / PPOCR_STD
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None].astype(np.float32))


def load_npz_feed(path: Path) -> Feed:
    with np.load(path, allow_pickle=False) as z:
        return {k: np.asarray(z[k]) for k in z.files}


def minilm_files(bench_dir: Path, split: str) -> list[Path]:
    return sorted((bench_dir / "text" / "minilm" / split).glob("*.npz"))


def calibration_feeds(model: str, bench_dir: Path, count: int) -> list[Feed]:
    """The first ``count`` calibration samples of ``model``, one feed dict (batch 1) each."""
    if model == "effnet_lite0":
        return [{"input": effnet_preprocess(p)} for p in image_files(bench_dir, "calib", count)]
    if model == "ppocrv4_det":
        return [{"x": ppocr_preprocess(p)} for p in image_files(bench_dir, "calib", count)]
    if model == "minilm_l6":
        return [load_npz_feed(p) for p in minilm_files(bench_dir, "calib")[:count]]
    raise ValueError(f"unknown model {model}")


# --------------------------------------------------------------------------------------------
# Compile / quantize jobs, each run in a fresh spawned child process
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Job:
    """One way of producing a quantized model: a row of a table."""

    slug: str  # output file name part
    label: str  # row label
    tool: str  # "qcompiler" or "ort"
    mode: str  # "static" or "dynamic"
    per_channel: bool = True  # ort only (static rows always per-channel)
    upgrade_opset: int | None = None  # ort only: onnx.version_converter first
    settings: str = ""  # printed under the table
    pipeline: str | None = None  # qcompiler only: a pipeline other than the target's default
    method: str | None = None  # qcompiler only: CalibrationOptions.method (None: the target's default)
    cache: str = ""  # qcompiler only: "cold" (CalibrationOptions.cache=<work>/<model>.cache, emptied first) | "warm" (as left)
    accuracy: str | None = None  # qcompiler only: compile(accuracy=...) (None: the target's default budget)

    @property
    def needs_calibration(self) -> bool:
        return self.mode == "static"


QC_STATIC = Job("qcompiler-static", "qcompiler (static)", "qcompiler", "static",
                settings='`qcompiler.compile(model, target="ort-cpu", calibration=<feed dicts>)`')
QC_MINMAX = Job("qcompiler-minmax", "qcompiler (static, minmax)", "qcompiler", "static", method="minmax",
                accuracy="off",
                settings='`qcompiler.compile(model, target="ort-cpu", calibration=<feed dicts>, '
                         'calibration_options=CalibrationOptions(method="minmax"), accuracy="off")`: the calibration '
                         'method of ort static and no accuracy-budget search (the work quantize_static does; the '
                         'held-out fidelity section is included), no cache (the default): the compile-time ratio')
QC_MINMAX_FILL = Job("qcompiler-minmax-fill", "qcompiler (static, minmax, filling a cache)", "qcompiler", "static",
                     method="minmax", cache="cold", accuracy="off",
                     settings="as qcompiler (static, minmax) with `CalibrationOptions(cache=<empty dir>)`: the first "
                              "build of the cached-rebuild ratio (it also writes the cache)")
QC_MINMAX_CACHED = Job("qcompiler-minmax-cached", "qcompiler (static, minmax, cached rebuild)", "qcompiler", "static",
                       method="minmax", cache="warm", accuracy="off",
                       settings="as qcompiler (static, minmax, filling a cache), again, with the cache it filled")
QC_DYNAMIC_MAXK = Job("qcompiler-dynamic-maxk", "qcompiler (dynamic, max-k=1024)", "qcompiler", "dynamic",
                      pipeline="upgrade-opset,canonicalize,fold-constants,infer-shapes,"
                               "quantize-dynamic{max-k=1024},cleanup-qdq",
                      settings="as qcompiler (dynamic) with `quantize-dynamic{max-k=1024}`: the FFN "
                               "down-projections (1536 inputs, post-GELU outliers) stay float")
QC_DYNAMIC = Job("qcompiler-dynamic", "qcompiler (dynamic)", "qcompiler", "dynamic",
                 settings='`qcompiler.compile(model, target="ort-cpu", mode="dynamic")`')
ORT_STATIC = Job("ort-static", "ort static", "ort", "static",
                 settings="`quant_pre_process`, then `quantize_static(quant_format=QDQ, per_channel=True, "
                          "calibrate_method=MinMax, activation_type=QUInt8, weight_type=QInt8, reduce_range=False)`")
ORT_STATIC_OP13 = Job("ort-static-op13", "ort static, opset 13 first", "ort", "static", upgrade_opset=13,
                      settings="`onnx.version_converter.convert_version(model, 13)` first (per-channel "
                               "DequantizeLinear needs opset 13; qcompiler's ort-cpu pipeline upgrades too), "
                               "then as ort static")
ORT_DYNAMIC = Job("ort-dynamic", "ort dynamic", "ort", "dynamic", per_channel=False,
                  settings="`quant_pre_process`, then `quantize_dynamic(weight_type=QInt8)`, other settings default")
ORT_DYNAMIC_PC = Job("ort-dynamic-pc", "ort dynamic, per-channel", "ort", "dynamic", per_channel=True,
                     settings="as ort dynamic plus `per_channel=True` (the configuration of the bench README's "
                              "minilm baseline)")


def _job_imports(job: Job) -> None:
    """Import what a job needs before the 'RSS before compile' reading, so Δ excludes imports."""
    if job.tool == "qcompiler":
        import qcompiler  # noqa: F401
        import qcompiler.passes  # noqa: F401
    else:
        import onnxruntime.quantization  # noqa: F401
        import onnxruntime.quantization.shape_inference  # noqa: F401


def cache_dir(out_path: Path, model: str) -> Path:
    """Where a job with ``cache=True`` keeps its build cache: next to the outputs, per model."""
    return out_path.parent / f"{model}.cache"


def _run_qcompiler(job: Job, model_path: Path, out_path: Path, feeds: list[Feed] | None) -> dict[str, Any]:
    import qcompiler

    calib = qcompiler.CalibrationOptions(method=job.method or "",
                                         cache=str(cache_dir(out_path, model_path.stem)) if job.cache else "")
    result = qcompiler.compile(str(model_path), target="ort-cpu", calibration=feeds, mode=job.mode,
                               pipeline=job.pipeline, accuracy=job.accuracy, calibration_options=calib)
    result.save(out_path)
    cal = result.report.get("calibration", {})
    return {"note": "", "model_runs": cal.get("model_runs"), "cache": cal.get("cache"),
            "weight_rounding": result.report.get("weight_rounding"),
            "build_cache": (result.report.get("build_cache") or {}).get("status")}


def _run_ort(job: Job, model_path: Path, out_path: Path, feeds: list[Feed] | None) -> dict[str, Any]:
    """[onnx.version_converter,] quant_pre_process, then quantize_static / quantize_dynamic;
    returns a note for the table ('' if none) and the seconds of the quantize call alone."""
    import importlib.util

    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # ORT's symbolic shape inference needs sympy (`pip install -e .[bench]` installs it) and fails on
    # some models; then the pre-processing runs without that step (what ORT's error message
    # suggests) and the row says so.
    note = ""
    skip_symbolic = importlib.util.find_spec("sympy") is None
    if skip_symbolic:
        note = "sympy missing: quant_pre_process(skip_symbolic_shape=True)"
    with tempfile.TemporaryDirectory(prefix="ortq.", dir=out_path.parent) as tmp:
        if job.upgrade_opset is not None:
            import onnx.version_converter

            upgraded = Path(tmp) / "upgraded.onnx"
            onnx.save(onnx.version_converter.convert_version(onnx.load(str(model_path)), job.upgrade_opset),
                      str(upgraded))
            model_path = upgraded
        pre = Path(tmp) / "preprocessed.onnx"
        pre_start = time.perf_counter()
        try:
            quant_pre_process(str(model_path), str(pre), skip_symbolic_shape=skip_symbolic)
        except Exception as exc:
            if skip_symbolic:
                raise
            note = f"quant_pre_process failed ({type(exc).__name__}: {exc}); reran with skip_symbolic_shape=True"
            quant_pre_process(str(model_path), str(pre), skip_symbolic_shape=True)
        quantize_start, quantize_cpu = time.perf_counter(), time.process_time()
        note_pre = f"quant_pre_process {quantize_start - pre_start:.1f} s"
        if job.mode == "static":
            assert feeds is not None
            quantize_static(str(pre), str(out_path), ListReader(feeds), quant_format=QuantFormat.QDQ,
                            per_channel=True, reduce_range=False, calibrate_method=CalibrationMethod.MinMax,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        else:
            quantize_dynamic(str(pre), str(out_path), weight_type=QuantType.QInt8, per_channel=job.per_channel)
        quantize_s, quantize_cpu_s = time.perf_counter() - quantize_start, time.process_time() - quantize_cpu
    return {"note": "; ".join(t for t in (note, note_pre) if t), "quantize_s": quantize_s, "quantize_cpu_s": quantize_cpu_s}


def _child_entry(conn: Connection, job: Job | None, model: str, model_path: str, out_path: str, bench_dir: str,
                 calib: int, scratch: str) -> None:
    """Child process body: load calibration, import, then time only the compile call(s).
    ``job=None`` only imports both tools (the idle baseline). Runs in ``scratch`` as its working
    directory: ORT's symbolic shape inference leaves ~90 MB temporary files in the current
    directory when it fails, and they must not land in the repository."""
    result: dict[str, Any]
    try:
        os.chdir(scratch)
        if job is None:
            import qcompiler  # noqa: F401
            import onnxruntime.quantization  # noqa: F401
            result = {"ok": True, "seconds": 0.0, "rss_before_mb": current_rss_mb()}
        else:
            feeds = calibration_feeds(model, Path(bench_dir), calib) if job.needs_calibration else None
            _job_imports(job)
            rss_before = current_rss_mb()
            start, cpu_start = time.perf_counter(), time.process_time()
            runner = _run_qcompiler if job.tool == "qcompiler" else _run_ort
            extra = runner(job, Path(model_path), Path(out_path), feeds)
            result = {"ok": True, "seconds": time.perf_counter() - start, "cpu_s": time.process_time() - cpu_start,
                      "rss_before_mb": rss_before, **extra}
    except BaseException as exc:  # report every failure as a table row, never abort the run
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    result["peak_rss_mb"] = peak_rss_mb()
    conn.send(result)
    conn.close()


def run_job(job: Job | None, model: str, model_path: Path, out_path: Path, bench_dir: Path, calib: int,
            timeout: float) -> dict[str, Any]:
    """Run one compile job in a fresh child (:func:`spawn_in_child`); its result dict."""
    result = spawn_in_child(_child_entry, (job, model, str(model_path), str(out_path), str(bench_dir), calib),
                            out_path, timeout)
    if result["ok"] and job is not None and not out_path.exists():
        result = {**result, "ok": False, "error": "job reported success but wrote no file"}
    return result


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------

@dataclass
class Variant:
    """One row of a table: a model file and everything measured about it."""

    label: str
    job: Job | None  # None for the fp32 original
    path: Path
    compile_s: float | None = None
    peak_rss_mb: float | None = None
    rss_delta_mb: float | None = None
    error: str | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # what the compile child reported besides time and RSS
    session: ort.InferenceSession | None = None
    latencies_ms: list[float] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def size_bytes(self) -> int | None:
        return self.path.stat().st_size if self.path.exists() else None

    @property
    def latency_ms(self) -> float | None:
        return statistics.median(self.latencies_ms) if self.latencies_ms else None

    def fail(self, stage: str, exc: BaseException | str) -> None:
        text = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
        self.error = f"{stage}: {text}" if self.error is None else self.error
        self.session = None


def session_options() -> ort.SessionOptions:
    """The one SessionOptions used for every variant."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return so


def select_feed(session: ort.InferenceSession, feed: Feed) -> Feed:
    """The subset of ``feed`` the session takes (a compiled model may drop an unused input)."""
    return {i.name: feed[i.name] for i in session.get_inputs()}


def measure_latency(variants: Sequence[Variant], feed: Feed, runs: int, rounds: int) -> None:
    """Round-robin timing: ``rounds`` rounds, each running every variant for one untimed run plus
    ``ceil(runs/rounds)`` timed runs, the variant order rotated per round so drift in machine
    load falls on all variants alike. Fills ``latencies_ms`` (>= ``runs`` per variant)."""
    live = [v for v in variants if v.session is not None]
    feeds = {v.label: select_feed(v.session, feed) for v in live}  # type: ignore[arg-type]
    for v in live:
        try:
            for _ in range(WARMUP_RUNS):
                v.session.run(None, feeds[v.label])  # type: ignore[union-attr]
        except Exception as exc:
            v.fail("run", exc)
    live = [v for v in live if v.session is not None]
    per_round = math.ceil(runs / rounds)
    for r in range(rounds):
        order = live[r % len(live):] + live[: r % len(live)] if live else []
        for v in order:
            sess, f = v.session, feeds[v.label]
            assert sess is not None
            sess.run(None, f)
            for _ in range(per_round):
                t0 = time.perf_counter_ns()
                sess.run(None, f)
                v.latencies_ms.append((time.perf_counter_ns() - t0) / 1e6)


def run_eval(variant: Variant, feeds: Sequence[Feed], output: str,
             post: Callable[[np.ndarray, Feed], np.ndarray]) -> list[np.ndarray] | None:
    """Outputs of one variant on the eval feeds, post-processed; None (and the error recorded) on failure."""
    if variant.session is None:
        return None
    try:
        return [post(variant.session.run([output], select_feed(variant.session, f))[0], f) for f in feeds]
    except Exception as exc:
        variant.fail("eval", exc)
        return None


# --------------------------------------------------------------------------------------------
# Fidelity metrics (reference = fp32 outputs on the same inputs)
# --------------------------------------------------------------------------------------------

def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of matching rows of two [N, ...] arrays (float64); two all-zero rows count as 1."""
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    num = (a * b).sum(axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    both_zero = ~a.any(axis=1) & ~b.any(axis=1)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.where(both_zero, 1.0, 0.0))


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def effnet_metrics(ref: list[np.ndarray], out: list[np.ndarray], _ctx: Any) -> dict[str, float]:
    """Top-1 agreement with fp32 (all images, and images where fp32's top-1 probability >= 0.5),
    and mean cosine of the logits."""
    r, q = np.stack(ref), np.stack(out)
    agree = r.argmax(axis=1) == q.argmax(axis=1)
    confident = softmax(r).max(axis=1) >= 0.5
    return {
        "top1": float(agree.mean()),
        "top1_conf": float(agree[confident].mean()) if confident.any() else float("nan"),
        "n_conf": float(confident.sum()),
        "cos": float(cosine_rows(r, q).mean()),
    }


def minilm_embed(hidden: np.ndarray, feed: Feed) -> np.ndarray:
    """Mean of ``last_hidden_state`` over the attention mask, L2-normalized: [384]."""
    mask = feed["attention_mask"].astype(np.float64)[0][:, None]
    pooled = (hidden[0].astype(np.float64) * mask).sum(axis=0) / max(mask.sum(), 1e-9)
    return pooled / max(np.linalg.norm(pooled), 1e-12)


@dataclass(frozen=True)
class Pairs:
    """Retrieval pairs as positions into the list of eval feeds."""

    query: np.ndarray
    doc: np.ndarray


def recall_at_1(emb: np.ndarray, pairs: Pairs) -> float:
    """Fraction of queries whose most cosine-similar doc (among all pair docs) is their own."""
    sims = emb[pairs.query] @ emb[pairs.doc].T  # embeddings are unit length
    return float((sims.argmax(axis=1) == np.arange(len(pairs.query))).mean())


def minilm_metrics(ref: list[np.ndarray], out: list[np.ndarray], pairs: Pairs) -> dict[str, float]:
    r, q = np.stack(ref), np.stack(out)
    return {"cos": float(cosine_rows(r, q).mean()), "recall1": recall_at_1(q, pairs)}


PPOCR_TEXT_THRESHOLD = 0.3  # DB post-processing's default binarization threshold


def ppocr_metrics(ref: list[np.ndarray], out: list[np.ndarray], _ctx: Any) -> dict[str, float]:
    """SQNR over all eval outputs together; mean per-image cosine over the images where fp32
    finds text (map max >= 0.3: on the others the map is ~0 everywhere and cosine is noise);
    IoU of the binarized (>= 0.3) text masks over all images together."""
    sig = sum(float(np.square(r.astype(np.float64)).sum()) for r in ref)
    err = sum(float(np.square(r.astype(np.float64) - q.astype(np.float64)).sum()) for r, q in zip(ref, out))
    sqnr = float("inf") if err == 0 else (float("-inf") if sig == 0 else 10 * math.log10(sig / err))
    text = [i for i, r in enumerate(ref) if r.max() >= PPOCR_TEXT_THRESHOLD]
    cos = float(np.mean([cosine_rows(ref[i][None], out[i][None])[0] for i in text])) if text else float("nan")
    inter = sum(int(((r >= PPOCR_TEXT_THRESHOLD) & (q >= PPOCR_TEXT_THRESHOLD)).sum()) for r, q in zip(ref, out))
    union = sum(int(((r >= PPOCR_TEXT_THRESHOLD) | (q >= PPOCR_TEXT_THRESHOLD)).sum()) for r, q in zip(ref, out))
    return {"sqnr": sqnr, "cos": cos, "n_text": float(len(text)), "iou": inter / union if union else float("nan")}


# --------------------------------------------------------------------------------------------
# Per-model setup
# --------------------------------------------------------------------------------------------

@dataclass
class EvalSet:
    """Evaluation inputs of one model, the latency input and what the metrics need."""

    feeds: list[Feed]
    latency_feed: Feed
    latency_desc: str
    desc: str
    context: Any = None


def _shape(arr: np.ndarray) -> str:
    return "x".join(str(d) for d in arr.shape)


def effnet_eval(bench_dir: Path, limit: int | None) -> EvalSet:
    files = image_files(bench_dir, "eval", limit)
    feeds = [{"input": effnet_preprocess(p)} for p in files]
    return EvalSet(feeds, feeds[0], f"eval image {files[0].name}, input {_shape(feeds[0]['input'])}",
                   f"{len(feeds)} eval images")


def minilm_eval(bench_dir: Path, limit: int | None) -> EvalSet:
    """The eval samples used by the first ``limit`` retrieval pairs (all 300 pairs: all 600 samples)."""
    pairs = json.loads((bench_dir / "text" / "minilm" / "eval_pairs.json").read_text())
    query, doc = pairs["query_idx"][:limit], pairs["doc_idx"][:limit]
    used = sorted(set(query) | set(doc))
    pos = {idx: i for i, idx in enumerate(used)}
    files = minilm_files(bench_dir, "eval")
    feeds = [load_npz_feed(files[i]) for i in used]
    longest = max(range(len(feeds)), key=lambda i: feeds[i]["input_ids"].shape[1])
    seq = feeds[longest]["input_ids"].shape[1]
    return EvalSet(feeds, feeds[longest], f"longest eval sample {files[used[longest]].name}, seq {seq}",
                   f"{len(feeds)} eval samples, {len(query)} query->doc pairs",
                   Pairs(np.array([pos[i] for i in query]), np.array([pos[i] for i in doc])))


def ppocr_eval(bench_dir: Path, limit: int | None) -> EvalSet:
    files = image_files(bench_dir, "eval", limit)
    feeds = [{"x": ppocr_preprocess(p)} for p in files]
    return EvalSet(feeds, feeds[0], f"eval image {files[0].name}, input {_shape(feeds[0]['x'])}",
                   f"{len(feeds)} eval images (longer side 320, sides multiples of 32); map cos over the images "
                   f"where fp32's map reaches {PPOCR_TEXT_THRESHOLD} (elsewhere it is ~0 and cosine is noise)")


@dataclass(frozen=True)
class Column:
    key: str
    header: str
    fmt: str


@dataclass(frozen=True)
class ModelSpec:
    """What differs between models: inputs, post-processing, metrics, variants, columns."""

    name: str
    load_eval: Callable[[Path, int | None], EvalSet]
    post: Callable[[np.ndarray, Feed], np.ndarray]
    metrics: Callable[[list[np.ndarray], list[np.ndarray], Any], dict[str, float]]
    columns: tuple[Column, ...]
    jobs: tuple[Job, ...]
    calib_desc: str


def _first(out: np.ndarray, _feed: Feed) -> np.ndarray:
    return out[0]


SPECS: dict[str, ModelSpec] = {
    "effnet_lite0": ModelSpec(
        "effnet_lite0", effnet_eval, _first, effnet_metrics,
        (Column("top1", "top-1 agree", ".3f"), Column("top1_conf", "top-1 agree (fp32 p>=0.5)", ".3f"),
         Column("cos", "logits cos", ".4f")),
        (QC_STATIC, QC_MINMAX, QC_MINMAX_FILL, QC_MINMAX_CACHED, ORT_STATIC, ORT_DYNAMIC),
        "first {n} images of images/calib (same preprocessing)"),
    "minilm_l6": ModelSpec(
        "minilm_l6", minilm_eval, minilm_embed, minilm_metrics,
        (Column("cos", "embedding cos", ".4f"), Column("recall1", "recall@1", ".3f")),
        (QC_MINMAX, QC_MINMAX_FILL, QC_MINMAX_CACHED, QC_DYNAMIC, QC_DYNAMIC_MAXK, ORT_STATIC, ORT_DYNAMIC, ORT_DYNAMIC_PC),
        "first {n} files of text/minilm/calib (one variable-length sample each)"),
    "ppocrv4_det": ModelSpec(
        "ppocrv4_det", ppocr_eval, _first, ppocr_metrics,
        (Column("sqnr", "SQNR dB", ".2f"), Column("cos", "map cos (text images)", ".4f"),
         Column("iou", "text mask IoU @0.3", ".3f")),
        (QC_STATIC, QC_MINMAX, QC_MINMAX_FILL, QC_MINMAX_CACHED, ORT_STATIC, ORT_STATIC_OP13, ORT_DYNAMIC),
        "first {n} images of images/calib (same preprocessing)"),
}


# --------------------------------------------------------------------------------------------
# One model, end to end
# --------------------------------------------------------------------------------------------

def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def build_variants(spec: ModelSpec, model_path: Path, args: argparse.Namespace, work: Path) -> list[Variant]:
    """fp32 plus one variant per compile job; each job runs in its own child process,
    ``--compile-runs`` times (in rounds over all jobs, so load changes fall on every row alike);
    ``compile s`` is the median."""
    variants = [Variant("fp32", None, model_path)]
    results: dict[str, list[dict[str, Any]]] = {job.slug: [] for job in spec.jobs}
    for r in range(args.compile_runs):
        for job in spec.jobs:
            out = work / f"{spec.name}.{job.slug}.onnx"
            out.unlink(missing_ok=True)
            if job.cache == "cold":
                shutil.rmtree(cache_dir(out, spec.name), ignore_errors=True)
            log(f"{spec.name}: {job.label} ({r + 1}/{args.compile_runs}) ...")
            res = run_job(job, spec.name, model_path, out, args.bench_dir, args.calib, args.timeout)
            if res["ok"]:
                log(f"{spec.name}: {job.label} done in {res['seconds']:.1f} s, peak RSS {res['peak_rss_mb']:.0f} MB")
            results[job.slug].append(res)
    for job in spec.jobs:
        out = work / f"{spec.name}.{job.slug}.onnx"
        label = job.label
        failed = [res for res in results[job.slug] if not res["ok"]]
        res = failed[0] if failed else results[job.slug][-1]
        v = Variant(label, job, out, peak_rss_mb=res.get("peak_rss_mb"))
        if res["ok"]:
            v.compile_s = statistics.median(x["seconds"] for x in results[job.slug])
            v.rss_delta_mb = res["peak_rss_mb"] - res["rss_before_mb"]
            v.note = res.get("note", "")
            v.extra = {k: res[k] for k in ("model_runs", "cache", "weight_rounding", "build_cache") if k in res}
            for k in ("quantize_s", "cpu_s", "quantize_cpu_s"):
                if k in res:
                    v.extra[k] = statistics.median(x[k] for x in results[job.slug])
        else:
            v.fail("compile", res["error"])
            log(f"{spec.name}: {label} FAILED: {res['error']}")
            if args.verbose and "traceback" in res:
                print(res["traceback"], file=sys.stderr)
        variants.append(v)
    return variants


def bench_model(spec: ModelSpec, args: argparse.Namespace, work: Path) -> str:
    """Build, time and evaluate all variants of one model; returns its markdown section."""
    model_path = args.bench_dir / "models" / f"{spec.name}.onnx"
    variants = build_variants(spec, model_path, args, work)
    if args.compile_only:
        return render_model(spec, variants, None, args)
    for v in variants:
        if v.error is None:
            try:
                v.session = ort.InferenceSession(str(v.path), session_options(), providers=["CPUExecutionProvider"])
            except Exception as exc:
                v.fail("load", exc)
    evalset = spec.load_eval(args.bench_dir, args.eval_limit)
    fp32 = variants[0]
    if fp32.session is None:
        raise SystemExit(f"{model_path}: the fp32 model does not load: {fp32.error}")
    output = fp32.session.get_outputs()[0].name
    log(f"{spec.name}: latency ({args.runs} runs, {args.rounds} rounds) ...")
    measure_latency(variants, evalset.latency_feed, args.runs, args.rounds)
    log(f"{spec.name}: fidelity on {evalset.desc} ...")
    ref = run_eval(fp32, evalset.feeds, output, spec.post)
    assert ref is not None, fp32.error
    for v in variants:
        out = ref if v is fp32 else run_eval(v, evalset.feeds, output, spec.post)
        if out is not None:
            v.metrics = spec.metrics(ref, out, evalset.context)
    for v in variants:
        v.session = None  # free memory before the next model
    return render_model(spec, variants, evalset, args)


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------

def _cell(value: float | None, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return format(value, fmt)


def render_model(spec: ModelSpec, variants: list[Variant], evalset: EvalSet | None, args: argparse.Namespace) -> str:
    fp32 = variants[0]
    headers = (["variant", "latency ms (median)", "vs fp32"] + [c.header for c in spec.columns]
               + ["size MB", "size vs fp32", "compile s", "compile peak RSS MB (Δ)", "notes"])
    lines = [f"### {spec.name}", "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for v in variants:
        lat, ref_lat = v.latency_ms, fp32.latency_ms
        size, ref_size = v.size_bytes, fp32.size_bytes
        rss = "-" if v.peak_rss_mb is None else (
            f"{v.peak_rss_mb:.0f}" + (f" (+{v.rss_delta_mb:.0f})" if v.rss_delta_mb is not None else ""))
        notes = "; ".join(escape_cell(t) for t in (v.note, v.error or "") if t)
        if v is fp32 and "n_conf" in v.metrics:
            notes = f"{int(v.metrics['n_conf'])} of {len(evalset.feeds)} images have fp32 top-1 p>=0.5"
        if v is fp32 and "n_text" in v.metrics:
            notes = f"{int(v.metrics['n_text'])} of {len(evalset.feeds)} images have text (fp32 map max >= 0.3)"
        row = [v.label, _cell(lat, ".2f"),
               _cell(lat / ref_lat, ".2f") + "x" if lat and ref_lat else "-"]
        row += [_cell(v.metrics.get(c.key), c.fmt) for c in spec.columns]
        row += [_cell(size / 1e6, ".2f") if size is not None else "-",
                _cell(size / ref_size, ".3f") + "x" if size and ref_size else "-",
                _cell(v.compile_s, ".1f"), rss, notes]
        lines.append("| " + " | ".join(row) + " |")
    measured = ([f"- latency input: {evalset.latency_desc}; {len(fp32.latencies_ms)} timed runs per variant",
                 f"- fidelity: {evalset.desc}; fp32 row = fp32 vs itself (metric sanity check)"]
                if evalset is not None else ["- `--compile-only`: no latency, no fidelity"])
    lines += [
        "",
        *measured,
        f"- compile s: median of {args.compile_runs} compile(s) per variant",
        f"- calibration (static rows): {spec.calib_desc.format(n=args.calib)}",
        *[f"- {v.job.label}: {v.job.settings}" for v in variants if v.job is not None],
        *compile_summary(variants),
        "",
    ]
    return "\n".join(lines)


def compile_summary(variants: list[Variant]) -> list[str]:
    """The compile-time ratios of issue 13: qcompiler vs onnxruntime's quantize_static with the
    same calibration method (MinMax), ORT timed with its quant_pre_process (the preparation ORT
    documents for quantize_static; qcompiler's pipeline does its own) and without it; and the
    cached rebuild vs the first build, with whether their outputs are byte-identical."""
    by_slug = {v.job.slug: v for v in variants if v.job is not None}
    qc, ort_v, warm = by_slug.get("qcompiler-minmax"), by_slug.get("ort-static"), by_slug.get("qcompiler-minmax-cached")
    fill = by_slug.get("qcompiler-minmax-fill")
    lines = []
    if qc and ort_v and qc.compile_s and ort_v.compile_s:
        q_only = ort_v.extra.get("quantize_s")
        lines.append(f"- **compile time, same calibration method (MinMax): qcompiler {qc.compile_s:.1f} s / "
                     f"onnxruntime {ort_v.compile_s:.1f} s (quant_pre_process + quantize_static) = "
                     f"{qc.compile_s / ort_v.compile_s:.2f}x**"
                     + (f" ({qc.compile_s / q_only:.2f}x of quantize_static alone, {q_only:.1f} s)" if q_only else "")
                     + f"; CPU time (all threads) {qc.extra['cpu_s']:.1f} s / {ort_v.extra['cpu_s']:.1f} s = "
                       f"{qc.extra['cpu_s'] / ort_v.extra['cpu_s']:.2f}x"
                     + (f" ({qc.extra['cpu_s'] / ort_v.extra['quantize_cpu_s']:.2f}x of quantize_static alone)"
                        if ort_v.extra.get("quantize_cpu_s") else ""))
    if fill and warm and fill.compile_s and warm.compile_s:
        same = all(v.path.exists() for v in (fill, warm) if v) and fill.path.read_bytes() == warm.path.read_bytes()
        same = same and (qc is None or not qc.path.exists() or qc.path.read_bytes() == warm.path.read_bytes())
        lines.append(f"- **cached rebuild: {warm.compile_s:.1f} s, {fill.compile_s / warm.compile_s:.1f}x faster than "
                     f"the first build** ({fill.compile_s:.1f} s, filling the cache; CPU time {warm.extra['cpu_s']:.2f} s "
                     f"vs {fill.extra['cpu_s']:.1f} s: {fill.extra['cpu_s'] / warm.extra['cpu_s']:.1f}x); outputs "
                     f"byte-identical (no cache, cache filled, cached): {'yes' if same else 'NO'}; "
                     f"whole-build cache: {warm.extra.get('build_cache')}")
    return lines


def header(args: argparse.Namespace, idle_rss: float | None) -> str:
    import qcompiler

    model_name, flags = cpu_info()
    flag_text = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in flags.items())
    cmd = shlex.join([Path(sys.executable).name, *sys.argv])
    per_round = math.ceil(args.runs / args.rounds)
    return "\n".join([
        "## Benchmark results",
        "",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- command: `{cmd}`",
        f"- machine: `{platform.processor() or platform.machine()}` ({model_name}), {os.cpu_count()} cores; "
        f"{flag_text}",
        f"- versions: python {platform.python_version()}, onnxruntime {ort.__version__}, onnx {onnx.__version__}, "
        f"numpy {np.__version__}, qcompiler {qcompiler.__version__}",
        f"- latency: ORT CPU EP, `intra_op_num_threads={THREADS}`, `inter_op_num_threads=1`, sequential, "
        "ORT_ENABLE_ALL, batch 1, the same SessionOptions for every row; "
        f"{WARMUP_RUNS} warm-up runs per session, then {args.rounds} round-robin rounds (order rotated each round) "
        f"of 1 untimed + {per_round} timed runs per variant; median of all timed runs; "
        "`vs fp32` = variant median / fp32 median from this run",
        "- compile: every compile/quantize runs in a fresh `spawn` child process; `compile s` = wall time of the "
        "compile call(s) only (calibration loading excluded; ORT rows include `quant_pre_process`); peak RSS = "
        "the child's `ru_maxrss` (interpreter + imports + calibration data + compile), Δ = peak minus the child's "
        "RSS just before the compile call"
        + (f"; an idle child (imports only) has {idle_rss:.0f} MB" if idle_rss is not None else ""),
        "",
    ])


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--bench-dir", type=Path, default=DEFAULT_BENCH_DIR, help="benchmark material (read-only)")
    p.add_argument("--models", default=",".join(MODEL_NAMES), help="comma-separated subset of " + ", ".join(MODEL_NAMES))
    p.add_argument("--runs", type=int, default=30, help="timed runs per variant (at least)")
    p.add_argument("--rounds", type=int, default=5, help="round-robin rounds the timed runs are split into")
    p.add_argument("--calib", type=int, default=64, help="calibration samples for the static rows")
    p.add_argument("--eval-limit", type=int, default=None,
                   help="use only the first N eval images / N minilm query->doc pairs (None: all)")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "benchmarks.md",
                   help="markdown file; only the part between the bench markers is rewritten")
    p.add_argument("--work", type=Path, default=None,
                   help="keep the compiled models here (None: a temporary directory, removed at the end)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds allowed per compile job")
    p.add_argument("--compile-runs", type=int, default=1, help="compile each variant this often (median reported)")
    p.add_argument("--compile-only", action="store_true",
                   help="only compile (time, RSS, size, compile-time ratios): no latency, no fidelity")
    p.add_argument("-v", "--verbose", action="store_true", help="print child tracebacks of failed jobs")
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in args.models if m not in SPECS]
    if bad:
        p.error(f"--models: unknown {', '.join(bad)} (choose from {', '.join(MODEL_NAMES)})")
    if (args.runs < 1 or args.calib < 1 or args.rounds < 1 or args.compile_runs < 1
            or (args.eval_limit is not None and args.eval_limit < 1)):
        p.error("--runs, --rounds, --calib, --compile-runs and --eval-limit must be >= 1")
    args.rounds = min(args.rounds, args.runs)
    args.bench_dir = args.bench_dir.resolve()
    if not (args.bench_dir / "models").is_dir():
        p.error(f"--bench-dir {args.bench_dir}: no models/ directory there")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    work = args.work.resolve() if args.work else Path(tempfile.mkdtemp(prefix="qc-bench."))
    work.mkdir(parents=True, exist_ok=True)
    try:
        idle = run_job(None, "", Path(), work / "idle", args.bench_dir, 0, 300)
        idle_rss = idle.get("peak_rss_mb") if idle["ok"] else None
        sections = [header(args, idle_rss)]
        for name in args.models:
            section = bench_model(SPECS[name], args, work)
            print(section, flush=True)
            sections.append(section)
        write_report(args.out, "\n".join(sections))
        log(f"wrote {args.out}")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
