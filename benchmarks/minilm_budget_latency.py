"""MiniLM latency: fp32, the static integer plan, the accuracy-budget compile (cosine>=0.99,
MatMuls to dynamic int8 per node) and dynamic mode, timed round-robin in one run (60 runs in 12
rounds, medians vs fp32): a shared machine's load drifts, and a 20-run two-model row moved
between 0.53x and 0.65x for the same model.

    python benchmarks/minilm_budget_latency.py [BENCH_DIR]
"""

import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402
import qcompiler  # noqa: E402

B = Path(sys.argv[1]) if len(sys.argv) > 1 else bench.DEFAULT_BENCH_DIR
feeds = bench.calibration_feeds("minilm_l6", B, 64)
ev = bench.minilm_eval(B, None)
fp32 = B / "models" / "minilm_l6.onnx"
tmp = Path(tempfile.mkdtemp())
variants = [bench.Variant("fp32", None, fp32)]
for label, kw in [("static-int8", dict(mode="static", accuracy="off")),
                  ("budget", dict(mode="static", accuracy="cosine>=0.99")),
                  ("dynamic", dict(mode="dynamic", accuracy="off"))]:
    r = qcompiler.compile(str(fp32), target="ort-cpu", calibration=feeds, eval_data=ev.feeds[:2], **kw)
    p = tmp / f"{label}.onnx"; r.save(p)
    print(label, (r.report.get("accuracy") or {}).get("summary", ""), flush=True)
    variants.append(bench.Variant(label, None, p))
for v in variants:
    so = bench.session_options(); so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    v.session = ort.InferenceSession(str(v.path), so, providers=["CPUExecutionProvider"])
bench.measure_latency(variants, ev.latency_feed, 60, 12)
med = {v.label: float(np.median(v.latencies_ms)) for v in variants}
print({k: f"{v:.2f} ms ({v / med['fp32']:.2f}x)" for k, v in med.items()})
