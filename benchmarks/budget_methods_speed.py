"""The accuracy budget's method trial on and off, against the default compile, in one process.

    python benchmarks/budget_methods_speed.py [--bench-dir ../shared/bench] [--model effnet_lite0]
        [--budgets 'cosine>=0.998,cosine>=0.999'] [--repeat 1]

ort-cpu, the first 64 calibration images (the budget is checked on the report's held-out slice,
as budget_speed.py does). Per budget, the compile with the trial (``budget_methods.TRIAL_LAYERS``
as shipped) and without it (0) alternate, so both see the same machine load; each line gives the
seconds, the ratio to the default compile of the same run and the report's summary line.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (the bench's preprocessing)

import qcompiler  # noqa: E402
from qcompiler import budget_methods  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench-dir", type=Path, default=bench.DEFAULT_BENCH_DIR)
    ap.add_argument("--model", default="effnet_lite0")
    ap.add_argument("--budgets", default="cosine>=0.998,cosine>=0.999")
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args(argv)
    feeds = bench.calibration_feeds(args.model, args.bench_dir, 64)
    model = str(args.bench_dir / "models" / f"{args.model}.onnx")
    shipped = budget_methods.TRIAL_LAYERS
    t0 = time.perf_counter()
    qcompiler.compile(model, target="ort-cpu", calibration=feeds)
    base = time.perf_counter() - t0
    print(f"default: {base:.1f} s", flush=True)
    for budget in args.budgets.split(","):
        for _ in range(args.repeat):
            for layers in (shipped, 0):
                budget_methods.TRIAL_LAYERS = layers
                t0 = time.perf_counter()
                result = qcompiler.compile(model, target="ort-cpu", calibration=feeds, accuracy=budget)
                dt = time.perf_counter() - t0
                acc = result.report["accuracy"]
                trial = acc.get("method_trial", {})
                print(f"{budget} trial {'on' if layers else 'off'}: {dt:.1f} s ({dt / base:.2f}x the default "
                      f"compile; trial {trial.get('seconds', 0)} s): {acc['summary']}", flush=True)
    budget_methods.TRIAL_LAYERS = shipped
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
