"""Step 1: compile EfficientNet-Lite0 for onnxruntime's CPU kernels and see what it bought.

    python examples/01_compile_a_model/run.py [--out DIR] [--runs N] [--json PATH]

Compiles ``examples/data/effnet_lite0.onnx`` for the built-in ``ort-cpu`` target with the 32
bundled calibration images (Python API), saves ``DIR/effnet_lite0.int8.onnx`` and prints size,
latency (fp32 vs int8, same session options, interleaved) and fidelity on the 48 bundled eval
images. Works from any directory.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import effnet  # noqa: E402  (examples/effnet.py: bundled data + helpers)

import qcompiler  # noqa: E402


def latency_ms(paths: list[Path], x: np.ndarray, runs: int, warmup: int = 3) -> list[float]:
    """Median latency (ms) of each model at batch 1, measured interleaved so that machine load
    drifting during the measurement hits every model alike."""
    sessions = [effnet.session(p) for p in paths]
    feed = {effnet.INPUT: x}
    for sess in sessions:
        for _ in range(warmup):
            sess.run(None, feed)
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(runs):
        for sess, ts in zip(sessions, times):
            start = time.perf_counter()
            sess.run(None, feed)
            ts.append((time.perf_counter() - start) * 1e3)
    return [statistics.median(ts) for ts in times]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Compile EfficientNet-Lite0 for ort-cpu and compare with fp32.")
    ap.add_argument("--out", type=Path, default=HERE / "out", help="output directory (default: %(default)s)")
    ap.add_argument("--runs", type=int, default=30, help="timed runs per model (default: %(default)s)")
    ap.add_argument("--json", type=Path, metavar="PATH", help="also write the numbers as JSON here")
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error("--runs must be >= 1")
    args.out.mkdir(parents=True, exist_ok=True)
    out_path = args.out / "effnet_lite0.int8.onnx"

    # 1. compile: model path + target name + calibration samples (one feed dict per image)
    calib = effnet.images("calib")
    start = time.perf_counter()
    result = qcompiler.compile(effnet.MODEL, target="ort-cpu", calibration=effnet.calibration_feeds(calib))
    result.save(out_path)
    compile_s = time.perf_counter() - start

    # 2. size
    size_fp32 = effnet.MODEL.stat().st_size
    size_int8 = out_path.stat().st_size

    # 3. fidelity on the eval images the compiler never saw
    x_eval = effnet.images("eval")
    ref = effnet.logits(effnet.session(effnet.MODEL), x_eval)
    got = effnet.logits(effnet.session(out_path), x_eval)
    fid = effnet.fidelity(ref, got)

    # 4. latency, batch 1
    lat_fp32, lat_int8 = latency_ms([effnet.MODEL, out_path], x_eval[:1], args.runs)

    ops = result.report["ops_after"]
    integer = sum(n for op, n in ops.items() if op in qcompiler.INTEGER_OPS)
    float_nodes = [result.model.graph.find_node(name) for name in result.report["float_nodes"]]
    float_ops = sorted({n.op for n in float_nodes if n is not None})
    summary = {
        "model": str(effnet.MODEL),
        "output": str(out_path),
        "target": result.report["target"],
        "compile_seconds": round(compile_s, 3),
        "calibration_images": len(calib),
        "size_mb": {"fp32": round(size_fp32 / 1e6, 3), "int8": round(size_int8 / 1e6, 3)},
        "size_ratio": size_int8 / size_fp32,
        "latency_ms": {"fp32": lat_fp32, "int8": lat_int8},
        "latency_ratio": lat_int8 / lat_fp32,
        "runs": args.runs,
        "threads": effnet.THREADS,
        "eval_images": len(x_eval),
        "top1_agreement": fid["top1_agreement"],
        "logits_cosine": fid["logits_cosine"],
        "integer_nodes": integer,
        "float_nodes": len(float_nodes),
        "float_ops": float_ops,
    }

    print(f"compiled {effnet.MODEL.name} for {summary['target']} in {compile_s:.1f} s "
          f"({len(calib)} calibration images) -> {out_path}")
    print(f"  nodes     {integer} integer kernels; {len(float_nodes)} nodes left float"
          + (f" ({', '.join(float_ops)})" if float_ops else ""))
    print(f"  size      {size_fp32 / 1e6:.1f} MB -> {size_int8 / 1e6:.1f} MB  ({summary['size_ratio']:.2f}x)")
    print(f"  latency   {lat_fp32:.2f} ms -> {lat_int8:.2f} ms  ({summary['latency_ratio']:.2f}x; median of "
          f"{args.runs} interleaved runs, batch 1, {effnet.THREADS} threads)")
    print(f"  fidelity  top-1 agreement {fid['top1_agreement']:.2f}, mean logits cosine "
          f"{fid['logits_cosine']:.3f} vs fp32 on {len(x_eval)} eval images")
    effnet.write_json(args.json, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
