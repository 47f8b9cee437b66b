"""Weight-only int4: qcompiler vs onnxruntime's MatMulNBitsQuantizer, in the same run.

    python benchmarks/weight_only_bench.py minilm [--bench ../shared/bench] [--work /tmp/wo]
    python benchmarks/weight_only_bench.py decoder --size 1.1b --work /tmp/wo

`minilm`: all-MiniLM-L6 at int4 block 32 on ort-cpu (qcompiler rtn / gptq / awq; onnxruntime's
default quantizer = its RTN, and its GPTQ where it runs): embedding cosine and recall@1 on the
600 eval samples, size vs fp32. `decoder`: a generated Llama-style decoder
(benchmarks/make_decoder.py, written under --work): compile time and peak RSS of each
compile (a child process each, peak = its VmHWM), single-token decode latency with a
128-token cache vs fp32, and next-token logits cosine vs fp32 on 8 prompts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_decoder import SIZES, build_decoder, decode_feed, prefill_feed  # noqa: E402


def _child(spec: dict) -> dict:
    """One compile (qcompiler or onnxruntime's quantizer), run inside a child process."""
    import onnx

    start = time.perf_counter()
    calib = None
    if spec.get("calib") == "minilm":
        from bench import calibration_feeds

        calib = calibration_feeds("minilm_l6", Path(spec["bench"]), 64)
    elif spec.get("calib") == "decoder":
        cfg = SIZES[spec["size"]]
        calib = [prefill_feed(cfg, 64, 1000 + i) for i in range(spec.get("samples", 8))]
    if spec["tool"] == "qcompiler":
        import qcompiler

        res = qcompiler.compile(spec["model"], target=spec.get("target", "ort-cpu"), mode="weight-only",
                                block_size=spec["block"], weight_algorithm=spec["algorithm"], calibration=calib)
        res.save(spec["out"])
    else:
        from onnxruntime.quantization import matmul_nbits_quantizer as mnq

        algo = None
        if spec["algorithm"] == "gptq":
            from onnxruntime.quantization.calibrate import CalibrationDataReader

            class Reader(CalibrationDataReader):
                def __init__(self) -> None:
                    self.it = iter(calib)

                def get_next(self):  # type: ignore[no-untyped-def]
                    return next(self.it, None)

            algo = mnq.GPTQWeightOnlyQuantConfig(calibration_data_reader=Reader(), block_size=spec["block"])
        model = onnx.load(spec["model"])
        q = mnq.MatMulNBitsQuantizer(model, block_size=spec["block"], is_symmetric=False, accuracy_level=4,
                                     algo_config=algo)
        q.process()
        q.model.save_model_to_file(spec["out"], use_external_data_format=q.model.model.ByteSize() > 2**31 - 2**24
                                   if _fits(q.model.model) else True)
    return {"seconds": time.perf_counter() - start}


def _fits(proto) -> bool:  # type: ignore[no-untyped-def]
    try:
        proto.ByteSize()
        return True
    except Exception:  # noqa: BLE001
        return False


def run_child(spec: dict) -> dict:
    """Run a compile in a child process; its wall time and peak RSS (VmHWM, polled)."""
    import tempfile

    err_file = tempfile.TemporaryFile(mode="w+")  # a pipe would fill up with the peer's log and block it
    out_file = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen([sys.executable, __file__, "_child", json.dumps(spec)], stdout=out_file,
                            stderr=err_file, text=True)
    peak = 0
    while True:
        try:
            with open(f"/proc/{proc.pid}/status") as fh:
                for line in fh:
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]))
        except OSError:
            pass
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)  # reaped here: its CPU time too
        if pid:
            break
        time.sleep(0.05)
    out_file.seek(0)
    out = out_file.read()
    err_file.seek(0)
    err = err_file.read()
    if os.waitstatus_to_exitcode(status) != 0:
        return {"error": (err.strip().splitlines() or ["?"])[-1]}
    res = json.loads(out.strip().splitlines()[-1])
    res["peak_rss_mb"] = peak / 1024
    res["cpu_seconds"] = usage.ru_utime + usage.ru_stime
    return res


def _size(path: str) -> int:
    data = Path(path + ".data")
    return os.path.getsize(path) + (data.stat().st_size if data.exists() else 0)


