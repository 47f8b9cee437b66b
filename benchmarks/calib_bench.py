#!/usr/bin/env python
"""Calibration benchmark: qcompiler's calibration engine against onnxruntime's calibrators.

For each model (effnet_lite0, minilm_l6), each sample count (64, 256; the bench material's
samples repeated in name order when there are fewer) and each method, in the same run and on
the same samples:

* ``qcompiler``: ``qcompiler.compile(model, target="ort-cpu", calibration=<feeds>,
  calibration_options=CalibrationOptions(method=METHOD))`` (methods minmax, entropy,
  percentile, mse; ``minmax-ranges`` is minmax with ``statistics="ranges"``: only the ranges, the statistics onnxruntime's
  calibrator collects, without the bias-correction means and GPTQ moments of the default);
* ``ort``: ``quantize_static(<quant_pre_process'ed model>, QDQ, per_channel=True,
  activation_type=QUInt8, weight_type=QInt8, reduce_range=False,
  calibrate_method=MinMax|Entropy|Percentile)`` (ORT has no mse; that row has no ORT side).

Each quantization runs in a fresh ``spawn`` child process: its wall time covers only the
compile / quantize_static call (``quant_pre_process`` runs once per model beforehand, outside
the timing, and the samples are loaded before the clock starts); the calibration time is
qcompiler's ``calibrate`` pass (its report) against ORT's calibrator inside quantize_static
(create_calibrator + collect_data + compute_data, timed by wrapping it). Peak RSS is the
child's high-water mark during the call (reset just before it on Linux; what is already
resident, interpreter + imports + samples, counts). The unique samples
are loaded once per child and repeated by reference, so 256 samples cost no more sample
memory than 64. Fidelity of each int8 model vs fp32 uses ``benchmarks/bench.py``'s evaluation
(effnet: top-1 agreement and logits cosine on the eval images; minilm: embedding cosine and
recall@1). Results are printed and written between ``<!-- calib-bench:begin -->`` and
``<!-- calib-bench:end -->`` of ``--out``.

    python benchmarks/calib_bench.py                                   # everything (slow)
    python benchmarks/calib_bench.py --samples 8 --models effnet_lite0 --methods minmax --eval-limit 10
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench  # noqa: E402  (benchmarks/bench.py: preprocessing, evaluation, report helpers)
from harness import ListReader, cpu_info, escape_cell, reset_peak_rss, spawn_in_child, window_peak_rss_mb, write_report  # noqa: E402

REPO_ROOT = HERE.parent
DEFAULT_BENCH = REPO_ROOT.parent / "shared" / "bench"
MODELS = ("effnet_lite0", "minilm_l6")
METHODS = ("minmax", "minmax-ranges", "entropy", "percentile", "mse")
# "-ranges": qcompiler collecting only ranges (statistics="ranges": no bias-correction
# means, no GPTQ moments), i.e. the statistics onnxruntime's calibrator collects; its ORT side is
# the same calibrator's row (measured once per sample count)
ORT_METHODS = {"minmax": "MinMax", "minmax-ranges": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
BEGIN = "<!-- calib-bench:begin -->"
END = "<!-- calib-bench:end -->"
METRICS = {"effnet_lite0": (("top1", "top-1 agree", ".3f"), ("cos", "logits cos", ".4f")),
           "minilm_l6": (("cos", "emb cos", ".4f"), ("recall1", "recall@1", ".3f"))}


# --------------------------------------------------------------------------------------------
# Child process: one quantization
# --------------------------------------------------------------------------------------------

def load_feeds(model: str, bench_dir: Path, count: int) -> list[bench.Feed]:
    """``count`` samples: the bench calibration set in name order, repeated (by reference)."""
    unique = bench.calibration_feeds(model, bench_dir, count)
    return [unique[i % len(unique)] for i in range(count)]


def _qcompiler(model_path: Path, out_path: Path, feeds: list[bench.Feed], method: str) -> tuple[str, float | None]:
    import qcompiler

    statistics = "all"
    if method.endswith("-ranges"):
        method, statistics = method[:-len("-ranges")], "ranges"
    result = qcompiler.compile(str(model_path), target="ort-cpu", calibration=feeds,
                               calibration_options=qcompiler.CalibrationOptions(method=method, statistics=statistics))
    note = ""
    result.save(out_path)
    return note, result.report.get("calibration", {}).get("seconds")


def _ort(model_path: Path, out_path: Path, feeds: list[bench.Feed], method: str) -> tuple[str, float | None]:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    ort_quantize = sys.modules["onnxruntime.quantization.quantize"]  # the module (the package re-exports a function)

    # the calibrator's own time (create_calibrator + collect_data + compute_data, which is what
    # qcompiler's calibrate pass does), measured by wrapping the calibrator quantize_static uses
    spent = [0.0]
    real_create = ort_quantize.create_calibrator

    def timed(fn: Any) -> Any:
        def call(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[0] += time.perf_counter() - t
        return call

    def create(*a: Any, **k: Any) -> Any:
        cal = timed(real_create)(*a, **k)
        cal.collect_data, cal.compute_data = timed(cal.collect_data), timed(cal.compute_data)
        return cal

    ort_quantize.create_calibrator = create
    try:
        quantize_static(str(model_path), str(out_path), ListReader(feeds), quant_format=QuantFormat.QDQ,
                        per_channel=True, reduce_range=False, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=getattr(CalibrationMethod, ORT_METHODS[method]))
    finally:
        ort_quantize.create_calibrator = real_create
    return "", spent[0]


def _child(conn: Connection, tool: str, model: str, method: str, samples: int, model_path: str, out_path: str,
           bench_dir: str, scratch: str) -> None:
    result: dict[str, Any]
    try:
        os.chdir(scratch)  # ORT's calibrators write temporary files into the working directory
        feeds = load_feeds(model, Path(bench_dir), samples)
        if tool == "qcompiler":
            import qcompiler  # noqa: F401
            import qcompiler.passes  # noqa: F401
        else:
            import onnxruntime.quantization  # noqa: F401
        # the peak is taken over the call alone: loading minilm's bench samples (tokenizing the
        # text) peaks at ~0.7 GB by itself and hid every difference between the two tools
        windowed = reset_peak_rss()
        start = time.perf_counter()
        run = _qcompiler if tool == "qcompiler" else _ort
        note, calib_s = run(Path(model_path), Path(out_path), feeds, method)
        result = {"ok": True, "seconds": time.perf_counter() - start, "calib_seconds": calib_s, "note": note,
                  "rss_window": windowed}
    except BaseException as exc:  # every failure becomes a table cell, never aborts the run
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    result["peak_rss_mb"] = window_peak_rss_mb()
    conn.send(result)
    conn.close()


def run_child(tool: str, model: str, method: str, samples: int, model_path: Path, out_path: Path,
              bench_dir: Path, timeout: float) -> dict[str, Any]:
    """One quantization in a fresh spawned child (spawn_in_child); its result dict."""
    result = spawn_in_child(_child, (tool, model, method, samples, str(model_path), str(out_path),
                                           str(bench_dir)), out_path, timeout)
    if result["ok"] and not out_path.exists():
        result = {**result, "ok": False, "error": "reported success but wrote no model"}
    return result


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------

@dataclass
class Side:
    """One tool's result for one (model, samples, method) cell."""

    seconds: float | None = None
    calib_seconds: float | None = None  # qcompiler: the calibrate pass (report); ORT: its calibrator
    rss_mb: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    error: str = ""
    note: str = ""


