#!/usr/bin/env python
"""Where effnet_lite0's top-1 agreement is lost, and what float fallback buys back.

For each target: the default compile (64 calibration images), then ``qcompiler.analyze`` on
the issue's 150-image eval set (the 75 eval images and their mirror images) with no sample
limit, so its error split (every layer's weights quantized with float activations, and the
reverse) gives top-1 agreement and cosine of each half alone: the floor a compile keeping
every layer in integer on that target's grids cannot go below by range or rounding choices.

With ``--prefixes``, ort-cpu compiles with the first k layers of the accuracy budget's own
order (``compile(accuracy=...)``'s moved list) forced to float, measured as compiled
(onnxruntime, ORT_DISABLE_ALL) on the same 150 images, with latency against fp32 in the same
run (ORT_ENABLE_ALL, one intra-op thread, median of ``--runs``).

    python benchmarks/accuracy_floor.py [--bench-dir ../shared/bench] [--targets ort-cpu,npu-int8]
                                        [--prefixes 0,5,10,15,18,22] [--runs 40]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402
from accuracy_bench import effnet_eval_mirrored  # noqa: E402

import qcompiler  # noqa: E402

MODEL = "effnet_lite0"


def _session(model: Any, level: Any) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def _latency(model: Any, feed: dict[str, np.ndarray], runs: int) -> float:
    s = _session(model, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    for _ in range(5):
        s.run(None, feed)
    t = []
    for _ in range(runs):
        t0 = time.perf_counter()
        s.run(None, feed)
        t.append(time.perf_counter() - t0)
    return float(np.median(t))


def _fmt(o: dict[str, Any]) -> str:
    return f"{o.get('top1_agreement')} / {o['cosine']:.5f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bench-dir", default=str(bench.DEFAULT_BENCH_DIR))
    p.add_argument("--targets", default="ort-cpu,npu-int8")
    p.add_argument("--prefixes", default="0,5,10,15,18,22")
    p.add_argument("--runs", type=int, default=40)
    a = p.parse_args(argv)
    bench_dir = Path(a.bench_dir)
    fp32 = str(bench_dir / "models" / f"{MODEL}.onnx")
    ev = effnet_eval_mirrored(bench_dir, None)
    calib = bench.calibration_feeds(MODEL, bench_dir, 64)
    print(f"{MODEL}: 64 calibration images, {len(ev.feeds)} eval images (75 + mirrors); "
          "top-1 agreement / cosine of the logits against fp32")
    print("| target | compiled (fake-quant) | weights alone | activations alone | limited by |\n|---|---|---|---|---|")
    for target in a.targets.split(","):
        res = qcompiler.compile(fp32, target=target, calibration=calib)
        rep = qcompiler.analyze(fp32, res.proto, ev.feeds, target=target, limit=None)
        split = rep["error_split"]
        print(f"| {target} | {_fmt(rep['outputs']['logits'])} | {_fmt(split['weights_only']['logits'])} | "
              f"{_fmt(split['activations_only']['logits'])} | {split.get('limited_by', '-')} |", flush=True)
    if not a.prefixes or "ort-cpu" not in a.targets.split(","):
        return 0
    order = [m["node"] for m in qcompiler.compile(fp32, target="ort-cpu", calibration=calib,
                                                  accuracy="cosine>=0.9999").report["accuracy"]["moved"]]
    ref_s = _session(fp32, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    ref = [ref_s.run(None, f)[0][0] for f in ev.feeds]
    print("\nort-cpu, the first k layers of the budget's order forced to float (as compiled, "
          f"ORT_DISABLE_ALL; latency: 1 thread, median of {a.runs}, vs fp32 in the same run)\n")
    print("| k float | top-1 | cosine | latency vs fp32 |\n|---|---|---|---|")
    fp32_bytes = Path(fp32).read_bytes()
    for k in [int(x) for x in a.prefixes.split(",")]:
        res = qcompiler.compile(fp32, target="ort-cpu", calibration=calib,
                                plan_overrides={n: ("float", "accuracy_floor.py") for n in order[:k]})
        q = res.proto.SerializeToString()
        s = _session(q, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        got = [s.run(None, f)[0][0] for f in ev.feeds]
        m = bench.effnet_metrics(ref, got, None)
        l0, l1, l2 = _latency(fp32_bytes, ev.latency_feed, a.runs), _latency(q, ev.latency_feed, a.runs), \
            _latency(fp32_bytes, ev.latency_feed, a.runs)
        print(f"| {k} | {m['top1']:.3f} | {m['cos']:.5f} | {2 * l1 / (l0 + l2):.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
