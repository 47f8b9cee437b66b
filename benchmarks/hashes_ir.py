"""Print the sha256 of every compiled bench model, one line per (model, mode, target).

A refactoring that must keep compiled outputs byte-identical runs this before and after and
diffs the two outputs. Calibration uses a small fixed set (the first N samples of the bench's
calibration split, preprocessed by bench.py), so a run takes minutes, not hours.

    python benchmarks/hashes_ir.py [--bench ../shared/bench] [--samples 8] > before.txt
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (the bench's preprocessing: the same feeds every run)

import qcompiler  # noqa: E402

TARGETS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "targets").glob("*.toml"))
CASES = [("effnet_lite0", "static"), ("minilm_l6", "static"), ("minilm_l6", "dynamic"), ("ppocrv4_det", "static")]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench", type=Path, default=Path(__file__).resolve().parents[1] / ".." / "shared" / "bench")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--targets", default=",".join(TARGETS))
    args = ap.parse_args(argv)
    feeds = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.onnx"
        for model, mode in CASES:
            if mode == "static" and model not in feeds:
                feeds[model] = bench.calibration_feeds(model, args.bench, args.samples)
            for target in args.targets.split(","):
                try:
                    result = qcompiler.compile(str(args.bench / "models" / f"{model}.onnx"), target=target,
                                               calibration=feeds.get(model) if mode == "static" else None,
                                               mode=mode)
                    result.save(out)
                    digest = hashlib.sha256(out.read_bytes()).hexdigest()
                except qcompiler.UserError as exc:
                    digest = f"error: {str(exc).splitlines()[0]}"
                print(f"{model:13s} {mode:8s} {target:12s} {digest}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
