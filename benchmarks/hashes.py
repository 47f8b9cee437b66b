#!/usr/bin/env python
"""Output hashes of every built-in target on the bench models: the byte-identity check of a refactor.

Compiles effnet_lite0, minilm_l6 (static and dynamic) and ppocrv4_det for every built-in target
(``targets/*.toml``) with a small fixed calibration set, and prints one line per combination:
the sha256 of the compiled model's bytes and the report's key fields (op counts after, lowered
and float node counts, a hash of the float-node reasons, the check verdict). A combination the
target rejects (no dynamic pipeline, ...) prints why. Run it before and after a refactor and
diff the two outputs::

    python benchmarks/hashes.py [../shared/bench] > before.txt

Calibration statistics stay at their defaults; ``--calib`` (default 8 samples) and ``--jobs``
(parallel compiles, default 2) keep the run within a few minutes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (the bench's preprocessing, shared on purpose)

import qcompiler  # noqa: E402
from qcompiler.errors import UserError  # noqa: E402
from qcompiler.target import builtin_targets  # noqa: E402

CASES = (("effnet_lite0", "static"), ("minilm_l6", "static"), ("minilm_l6", "dynamic"), ("ppocrv4_det", "static"))


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def compile_one(bench_dir: str, model: str, mode: str, target: str, calib: int) -> str:
    """One line: ``model mode target sha256 {key report fields}`` or ``... skipped: why``."""
    path = Path(bench_dir) / "models" / f"{model}.onnx"
    feeds = bench.calibration_feeds(model, Path(bench_dir), calib) if mode == "static" else None
    head = f"{model:13s} {mode:8s} {target:12s}"
    try:
        res = qcompiler.compile(str(path), target=target, mode=mode, calibration=feeds,
                               calibration_options=qcompiler.CalibrationOptions(workers=1))
    except UserError as exc:
        return f"{head} skipped: {exc}"
    rep = res.report
    key = {
        "ops_after": rep["ops_after"],
        "lowered": len(rep["lowered"]),
        "float_nodes": len(rep["float_nodes"]),
        "float_reasons": _digest(json.dumps(rep["float_nodes"], sort_keys=True).encode())[:12],
        "legal": rep.get("check", {}).get("legal"),
        "warnings": len(rep.get("check", {}).get("warnings", [])),
    }
    return f"{head} {_digest(res.proto.SerializeToString())} {json.dumps(key, sort_keys=True)}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bench", nargs="?", default="../shared/bench", help="bench directory (default ../shared/bench)")
    ap.add_argument("--calib", type=int, default=8, help="calibration samples per static compile (default 8)")
    ap.add_argument("--jobs", type=int, default=2, help="compiles run in parallel (default 2)")
    args = ap.parse_args(argv)
    if not (Path(args.bench) / "models").is_dir():
        print(f"hashes: {args.bench}: no models/ directory (pass the bench path)", file=sys.stderr)
        return 2
    combos = [(args.bench, m, mode, t, args.calib) for m, mode in CASES for t in sorted(builtin_targets())]
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for line in pool.map(compile_one, *zip(*combos)):
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