@dataclass
class Row:
    samples: int
    method: str
    qc: Side
    ort: Side | None  # None: ORT has no such method


def log(msg: str) -> None:
    print(f"[calib-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def preprocess_for_ort(model: str, bench_dir: Path, work: Path) -> Path:
    """``quant_pre_process`` once per model (outside the timing), as ORT recommends; falls back
    to ``skip_symbolic_shape=True`` where symbolic shape inference fails (MiniLM)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, dst = bench_dir / "models" / f"{model}.onnx", work / f"{model}.pre.onnx"
    cwd = os.getcwd()
    os.chdir(work)  # failed symbolic shape inference leaves temporary files in the working directory
    try:
        quant_pre_process(str(src), str(dst))
    except Exception:
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
    finally:
        os.chdir(cwd)
    return dst


def evaluate(model: str, path: Path, evalset: bench.EvalSet, ref: list[Any], output: str) -> dict[str, float]:
    import onnxruntime as ort

    v = bench.Variant(path.name, None, path)
    v.session = ort.InferenceSession(str(path), bench.session_options(), providers=["CPUExecutionProvider"])
    spec = bench.SPECS[model]
    out = bench.run_eval(v, evalset.feeds, output, spec.post)
    if out is None:
        raise RuntimeError(v.error or "evaluation failed")
    return spec.metrics(ref, out, evalset.context)


def measure(tool: str, model: str, method: str, samples: int, src: Path, work: Path, args: argparse.Namespace,
            evalset: bench.EvalSet, ref: list[Any], output: str) -> Side:
    out = work / f"{model}.{tool}.{method}.{samples}.onnx"
    out.unlink(missing_ok=True)
    log(f"{model}: {tool} {method}, {samples} samples ...")
    res = run_child(tool, model, method, samples, src, out, args.bench, args.timeout)
    side = Side(rss_mb=res.get("peak_rss_mb"))
    if not res["ok"]:
        side.error = res["error"]
        log(f"{model}: {tool} {method} FAILED: {side.error}")
        if args.verbose and "traceback" in res:
            print(res["traceback"], file=sys.stderr)
        return side
    side.seconds, side.calib_seconds, side.note = res["seconds"], res.get("calib_seconds"), res.get("note", "")
    try:
        side.metrics = evaluate(model, out, evalset, ref, output)
    except Exception as exc:
        side.error = f"eval: {type(exc).__name__}: {exc}"
    log(f"{model}: {tool} {method} {side.seconds:.1f} s, peak RSS {side.rss_mb:.0f} MB, {side.metrics}")
    out.unlink(missing_ok=True)
    return side


def bench_model(model: str, args: argparse.Namespace, work: Path) -> list[Row]:
    import onnxruntime as ort

    src = args.bench / "models" / f"{model}.onnx"
    pre = preprocess_for_ort(model, args.bench, work) if any(m in ORT_METHODS for m in args.methods) else src
    spec = bench.SPECS[model]
    evalset = spec.load_eval(args.bench, args.eval_limit)
    fp32 = bench.Variant("fp32", None, src)
    fp32.session = ort.InferenceSession(str(src), bench.session_options(), providers=["CPUExecutionProvider"])
    output = fp32.session.get_outputs()[0].name
    ref = bench.run_eval(fp32, evalset.feeds, output, spec.post)
    assert ref is not None, fp32.error
    rows = []
    for n in args.samples:
        ort_sides: dict[str, Side] = {}  # one measurement per ORT calibrator and sample count
        for method in args.methods:
            qc = measure("qcompiler", model, method, n, src, work, args, evalset, ref, output)
            peer = ORT_METHODS.get(method)
            if peer is not None and peer not in ort_sides:
                ort_sides[peer] = measure("ort", model, method, n, pre, work, args, evalset, ref, output)
            rows.append(Row(n, method, qc, ort_sides.get(peer) if peer else None))
    return rows


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------

def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "-"


def render(model: str, rows: list[Row], args: argparse.Namespace) -> str:
    metrics = METRICS[model]
    headers = ["samples", "method", "qc calibrate s", "ORT calibrator s", "calibration time qc/ORT",
               "qc whole compile s", "ORT quantize_static s", "whole qc/ORT", "qc peak RSS MB", "ORT peak RSS MB",
               "RSS qc/ORT"]
    headers += [f"qc {h}" for _, h, _ in metrics] + [f"ORT {h}" for _, h, _ in metrics] + ["notes"]
    lines = [f"### {model}", "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        o = r.ort or Side()
        notes = []
        for who, side in (("qc", r.qc), ("ORT", r.ort)):
            if side is not None and (side.error or side.note):
                notes.append(f"{who}: " + escape_cell(side.error or side.note, 200))
        if r.ort is None:
            notes.append("ORT has no such method")
        cells = [str(r.samples), r.method, _num(r.qc.calib_seconds, ".2f"), _num(o.calib_seconds, ".2f"),
                 _ratio(r.qc.calib_seconds, o.calib_seconds), _num(r.qc.seconds, ".1f"), _num(o.seconds, ".1f"),
                 _ratio(r.qc.seconds, o.seconds), _num(r.qc.rss_mb, ".0f"),
                 _num(o.rss_mb, ".0f") + (" (failed)" if r.ort is not None and o.error and o.rss_mb else ""),
                 _ratio(r.qc.rss_mb, o.rss_mb if not o.error else None)]
        cells += [_num(r.qc.metrics.get(k), f) for k, _, f in metrics]
        cells += [_num(o.metrics.get(k), f) for k, _, f in metrics]
        cells.append("; ".join(notes))
        lines.append("| " + " | ".join(cells) + " |")
    evaluation = "eval images" if model == "effnet_lite0" else "eval query/doc pairs' samples"
    lines += ["", f"- fidelity vs fp32 on the {evaluation} (`--eval-limit {args.eval_limit or 'all'}`)", ""]
    return "\n".join(lines)


def header(args: argparse.Namespace) -> str:
    import numpy as np
    import onnx
    import onnxruntime as ort

    import qcompiler

    cpu, flags = cpu_info()
    return "\n".join([
        "## Calibration benchmark",
        "",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- command: `{shlex.join([Path(sys.executable).name, *sys.argv])}`",
        f"- machine: {cpu}, {os.cpu_count()} cores; " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in flags.items()),
        f"- versions: python {platform.python_version()}, onnxruntime {ort.__version__}, onnx {onnx.__version__}, "
        f"numpy {np.__version__}, qcompiler {qcompiler.__version__}",
        "- qcompiler: `qcompiler.compile(model, target=\"ort-cpu\", calibration=<feeds>, calibration_options=CalibrationOptions(method=M))`; "
        "ORT: `quantize_static(<quant_pre_process output>, QDQ, per_channel=True, QUInt8 activations, QInt8 "
        "weights, reduce_range=False, calibrate_method=M)` (ORT's default Percentile is 99.999, qcompiler's 99.99)",
        "- each quantization in a fresh `spawn` child. Calibration time: qcompiler's `calibrate` pass (from its "
        "report: data checks, model runs, statistics, ranges, GPTQ input moments, channel means) vs ORT's "
        "calibrator inside quantize_static (create_calibrator + collect_data + compute_data, timed by wrapping "
        "it); whole: the compile / quantize_static call. Peak RSS = the child's peak resident set during "
        "that call (its high-water mark reset just before it: the interpreter, imports and unique samples "
        "already resident count, the harness's own sample loading before the call does not); samples "
        "beyond the bench set's count "
        "repeat it in name order (by reference, no extra memory)",
        "",
    ])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--bench", type=Path, default=DEFAULT_BENCH, help="benchmark material (read-only)")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--samples", default="64,256", help="comma-separated calibration sample counts")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--eval-limit", type=int, default=None, help="first N eval images / minilm pairs (None: all)")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "benchmarks.md")
    p.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temporary one)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per quantization")
    p.add_argument("-v", "--verbose", action="store_true", help="print child tracebacks")
    a = p.parse_args(argv)
    a.models = [m.strip() for m in a.models.split(",") if m.strip()]
    a.methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    try:
        a.samples = [int(s) for s in a.samples.split(",") if s.strip()]
    except ValueError:
        p.error("--samples: comma-separated integers")
    if bad := [m for m in a.models if m not in MODELS]:
        p.error(f"--models: unknown {', '.join(bad)} (choose from {', '.join(MODELS)})")
    if bad := [m for m in a.methods if m not in METHODS]:
        p.error(f"--methods: unknown {', '.join(bad)} (choose from {', '.join(METHODS)})")
    if not a.samples or min(a.samples) < 1:
        p.error("--samples must be >= 1")
    a.bench = a.bench.resolve()
    if not (a.bench / "models").is_dir():
        p.error(f"--bench {a.bench}: no models/ directory there")
    return a


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    work = args.work.resolve() if args.work else Path(tempfile.mkdtemp(prefix="qc-calib-bench."))
    work.mkdir(parents=True, exist_ok=True)
    try:
        sections = [header(args)]
        for model in args.models:
            section = render(model, bench_model(model, args, work), args)
            print(section, flush=True)
            sections.append(section)
        write_report(args.out, "\n".join(sections), BEGIN, END)
        log(f"wrote {args.out}")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
