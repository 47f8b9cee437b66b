#!/usr/bin/env python
"""Every built-in target on real models: compile, check, simulate, and run in onnxruntime.

For each model (effnet_lite0, ppocrv4_det by default) and each built-in target
(``qcompiler targets``), this compiles the model with the bench's calibration images, runs the
legality checker (``qcompiler.check``, when present), simulates the output with the target's
integer arithmetic (``qcompiler.sim.simulate``) and, where onnxruntime loads the output, runs it
there too. Fidelity vs fp32 uses the metrics of ``benchmarks/bench.py`` (effnet: top-1 agreement
and logits cosine; PP-OCR: map SQNR and cosine). The table is printed and written to
``docs/benchmarks.md`` between ``<!-- targets-bench:begin -->`` and ``<!-- targets-bench:end -->``.

No latency is measured. Run on demand, e.g. a small check by hand::

    python benchmarks/targets_bench.py --calib 8 --eval-limit 3 --no-write
"""

from __future__ import annotations

import argparse
import datetime
import math
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (the benchmark's preprocessing and metrics, shared on purpose)
from harness import write_report  # noqa: E402

import qcompiler  # noqa: E402
from qcompiler.sim import simulate  # noqa: E402

BEGIN_MARKER = "<!-- targets-bench:begin -->"
END_MARKER = "<!-- targets-bench:end -->"
MODELS = ("effnet_lite0", "ppocrv4_det")


@dataclass
class Row:
    model: str
    target: str
    format: str = "-"
    compile_s: float | None = None
    check: str = "n/a"
    sim: dict[str, float] = field(default_factory=dict)
    sim_s: float | None = None
    ort: dict[str, float] | None = None
    sim_vs_ort: float | None = None
    error: str = ""


def _eval_feeds(model: str, bench_dir: Path, limit: int | None) -> list[dict[str, np.ndarray]]:
    if model == "effnet_lite0":
        return bench.effnet_eval(bench_dir, limit).feeds
    if model == "ppocrv4_det":
        return bench.ppocr_eval(bench_dir, limit).feeds
    raise SystemExit(f"targets_bench: unsupported model {model}")


def _metrics(model: str, ref: list[np.ndarray], out: list[np.ndarray]) -> dict[str, float]:
    if model == "effnet_lite0":
        return bench.effnet_metrics(ref, out, None)
    return bench.ppocr_metrics(ref, out, None)


def _ort_outputs(path: Path, feeds: list[dict[str, np.ndarray]], optimize: bool = True) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    if not optimize:  # the graph as written: onnxruntime's float-op rewrites change PP-OCR's map by ~0.1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = sess.get_outputs()[0].name
    return [sess.run([name], f)[0][0] for f in feeds]


def _check(path: Path, target: str) -> str:
    try:
        from qcompiler.check import check_model  # written in parallel; optional here
    except ImportError:
        return "n/a"
    try:
        result = check_model(str(path), target)
    except Exception as exc:  # noqa: BLE001 - report, keep benchmarking
        return f"error: {type(exc).__name__}"
    problems = getattr(result, "problems", result)  # CheckResult, or a plain list of problems
    return "pass" if not problems else f"{len(problems)} problems"


def run_one(model: str, target: str, args: argparse.Namespace, work: Path, calib: list[dict[str, np.ndarray]],
            feeds: list[dict[str, np.ndarray]], ref: list[np.ndarray]) -> Row:
    row = Row(model, target)
    src = args.bench / "models" / f"{model}.onnx"
    out = work / f"{model}.{target}.onnx"
    try:
        t0 = time.perf_counter()
        res = qcompiler.compile(str(src), target=target, calibration=calib, quiet=True)
        row.compile_s = time.perf_counter() - t0
        row.format = res.report.get("format", "-")
        res.save(out)
    except Exception as exc:  # noqa: BLE001
        row.error = f"compile: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        return row
    row.check = _check(out, target)
    try:
        t0 = time.perf_counter()
        sim = simulate(out, target, feeds)
        row.sim_s = (time.perf_counter() - t0) / max(1, len(feeds))
        name = onnx.load(str(out), load_external_data=False).graph.output[0].name
        sim_out = [np.asarray(o[name])[0].astype(np.float32) for o in sim.outputs]
        row.sim = _metrics(model, ref, sim_out)
    except Exception as exc:  # noqa: BLE001
        row.error = f"simulate: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        if args.verbose:
            traceback.print_exc()
        sim_out = None
    try:
        ort_out = _ort_outputs(out, feeds)
        row.ort = _metrics(model, ref, ort_out)
        if sim_out is not None:
            plain = _ort_outputs(out, feeds, optimize=False)
            row.sim_vs_ort = float(np.mean(bench.cosine_rows(np.stack(plain), np.stack(sim_out)))) \
                if model == "effnet_lite0" else max(float(np.abs(a - b).max()) for a, b in zip(plain, sim_out))
    except Exception as exc:  # noqa: BLE001 - e.g. a target onnxruntime can't run
        row.ort = None
        row.error = row.error or f"onnxruntime: {type(exc).__name__}"
    return row


def _f(v: float | None, fmt: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if math.isinf(v):
        return "inf"
    return format(v, fmt)


def render(rows: list[Row], args: argparse.Namespace, n_eval: dict[str, int]) -> str:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    lines = [f"### Targets: simulated vs onnxruntime fidelity ({stamp}, qcompiler {qcompiler.__version__}, "
             f"onnxruntime {ort.__version__})", "",
             f"`python benchmarks/targets_bench.py --calib {args.calib}"
             + (f" --eval-limit {args.eval_limit}" if args.eval_limit else "") + "`. "
             "Calibration: the first bench calibration images; fidelity vs fp32 on the eval images "
             f"({', '.join(f'{m}: {n}' for m, n in n_eval.items())}). *sim*: `qcompiler.simulate` with the "
             "target's integer arithmetic; *ORT*: onnxruntime CPU on the same file (`-` where it can't run it); "
             "*sim vs ORT*: effnet logits cosine / PP-OCR largest map difference between the simulator and "
             "onnxruntime with graph optimizations off (the graph as written).", "",
             "| model | target | format | check | sim fidelity | ORT fidelity | sim vs ORT | sim s/sample | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.model == "effnet_lite0":
            def fid(m: dict[str, float] | None) -> str:
                return "-" if not m else f"top-1 {_f(m.get('top1'), '.2f')}, cos {_f(m.get('cos'), '.4f')}"
            svo = _f(r.sim_vs_ort, ".5f")
        else:
            def fid(m: dict[str, float] | None) -> str:
                return "-" if not m else f"SQNR {_f(m.get('sqnr'), '.1f')} dB, cos {_f(m.get('cos'), '.4f')}"
            svo = "-" if r.sim_vs_ort is None else f"max diff {_f(r.sim_vs_ort, '.3g')}"
        note = r.error.replace("|", "\\|")
        lines.append(f"| {r.model} | {r.target} | {r.format} | {r.check} | {fid(r.sim)} | {fid(r.ort)} | {svo} | "
                     f"{_f(r.sim_s, '.1f')} | {note} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bench", type=Path, default=bench.DEFAULT_BENCH_DIR, help="benchmark material directory")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--targets", help="comma-separated targets (default: every built-in target)")
    p.add_argument("--calib", type=int, default=32, help="calibration images per model")
    p.add_argument("--eval-limit", type=int, default=None, help="use only the first N eval images")
    p.add_argument("--out", type=Path, default=bench.REPO_ROOT / "docs" / "benchmarks.md")
    p.add_argument("--no-write", action="store_true", help="print only")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    targets = args.targets.split(",") if args.targets else sorted(qcompiler.builtin_targets())
    rows: list[Row] = []
    n_eval: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="qc-targets-") as tmp:
        work = Path(tmp)
        for model in args.models.split(","):
            calib = bench.calibration_feeds(model, args.bench, args.calib)
            feeds = _eval_feeds(model, args.bench, args.eval_limit)
            n_eval[model] = len(feeds)
            ref = _ort_outputs(args.bench / "models" / f"{model}.onnx", feeds)
            for target in targets:
                print(f"[targets-bench] {model} / {target} ...", file=sys.stderr, flush=True)
                rows.append(run_one(model, target, args, work, calib, feeds, ref))
                print(render(rows[-1:], args, n_eval).splitlines()[-1], file=sys.stderr, flush=True)
    section = render(rows, args, n_eval)
    print(section)
    if not args.no_write:
        write_report(args.out, section, BEGIN_MARKER, END_MARKER)
    return 0


if __name__ == "__main__":
    sys.exit(main())
