"""Step 2: add your own pass to the pipeline with a plugin file, from the command line.

    python examples/02_custom_pass/run.py [--out DIR] [--threshold T] [--json PATH]

Writes the bundled calibration images as ``DIR/calib.npz``, then runs the ``qcompiler`` CLI
twice on EfficientNet-Lite0: once with ort-cpu's default pipeline, once with
``--plugin my_pass.py`` and ``prune-small-weights`` inserted after ``fuse-pad-conv``. Prints
the commands, how many weights the pass zeroed (from the compile report) and how the two
compiled models differ. Works from any directory.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import effnet  # noqa: E402  (examples/effnet.py: bundled data + helpers)

import qcompiler  # noqa: E402

PLUGIN = HERE / "my_pass.py"
INSERT_AFTER = "fuse-pad-conv"


def with_pass(pipeline: str, spec: str, after: str) -> str:
    """``pipeline`` with the pass ``spec`` inserted right after the pass named ``after``."""
    passes = qcompiler.parse_pipeline(pipeline)
    names = [p.name for p in passes]
    if after not in names:
        raise SystemExit(f"pipeline has no '{after}': {pipeline}")
    i = names.index(after) + 1
    return qcompiler.format_pipeline(passes[:i] + qcompiler.parse_pipeline(spec) + passes[i:])


def qcompiler_cli(args: list[str]) -> None:
    """Run ``qcompiler ARGS`` (as ``python -m qcompiler.cli`` so no PATH set-up is needed)."""
    print("$ qcompiler " + " ".join(shlex.quote(a) for a in args), flush=True)
    proc = subprocess.run([sys.executable, "-m", "qcompiler.cli", *args], text=True, capture_output=True)
    sys.stdout.write(proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"qcompiler exited with {proc.returncode}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Compile EfficientNet-Lite0 with a plugin pass in the pipeline.")
    ap.add_argument("--out", type=Path, default=HERE / "out", help="output directory (default: %(default)s)")
    ap.add_argument("--threshold", type=float, default=1e-3,
                    help="prune-small-weights threshold (default: %(default)s)")
    ap.add_argument("--json", type=Path, metavar="PATH", help="also write the numbers as JSON here")
    args = ap.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    calib_path = out / "calib.npz"  # the CLI's calibration format: one array per input, samples on axis 0
    np.savez(calib_path, **{effnet.INPUT: effnet.images("calib")})

    default = qcompiler.load_target("ort-cpu").pipeline("static")  # what `qcompiler passes --target ort-cpu` prints
    custom = with_pass(default, f"prune-small-weights{{threshold={args.threshold:g}}}", INSERT_AFTER)
    common = [str(effnet.MODEL), "--target", "ort-cpu", "--calibration", str(calib_path)]
    paths = {"default": out / "effnet_lite0.int8.onnx", "pruned": out / "effnet_lite0.pruned.int8.onnx"}
    reports = {k: p.with_suffix(".report.json") for k, p in paths.items()}

    qcompiler_cli(["compile", *common, "-o", str(paths["default"]), "--report", str(reports["default"])])
    qcompiler_cli(["compile", *common, "-o", str(paths["pruned"]), "--report", str(reports["pruned"]),
                   "--plugin", str(PLUGIN), "--pipeline", custom])

    report = json.loads(reports["pruned"].read_text())
    stats = report["prune_small_weights"]
    blobs = {k: p.read_bytes() for k, p in paths.items()}
    x_eval = effnet.images("eval")
    ref = effnet.logits(effnet.session(effnet.MODEL), x_eval)
    got = {k: effnet.logits(effnet.session(p), x_eval) for k, p in paths.items()}
    fid = {k: effnet.fidelity(ref, v) for k, v in got.items()}
    summary = {
        "pipeline": report["pipeline"],
        "threshold": stats["threshold"],
        "pruned_weights": stats["pruned"],
        "total_weights": stats["total"],
        "pruned_tensors": stats["tensors"],
        "outputs": {k: str(p) for k, p in paths.items()},
        "bytes_identical": blobs["default"] == blobs["pruned"],
        "max_abs_logit_diff": float(np.max(np.abs(got["default"] - got["pruned"]))),
        "fidelity_vs_fp32": fid,
    }

    print(f"\nprune-small-weights{{threshold={stats['threshold']:g}}} zeroed {stats['pruned']} of "
          f"{stats['total']} weights ({100 * stats['pruned'] / max(stats['total'], 1):.1f}%) in "
          f"{stats['tensors']} tensors")
    print(f"compiled models {'are IDENTICAL' if summary['bytes_identical'] else 'differ'}: "
          f"max |logit difference| {summary['max_abs_logit_diff']:.3f} on {len(x_eval)} eval images")
    for k, f in fid.items():
        print(f"  {k:<8} vs fp32: top-1 agreement {f['top1_agreement']:.2f}, logits cosine {f['logits_cosine']:.3f}")
    effnet.write_json(args.json, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
