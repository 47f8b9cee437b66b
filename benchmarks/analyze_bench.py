#!/usr/bin/env python
"""``qcompiler analyze`` on the three bench models: compile each for ort-cpu (64 calibration
samples, as benchmarks/bench.py does), analyze it on the first ``--limit`` eval samples, write
the HTML and JSON to ``--out``, a headless-Chromium screenshot of each page to
``docs/img/analyze_<model>.png``, and the timings (wall and CPU seconds of compile and analyze)
as a markdown table between the ``<!-- analyze:begin -->`` / ``<!-- analyze:end -->`` markers
of docs/benchmarks.md.

    python benchmarks/analyze_bench.py [BENCH_DIR] [--out out/analyze] [--limit 8]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402  (the bench material's preprocessing, one copy)

import qcompiler  # noqa: E402
from qcompiler.analysis import DEFAULT_LIMIT  # noqa: E402

MODELS = ("effnet_lite0", "minilm_l6", "ppocrv4_det")


def eval_feeds(model: str, bench_dir: Path, n: int) -> list[dict]:
    if model == "effnet_lite0":
        return [{"input": bench.effnet_preprocess(p)} for p in bench.image_files(bench_dir, "eval", n)]
    if model == "ppocrv4_det":
        return [{"x": bench.ppocr_preprocess(p)} for p in bench.image_files(bench_dir, "eval", n)]
    return [bench.load_npz_feed(p) for p in bench.minilm_files(bench_dir, "eval")[:n]]


def screenshot(html: Path, png: Path) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        print("no chromium: no screenshot", file=sys.stderr)
        return
    with tempfile.TemporaryDirectory() as prof:
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={prof}", "--hide-scrollbars", f"--screenshot={png}",
                        "--window-size=1280,1600", html.resolve().as_uri()], check=True, capture_output=True,
                       timeout=300)
    try:  # palette PNG: the screenshots stay small (Pillow is a bench dependency)
        from PIL import Image

        with Image.open(png) as im:
            im.convert("RGB").quantize(colors=64).save(png, optimize=True)
    except ImportError:
        pass


def timed(fn):  # -> (result, wall s, cpu s)
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bench_dir", nargs="?", default=str(bench.DEFAULT_BENCH_DIR))
    p.add_argument("--out", default=str(REPO_ROOT / "out" / "analyze"))
    p.add_argument("--limit", type=int, default=DEFAULT_LIMIT)
    p.add_argument("--calibration", type=int, default=64)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--md", default=str(REPO_ROOT / "docs" / "benchmarks.md"))
    a = p.parse_args(argv)
    bench_dir, out = Path(a.bench_dir), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (REPO_ROOT / "docs" / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for model in a.models.split(","):
        src = bench_dir / "models" / f"{model}.onnx"
        calib = bench.calibration_feeds(model, bench_dir, a.calibration)
        res, cw, cc = timed(lambda: qcompiler.compile(str(src), target="ort-cpu", calibration=calib))
        qpath = out / f"{model}.ort-cpu.onnx"
        res.save(qpath)
        feeds = eval_feeds(model, bench_dir, a.limit)
        rep, aw, ac = timed(lambda: qcompiler.analyze(src, qpath, feeds, html=out / f"analyze_{model}.html",
                                                      json_path=out / f"analyze_{model}.json", limit=a.limit))
        png = REPO_ROOT / "docs" / "img" / f"analyze_{model}.png"
        screenshot(out / f"analyze_{model}.html", png)
        outs = "; ".join(f"{k}: cos {v['cosine']}, {v['sqnr_db']} dB" + (f", top-1 {v['top1_agreement']}"
                                                                          if "top1_agreement" in v else "")
                         for k, v in rep["outputs"].items())
        fid = res.report["fidelity"]
        split = rep["error_split"]
        alone = "; ".join(f"{part}: " + ", ".join(f"cos {v['cosine']}, {v['sqnr_db']} dB"
                                                  for v in split[f"{part}_only"].values())
                          for part in ("weights", "activations"))
        row = (f"| {model} | {len(rep['layers'])} | {a.limit} | {cw:.1f} / {cc:.1f} | {aw:.1f} / {ac:.1f} | "
               f"{rep['ranking'][0]} | {outs} | {alone} ({split.get('limited_by', '-')}) |")
        rows.append(row)
        print(row, flush=True)
        print(f"  compile fidelity ({fid.get('held_out', fid.get('status'))}): "
              f"{json.dumps(fid.get('outputs'))}", flush=True)
    md = Path(a.md)
    table = ("<!-- analyze:begin -->\n"
             f"`python benchmarks/analyze_bench.py --limit {a.limit}` (ort-cpu, {a.calibration} calibration samples; "
             f"analysis on the first {a.limit} eval samples; {os.cpu_count()} cores)\n\n"
             "| model | integer layers | samples | compile s (wall / CPU) | analyze s (wall / CPU) | most sensitive "
             "layer | outputs (fake-quant) | alone (error split; limited by) |\n|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) +
             "\n<!-- analyze:end -->")
    text = md.read_text() if md.exists() else ""
    if "<!-- analyze:begin -->" in text:
        head, rest = text.split("<!-- analyze:begin -->", 1)
        text = head + table + rest.split("<!-- analyze:end -->", 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n## Accuracy analysis (`qcompiler analyze`)\n\n" + table + "\n"
    md.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
