"""Compile time of an accuracy-budget compile against the default compile, in one process.

    python benchmarks/budget_speed.py [--bench-dir ../shared/bench] [--budget 'cosine>=0.999'] [--repeat 2]

effnet_lite0 on ort-cpu, the first 64 calibration images (the report's fidelity on its held-out
slice, as a user without --eval-data runs it). Prints each compile's seconds, the budget's
summary line and the ratio to the default compile of the same run (issue 11: at most 3x).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (the bench's preprocessing)

import qcompiler  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench-dir", type=Path, default=bench.DEFAULT_BENCH_DIR)
    ap.add_argument("--budget", default="cosine>=0.999")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args(argv)
    feeds = bench.calibration_feeds("effnet_lite0", args.bench_dir, 64)
    model = str(args.bench_dir / "models" / "effnet_lite0.onnx")
    base = 0.0
    for accuracy in [None] + [args.budget] * args.repeat:
        t0 = time.perf_counter()
        result = qcompiler.compile(model, target="ort-cpu", calibration=feeds,
                                   **({} if accuracy is None else {"accuracy": accuracy}))
        dt = time.perf_counter() - t0
        acc = result.report.get("accuracy", {})
        base = base or dt
        print(f"{accuracy or 'default'}: {dt:.1f} s ({dt / base:.2f}x the default compile): "
              f"{acc.get('summary') or acc.get('status')}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
