#!/usr/bin/env python
"""What one more calibration sample costs, against what running the float model once costs.

A calibrator that observes activations must run the float model once per sample. So, on a
given machine, ``inference floor / ORT's cost per sample`` is the smallest calibration-time
ratio any such calibrator can reach once the sample count is large enough that fixed costs
(session build, planning, GPTQ statistics of the first samples) no longer count. This script
measures, in one process and on the same samples, per sample (medians of ``--reps``):

* ``plain, 2 ORT threads``: the float model, one session with onnxruntime's default threads;
* ``floor (2 lanes)``: the float model with nothing exposed, two samples in flight on two
  one-thread lanes sharing one session: the fastest way we know to run it on this machine;
* ``ORT MinMax collect_data``: onnxruntime's MinMax calibrator (on the ``quant_pre_process``'ed
  model, created once outside the timing) collecting the N2 samples: its time per sample;
* ``qcompiler marginal``: the ``calibrate`` pass (method minmax; ``all`` and ``ranges``
  statistics), the same difference.

    python benchmarks/calib_floor.py                     # both models, N1=64, N2=256
    python benchmarks/calib_floor.py --models minilm_l6 --reps 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench  # noqa: E402
from harness import ListReader  # noqa: E402
import calib_bench  # noqa: E402

MODELS = ("effnet_lite0", "minilm_l6")
FLOOR = "floor (2 lanes x 1 thread, nothing exposed)"
ORT = "ORT MinMax calibrator collect_data"


def _session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _lanes(sess: Any, feeds: list[bench.Feed], lanes: int = 2) -> None:
    """Samples k, k + lanes, ... on lane k: each a thread running the shared session."""
    def lane(k: int) -> None:
        for feed in feeds[k::lanes]:
            sess.run(None, feed)

    threads = [threading.Thread(target=lane, args=(k,)) for k in range(lanes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _ort_calibrator(pre: Path, scratch: Path) -> Any:
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    return create_calibrator(str(pre), None, augmented_model_path=str(scratch / "augmented.onnx"),
                             calibrate_method=CalibrationMethod.MinMax)


def _collect(cal: Any, feeds: list[bench.Feed]) -> None:
    cal.collect_data(ListReader(feeds))
    cal.intermediate_outputs = []  # what collect_data keeps per sample: dropped between repetitions


def _qcompiler(src: Path, feeds: list[bench.Feed], stats: str) -> float:
    import qcompiler

    res = qcompiler.compile(str(src), target="ort-cpu", calibration=feeds, stop_after="calibrate", check=False,
                            calibration_options=qcompiler.CalibrationOptions(method="minmax", statistics=stats))
    return float(res.report["calibration"]["seconds"])


def measure(model: str, args: argparse.Namespace, scratch: Path) -> list[tuple[str, float]]:
    src = args.bench / "models" / f"{model}.onnx"
    pre = calib_bench.preprocess_for_ort(model, args.bench, scratch)
    n1, n2 = args.samples
    feeds = calib_bench.load_feeds(model, args.bench, n2)
    plain2, lane1, cal = _session(src, 0), _session(src, 1), _ort_calibrator(pre, scratch)
    per = 1000.0 / len(feeds)
    timed: dict[str, list[float]] = {}
    for _ in range(args.reps):  # interleaved, so the machine's drift hits all three alike
        for name, fn in (("plain, 2 ORT threads", lambda: [plain2.run(None, f) for f in feeds]),
                         (FLOOR, lambda: _lanes(lane1, feeds)),
                         (ORT, lambda: _collect(cal, feeds))):
            t = time.perf_counter()
            fn()
            timed.setdefault(name, []).append((time.perf_counter() - t) * per)
    rows = [(name, statistics.median(v)) for name, v in timed.items()]

    def marginal(run: Callable[[list[bench.Feed]], float | None]) -> float:
        small, large = [], []
        for _ in range(args.reps):  # interleaved, so drift hits both sizes alike
            for size, into in ((n1, small), (n2, large)):
                t = time.perf_counter()
                inner = run(feeds[:size])
                into.append(inner if inner is not None else time.perf_counter() - t)
        return (statistics.median(large) - statistics.median(small)) / (n2 - n1) * 1000.0

    for stats in ("all", "ranges"):
        rows.append((f"qcompiler calibrate minmax ({stats}), marginal", marginal(lambda fs, s=stats: _qcompiler(src, fs, s))))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bench", type=Path, default=calib_bench.DEFAULT_BENCH)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--samples", default="64,256", help="N1,N2: the marginal cost is (t(N2) - t(N1)) / (N2 - N1)")
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)
    args.samples = tuple(int(s) for s in args.samples.split(","))
    if len(args.samples) != 2 or not 0 < args.samples[0] < args.samples[1]:
        p.error("--samples: N1,N2 with 0 < N1 < N2")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if bad := [m for m in models if m not in MODELS]:
        p.error(f"--models: unknown {', '.join(bad)}")
    with tempfile.TemporaryDirectory(prefix="qc-calib-floor-") as tmp:
        for model in models:
            rows = measure(model, args, Path(tmp))
            ort = dict(rows)[ORT]
            floor = dict(rows)[FLOOR]
            print(f"\n{model} (ms per sample, medians of {args.reps}; marginal: N = {args.samples[0]} and "
                  f"{args.samples[1]})")
            for name, ms in rows:
                print(f"  {name:<48} {ms:7.2f}   {ms / ort:5.2f}x ORT's")
            print(f"  -> a calibrator that runs the float model once per sample spends at least {floor / ort:.2f}x "
                  f"ORT's time per sample on this machine")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
