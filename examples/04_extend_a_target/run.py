"""Step 4: extend a built-in hardware target and see the partitions move.

    python examples/04_extend_a_target/run.py [--out DIR] [--json PATH]

Compiles EfficientNet-Lite0 for the built-in ``npu-int8`` target (an integer-only NPU; ops it
lacks run on the host in float) and for ``my-npu.toml``, which extends it with per-channel
weights and two more integer ops. Prints, for each: the integer partitions the compile report
lists (nodes, and the values that cross between host and NPU), the nodes left on the host and
why, and how closely onnxruntime's run of the output follows the float model on the 48 eval
images. Works from any directory.
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

MY_TARGET = HERE / "my-npu.toml"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Compile EfficientNet-Lite0 for npu-int8 and for a target extending it.")
    ap.add_argument("--out", type=Path, default=HERE / "out", help="output directory (default: %(default)s)")
    ap.add_argument("--json", type=Path, metavar="PATH", help="also write the numbers as JSON here")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    feeds = effnet.calibration_feeds(effnet.images("calib"))
    x_eval = effnet.images("eval")
    ref = effnet.logits(effnet.session(effnet.MODEL), x_eval)
    summary: dict[str, dict[str, Any]] = {}
    for target in ("npu-int8", MY_TARGET):
        tgt = qcompiler.load_target(target)
        out_path = args.out / f"effnet_lite0.{tgt.name}.onnx"
        result = qcompiler.compile(effnet.MODEL, target=tgt, calibration=feeds)
        result.save(out_path)
        parts = result.report["partitions"]
        # the nodes that stay on the host because the target has no integer rule for their op
        host = {name: why for name, why in result.report["float_nodes"].items() if "runs" in why}
        summary[tgt.name] = {
            "target_file": str(tgt.path),
            "output": str(out_path),
            "partitions": [{"nodes": len(p["nodes"]), "inputs": p["inputs"], "outputs": p["outputs"]} for p in parts],
            "host_ops": sorted({why.split(" runs ")[1].split(" in float")[0] for why in host.values()}),
            # an NPU model: onnxruntime runs it as written (its CPU kernels are not the NPU's)
            **effnet.fidelity(ref, effnet.logits(effnet.session(out_path, as_written=True), x_eval)),
        }

    for name, s in summary.items():
        print(f"== {name}: {len(s['partitions'])} integer partition(s)")
        for i, p in enumerate(s["partitions"]):
            print(f"   partition {i}: {p['nodes']:3d} nodes, in: {', '.join(p['inputs'])}; out: {', '.join(p['outputs'])}")
        print(f"   op types left on the host: {', '.join(s['host_ops']) or '-'}")
        print(f"   vs fp32 on {len(x_eval)} eval images: top-1 agreement {s['top1_agreement']:.3f}, "
              f"logits cosine {s['logits_cosine']:.3f}")
    effnet.write_json(args.json, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