def _session(path: str, threads: int = 1) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def bench_minilm(a: argparse.Namespace) -> None:
    from bench import minilm_embed, minilm_eval, minilm_metrics

    model = str(Path(a.bench) / "models" / "minilm_l6.onnx")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    ev = minilm_eval(Path(a.bench), None)
    ref_sess = _session(model)
    ref = [minilm_embed(ref_sess.run(["last_hidden_state"], f)[0], f) for f in ev.feeds]
    fp32 = minilm_metrics(ref, ref, ev.context)
    print(f"minilm fp32: recall@1 {fp32['recall1']:.3f}, size {_size(model) / 1e6:.1f} MB ({ev.desc})")
    rows = [("qcompiler", "rtn", None), ("qcompiler", "gptq", "minilm"), ("qcompiler", "awq", "minilm"),
            ("onnxruntime", "rtn", None), ("onnxruntime", "gptq", "minilm")]
    for tool, alg, calib in rows:
        out = str(work / f"minilm_{tool}_{alg}.onnx")
        res = run_child({"tool": tool, "algorithm": alg, "model": model, "out": out, "block": a.block_size,
                         "calib": calib, "bench": a.bench})
        if "error" in res:
            print(f"{tool:12s} {alg:5s} not run: {res['error']}")
            continue
        sess = _session(out)
        emb = [minilm_embed(sess.run(["last_hidden_state"], f)[0], f) for f in ev.feeds]
        m = minilm_metrics(ref, emb, ev.context)
        print(f"{tool:12s} {alg:5s} block {a.block_size}: cosine {m['cos']:.4f}  recall@1 {m['recall1']:.3f} "
              f"(fp32 {fp32['recall1']:.3f})  size {_size(out) / _size(model):.3f}x  "
              f"compile {res['seconds']:.1f} s (CPU {res['cpu_seconds']:.1f} s), peak RSS {res['peak_rss_mb']:.0f} MB",
              flush=True)


def _latency(sess: ort.InferenceSession, feed: dict, runs: int) -> float:
    sess.run(None, feed)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_decoder(a: argparse.Namespace) -> None:
    cfg = SIZES[a.size]
    work = Path(a.work)
    model = str(work / f"decoder_{a.size}.onnx")
    if not Path(model).exists():
        t = time.perf_counter()
        build_decoder(cfg, model, seed=0)
        print(f"generated {model}: {cfg.params() / 1e9:.3f}B params in {time.perf_counter() - t:.0f} s")
    print(f"decoder {a.size}: {cfg.params() / 1e6:.0f}M params, fp32 {_size(model) / 1e9:.2f} GB")
    runs = []
    for tool, alg in [(t.split(":")[0], t.split(":")[1]) for t in a.runs.split(",")]:
        out = str(work / f"decoder_{a.size}_{tool}_{alg}.onnx")
        res = run_child({"tool": tool, "algorithm": alg, "model": model, "out": out, "block": a.block_size,
                         "calib": "decoder" if alg != "rtn" else None, "size": a.size, "samples": a.samples})
        if "error" in res:
            print(f"{tool:12s} {alg:5s} not run: {res['error']}")
            continue
        print(f"{tool:12s} {alg:5s} compile {res['seconds']:.1f} s (CPU {res['cpu_seconds']:.1f} s), "
              f"peak RSS {res['peak_rss_mb']:.0f} MB, "
              f"size {_size(out) / _size(model):.3f}x", flush=True)
        runs.append((tool, alg, out))
    dfeed = decode_feed(cfg, 128, 7)
    prompts = [prefill_feed(cfg, 32, 500 + i) for i in range(8)]
    ref = _session(model, a.threads)
    ref_lat = _latency(ref, dfeed, a.latency_runs)
    ref_logits = [ref.run(["logits"], p)[0][0, -1] for p in prompts]
    print(f"fp32 decode (1 token, 128-token cache, {a.threads} threads): {ref_lat * 1e3:.2f} ms", flush=True)
    del ref
    for tool, alg, out in runs:
        sess = _session(out, a.threads)
        lat = _latency(sess, dfeed, a.latency_runs)
        cos = [float(r @ q / (np.linalg.norm(r) * np.linalg.norm(q)))
               for r, q in zip(ref_logits, (sess.run(["logits"], p)[0][0, -1] for p in prompts))]
        print(f"{tool:12s} {alg:5s} decode {lat * 1e3:.2f} ms = {lat / ref_lat:.3f}x fp32, next-token logits "
              f"cosine {np.mean(cos):.4f} (min {np.min(cos):.4f})", flush=True)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "_child":
        print(json.dumps(_child(json.loads(sys.argv[2]))))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("minilm")
    m.add_argument("--bench", default=str(Path(__file__).resolve().parents[1] / ".." / "shared" / "bench"))
    m.add_argument("--work", default="/tmp/qcompiler-weight-only")
    m.add_argument("--block-size", type=int, default=32)
    d = sub.add_parser("decoder")
    d.add_argument("--size", choices=sorted(SIZES), default="small")
    d.add_argument("--work", default="/tmp/qcompiler-weight-only")
    d.add_argument("--block-size", type=int, default=32)
    d.add_argument("--runs", default="onnxruntime:rtn,qcompiler:rtn,qcompiler:awq")
    d.add_argument("--samples", type=int, default=8)
    d.add_argument("--threads", type=int, default=1)
    d.add_argument("--latency-runs", type=int, default=20)
    a = ap.parse_args()
    bench_minilm(a) if a.cmd == "minilm" else bench_decoder(a)


if __name__ == "__main__":
    main()
