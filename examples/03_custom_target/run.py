"""Step 3: describe your own target in TOML and compile for it.

    python examples/03_custom_target/run.py [--out DIR] [--json PATH]

Compiles EfficientNet-Lite0 twice with the Python API, for the built-in ``ort-cpu`` target and
for ``my-target.toml`` (which extends it: QDQ format, per-tensor weight scales), then prints
what each target changed in the output (op histograms) and how closely each follows the float
model on the 48 bundled eval images. Works from any directory.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import effnet  # noqa: E402  (examples/effnet.py: bundled data + helpers)

import qcompiler  # noqa: E402

MY_TARGET = HERE / "my-target.toml"
SHOWN_OPS = ("QLinearConv", "QLinearAdd", "QGemm", "QuantizeLinear", "DequantizeLinear", "Conv", "Add", "Gemm")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Compile EfficientNet-Lite0 for ort-cpu and for a custom TOML target.")
    ap.add_argument("--out", type=Path, default=HERE / "out", help="output directory (default: %(default)s)")
    ap.add_argument("--json", type=Path, metavar="PATH", help="also write the numbers as JSON here")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    feeds = effnet.calibration_feeds(effnet.images("calib"))
    x_eval = effnet.images("eval")
    ref = effnet.logits(effnet.session(effnet.MODEL), x_eval)
    summary: dict[str, dict[str, Any]] = {}
    for target in ("ort-cpu", MY_TARGET):
        tgt = qcompiler.load_target(target)  # a built-in name or a path to a .toml file
        out_path = args.out / f"effnet_lite0.{tgt.name}.onnx"
        result = qcompiler.compile(effnet.MODEL, target=tgt, calibration=feeds)
        size = result.save(out_path)
        fid = effnet.fidelity(ref, effnet.logits(effnet.session(out_path), x_eval))
        summary[tgt.name] = {
            "target_file": str(tgt.path),
            "format": result.report["format"],
            "weight_granularity": "per-channel" if tgt.op("Conv").weight.per_channel else "per-tensor",
            "output": str(out_path),
            "size_mb": round(size / 1e6, 3),
            "ops": effnet.op_histogram(out_path),
            **fid,
        }

    columns = list(summary.values())
    print(f"{'':<20}" + "".join(f"{name:>14}" for name in summary))
    for key in ("format", "weight_granularity", "size_mb"):
        print(f"{key:<20}" + "".join(f"{str(c[key]):>14}" for c in columns))
    print("ops in the output")
    for op in SHOWN_OPS:
        print(f"  {op:<18}" + "".join(f"{c['ops'].get(op, 0):>14}" for c in columns))
    print(f"vs fp32 on {len(x_eval)} eval images")
    for key in ("top1_agreement", "logits_cosine"):
        print(f"  {key:<18}" + "".join(f"{c[key]:>14.3f}" for c in columns))
    effnet.write_json(args.json, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
